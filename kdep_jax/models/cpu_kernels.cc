// kdep_jax's XLA:CPU kernels (built and registered by cpu_kernels.py): the two gradients of a depthwise
// convolution, NHWC input x (N, H, W, C), HWIO kernel (k, k, 1, C), output gradient dy (N, Ho, Wo, C).
//
// XLA runs each as k*k passes over the batch, copying a shifted window out in each; here one pass over each
// image row does all k*k taps, with the row in cache and, for the weight gradient, each tap's sum over the row in
// registers. The weight gradient's per-image sums are float64 partials, added in image order at the end, so
// neither result depends on how many threads ran or which images each took.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// A rank-4 float32 buffer, named: the comma of its template arguments would split the handler macro's arguments.
using Float32x4d = ffi::Buffer<ffi::F32, 4>;

constexpr int64_t kLanes = 16;  // channels per register-held sum (one AVX-512 vector, two AVX2 ones)

int64_t FloorDiv(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

struct Shape {
  int64_t height, width, channels, out_height, out_width, k, stride, pad_top, pad_left;
};

// The range [first, end) of output columns wo whose tap j reads an input column wo * stride + j - pad_left
// inside [0, width).
struct Columns {
  int64_t first, end;
};

Columns TapColumns(const Shape& s, int64_t j) {
  return {std::max<int64_t>(0, -FloorDiv(j - s.pad_left, s.stride)),
          std::min<int64_t>(s.out_width, FloorDiv(s.width - 1 + s.pad_left - j, s.stride) + 1)};
}

// Adds to partial (k*k, C) the products of each tap's window of one image's x with its dy.
void AddWeightGradient(const float* x, const float* dy, double* partial, const Shape& s) {
  const int64_t c = s.channels;
  for (int64_t ho = 0; ho < s.out_height; ++ho) {
    const float* dy_row = dy + ho * s.out_width * c;
    for (int64_t i = 0; i < s.k; ++i) {
      const int64_t hi = ho * s.stride + i - s.pad_top;
      if (hi < 0 || hi >= s.height) continue;
      const float* x_row = x + hi * s.width * c;
      for (int64_t j = 0; j < s.k; ++j) {
        const Columns columns = TapColumns(s, j);
        const float* x_tap = x_row + (j - s.pad_left) * c;
        double* tap = partial + (i * s.k + j) * c;
        int64_t c0 = 0;
        for (; c0 + kLanes <= c; c0 += kLanes) {
          float sum[kLanes] = {};
          for (int64_t wo = columns.first; wo < columns.end; ++wo) {
            const float* xp = x_tap + wo * s.stride * c + c0;
            const float* dp = dy_row + wo * c + c0;
            for (int64_t l = 0; l < kLanes; ++l) sum[l] += xp[l] * dp[l];
          }
          for (int64_t l = 0; l < kLanes; ++l) tap[c0 + l] += sum[l];
        }
        for (; c0 < c; ++c0) {
          float sum = 0.0f;
          for (int64_t wo = columns.first; wo < columns.end; ++wo) {
            sum += x_tap[wo * s.stride * c + c0] * dy_row[wo * c + c0];
          }
          tap[c0] += sum;
        }
      }
    }
  }
}

// Writes one image's input gradient dx: each output position's gradient times each tap's weights, added where
// that tap read the input, row by row and 16 channels at a time.
void InputGradient(const float* dy, const float* kernel, float* dx, const Shape& s) {
  const int64_t c = s.channels;
  for (int64_t hi = 0; hi < s.height; ++hi) {
    float* dx_row = dx + hi * s.width * c;
    std::fill(dx_row, dx_row + s.width * c, 0.0f);
    for (int64_t i = 0; i < s.k; ++i) {
      // Tap row i of output row ho reads input row ho * stride + i - pad_top.
      const int64_t offset = hi + s.pad_top - i;
      if (offset < 0 || offset % s.stride != 0 || offset / s.stride >= s.out_height) continue;
      const float* dy_row = dy + offset / s.stride * s.out_width * c;
      for (int64_t j = 0; j < s.k; ++j) {
        const Columns columns = TapColumns(s, j);
        const float* weights = kernel + (i * s.k + j) * c;
        float* dx_tap = dx_row + (j - s.pad_left) * c;
        int64_t c0 = 0;
        for (; c0 + kLanes <= c; c0 += kLanes) {
          float weight[kLanes];
          for (int64_t l = 0; l < kLanes; ++l) weight[l] = weights[c0 + l];
          for (int64_t wo = columns.first; wo < columns.end; ++wo) {
            float* __restrict__ dxp = dx_tap + wo * s.stride * c + c0;
            const float* __restrict__ dyp = dy_row + wo * c + c0;
            for (int64_t l = 0; l < kLanes; ++l) dxp[l] += dyp[l] * weight[l];
          }
        }
        for (; c0 < c; ++c0) {
          for (int64_t wo = columns.first; wo < columns.end; ++wo) {
            dx_tap[wo * s.stride * c + c0] += dy_row[wo * c + c0] * weights[c0];
          }
        }
      }
    }
  }
}

// Images handed out one at a time to the calling thread and to helpers on XLA's thread pool. The caller waits
// only for images already taken, so a helper that XLA starts late (its threads busy) finds none left and ends.
struct Images {
  std::atomic<int64_t> next{0};
  int64_t done = 0;
  std::mutex mutex;
  std::condition_variable all_done;
};

// Runs image(0) ... image(n - 1) on the calling thread and on helpers from XLA's thread pool.
template <typename F>
void ForEachImage(ffi::ThreadPool& pool, int64_t n, F image) {
  auto images = std::make_shared<Images>();
  auto work = [=]() {
    for (int64_t index; (index = images->next.fetch_add(1)) < n;) {
      image(index);
      std::lock_guard<std::mutex> lock(images->mutex);
      if (++images->done == n) images->all_done.notify_all();
    }
  };
  for (int64_t helper = 1; helper < std::min<int64_t>(pool.num_threads(), n); ++helper) {
    pool.Schedule([images, n, work]() {
      if (images->next.load() < n) work();
    });
  }
  work();
  std::unique_lock<std::mutex> lock(images->mutex);
  images->all_done.wait(lock, [&] { return images->done == n; });
}

// The shape of a depthwise conv from its input, output and kernel sizes; false where they do not fit together.
bool ConvShape(ffi::Span<const int64_t> x, ffi::Span<const int64_t> dy, ffi::Span<const int64_t> kernel,
               int64_t stride, int64_t pad_top, int64_t pad_left, Shape* s) {
  *s = Shape{x[1], x[2], x[3], dy[1], dy[2], kernel[0], stride, pad_top, pad_left};
  return dy[0] == x[0] && dy[3] == x[3] && kernel[1] == kernel[0] && kernel[2] == 1 && kernel[3] == x[3] &&
         stride >= 1;
}

ffi::Error DepthwiseWeightGradient(ffi::ThreadPool pool, Float32x4d x, Float32x4d dy, ffi::Result<Float32x4d> dw,
                                   int64_t stride, int64_t pad_top, int64_t pad_left) {
  Shape s;
  if (!ConvShape(x.dimensions(), dy.dimensions(), dw->dimensions(), stride, pad_top, pad_left, &s)) {
    return ffi::Error::InvalidArgument("kdep_depthwise_weight_gradient: shapes that do not fit together");
  }
  const int64_t n = x.dimensions()[0], taps = s.k * s.k * s.channels;
  std::vector<double> partials(n * taps, 0.0);
  const float* x_data = x.typed_data();
  const float* dy_data = dy.typed_data();
  double* partials_data = partials.data();
  ForEachImage(pool, n, [=](int64_t image) {
    AddWeightGradient(x_data + image * s.height * s.width * s.channels,
                      dy_data + image * s.out_height * s.out_width * s.channels, partials_data + image * taps, s);
  });
  float* out = dw->typed_data();
  for (int64_t t = 0; t < taps; ++t) {
    double sum = 0.0;
    for (int64_t image = 0; image < n; ++image) sum += partials_data[image * taps + t];
    out[t] = static_cast<float>(sum);
  }
  return ffi::Error::Success();
}

ffi::Error DepthwiseInputGradient(ffi::ThreadPool pool, Float32x4d dy, Float32x4d kernel, ffi::Result<Float32x4d> dx,
                                  int64_t stride, int64_t pad_top, int64_t pad_left) {
  Shape s;
  if (!ConvShape(dx->dimensions(), dy.dimensions(), kernel.dimensions(), stride, pad_top, pad_left, &s)) {
    return ffi::Error::InvalidArgument("kdep_depthwise_input_gradient: shapes that do not fit together");
  }
  const float* dy_data = dy.typed_data();
  const float* kernel_data = kernel.typed_data();
  float* dx_data = dx->typed_data();
  ForEachImage(pool, dx->dimensions()[0], [=](int64_t image) {
    InputGradient(dy_data + image * s.out_height * s.out_width * s.channels, kernel_data,
                  dx_data + image * s.height * s.width * s.channels, s);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KdepDepthwiseWeightGradient, DepthwiseWeightGradient,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Float32x4d>()
                                  .Arg<Float32x4d>()
                                  .Ret<Float32x4d>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(KdepDepthwiseInputGradient, DepthwiseInputGradient,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Float32x4d>()
                                  .Arg<Float32x4d>()
                                  .Ret<Float32x4d>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left"));
