// kdep_jax's XLA:CPU kernels (built and registered by cpu_kernels.py).
//
// KdepDepthwiseWeightGradient: the weight gradient of a depthwise convolution, NHWC input x (N, H, W, C) and
// output gradient dy (N, Ho, Wo, C), into dw (k, k, 1, C). XLA runs it as k*k passes over the batch, each
// copying a shifted window of x out; here one pass over each image keeps a tap's sum over a row in registers.
// Each image's sums go into float64 partials, added in image order at the end: the result does not depend on
// how many threads ran or which images each took.
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

// Adds to partial (k*k, C) the products of each tap's window of one image's x with its dy.
void AddImage(const float* x, const float* dy, double* partial, const Shape& s) {
  const int64_t c = s.channels;
  for (int64_t ho = 0; ho < s.out_height; ++ho) {
    const float* dy_row = dy + ho * s.out_width * c;
    for (int64_t i = 0; i < s.k; ++i) {
      const int64_t hi = ho * s.stride + i - s.pad_top;
      if (hi < 0 || hi >= s.height) continue;
      const float* x_row = x + hi * s.width * c;
      for (int64_t j = 0; j < s.k; ++j) {
        // Output column wo reads input column wo * stride + j - pad_left: inside x for wo in [first, end).
        const int64_t first = std::max<int64_t>(0, -FloorDiv(j - s.pad_left, s.stride));
        const int64_t end = std::min<int64_t>(s.out_width, FloorDiv(s.width - 1 + s.pad_left - j, s.stride) + 1);
        const float* x_tap = x_row + (j - s.pad_left) * c;
        double* tap = partial + (i * s.k + j) * c;
        int64_t c0 = 0;
        for (; c0 + kLanes <= c; c0 += kLanes) {
          float sum[kLanes] = {};
          for (int64_t wo = first; wo < end; ++wo) {
            const float* xp = x_tap + wo * s.stride * c + c0;
            const float* dp = dy_row + wo * c + c0;
            for (int64_t l = 0; l < kLanes; ++l) sum[l] += xp[l] * dp[l];
          }
          for (int64_t l = 0; l < kLanes; ++l) tap[c0 + l] += sum[l];
        }
        for (; c0 < c; ++c0) {
          float sum = 0.0f;
          for (int64_t wo = first; wo < end; ++wo) sum += x_tap[wo * s.stride * c + c0] * dy_row[wo * c + c0];
          tap[c0] += sum;
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

ffi::Error DepthwiseWeightGradient(ffi::ThreadPool pool, Float32x4d x, Float32x4d dy, ffi::Result<Float32x4d> dw,
                                   int64_t stride, int64_t pad_top, int64_t pad_left) {
  const auto x_dims = x.dimensions(), dy_dims = dy.dimensions(), dw_dims = dw->dimensions();
  const int64_t n = x_dims[0];
  const Shape s{x_dims[1], x_dims[2], x_dims[3], dy_dims[1], dy_dims[2], dw_dims[0], stride, pad_top, pad_left};
  if (dy_dims[0] != n || dy_dims[3] != s.channels || dw_dims[1] != s.k || dw_dims[2] != 1 ||
      dw_dims[3] != s.channels || stride < 1) {
    return ffi::Error::InvalidArgument("kdep_depthwise_weight_gradient: inconsistent shapes");
  }
  const int64_t taps = s.k * s.k * s.channels;
  std::vector<double> partials(n * taps, 0.0);
  const float* x_data = x.typed_data();
  const float* dy_data = dy.typed_data();
  double* partials_data = partials.data();
  auto images = std::make_shared<Images>();
  auto work = [=]() {
    for (int64_t image; (image = images->next.fetch_add(1)) < n;) {
      AddImage(x_data + image * s.height * s.width * s.channels,
               dy_data + image * s.out_height * s.out_width * s.channels, partials_data + image * taps, s);
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
