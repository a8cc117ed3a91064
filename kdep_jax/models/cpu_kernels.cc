// kdep_jax's XLA:CPU kernels (built and registered by cpu_kernels.py): weight gradients of convolutions that
// XLA:CPU runs far below the CPU's speed, from the NHWC input x (N, H, W, Cin) and output gradient dy
// (N, Ho, Wo, Cout) into the HWIO kernel's gradient dw (k, k, Cin or 1, Cout).
//
// - KdepDepthwiseWeightGradient: a depthwise conv (Cin == Cout, dw (k, k, 1, C)). XLA runs it as k*k passes over
//   the batch, each copying a shifted window of x out of memory.
// - KdepConvWeightGradient: a dense conv with few weights (a stem on the RGB image, whose contraction XLA hands
//   to Eigen only Cin = 3 long, or a ResNet's 56 px convs, which Eigen runs at half this kernel's speed). Its
//   float64 partials hold the whole weight gradient, so it is fast while they fit in the L2 cache.
//
// Both make one pass over each image's rows and keep each tap's sums over a row in registers, 16 or 32 output
// channels at a time. Each image's sums go into float64 partials, added in image order at the end, so the
// result does not depend on how many threads ran or which images each took.
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

int64_t FloorDiv(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

struct Shape {
  int64_t height, width, in_channels, out_height, out_width, out_channels, k, stride, pad_top, pad_left;
};

// Calls row(x_tap, dy_row, first, end, tap) for each output row of one image and each tap (i, j) whose input
// row is inside x: output column wo of the row reads x_tap[wo * stride * in_channels ...], inside x for wo in
// [first, end); tap = i * k + j.
template <typename F>
void ForEachTapRow(const float* x, const float* dy, const Shape& s, F row) {
  for (int64_t ho = 0; ho < s.out_height; ++ho) {
    const float* dy_row = dy + ho * s.out_width * s.out_channels;
    for (int64_t i = 0; i < s.k; ++i) {
      const int64_t hi = ho * s.stride + i - s.pad_top;
      if (hi < 0 || hi >= s.height) continue;
      const float* x_row = x + hi * s.width * s.in_channels;
      for (int64_t j = 0; j < s.k; ++j) {
        // Output column wo reads input column wo * stride + j - pad_left.
        const int64_t first = std::max<int64_t>(0, -FloorDiv(j - s.pad_left, s.stride));
        const int64_t end = std::min<int64_t>(s.out_width, FloorDiv(s.width - 1 + s.pad_left - j, s.stride) + 1);
        row(x_row + (j - s.pad_left) * s.in_channels, dy_row, first, end, i * s.k + j);
      }
    }
  }
}

constexpr int64_t kDepthwiseLanes = 16;  // one AVX-512 vector, two AVX2 ones

// Adds to partial (k*k, C) the products of each tap's window of one image's x with its dy.
void AddDepthwiseImage(const float* x, const float* dy, double* partial, const Shape& s) {
  const int64_t c = s.in_channels;
  ForEachTapRow(x, dy, s, [&](const float* x_tap, const float* dy_row, int64_t first, int64_t end, int64_t t) {
    double* tap = partial + t * c;
    int64_t c0 = 0;
    for (; c0 + kDepthwiseLanes <= c; c0 += kDepthwiseLanes) {
      float sum[kDepthwiseLanes] = {};
      for (int64_t wo = first; wo < end; ++wo) {
        const float* xp = x_tap + wo * s.stride * c + c0;
        const float* dp = dy_row + wo * c + c0;
        for (int64_t l = 0; l < kDepthwiseLanes; ++l) sum[l] += xp[l] * dp[l];
      }
      for (int64_t l = 0; l < kDepthwiseLanes; ++l) tap[c0 + l] += sum[l];
    }
    for (; c0 < c; ++c0) {
      float sum = 0.0f;
      for (int64_t wo = first; wo < end; ++wo) sum += x_tap[wo * s.stride * c + c0] * dy_row[wo * c + c0];
      tap[c0] += sum;
    }
  });
}

constexpr int64_t kDenseLanes = 32;

// Adds to tap (Cin, Cout) one row's products of input channels ci0 ... ci0 + kIn - 1 of the tap's window with
// the output gradient, kDenseLanes output channels at a time.
template <int kIn>
void AddDenseTapRow(const float* x_tap, const float* dy_row, int64_t first, int64_t end, int64_t ci0,
                    const Shape& s, double* tap) {
  const int64_t cin = s.in_channels, cout = s.out_channels;
  int64_t co0 = 0;
  for (; co0 + kDenseLanes <= cout; co0 += kDenseLanes) {
    float sum[kIn][kDenseLanes] = {};
    for (int64_t wo = first; wo < end; ++wo) {
      const float* xp = x_tap + wo * s.stride * cin + ci0;
      const float* dp = dy_row + wo * cout + co0;
      for (int q = 0; q < kIn; ++q) {
        for (int64_t l = 0; l < kDenseLanes; ++l) sum[q][l] += xp[q] * dp[l];
      }
    }
    for (int q = 0; q < kIn; ++q) {
      for (int64_t l = 0; l < kDenseLanes; ++l) tap[(ci0 + q) * cout + co0 + l] += sum[q][l];
    }
  }
  for (; co0 < cout; ++co0) {
    for (int q = 0; q < kIn; ++q) {
      float sum = 0.0f;
      for (int64_t wo = first; wo < end; ++wo) sum += x_tap[wo * s.stride * cin + ci0 + q] * dy_row[wo * cout + co0];
      tap[(ci0 + q) * cout + co0] += sum;
    }
  }
}

constexpr int64_t kDenseInputBlock = 8;  // 8 x 32 sums: 16 AVX-512 registers (1.25x faster than 4 x 32)

// Adds to partial (k*k, Cin, Cout) the products of each tap's window of one image's x with its dy, up to
// kDenseInputBlock input channels at a time.
void AddDenseImage(const float* x, const float* dy, double* partial, const Shape& s) {
  const int64_t cin = s.in_channels, cout = s.out_channels;
  ForEachTapRow(x, dy, s, [&](const float* x_tap, const float* dy_row, int64_t first, int64_t end, int64_t t) {
    double* tap = partial + t * cin * cout;
    for (int64_t ci0 = 0; ci0 < cin; ci0 += kDenseInputBlock) {
      switch (std::min<int64_t>(kDenseInputBlock, cin - ci0)) {
        case 8: AddDenseTapRow<8>(x_tap, dy_row, first, end, ci0, s, tap); break;
        case 7: AddDenseTapRow<7>(x_tap, dy_row, first, end, ci0, s, tap); break;
        case 6: AddDenseTapRow<6>(x_tap, dy_row, first, end, ci0, s, tap); break;
        case 5: AddDenseTapRow<5>(x_tap, dy_row, first, end, ci0, s, tap); break;
        case 4: AddDenseTapRow<4>(x_tap, dy_row, first, end, ci0, s, tap); break;
        case 3: AddDenseTapRow<3>(x_tap, dy_row, first, end, ci0, s, tap); break;
        case 2: AddDenseTapRow<2>(x_tap, dy_row, first, end, ci0, s, tap); break;
        default: AddDenseTapRow<1>(x_tap, dy_row, first, end, ci0, s, tap);
      }
    }
  });
}

// Images handed out one at a time to the calling thread and to helpers on XLA's thread pool. The caller waits
// only for images already taken, so a helper that XLA starts late (its threads busy) finds none left and ends.
struct Images {
  std::atomic<int64_t> next{0};
  int64_t done = 0;
  std::mutex mutex;
  std::condition_variable all_done;
};

// dw = the sum over images of add_image's float64 partials, added in image order.
template <typename F>
ffi::Error WeightGradient(ffi::ThreadPool& pool, Float32x4d& x, Float32x4d& dy, ffi::Result<Float32x4d>& dw,
                          int64_t stride, int64_t pad_top, int64_t pad_left, bool depthwise, F add_image) {
  const auto x_dims = x.dimensions(), dy_dims = dy.dimensions(), dw_dims = dw->dimensions();
  const int64_t n = x_dims[0];
  const Shape s{x_dims[1], x_dims[2], x_dims[3], dy_dims[1], dy_dims[2], dy_dims[3], dw_dims[0],
                stride, pad_top, pad_left};
  const bool shapes_fit = dy_dims[0] == n && dw_dims[1] == s.k && dw_dims[3] == s.out_channels && stride >= 1 &&
                          (depthwise ? dw_dims[2] == 1 && s.in_channels == s.out_channels
                                     : dw_dims[2] == s.in_channels);
  if (!shapes_fit) return ffi::Error::InvalidArgument("kdep_jax CPU kernel: shapes that do not fit together");
  const int64_t taps = dw->element_count();
  std::vector<double> partials(n * taps, 0.0);
  const float* x_data = x.typed_data();
  const float* dy_data = dy.typed_data();
  double* partials_data = partials.data();
  auto images = std::make_shared<Images>();
  auto work = [=]() {
    for (int64_t image; (image = images->next.fetch_add(1)) < n;) {
      add_image(x_data + image * s.height * s.width * s.in_channels,
                dy_data + image * s.out_height * s.out_width * s.out_channels, partials_data + image * taps, s);
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
  {
    std::unique_lock<std::mutex> lock(images->mutex);
    images->all_done.wait(lock, [&] { return images->done == n; });
  }
  float* out = dw->typed_data();
  for (int64_t t = 0; t < taps; ++t) {
    double sum = 0.0;
    for (int64_t image = 0; image < n; ++image) sum += partials_data[image * taps + t];
    out[t] = static_cast<float>(sum);
  }
  return ffi::Error::Success();
}

ffi::Error DepthwiseWeightGradient(ffi::ThreadPool pool, Float32x4d x, Float32x4d dy, ffi::Result<Float32x4d> dw,
                                   int64_t stride, int64_t pad_top, int64_t pad_left) {
  return WeightGradient(pool, x, dy, dw, stride, pad_top, pad_left, /*depthwise=*/true, AddDepthwiseImage);
}

ffi::Error ConvWeightGradient(ffi::ThreadPool pool, Float32x4d x, Float32x4d dy, ffi::Result<Float32x4d> dw,
                              int64_t stride, int64_t pad_top, int64_t pad_left) {
  return WeightGradient(pool, x, dy, dw, stride, pad_top, pad_left, /*depthwise=*/false, AddDenseImage);
}

}  // namespace

#define KDEP_WEIGHT_GRADIENT_HANDLER(name, function)         \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, function,              \
                                ffi::Ffi::Bind()             \
                                    .Ctx<ffi::ThreadPool>()  \
                                    .Arg<Float32x4d>()       \
                                    .Arg<Float32x4d>()       \
                                    .Ret<Float32x4d>()       \
                                    .Attr<int64_t>("stride") \
                                    .Attr<int64_t>("pad_top") \
                                    .Attr<int64_t>("pad_left"))

KDEP_WEIGHT_GRADIENT_HANDLER(KdepDepthwiseWeightGradient, DepthwiseWeightGradient);
KDEP_WEIGHT_GRADIENT_HANDLER(KdepConvWeightGradient, ConvWeightGradient);
