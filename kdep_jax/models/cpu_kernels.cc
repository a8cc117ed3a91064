// kdep_jax's XLA:CPU kernels (built and registered by cpu_kernels.py) for convolutions that XLA:CPU runs below
// the CPU's speed, on NHWC inputs x (N, H, W, Cin), outputs and output gradients dy (N, Ho, Wo, Cout) and HWIO
// kernels (k, k, Cin or 1, Cout).
//
// - KdepConv: a dense conv's forward pass, which XLA runs through Eigen at 75-100% of this kernel's speed.
// - KdepWinogradConv, KdepWinogradConv4x4: a dense 3x3 conv with stride 1 (forward pass, and input gradient: a conv
//   of dy with the kernel turned round) by Winograd's F(2x2, 3x3), 16 products per 2x2 tile where the direct conv
//   takes 36, or F(4x4, 3x3), 36 per 4x4 tile where it takes 144.
// - KdepConvInputGradient: a dense conv's input gradient, any stride (Eigen: 20% of this kernel's speed for a
//   ResNet's 56 px stride-2 conv, on one thread; 70-85% for the others).
// - KdepDepthwiseWeightGradient: a depthwise conv's weight gradient (Cin == Cout, dw (k, k, 1, C)). XLA runs it
//   as k*k passes over the batch, each copying a shifted window of x out of memory.
// - KdepDepthwiseInputGradient: a depthwise conv's input gradient, which XLA runs as k*k shifted, padded products
//   added in fused loops (alone at 45-70% of this kernel's speed at MobileNetV2's 112 to 28 px, level at 14 px).
// - KdepConvWeightGradient: a dense conv's weight gradient (a stem's on the RGB image XLA hands to Eigen as a
//   contraction only Cin = 3 long; Eigen runs a ResNet's 56 and 28 px convs' at a half to two thirds of this
//   kernel's speed).
// - KdepWinogradWeightGradient: a 3x3 conv's weight gradient with stride 1 by Winograd's F(2x2, 3x3); and
//   KdepWinogradWeightGradientOfActivation, that of a conv of relu(x * scale + shift) (a BatchNorm's affine map and a
//   ReLU), computed from x as the kernel reads it, so that the backward pass need not keep the activation.
// - KdepMaxPool, KdepMaxPoolGradient: a max-pool (ResNet's stem pool) that also gives the tap that holds each
//   output's maximum, and its input gradient from those taps, so that the backward pass keeps an int8 per output
//   instead of the pool's input (XLA, given both from the input, keeps its k*k windows until the backward pass).
// - KdepBatchMoments, KdepBatchMomentsBfloat16: not a conv, a BatchNorm's batch statistics in training, in one
//   pass over x where XLA wrote x in float32 (from bfloat16) and x less its mean before reducing each.
// - KdepAttention: not a conv, multi-head attention's core softmax(q k^T / sqrt(d)) v (ViT's), below.
// - KdepDense: not a conv either, a Linear layer's product x w (the transformers'), below.
// - KdepAmxConv: a dense conv's forward pass in bfloat16 (float32 sums) on the AMX tiles of an Intel Xeon, which
//   XLA:CPU does not use (its bfloat16 convs are slower than its float32 ones), below; with a ResNet block's BatchNorm
//   and ReLU applied to its input, and its end (BatchNorm, residual, ReLU) to its output. KdepAmxConvWeightGradient:
//   its weight gradient on the tiles. KdepAmxPatchConv, KdepAmxPatchConvWeightGradient: the same for a conv whose input
//   channels do not fit the tiles' blocks (a stem's RGB image), by its patches, to float32 sums;
//   KdepAmxPatchConvMaxPool, KdepAmxPatchConvPoolStatistics, KdepAmxPatchConvPoolWeightGradient: a ResNet stem's conv
//   and max-pool (in training with its batch statistics) in one kernel, and its weight gradient.
//
// The weight gradients keep each tap's sums over many pixels in registers, kSumLanes output channels at a time.
// The sums of each image (of each chunk of images, for a dense conv: as many as the shapes say) go into float64
// partials, added in image order at the end, so the result does not depend on how many threads ran or which
// images each took.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <utility>
#include <vector>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// A rank-4 float32 buffer, named: the comma of its template arguments would split the handler macro's arguments.
using Float32x4d = ffi::Buffer<ffi::F32, 4>;
using Int8x4d = ffi::Buffer<ffi::S8, 4>;
using Float32x1d = ffi::Buffer<ffi::F32, 1>;
using Bfloat16x4d = ffi::Buffer<ffi::BF16, 4>;

int64_t FloorDiv(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

struct Shape {
  int64_t height, width, in_channels, out_height, out_width, out_channels, k, stride, pad_top, pad_left;
};

// One register of floats: GCC keeps a vector wider than the CPU's registers in memory, not in two registers.
#if defined(__AVX512F__)
using Vector = float __attribute__((vector_size(64), aligned(4)));  // 16 floats: one AVX-512 register
#else
using Vector = float __attribute__((vector_size(32), aligned(4)));  // 8 floats: one AVX2 register
#endif
constexpr int64_t kLanes = sizeof(Vector) / sizeof(float);
using DoubleVector = double __attribute__((vector_size(64)));  // 8 doubles
using HalfVector = float __attribute__((vector_size(32), aligned(4)));  // 8 floats, converted to and from doubles
constexpr int64_t kVectorOutBlock = 32;  // the output channels of a block of the dense kernels' weights

// The micro-kernels' register blocking: AVX-512 has 32 vector registers, AVX2 16, and a kernel keeps its sums in
// at most 28 or 12 of them, so that none spill to memory.
#if defined(__AVX512F__)
constexpr int64_t kSumLanes = 32;  // the output channels whose sums a dense micro-kernel keeps at once
constexpr int kSumRows = 14;  // the pixels (forward pass) or input channels (weight gradient) it keeps them for
constexpr int kDepthwiseColumnTaps = 7;  // column taps whose sums a depthwise band keeps at once, 2 vectors each
#else
constexpr int64_t kSumLanes = 16;
constexpr int kSumRows = 6;
constexpr int kDepthwiseColumnTaps = 6;
#endif

inline Vector Load(const float* from) {  // kLanes floats, wherever they lie
  Vector v;
  std::memcpy(&v, from, sizeof(Vector));
  return v;
}

// The columns [first, end) of an output row whose input column, wo * stride + j - pad_left, is inside x.
std::pair<int64_t, int64_t> TapColumns(const Shape& s, int64_t j) {
  return {std::max<int64_t>(0, -FloorDiv(j - s.pad_left, s.stride)),
          std::min<int64_t>(s.out_width, FloorDiv(s.width - 1 + s.pad_left - j, s.stride) + 1)};
}

// Copies an image row (`width` pixels of `channels`) into `row` from its column `left` on, as far as its
// `row_width` columns reach, with zeros around.
void CopyPaddedRow(const float* image_row, int64_t width, int64_t channels, int64_t left, int64_t row_width,
                   float* row) {
  const int64_t first = std::clamp<int64_t>(left, 0, row_width);
  const int64_t end = std::clamp<int64_t>(left + width, first, row_width);
  std::fill_n(row, first * channels, 0.0f);
  std::copy_n(image_row + (first - left) * channels, (end - first) * channels, row + first * channels);
  std::fill(row + end * channels, row + row_width * channels, 0.0f);
}

// A conv's input given as what it is computed from: relu(x * scale + shift), per input channel (a BatchNorm's
// affine map and `layers.relu`: a NaN stays), so that the caller need not keep it; none where scale is null.
struct InputActivation {
  const float* scale = nullptr;
  const float* shift = nullptr;
};

// Copies the rows first_row ... first_row + rows - 1 of one image of x (N, H, W, Cin) into `out`, each as
// CopyPaddedRow does from column pad_left on, padded_width pixels apart; rows outside the image are zeros. With an
// activation, its values in place of x's (the padding stays zero).
void CopyPaddedRows(const float* image, const Shape& s, int64_t first_row, int64_t rows, int64_t padded_width,
                    float* out, InputActivation activation = {}) {
  const int64_t cin = s.in_channels, row_pitch = padded_width * cin;
  const int64_t first = std::clamp<int64_t>(s.pad_left, 0, padded_width);
  const int64_t end = std::clamp<int64_t>(s.pad_left + s.width, first, padded_width);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t hi = first_row + r;
    float* row = out + r * row_pitch;
    if (hi < 0 || hi >= s.height) {
      std::fill_n(row, row_pitch, 0.0f);
      continue;
    }
    CopyPaddedRow(image + hi * s.width * cin, s.width, cin, s.pad_left, padded_width, row);
    if (activation.scale == nullptr) continue;
    for (int64_t column = first; column < end; ++column) {
      float* __restrict pixel = row + column * cin;
      for (int64_t ci = 0; ci < cin; ++ci) {
        const float value = pixel[ci] * activation.scale[ci] + activation.shift[ci];
        pixel[ci] = value < 0.0f ? 0.0f : value;
      }
    }
  }
}

constexpr int64_t kDepthwiseLanes = kLanes;
constexpr int64_t kDepthwiseBandPixels = 112;  // output pixels per band of rows, at least (or the whole image)

// Adds to taps (kTaps column taps j0 ... j0 + kTaps - 1 of tap row i, C channels each) the products of one image's
// x with its dy over the output rows [ho0, ho1), for the channels c0 ... c0 + 15. Each tap's sums stay in two
// registers over the band, even and odd output columns apart, so that 2 * kTaps chains of FMAs run side by side;
// the columns where one of the taps falls outside x are added one at a time.
//
// columns[j]: TapColumns(s, j); [inner_first, inner_end): the columns where all kTaps taps are inside x.
template <int kTaps>
void AddDepthwiseBandTaps(const float* x, const float* dy, int64_t ho0, int64_t ho1, int64_t i, int64_t j0,
                          int64_t c0, const std::pair<int64_t, int64_t>* columns, int64_t inner_first,
                          int64_t inner_end, double* taps, const Shape& s) {
  const int64_t c = s.in_channels, x_step = s.stride * c;
  Vector even[kTaps] = {}, odd[kTaps] = {};
  for (int64_t ho = ho0; ho < ho1; ++ho) {
    const int64_t hi = ho * s.stride + i - s.pad_top;
    if (hi < 0 || hi >= s.height) continue;
    const float* dy_row = dy + ho * s.out_width * c + c0;
    // Output column wo, tap j0 + t reads x_tap + wo * stride * C + t * C.
    const float* x_tap = x + (hi * s.width + j0 - s.pad_left) * c + c0;
    int64_t wo = inner_first;
    for (; wo + 1 < inner_end; wo += 2) {
      const Vector dy0 = Load(dy_row + wo * c), dy1 = Load(dy_row + (wo + 1) * c);
      const float* x0 = x_tap + wo * x_step;
#pragma GCC unroll 7
      for (int t = 0; t < kTaps; ++t) {
        even[t] += Load(x0 + t * c) * dy0;
        odd[t] += Load(x0 + x_step + t * c) * dy1;
      }
    }
    auto add_column = [&](int64_t column) {
      const Vector d = Load(dy_row + column * c);
#pragma GCC unroll 7
      for (int t = 0; t < kTaps; ++t) {
        const auto [first, end] = columns[j0 + t];
        if (column >= first && column < end) even[t] += Load(x_tap + column * x_step + t * c) * d;
      }
    };
    if (wo < inner_end) add_column(wo);
    for (int64_t column = 0; column < inner_first; ++column) add_column(column);
    for (int64_t column = inner_end; column < s.out_width; ++column) add_column(column);
  }
#pragma GCC unroll 7
  for (int t = 0; t < kTaps; ++t) {
    const Vector sum = even[t] + odd[t];
    for (int l = 0; l < kDepthwiseLanes; ++l) taps[(j0 + t) * c + c0 + l] += sum[l];
  }
}

// Adds to partial (k*k, C) the products of each tap's window of one image's x with its dy: band by band of output
// rows, for each tap row, its column taps (up to kDepthwiseColumnTaps at a time) a vector of channels at a time,
// then the channels left one at a time.
void AddDepthwiseImage(const float* x, const float* dy, double* partial, const Shape& s) {
  const int64_t c = s.in_channels;
  std::vector<std::pair<int64_t, int64_t>> columns(s.k), inner(s.k);  // inner: of the taps j0 ... j0 + 6
  for (int64_t j = 0; j < s.k; ++j) columns[j] = TapColumns(s, j);
  for (int64_t j0 = 0; j0 < s.k; j0 += kDepthwiseColumnTaps) {
    inner[j0] = {0, s.out_width};
    for (int64_t j = j0; j < std::min<int64_t>(s.k, j0 + kDepthwiseColumnTaps); ++j) {
      inner[j0] = {std::max(inner[j0].first, columns[j].first), std::min(inner[j0].second, columns[j].second)};
    }
    inner[j0].second = std::max(inner[j0].first, inner[j0].second);
  }
  const int64_t band = std::max<int64_t>(1, kDepthwiseBandPixels / std::max<int64_t>(1, s.out_width));
  for (int64_t ho0 = 0; ho0 < s.out_height; ho0 += band) {
    const int64_t ho1 = std::min(s.out_height, ho0 + band);
    for (int64_t i = 0; i < s.k; ++i) {
      double* taps = partial + i * s.k * c;
      for (int64_t c0 = 0; c0 + kDepthwiseLanes <= c; c0 += kDepthwiseLanes) {
        for (int64_t j0 = 0; j0 < s.k; j0 += kDepthwiseColumnTaps) {
          const auto [first, end] = inner[j0];
          switch (std::min<int64_t>(kDepthwiseColumnTaps, s.k - j0)) {
#define KDEP_DEPTHWISE_CASE(n) \
  case n: AddDepthwiseBandTaps<n>(x, dy, ho0, ho1, i, j0, c0, columns.data(), first, end, taps, s); break;
            KDEP_DEPTHWISE_CASE(7) KDEP_DEPTHWISE_CASE(6) KDEP_DEPTHWISE_CASE(5) KDEP_DEPTHWISE_CASE(4)
            KDEP_DEPTHWISE_CASE(3) KDEP_DEPTHWISE_CASE(2)
#undef KDEP_DEPTHWISE_CASE
            default: AddDepthwiseBandTaps<1>(x, dy, ho0, ho1, i, j0, c0, columns.data(), first, end, taps, s);
          }
        }
      }
      for (int64_t ho = ho0; ho < ho1; ++ho) {
        const int64_t hi = ho * s.stride + i - s.pad_top;
        if (hi < 0 || hi >= s.height) continue;
        const float* x_row = x + hi * s.width * c;
        const float* dy_row = dy + ho * s.out_width * c;
        for (int64_t j = 0; j < s.k; ++j) {
          const auto [first, end] = columns[j];
          for (int64_t ch = c / kDepthwiseLanes * kDepthwiseLanes; ch < c; ++ch) {
            float sum = 0.0f;
            for (int64_t wo = first; wo < end; ++wo) {
              sum += x_row[(wo * s.stride + j - s.pad_left) * c + ch] * dy_row[wo * c + ch];
            }
            taps[j * c + ch] += sum;
          }
        }
      }
    }
  }
}

// Adds to tap (kIn, Cout) the products of kIn input channels with the output gradient over a band of pixels,
// summed in registers kSumLanes output channels at a time. pixels(add_pixel) calls add_pixel(xp, dp) for each pixel of
// the band: its kIn input values at xp, its output gradient's channels from dy_channel0 on at dp.
template <int kIn, typename Pixels>
void AddTapBand(Pixels pixels, int64_t co_begin, int64_t co_end, int64_t cout, double* tap, int64_t dy_channel0) {
  int64_t co0 = co_begin;
  constexpr int V = kSumLanes / kLanes;  // vectors of sums per input channel
  for (; co0 + kSumLanes <= co_end; co0 += kSumLanes) {
    Vector sum[kIn][V] = {};
    pixels([&](const float* xp, const float* dp) {
      Vector d[V];
      for (int v = 0; v < V; ++v) std::memcpy(&d[v], dp + co0 - dy_channel0 + kLanes * v, sizeof(Vector));
      for (int q = 0; q < kIn; ++q) {
        for (int v = 0; v < V; ++v) sum[q][v] += xp[q] * d[v];
      }
    });
    for (int q = 0; q < kIn; ++q) {
      for (int v = 0; v < V; ++v) {
        for (int l = 0; l < kLanes; ++l) tap[q * cout + co0 + kLanes * v + l] += sum[q][v][l];
      }
    }
  }
  for (; co0 < co_end; ++co0) {
    float sum[kIn] = {};
    pixels([&](const float* xp, const float* dp) {
      for (int q = 0; q < kIn; ++q) sum[q] += xp[q] * dp[co0 - dy_channel0];
    });
    for (int q = 0; q < kIn; ++q) tap[q * cout + co0] += sum[q];
  }
}

constexpr int64_t kDenseInputBlock = kSumRows;

// AddTapBand over `channels` input channels, kDenseInputBlock at a time: pixels(ci0, add_pixel) passes add_pixel
// the values from channel ci0 on; tap (channels, Cout).
template <typename Pixels>
void AddTapBands(int64_t channels, Pixels pixels, int64_t co_begin, int64_t co_end, int64_t cout, double* tap,
                 int64_t dy_channel0 = 0) {
  for (int64_t ci0 = 0; ci0 < channels; ci0 += kDenseInputBlock) {
    auto from_ci0 = [&](auto add_pixel) { pixels(ci0, add_pixel); };
    double* block = tap + ci0 * cout;
    switch (std::min(kDenseInputBlock, channels - ci0)) {
#define KDEP_DENSE_CASE(n) \
  case n: AddTapBand<n>(from_ci0, co_begin, co_end, cout, block, dy_channel0); break;
      KDEP_DENSE_CASE(14) KDEP_DENSE_CASE(13) KDEP_DENSE_CASE(12) KDEP_DENSE_CASE(11) KDEP_DENSE_CASE(10)
      KDEP_DENSE_CASE(9) KDEP_DENSE_CASE(8) KDEP_DENSE_CASE(7) KDEP_DENSE_CASE(6) KDEP_DENSE_CASE(5)
      KDEP_DENSE_CASE(4) KDEP_DENSE_CASE(3) KDEP_DENSE_CASE(2)
#undef KDEP_DENSE_CASE
      default: AddTapBand<1>(from_ci0, co_begin, co_end, cout, block, dy_channel0);
    }
  }
}

constexpr int64_t kDenseBandPixels = 512;  // output pixels per band, at least (1.0-1.3x faster than 1024 or 2048)
constexpr int64_t kDenseChunkPixels = 56 * 56;  // output pixels per chunk of images, at least

// Adds to partial (k*k, Cin, Cout) the products of each tap's window of a chunk of images' x with their dy, for
// output channels [co_begin, co_end). A band of rows at a time, whose x and dy stay in the L2 cache while each
// tap and block of channels passes over them.
//
// Inputs narrower than kDenseInputBlock channels (a stem's RGB image) would fill few of the registers: their bands
// stay inside one image, and the rows of x a band reads are copied, zero-padded, to scratch memory, where a row of
// taps (i, 0 ... k - 1) reads k * Cin consecutive values at each pixel, as one run of channels (ResNet's stem: 7
// runs of 21, not 49 of 3).
void AddDenseChunk(const float* x, const float* dy, int64_t images, int64_t co_begin, int64_t co_end,
                   double* partial, const Shape& s) {
  const int64_t cin = s.in_channels, cout = s.out_channels;
  const int64_t band = std::max<int64_t>(1, (kDenseBandPixels + s.out_width - 1) / std::max<int64_t>(1, s.out_width));
  if (cin < kDenseInputBlock) {
    const int64_t padded_width = (s.out_width - 1) * s.stride + s.k, row_pitch = padded_width * cin;
    std::vector<float> scratch(((band - 1) * s.stride + s.k) * row_pitch);
    for (int64_t image = 0; image < images; ++image) {
      for (int64_t ho0 = 0; ho0 < s.out_height; ho0 += band) {
        const int64_t ho1 = std::min(s.out_height, ho0 + band);
        CopyPaddedRows(x + image * s.height * s.width * cin, s, ho0 * s.stride - s.pad_top,
                       (ho1 - ho0 - 1) * s.stride + s.k, padded_width, scratch.data());
        for (int64_t i = 0; i < s.k; ++i) {
          auto pixels = [&](int64_t ci0, auto add_pixel) {
            for (int64_t ho = ho0; ho < ho1; ++ho) {
              const float* x_row = scratch.data() + ((ho - ho0) * s.stride + i) * row_pitch + ci0;
              const float* dy_row = dy + (image * s.out_height + ho) * s.out_width * cout;
              for (int64_t wo = 0; wo < s.out_width; ++wo) add_pixel(x_row + wo * s.stride * cin, dy_row + wo * cout);
            }
          };
          AddTapBands(s.k * cin, pixels, co_begin, co_end, cout, partial + i * s.k * cin * cout);
        }
      }
    }
    return;
  }
  // With stride 1, per band, the rows of x it reads are copied to scratch memory in blocks of kDenseInputBlock
  // channels, (blocks, rows, columns, kDenseInputBlock), so that a pass over the band's pixels for one block reads
  // consecutive memory, not pixels Cin floats apart, in the same few sets of the caches at 512 channels; its output
  // gradients alike, in blocks of kVectorOutBlock channels of [co_begin, co_end), (blocks, pixels, 32). ResNet-18's
  // 7, 14 and 56 px weight gradients 1.13-1.2x faster alone, 28 px level; with stride 2, where each pixel copied
  // serves a quarter as many taps, copying x made its 14 px one 0.9x as fast (Intel Xeon with AVX-512 and AMX).
  const bool copy_x = s.stride == 1;
  const int64_t x_pitch = copy_x ? kDenseInputBlock : cin;  // between the columns of a row of x as the taps read it
  const int64_t rows = images * s.out_height;
  // A band's rows of x: per image it reaches, from its first row's first tap row to its last row's last.
  auto first_x_row = [&](int64_t ho) { return std::max<int64_t>(0, ho * s.stride - s.pad_top); };
  auto end_x_row = [&](int64_t ho) { return std::min(s.height, ho * s.stride - s.pad_top + s.k); };
  int64_t max_slots = 0;  // the most rows of x a band reads
  for (int64_t r0 = 0; r0 < rows && copy_x; r0 += band) {
    int64_t slots = 0;
    for (int64_t r = r0, r1 = std::min(rows, r0 + band); r < r1;) {
      const int64_t image = r / s.out_height, last = std::min(r1, (image + 1) * s.out_height) - 1;
      slots += std::max<int64_t>(0, end_x_row(last % s.out_height) - first_x_row(r % s.out_height));
      r = last + 1;
    }
    max_slots = std::max(max_slots, slots);
  }
  const int64_t blocks = (cin + kDenseInputBlock - 1) / kDenseInputBlock, block_pitch = max_slots * s.width;
  std::vector<float> x_copy(blocks * block_pitch * kDenseInputBlock);
  // Per image, the row of x (or of x_copy, whose rows before the band's first are not there) holding its row 0.
  std::vector<int64_t> row0_of_image(images);
  for (int64_t image = 0; image < images; ++image) row0_of_image[image] = image * s.height;
  const float* x_rows = copy_x ? x_copy.data() : x;
  const int64_t channel_step = copy_x ? block_pitch : 1;  // x_rows + ci0 * channel_step: channel ci0's values
  const int64_t band_pixels = band * s.out_width;
  const int64_t dy_blocks = (co_end - co_begin + kVectorOutBlock - 1) / kVectorOutBlock;
  std::vector<float> dy_copy(dy_blocks * band_pixels * kVectorOutBlock);
  // A tap's pixels in the band as offsets into x_rows and dy_copy, one loop over the band rather than one per row,
  // whose exits cost most at 7 px (ResNet-18's stride-2 14 px and its 7 px weight gradients 1.1x and 1.04x faster).
  std::vector<int64_t> offsets;
  for (int64_t r0 = 0; r0 < rows; r0 += band) {
    const int64_t r1 = std::min(rows, r0 + band);
    for (int64_t r = r0, slot = 0; r < r1 && copy_x;) {
      const int64_t image = r / s.out_height, last = std::min(r1, (image + 1) * s.out_height) - 1;
      const int64_t hi0 = first_x_row(r % s.out_height), hi1 = end_x_row(last % s.out_height);
      row0_of_image[image] = slot - hi0;
      for (int64_t hi = hi0; hi < hi1; ++hi, ++slot) {
        const float* x_row = x + (image * s.height + hi) * s.width * cin;
        for (int64_t b = 0; b < blocks; ++b) {
          const int64_t c0 = b * kDenseInputBlock, width = std::min(kDenseInputBlock, cin - c0);
          float* to = x_copy.data() + (b * block_pitch + slot * s.width) * kDenseInputBlock;
          for (int64_t w = 0; w < s.width; ++w) {
            std::memcpy(to + w * kDenseInputBlock, x_row + w * cin + c0, width * sizeof(float));
          }
        }
      }
      r = last + 1;
    }
    for (int64_t p = 0; p < (r1 - r0) * s.out_width; ++p) {
      for (int64_t b = 0; b < dy_blocks; ++b) {
        const int64_t c0 = co_begin + b * kVectorOutBlock, width = std::min(kVectorOutBlock, co_end - c0);
        std::memcpy(dy_copy.data() + (b * band_pixels + p) * kVectorOutBlock, dy + (r0 * s.out_width + p) * cout + c0,
                    width * sizeof(float));
      }
    }
    for (int64_t i = 0; i < s.k; ++i) {
      for (int64_t j = 0; j < s.k; ++j) {
        const auto [first, end] = TapColumns(s, j);
        offsets.clear();
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t image = r / s.out_height, ho = r % s.out_height, hi = ho * s.stride + i - s.pad_top;
          if (hi < 0 || hi >= s.height) continue;
          // Output column wo reads x at x_row + wo * stride * x_pitch.
          const int64_t x_row = ((row0_of_image[image] + hi) * s.width + j - s.pad_left) * x_pitch;
          for (int64_t wo = first; wo < end; ++wo) {
            offsets.push_back(x_row + wo * s.stride * x_pitch);
            offsets.push_back(((r - r0) * s.out_width + wo) * kVectorOutBlock);
          }
        }
        for (int64_t b = 0; b < dy_blocks; ++b) {
          const int64_t c0 = co_begin + b * kVectorOutBlock;
          const float* dy_block = dy_copy.data() + b * band_pixels * kVectorOutBlock;
          auto pixels = [&](int64_t ci0, auto add_pixel) {
            const float* x_block = x_rows + ci0 * channel_step;
            for (size_t p = 0; p < offsets.size(); p += 2) add_pixel(x_block + offsets[p], dy_block + offsets[p + 1]);
          };
          AddTapBands(cin, pixels, c0, std::min(co_end, c0 + kVectorOutBlock), cout,
                      partial + (i * s.k + j) * cin * cout, c0);
        }
      }
    }
  }
}

// Tasks handed out one at a time to the calling thread and to helpers on XLA's thread pool. The caller waits
// only for tasks already taken, so a helper that XLA starts late (its threads busy) finds none left and ends.
struct Tasks {
  std::atomic<int64_t> next{0};
  int64_t done = 0;
  std::mutex mutex;
  std::condition_variable all_done;
};

// Runs make_worker()(task) for task = 0 ... count - 1 on up to pool.num_threads() threads. A thread makes its
// worker (its scratch memory) once it has taken a task, while the caller is still waiting: a helper that finds
// no task left touches nothing the caller owns.
template <typename MakeWorker>
void ParallelFor(ffi::ThreadPool& pool, int64_t count, MakeWorker make_worker) {
  auto tasks = std::make_shared<Tasks>();
  auto work = [=]() {
    int64_t task = tasks->next.fetch_add(1);
    if (task >= count) return;
    auto worker = make_worker();
    for (; task < count; task = tasks->next.fetch_add(1)) {
      worker(task);
      std::lock_guard<std::mutex> lock(tasks->mutex);
      if (++tasks->done == count) tasks->all_done.notify_all();
    }
  };
  for (int64_t helper = 1; helper < std::min<int64_t>(pool.num_threads(), count); ++helper) {
    pool.Schedule([work] { work(); });
  }
  work();
  std::unique_lock<std::mutex> lock(tasks->mutex);
  tasks->all_done.wait(lock, [&] { return tasks->done == count; });
}

// dw = finish(the sum over chunks of images of their float64 partials, added in chunk order): chunk_images images
// per chunk, as the shapes say (never the threads). add(x, dy, images, part_begin, part_end, partial, shape) adds
// the products of a chunk's parts [part_begin, part_end) (of `parts`: blocks of 32 output channels, or what the
// caller splits its sums by) to its partial (partial_size values; dw's own, unless finish maps them to dw); each
// chunk's parts are split into groups so that there are tasks for every thread.
template <typename F, typename Finish>
ffi::Error WeightGradient(ffi::ThreadPool& pool, Float32x4d& x, Float32x4d& dy, ffi::Result<Float32x4d>& dw,
                          int64_t stride, int64_t pad_top, int64_t pad_left, bool depthwise, int64_t chunk_pixels,
                          int64_t parts, int64_t partial_size, F add, Finish finish) {
  const auto x_dims = x.dimensions(), dy_dims = dy.dimensions(), dw_dims = dw->dimensions();
  const int64_t n = x_dims[0];
  const Shape s{x_dims[1], x_dims[2], x_dims[3], dy_dims[1], dy_dims[2], dy_dims[3], dw_dims[0],
                stride, pad_top, pad_left};
  const bool shapes_fit = dy_dims[0] == n && dw_dims[1] == s.k && dw_dims[3] == s.out_channels && stride >= 1 &&
                          (depthwise ? dw_dims[2] == 1 && s.in_channels == s.out_channels
                                     : dw_dims[2] == s.in_channels);
  if (!shapes_fit) return ffi::Error::InvalidArgument("kdep_jax CPU kernel: shapes that do not fit together");
  const int64_t out_pixels = std::max<int64_t>(1, s.out_height * s.out_width);
  const int64_t chunk_images =
      std::clamp<int64_t>((chunk_pixels + out_pixels - 1) / out_pixels, 1, std::max<int64_t>(n, 1));
  const int64_t chunks = (n + chunk_images - 1) / chunk_images;
  const int64_t groups = std::clamp<int64_t>(4 * pool.num_threads() / std::max<int64_t>(chunks, 1), 1, parts);
  std::vector<double> partials(chunks * partial_size, 0.0);
  const float* x_data = x.typed_data();
  const float* dy_data = dy.typed_data();
  double* partials_data = partials.data();
  ParallelFor(pool, chunks * groups, [&]() {
    return [&](int64_t task) {
      const int64_t chunk = task / groups, group = task % groups, first_image = chunk * chunk_images;
      add(x_data + first_image * s.height * s.width * s.in_channels,
          dy_data + first_image * s.out_height * s.out_width * s.out_channels,
          std::min(chunk_images, n - first_image), group * parts / groups, (group + 1) * parts / groups,
          partials_data + chunk * partial_size, s);
    };
  });
  // Added into the first chunk's partials, in chunk order: a second buffer of sums (19 MB for a 3x3 conv with 512
  // channels), allocated and zeroed per call, took a quarter of ResNet-18's 7 px weight gradient (the Xeon).
  for (int64_t chunk = 1; chunk < chunks; ++chunk) {
    for (int64_t t = 0; t < partial_size; ++t) partials_data[t] += partials_data[chunk * partial_size + t];
  }
  finish(partials_data, dw->typed_data(), s);
  return ffi::Error::Success();
}

// The weight gradient's own sums, rounded to float32 (dw->element_count() of them).
auto RoundedSums(int64_t size) {
  return [size](const double* sums, float* out, const Shape&) {
    for (int64_t t = 0; t < size; ++t) out[t] = static_cast<float>(sums[t]);
  };
}

ffi::Error DepthwiseWeightGradient(ffi::ThreadPool pool, Float32x4d x, Float32x4d dy, ffi::Result<Float32x4d> dw,
                                   int64_t stride, int64_t pad_top, int64_t pad_left) {
  return WeightGradient(pool, x, dy, dw, stride, pad_top, pad_left, /*depthwise=*/true, /*chunk_pixels=*/1,
                        /*parts=*/1, dw->element_count(),
                        [](const float* x, const float* dy, int64_t, int64_t, int64_t, double* partial,
                           const Shape& s) { AddDepthwiseImage(x, dy, partial, s); },
                        RoundedSums(dw->element_count()));
}

ffi::Error ConvWeightGradient(ffi::ThreadPool pool, Float32x4d x, Float32x4d dy, ffi::Result<Float32x4d> dw,
                              int64_t stride, int64_t pad_top, int64_t pad_left) {
  const int64_t cout = dy.dimensions()[3], blocks = (cout + kVectorOutBlock - 1) / kVectorOutBlock;
  return WeightGradient(pool, x, dy, dw, stride, pad_top, pad_left, /*depthwise=*/false, kDenseChunkPixels, blocks,
                        dw->element_count(),
                        [cout](const float* x, const float* dy, int64_t images, int64_t block_begin,
                               int64_t block_end, double* partial, const Shape& s) {
                          AddDenseChunk(x, dy, images, std::min(cout, block_begin * kVectorOutBlock),
                                        std::min(cout, block_end * kVectorOutBlock), partial, s);
                        },
                        RoundedSums(dw->element_count()));
}

// Dense convs: the forward pass y (N, Ho, Wo, Cout) of x and the HWIO kernel w (k, k, Cin, Cout), and a conv's
// input gradient dx (N, H, W, Cin) from dy and w, with the channels they write a multiple of kVectorOutBlock. Each
// task takes a band of rows of the result of one image (`BandRows`) and copies the rows it reads, zero-padded, into
// scratch memory; then block by block of channels, each block's weights serve all its rows.
// Per block of kVectorOutBlock channels, a micro-kernel keeps the sums of up to kConvPixels pixels in registers
// (kSumLanes channels at a time) over all taps and channels it reads: each weight vector it loads serves every
// pixel, each value read every channel it sums. Every result is summed by one thread in one order: it does not
// depend on the threads, nor on the register blocking.
constexpr int kConvPixels = kSumRows;

// Pixels a task of the dense convs writes, at least (or a whole image): a band of rows of one image, whose
// blocks of weights, read into the L2 cache once, serve all its rows. With a row per task, a ResNet's 7 px convs
// with 512 channels read their 9.4 MB of weights from the L3 cache for each row of 7 pixels: alone at batch 32,
// ResNet-50's stride-2 one 43.7 -> 33.1 ms, a 7 px input gradient 41.0 -> 25.4 ms, the 28 and 14 px convs 1.05-1.15x
// (Intel Xeon with AVX-512 and AMX).
constexpr int64_t kConvTaskPixels = 112;

// Rows of an image of height x width per band of at least task_pixels pixels (or the whole image).
int64_t BandRows(int64_t height, int64_t width, int64_t task_pixels = kConvTaskPixels) {
  return std::clamp<int64_t>((task_pixels + width - 1) / std::max<int64_t>(width, 1), 1, std::max<int64_t>(height, 1));
}

// One tap of the micro-kernel: where its pixel 0 reads, and its weights (channels read, kVectorOutBlock).
struct ConvTap {
  const float* in;
  const float* w;
};

// Writes kVectorOutBlock channels of kColumns pixels: pixel p sums, over the taps, the products of the `channels`
// values at tap.in + offset + p * step with the tap's weights; it goes to out + p * pixel_pitch.
template <int kColumns>
void ConvPixels(const std::vector<ConvTap>& taps, int64_t offset, int64_t channels, int64_t step, float* out,
                int64_t pixel_pitch) {
  constexpr int V = kSumLanes / kLanes;  // vectors of sums per pixel
  for (int64_t lane0 = 0; lane0 < kVectorOutBlock; lane0 += kSumLanes) {
    Vector sum[kColumns][V];
    for (int p = 0; p < kColumns; ++p) {
      for (int v = 0; v < V; ++v) sum[p][v] = Vector{};
    }
    for (const ConvTap& tap : taps) {
      const float* in = tap.in + offset;
      for (int64_t c = 0; c < channels; ++c) {
        Vector w[V];
        for (int v = 0; v < V; ++v) {
          std::memcpy(&w[v], tap.w + c * kVectorOutBlock + lane0 + kLanes * v, sizeof(Vector));
        }
#pragma GCC unroll 16
        for (int p = 0; p < kColumns; ++p) {
          const float value = in[p * step + c];
          for (int v = 0; v < V; ++v) sum[p][v] += value * w[v];
        }
      }
    }
    for (int p = 0; p < kColumns; ++p) {
      for (int v = 0; v < V; ++v) std::memcpy(out + p * pixel_pitch + lane0 + kLanes * v, &sum[p][v], sizeof(Vector));
    }
  }
}

// ConvPixels over a row of `columns` pixels, in as few blocks of at most kConvPixels as it takes, of sizes at
// most one apart (16 pixels: 8 and 8, not 14 and 2, whose 4 sums would wait on each other).
void ConvRow(int64_t columns, const std::vector<ConvTap>& taps, int64_t channels, int64_t step, float* out,
             int64_t pixel_pitch) {
  const int64_t blocks = (columns + kConvPixels - 1) / kConvPixels;
  for (int64_t block = 0, p0 = 0, pixels = 0; block < blocks; ++block, p0 += pixels) {
    pixels = (columns - p0) / (blocks - block);
    float* block_out = out + p0 * pixel_pitch;
    switch (pixels) {
#define KDEP_CONV_PIXELS_CASE(n) \
  case n: ConvPixels<n>(taps, p0 * step, channels, step, block_out, pixel_pitch); break;
      KDEP_CONV_PIXELS_CASE(14) KDEP_CONV_PIXELS_CASE(13) KDEP_CONV_PIXELS_CASE(12) KDEP_CONV_PIXELS_CASE(11)
      KDEP_CONV_PIXELS_CASE(10) KDEP_CONV_PIXELS_CASE(9) KDEP_CONV_PIXELS_CASE(8) KDEP_CONV_PIXELS_CASE(7)
      KDEP_CONV_PIXELS_CASE(6) KDEP_CONV_PIXELS_CASE(5) KDEP_CONV_PIXELS_CASE(4) KDEP_CONV_PIXELS_CASE(3)
      KDEP_CONV_PIXELS_CASE(2)
#undef KDEP_CONV_PIXELS_CASE
      default: ConvPixels<1>(taps, p0 * step, channels, step, block_out, pixel_pitch);
    }
  }
}

// w (k, k, Cin, Cout) in blocks of kVectorOutBlock channels, of Cout (forward) or of Cin (input gradient):
// (Cout / 32, k, k, Cin, 32) or (Cin / 32, k, k, Cout, 32).
std::vector<float> PackWeights(const float* w, const Shape& s, bool by_input_channel) {
  const int64_t cin = s.in_channels, cout = s.out_channels, taps = s.k * s.k;
  const int64_t read = by_input_channel ? cout : cin, written = by_input_channel ? cin : cout;
  std::vector<float> packed(taps * cin * cout);
  for (int64_t b = 0; b < written / kVectorOutBlock; ++b) {
    for (int64_t t = 0; t < taps; ++t) {
      for (int64_t c = 0; c < read; ++c) {
        float* to = packed.data() + ((b * taps + t) * read + c) * kVectorOutBlock;
        for (int64_t l = 0; l < kVectorOutBlock; ++l) {
          const int64_t ci = by_input_channel ? b * kVectorOutBlock + l : c;
          const int64_t co = by_input_channel ? c : b * kVectorOutBlock + l;
          to[l] = w[(t * cin + ci) * cout + co];
        }
      }
    }
  }
  return packed;
}

ffi::Error Conv(ffi::ThreadPool pool, Float32x4d x, Float32x4d w, ffi::Result<Float32x4d> y, int64_t stride,
                int64_t pad_top, int64_t pad_left) {
  const auto x_dims = x.dimensions(), w_dims = w.dimensions(), y_dims = y->dimensions();
  const int64_t n = x_dims[0];
  const Shape s{x_dims[1], x_dims[2], x_dims[3], y_dims[1], y_dims[2], y_dims[3], w_dims[0],
                stride, pad_top, pad_left};
  const bool shapes_fit = y_dims[0] == n && w_dims[1] == s.k && w_dims[2] == s.in_channels &&
                          w_dims[3] == s.out_channels && s.out_channels % kVectorOutBlock == 0 && stride >= 1 &&
                          pad_top >= 0 && pad_left >= 0;
  if (!shapes_fit) return ffi::Error::InvalidArgument("kdep_jax CPU conv kernel: shapes that do not fit together");
  const std::vector<float> packed = PackWeights(w.typed_data(), s, /*by_input_channel=*/false);
  const int64_t block_size = s.k * s.k * s.in_channels * kVectorOutBlock;
  const int64_t padded_width = (s.out_width - 1) * s.stride + s.k, row_pitch = padded_width * s.in_channels;
  const int64_t band = BandRows(s.out_height, s.out_width), bands = (s.out_height + band - 1) / band;
  const float* x_data = x.typed_data();
  float* y_data = y->typed_data();
  ParallelFor(pool, n * bands, [&]() {
    return [&, scratch = std::vector<float>(((band - 1) * s.stride + s.k) * row_pitch),
            taps = std::vector<ConvTap>(s.k)](int64_t task) mutable {
      const int64_t image = task / bands, first_row = task % bands * band;
      const int64_t band_rows = std::min(band, s.out_height - first_row);
      CopyPaddedRows(x_data + image * s.height * s.width * s.in_channels, s, first_row * s.stride - s.pad_top,
                     (band_rows - 1) * s.stride + s.k, padded_width, scratch.data());
      float* y_band = y_data + (image * s.out_height + first_row) * s.out_width * s.out_channels;
      for (int64_t b = 0; b < s.out_channels / kVectorOutBlock; ++b) {
        for (int64_t r = 0; r < band_rows; ++r) {
          // A row of taps (i, 0 ... k - 1) reads k * Cin consecutive values of its padded scratch row, and its
          // weights lie in the same order: one run of channels per row, so a stem's 7 x 3 values are one loop of
          // 21 (1.18x on ResNet's stem), not 7 of 3; the sums are added in the same order.
          for (int64_t i = 0; i < s.k; ++i) {
            taps[i] = {scratch.data() + (r * s.stride + i) * row_pitch,
                       packed.data() + b * block_size + i * s.k * s.in_channels * kVectorOutBlock};
          }
          ConvRow(s.out_width, taps, s.k * s.in_channels, s.stride * s.in_channels,
                  y_band + r * s.out_width * s.out_channels + b * kVectorOutBlock, s.out_channels);
        }
      }
    };
  });
  return ffi::Error::Success();
}

// A dense 3x3 conv with stride 1 and padding 1 by Winograd's F(m x m, 3x3), m = kTile = 2 or 4: each m x m tile of
// y is A^T [(G g G^T) . (B^T d B)] A over the (m + 2)^2 patch d of x around it, (m + 2)^2 products per tile and
// channel pair where the direct conv takes 9 m^2 (2.25x fewer for m = 2, 4x for m = 4), at the price of transforms
// linear in the channels. Per task, a band of tile rows of one image: its patches, transformed, for all input
// channels; then, per block of kVectorOutBlock output channels, the (m + 2)^2 matrix products of the transformed
// patches with the transformed kernel (`ConvRow`'s micro-kernel, one tap of Cin values) and the output transform.
// The transforms add and subtract in float32 (the kernel's in float64, rounded once); the result differs from the
// direct conv's by float32 rounding (m = 4's transforms have larger coefficients: a few times more), and does not
// depend on the threads.
constexpr int64_t kWinogradTiles = 14;  // tiles per band of an image, at least (or the whole image)
// Tiles per task of images that are one band each, at least: ResNet's 7 px F(2x2, 3x3) conv, 512 channels, alone
// 26.4 -> 23.1 ms at batch 32 (the Xeon), its 16.8 MB of transformed weights read once per 4 images, not per image.
constexpr int64_t kWinogradGroupTiles = 64;

// The 1-D transforms of F(m, 3): B^T d of a patch column of kPatch values, G g of a kernel column of 3, and A^T m of
// a column of kPatch products (kTile outputs); the 2-D ones apply them to the columns, then to the rows.
template <int kTile>
struct Winograd;

template <>
struct Winograd<2> {
  static constexpr int kPatch = 4, kElements = 16;
  template <typename V>
  static void Input(const V* d, V* out) {
    out[0] = d[0] - d[2];
    out[1] = d[1] + d[2];
    out[2] = d[2] - d[1];
    out[3] = d[1] - d[3];
  }
  template <typename V>
  static void Kernel(const V* g, V* out) {
    out[0] = g[0];
    out[1] = 0.5 * (g[0] + g[1] + g[2]);
    out[2] = 0.5 * (g[0] - g[1] + g[2]);
    out[3] = g[2];
  }
  template <typename V>
  static void Output(const V* m, V* out) {
    out[0] = m[0] + m[1] + m[2];
    out[1] = m[1] - m[2] - m[3];
  }
};

// Lavin and Gray's F(4, 3), at the points 0, 1, -1, 2, -2 and infinity.
template <>
struct Winograd<4> {
  static constexpr int kPatch = 6, kElements = 36;
  template <typename V>
  static void Input(const V* d, V* out) {
    const V a = d[4] - 4.0f * d[2], b = d[3] - 4.0f * d[1], c = d[4] - d[2], e = 2.0f * (d[3] - d[1]);
    out[0] = 4.0f * d[0] - 5.0f * d[2] + d[4];
    out[1] = a + b;
    out[2] = a - b;
    out[3] = c + e;
    out[4] = c - e;
    out[5] = 4.0f * d[1] - 5.0f * d[3] + d[5];
  }
  template <typename V>
  static void Kernel(const V* g, V* out) {
    constexpr double kSixth = 1.0 / 6, kTwelfth = 1.0 / 12, kTwentyFourth = 1.0 / 24;  // products: no divisions
    const V even = kTwentyFourth * g[0] + kSixth * g[2], odd = kTwelfth * g[1];
    out[0] = 0.25 * g[0];
    out[1] = -kSixth * (g[0] + g[1] + g[2]);
    out[2] = -kSixth * (g[0] - g[1] + g[2]);
    out[3] = even + odd;
    out[4] = even - odd;
    out[5] = g[2];
  }
  template <typename V>
  static void Output(const V* m, V* out) {
    const V sum12 = m[1] + m[2], difference12 = m[1] - m[2], sum34 = m[3] + m[4], difference34 = m[3] - m[4];
    out[0] = m[0] + sum12 + sum34;
    out[1] = difference12 + 2.0f * difference34;
    out[2] = sum12 + 4.0f * sum34;
    out[3] = difference12 + 8.0f * difference34 + m[5];
  }
};

// w (3, 3, Cin, Cout) -> G g G^T for every channel pair, packed (Cout / 32, kElements, Cin, 32) like `PackWeights`;
// a task per block of output channels, each writing kElements runs of 32 values per input channel.
template <int kTile>
std::vector<float> PackWinogradWeights(ffi::ThreadPool& pool, const float* w, int64_t cin, int64_t cout) {
  using T = Winograd<kTile>;
  constexpr int P = T::kPatch;
  std::vector<float> packed(T::kElements * cin * cout);
  ParallelFor(pool, cout / kVectorOutBlock, [&]() {
    return [&](int64_t block) {
      constexpr int64_t L = kVectorOutBlock;
      for (int64_t ci = 0; ci < cin; ++ci) {
        float* to = packed.data() + block * T::kElements * cin * L + ci * L;
        for (int64_t l = 0; l < L; l += 8) {
          DoubleVector gg[P][3];  // G g: the kernel's columns transformed
          for (int j = 0; j < 3; ++j) {
            DoubleVector column[3], transformed[P];
            for (int i = 0; i < 3; ++i) {
              HalfVector values;
              std::memcpy(&values, w + ((i * 3 + j) * cin + ci) * cout + block * L + l, sizeof(values));
              column[i] = __builtin_convertvector(values, DoubleVector);
            }
            T::Kernel(column, transformed);
            for (int a = 0; a < P; ++a) gg[a][j] = transformed[a];
          }
          for (int a = 0; a < P; ++a) {
            DoubleVector row[P];
            T::Kernel(gg[a], row);
            for (int b = 0; b < P; ++b) {
              const HalfVector rounded = __builtin_convertvector(row[b], HalfVector);
              std::memcpy(to + (a * P + b) * cin * L + l, &rounded, sizeof(rounded));
            }
          }
        }
      }
    };
  });
  return packed;
}

// B^T d B of `tiles` patches d of padded rows of x, `row_pitch` apart: tile t's patch starts at row
// kTile * (t / tile_columns), column kTile * (t % tile_columns). Its elements e = kPatch * row + column in
// [e_begin, e_end), channel c, go to patches[(e - e_begin) * e_pitch + t * Cin + c].
template <int kTile>
void TransformPatches(const float* rows, int64_t row_pitch, int64_t tile_columns, int64_t tiles, int64_t cin,
                      int64_t e_begin, int64_t e_end, int64_t e_pitch, float* patches) {
  constexpr int P = Winograd<kTile>::kPatch;
  for (int64_t t = 0; t < tiles; ++t) {
    const float* d = rows + (t / tile_columns) * kTile * row_pitch + (t % tile_columns) * kTile * cin;
    for (int64_t c = 0; c < cin; c += kLanes) {
      Vector rows_b[P][P];  // (B^T d)[row][column]
      for (int col = 0; col < P; ++col) {
        Vector column[P], transformed[P];
        for (int i = 0; i < P; ++i) column[i] = Load(d + i * row_pitch + col * cin + c);
        Winograd<kTile>::Input(column, transformed);
        for (int i = 0; i < P; ++i) rows_b[i][col] = transformed[i];
      }
      for (int64_t r = e_begin / P; r * P < e_end; ++r) {
        Vector v[P];
        Winograd<kTile>::Input(rows_b[r], v);
        for (int64_t e = std::max(e_begin, r * P); e < std::min(e_end, r * P + P); ++e) {
          std::memcpy(patches + (e - e_begin) * e_pitch + t * cin + c, &v[e % P], sizeof(Vector));
        }
      }
    }
  }
}

template <int kTile>
ffi::Error WinogradConv(ffi::ThreadPool pool, Float32x4d x, Float32x4d w, ffi::Result<Float32x4d> y, int64_t stride,
                        int64_t pad_top, int64_t pad_left) {
  using T = Winograd<kTile>;
  constexpr int P = T::kPatch, E = T::kElements;
  const auto x_dims = x.dimensions(), w_dims = w.dimensions(), y_dims = y->dimensions();
  const int64_t n = x_dims[0];
  const Shape s{x_dims[1], x_dims[2], x_dims[3], y_dims[1], y_dims[2], y_dims[3], w_dims[0], stride, pad_top,
                pad_left};
  const bool shapes_fit = y_dims[0] == n && s.out_height == s.height && s.out_width == s.width && s.k == 3 &&
                          w_dims[1] == 3 && w_dims[2] == s.in_channels && w_dims[3] == s.out_channels &&
                          s.in_channels % 16 == 0 && s.out_channels % kVectorOutBlock == 0 && stride == 1 &&
                          pad_top == 1 && pad_left == 1;
  if (!shapes_fit) {
    return ffi::Error::InvalidArgument("kdep_jax CPU Winograd conv kernel: shapes that do not fit together");
  }
  const int64_t cin = s.in_channels, cout = s.out_channels;
  const std::vector<float> packed = PackWinogradWeights<kTile>(pool, w.typed_data(), cin, cout);
  const int64_t tile_rows = (s.height + kTile - 1) / kTile, tile_columns = (s.width + kTile - 1) / kTile;
  const int64_t band = std::min(tile_rows, (kWinogradTiles + tile_columns - 1) / tile_columns);
  const int64_t bands = (tile_rows + band - 1) / band, band_tiles = band * tile_columns;
  // Images small enough to be one band go kWinogradGroupTiles tiles or more to a task, so that each block of the
  // transformed kernel read into the L2 cache serves them all.
  const int64_t group =
      bands > 1 ? 1 : std::clamp<int64_t>(kWinogradGroupTiles / band_tiles, 1, std::max<int64_t>(n, 1));
  const int64_t groups = (n + group - 1) / group, group_tiles = group * band_tiles;
  const int64_t padded_width = kTile * tile_columns + 2, row_pitch = padded_width * cin;
  const float* x_data = x.typed_data();
  float* y_data = y->typed_data();
  ParallelFor(pool, groups * bands, [&]() {
    return [&, rows = std::vector<float>((kTile * band + 2) * row_pitch),
            patches = std::vector<float>(E * group_tiles * cin),
            products = std::vector<float>(E * group_tiles * kVectorOutBlock), taps = std::vector<ConvTap>(1)](
               int64_t task) mutable {
      const int64_t first_image = task / bands * group, first_tile_row = task % bands * band;
      const int64_t images = std::min(group, n - first_image);
      const int64_t band_rows = std::min(band, tile_rows - first_tile_row), image_tiles = band_rows * tile_columns;
      const int64_t tiles = images * image_tiles;
      for (int64_t g = 0; g < images; ++g) {
        CopyPaddedRows(x_data + (first_image + g) * s.height * s.width * cin, s, kTile * first_tile_row - 1,
                       kTile * band_rows + 2, padded_width, rows.data());
        TransformPatches<kTile>(rows.data(), row_pitch, tile_columns, image_tiles, cin, 0, E, tiles * cin,
                                patches.data() + g * image_tiles * cin);
      }
      for (int64_t b = 0; b < cout / kVectorOutBlock; ++b) {
        for (int64_t e = 0; e < E; ++e) {
          taps[0] = {patches.data() + e * tiles * cin, packed.data() + (b * E + e) * cin * kVectorOutBlock};
          ConvRow(tiles, taps, cin, cin, products.data() + e * tiles * kVectorOutBlock, kVectorOutBlock);
        }
        // y's tile: A^T m A, its pixels inside y.
        for (int64_t t = 0; t < tiles; ++t) {
          float* y_image = y_data + (first_image + t / image_tiles) * s.height * s.width * cout;
          const int64_t ho = kTile * (first_tile_row + t % image_tiles / tile_columns), wo = kTile * (t % tile_columns);
          for (int64_t half = 0; half < kVectorOutBlock; half += kLanes) {
            Vector a[kTile][P];  // (A^T m)[r][col]
            for (int col = 0; col < P; ++col) {
              Vector column[P], transformed[kTile];
              for (int i = 0; i < P; ++i) {
                column[i] = Load(products.data() + ((i * P + col) * tiles + t) * kVectorOutBlock + half);
              }
              Winograd<kTile>::Output(column, transformed);
              for (int r = 0; r < kTile; ++r) a[r][col] = transformed[r];
            }
            for (int r = 0; r < kTile && ho + r < s.height; ++r) {
              Vector out[kTile];
              Winograd<kTile>::Output(a[r], out);
              for (int col = 0; col < kTile && wo + col < s.width; ++col) {
                std::memcpy(y_image + ((ho + r) * s.width + wo + col) * cout + b * kVectorOutBlock + half, &out[col],
                            sizeof(Vector));
              }
            }
          }
        }
      }
    };
  });
  return ffi::Error::Success();
}

// The weight gradient of WinogradConv's 3x3 conv, by the same algorithm: y's tile is linear in U = G g G^T, so the
// gradient of U at element e is the sum over tiles of (B^T d B)[e] times (A dy A^T)[e] (dy's 2x2 tile, 4x4 after),
// a matrix product (Cin x tiles) x (tiles x Cout) per element, and dw = G^T (that gradient) G. Per chunk of images
// and group of elements [e_begin, e_end), bands of about kWinogradBandTiles tiles (their transformed patches and
// output gradients at those elements in the L2 cache) summed by `AddTapBands`, the dense weight gradient's
// micro-kernel, in float32 over a band, into float64 partials (16, Cin, Cout).
constexpr int64_t kWinogradBandTiles = 128;

void AddWinogradChunk(const float* x, const float* dy, int64_t images, int64_t e_begin, int64_t e_end,
                      double* partial, const Shape& s, InputActivation activation) {
  const int64_t cin = s.in_channels, cout = s.out_channels, elements = e_end - e_begin;
  const int64_t tile_rows = (s.height + 1) / 2, tile_columns = (s.width + 1) / 2;
  const int64_t band = (kWinogradBandTiles + tile_columns - 1) / tile_columns, band_tiles = band * tile_columns;
  const int64_t padded_width = 2 * tile_columns + 2, row_pitch = padded_width * cin;
  std::vector<float> rows((2 * band + 2) * row_pitch);
  // Every value of patches and grads is written before it is read.
  const std::unique_ptr<float[]> patches(new float[elements * band_tiles * cin]),
      grads(new float[elements * band_tiles * cout]);
  for (int64_t r0 = 0; r0 < images * tile_rows; r0 += band) {
    const int64_t r1 = std::min(images * tile_rows, r0 + band), tiles = (r1 - r0) * tile_columns;
    // The band's tile rows image by image: each image's rows of x copied once, with the padding around them.
    for (int64_t first = r0, end; first < r1; first = end) {
      const int64_t image = first / tile_rows;
      end = std::min(r1, (image + 1) * tile_rows);
      CopyPaddedRows(x + image * s.height * s.width * cin, s, 2 * (first % tile_rows) - 1, 2 * (end - first) + 2,
                     padded_width, rows.data(), activation);
      TransformPatches<2>(rows.data(), row_pitch, tile_columns, (end - first) * tile_columns, cin, e_begin, e_end,
                       tiles * cin, patches.get() + (first - r0) * tile_columns * cin);
    }
    // grads[e - e_begin][t][co]: A dy A^T of tile t's 2x2 output gradient, zero outside dy.
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t r = r0 + t / tile_columns, image = r / tile_rows, ty = r % tile_rows, tx = t % tile_columns;
      for (int64_t co = 0; co < cout; co += kLanes) {
        Vector g[2][2];
        for (int a = 0; a < 2; ++a) {
          for (int b = 0; b < 2; ++b) {
            const int64_t ho = 2 * ty + a, wo = 2 * tx + b;
            g[a][b] = ho < s.height && wo < s.width
                          ? Load(dy + ((image * s.height + ho) * s.width + wo) * cout + co) : Vector{};
          }
        }
        const Vector rows_a[4][2] = {{g[0][0], g[0][1]}, {g[0][0] + g[1][0], g[0][1] + g[1][1]},
                                     {g[0][0] - g[1][0], g[0][1] - g[1][1]}, {-g[1][0], -g[1][1]}};
        for (int64_t row = e_begin / 4; row * 4 < e_end; ++row) {
          const Vector* p = rows_a[row];
          const Vector z[4] = {p[0], p[0] + p[1], p[0] - p[1], -p[1]};
          for (int64_t e = std::max(e_begin, row * 4); e < std::min(e_end, row * 4 + 4); ++e) {
            std::memcpy(grads.get() + ((e - e_begin) * tiles + t) * cout + co, &z[e % 4], sizeof(Vector));
          }
        }
      }
    }
    for (int64_t e = e_begin; e < e_end; ++e) {
      const float* patches_e = patches.get() + (e - e_begin) * tiles * cin;
      const float* grads_e = grads.get() + (e - e_begin) * tiles * cout;
      auto pixels = [&](int64_t ci0, auto add_pixel) {
        for (int64_t t = 0; t < tiles; ++t) add_pixel(patches_e + t * cin + ci0, grads_e + t * cout);
      };
      AddTapBands(cin, pixels, 0, cout, cout, partial + e * cin * cout);
    }
  }
}

// dw (3, 3, Cin, Cout) = G^T m G from the sums m (16, Cin, Cout) of AddWinogradChunk, in float64.
void FinishWinogradWeightGradient(const double* m, float* dw, const Shape& s) {
  const int64_t pairs = s.in_channels * s.out_channels;
  for (int64_t pair = 0; pair < pairs; ++pair) {
    double gm[3][4];  // G^T m
    for (int b = 0; b < 4; ++b) {
      const double m0 = m[b * pairs + pair], m1 = m[(4 + b) * pairs + pair], m2 = m[(8 + b) * pairs + pair],
                   m3 = m[(12 + b) * pairs + pair];
      gm[0][b] = m0 + 0.5 * (m1 + m2);
      gm[1][b] = 0.5 * (m1 - m2);
      gm[2][b] = 0.5 * (m1 + m2) + m3;
    }
    for (int i = 0; i < 3; ++i) {
      const double* r = gm[i];
      dw[(i * 3) * pairs + pair] = static_cast<float>(r[0] + 0.5 * (r[1] + r[2]));
      dw[(i * 3 + 1) * pairs + pair] = static_cast<float>(0.5 * (r[1] - r[2]));
      dw[(i * 3 + 2) * pairs + pair] = static_cast<float>(0.5 * (r[1] + r[2]) + r[3]);
    }
  }
}

ffi::Error WinogradWeightGradientOf(ffi::ThreadPool& pool, Float32x4d& x, InputActivation activation, Float32x4d& dy,
                                    ffi::Result<Float32x4d>& dw, int64_t stride, int64_t pad_top, int64_t pad_left) {
  const auto x_dims = x.dimensions(), dy_dims = dy.dimensions(), dw_dims = dw->dimensions();
  const bool shapes_fit = dw_dims[0] == 3 && stride == 1 && pad_top == 1 && pad_left == 1 &&
                          dy_dims[1] == x_dims[1] && dy_dims[2] == x_dims[2] && x_dims[3] % 16 == 0 &&
                          dy_dims[3] % 16 == 0;
  if (!shapes_fit) {
    return ffi::Error::InvalidArgument("kdep_jax CPU Winograd weight gradient kernel: shapes that do not fit");
  }
  auto add = [activation](const float* x, const float* dy, int64_t images, int64_t e_begin, int64_t e_end,
                          double* partial, const Shape& s) {
    AddWinogradChunk(x, dy, images, e_begin, e_end, partial, s, activation);
  };
  return WeightGradient(pool, x, dy, dw, stride, pad_top, pad_left, /*depthwise=*/false, kDenseChunkPixels,
                        /*parts=*/16, 16 * x_dims[3] * dy_dims[3], add, FinishWinogradWeightGradient);
}

ffi::Error WinogradWeightGradient(ffi::ThreadPool pool, Float32x4d x, Float32x4d dy, ffi::Result<Float32x4d> dw,
                                  int64_t stride, int64_t pad_top, int64_t pad_left) {
  return WinogradWeightGradientOf(pool, x, {}, dy, dw, stride, pad_top, pad_left);
}

// The weight gradient of a Winograd conv whose input is relu(x * scale + shift) (InputActivation), from x.
ffi::Error WinogradWeightGradientOfActivation(ffi::ThreadPool pool, Float32x4d x, Float32x1d scale, Float32x1d shift,
                                              Float32x4d dy, ffi::Result<Float32x4d> dw, int64_t stride,
                                              int64_t pad_top, int64_t pad_left) {
  if (scale.dimensions()[0] != x.dimensions()[3] || shift.dimensions()[0] != x.dimensions()[3]) {
    return ffi::Error::InvalidArgument("kdep_jax CPU Winograd weight gradient kernel: an activation of the wrong size");
  }
  return WinogradWeightGradientOf(pool, x, {scale.typed_data(), shift.typed_data()}, dy, dw, stride, pad_top,
                                  pad_left);
}

// An input gradient's taps, for dx pixel (hi, wi) = (ho * stride + i - pad_top, wo * stride + j - pad_left): the
// row ho of dy that tap row i brings to row hi of dx (-1 where none does), and, phase by phase of dx's columns
// (wi % stride), the taps j that reach them, each with the column of dy its pixel 0 reads (wo = b + shift for
// wi = phase + b * stride).
int64_t RowOfDy(const Shape& s, int64_t hi, int64_t i) {
  const int64_t offset = hi + s.pad_top - i, ho = FloorDiv(offset, s.stride);
  return ho * s.stride == offset && ho >= 0 && ho < s.out_height ? ho : -1;
}

struct ColumnTap {
  int64_t j, shift;
};

std::vector<std::vector<ColumnTap>> ColumnTapsByPhase(const Shape& s) {
  std::vector<std::vector<ColumnTap>> column_taps(std::min(s.stride, s.width));
  for (int64_t phase = 0; phase < static_cast<int64_t>(column_taps.size()); ++phase) {
    for (int64_t j = 0; j < s.k; ++j) {
      const int64_t offset = phase + s.pad_left - j, shift = FloorDiv(offset, s.stride);
      if (shift * s.stride == offset) column_taps[phase].push_back({j, shift});
    }
  }
  return column_taps;
}

// The input gradient dx of a conv with any stride, from dy and w. Input pixel (hi, wi) gets dy (ho, wo) times
// tap (i, j) where hi = ho * stride + i - pad_top (columns alike). For each input row, the taps whose i fits a
// row ho of dy, and for each phase wi % stride of the columns, the taps whose j fits: a conv of dy's rows with
// stride 1 whose pixels go to every stride-th column of dx.
ffi::Error ConvInputGradient(ffi::ThreadPool pool, Float32x4d dy, Float32x4d w, ffi::Result<Float32x4d> dx,
                             int64_t stride, int64_t pad_top, int64_t pad_left) {
  const auto dy_dims = dy.dimensions(), w_dims = w.dimensions(), dx_dims = dx->dimensions();
  const int64_t n = dx_dims[0];
  const Shape s{dx_dims[1], dx_dims[2], dx_dims[3], dy_dims[1], dy_dims[2], dy_dims[3], w_dims[0],
                stride, pad_top, pad_left};
  const bool shapes_fit = dy_dims[0] == n && w_dims[1] == s.k && w_dims[2] == s.in_channels &&
                          w_dims[3] == s.out_channels && s.in_channels % kVectorOutBlock == 0 && stride >= 1;
  if (!shapes_fit) {
    return ffi::Error::InvalidArgument("kdep_jax CPU conv input gradient kernel: shapes that do not fit together");
  }
  const std::vector<float> packed = PackWeights(w.typed_data(), s, /*by_input_channel=*/true);
  const int64_t block_size = s.k * s.k * s.out_channels * kVectorOutBlock;
  const std::vector<std::vector<ColumnTap>> column_taps = ColumnTapsByPhase(s);
  int64_t left = 0, right = s.out_width;  // the columns of dy the phases read, from -left to right - 1
  for (int64_t phase = 0; phase < static_cast<int64_t>(column_taps.size()); ++phase) {
    const int64_t columns = (s.width - phase + s.stride - 1) / s.stride;
    for (const ColumnTap& column : column_taps[phase]) {
      left = std::max(left, -column.shift);
      right = std::max(right, columns + column.shift);
    }
  }
  const int64_t padded_width = left + right, row_pitch = padded_width * s.out_channels;
  // A band of `band` rows of dx reads at most dy_rows rows of dy, each copied once to scratch.
  const int64_t band = BandRows(s.height, s.width), bands = (s.height + band - 1) / band;
  const int64_t dy_rows = (band + s.k - 2) / s.stride + 1;
  const float* dy_data = dy.typed_data();
  float* dx_data = dx->typed_data();
  ParallelFor(pool, n * bands, [&]() {
    return [&, scratch = std::vector<float>(dy_rows * row_pitch), taps = std::vector<ConvTap>(),
            row_taps = std::vector<std::vector<std::pair<int64_t, const float*>>>(band)](int64_t task) mutable {
      const int64_t image = task / bands, first_row = task % bands * band;
      const int64_t band_rows = std::min(band, s.height - first_row);
      const int64_t first_dy_row = std::max<int64_t>(0, -FloorDiv(s.k - 1 - first_row - s.pad_top, s.stride));
      const int64_t end_dy_row =
          std::min(s.out_height, FloorDiv(first_row + band_rows - 1 + s.pad_top, s.stride) + 1);
      for (int64_t ho = first_dy_row; ho < end_dy_row; ++ho) {
        CopyPaddedRow(dy_data + (image * s.out_height + ho) * s.out_width * s.out_channels, s.out_width,
                      s.out_channels, left, padded_width, scratch.data() + (ho - first_dy_row) * row_pitch);
      }
      // Per row of dx, the taps i whose row of dy, (hi + pad_top - i) / stride, is inside dy.
      for (int64_t r = 0; r < band_rows; ++r) {
        row_taps[r].clear();
        for (int64_t i = 0; i < s.k; ++i) {
          const int64_t ho = RowOfDy(s, first_row + r, i);
          if (ho < 0) continue;
          row_taps[r].push_back({i, scratch.data() + (ho - first_dy_row) * row_pitch + left * s.out_channels});
        }
      }
      float* dx_band = dx_data + (image * s.height + first_row) * s.width * s.in_channels;
      for (int64_t phase = 0; phase < static_cast<int64_t>(column_taps.size()); ++phase) {
        const int64_t columns = (s.width - phase + s.stride - 1) / s.stride;
        for (int64_t b = 0; b < s.in_channels / kVectorOutBlock; ++b) {
          for (int64_t r = 0; r < band_rows; ++r) {
            taps.clear();
            for (const auto& [i, row] : row_taps[r]) {
              for (const ColumnTap& column : column_taps[phase]) {
                const float* in = row + column.shift * s.out_channels;
                taps.push_back({in, packed.data() + b * block_size + (i * s.k + column.j) * s.out_channels *
                                                                     kVectorOutBlock});
              }
            }
            float* out = dx_band + r * s.width * s.in_channels + phase * s.in_channels;
            ConvRow(columns, taps, s.out_channels, s.out_channels, out + b * kVectorOutBlock,
                    s.stride * s.in_channels);
          }
        }
      }
    };
  });
  return ffi::Error::Success();
}

// A depthwise conv's input gradient dx (N, H, W, C) from dy (N, Ho, Wo, C) and w (k, k, 1, C): each pixel of dx
// sums, channel by channel, the taps that reach it (dy's values times the taps' weights, in row-major order of the
// taps); each row of dx is one thread's, so the sums do not depend on the threads.

// One tap of a row of dx: column b of the row reads dy at in + b * in_step (channel 0), for the columns
// [first, end) where that is inside dy; w: the tap's C weights.
struct DepthwiseTap {
  const float* in;
  const float* w;
  int64_t first, end;
};

// Writes column b's channels [c, c + kBlocks x the lanes of V): V is Vector (kLanes channels) or float (one). The
// kBlocks sums are independent chains of FMAs, side by side (inlined: 1.2x faster alone than one block at a time).
template <typename V, int kBlocks, bool kCheck>
inline __attribute__((always_inline)) void DepthwisePixel(const std::vector<DepthwiseTap>& taps, int64_t b,
                                                          int64_t in_step, int64_t c, float* out) {
  constexpr int64_t kLanes = sizeof(V) / sizeof(float);
  V sum[kBlocks] = {};
  for (const DepthwiseTap& tap : taps) {
    if (kCheck && (b < tap.first || b >= tap.end)) continue;
    const float* in = tap.in + b * in_step + c;
    for (int q = 0; q < kBlocks; ++q) {
      V value, weight;
      std::memcpy(&value, in + q * kLanes, sizeof(V));
      std::memcpy(&weight, tap.w + c + q * kLanes, sizeof(V));
      sum[q] += value * weight;
    }
  }
  for (int q = 0; q < kBlocks; ++q) std::memcpy(out + c + q * kLanes, &sum[q], sizeof(V));
}

// Columns [b0, b1) of a row: 8 vectors of channels at a time, then 4, 2, 1, then the rest one at a time.
template <bool kCheck>
void DepthwiseColumns(const std::vector<DepthwiseTap>& taps, int64_t b0, int64_t b1, int64_t in_step,
                      int64_t channels, float* out, int64_t out_step) {
  for (int64_t b = b0; b < b1; ++b) {
    float* pixel = out + b * out_step;
    int64_t c = 0;
    for (; c + 8 * kDepthwiseLanes <= channels; c += 8 * kDepthwiseLanes) {
      DepthwisePixel<Vector, 8, kCheck>(taps, b, in_step, c, pixel);
    }
    if (c + 4 * kDepthwiseLanes <= channels) {
      DepthwisePixel<Vector, 4, kCheck>(taps, b, in_step, c, pixel);
      c += 4 * kDepthwiseLanes;
    }
    if (c + 2 * kDepthwiseLanes <= channels) {
      DepthwisePixel<Vector, 2, kCheck>(taps, b, in_step, c, pixel);
      c += 2 * kDepthwiseLanes;
    }
    if (c + kDepthwiseLanes <= channels) {
      DepthwisePixel<Vector, 1, kCheck>(taps, b, in_step, c, pixel);
      c += kDepthwiseLanes;
    }
    for (; c < channels; ++c) DepthwisePixel<float, 1, kCheck>(taps, b, in_step, c, pixel);
  }
}

// A row of `columns` pixels, out_step apart: the columns where every tap is inside dy without checks, the border
// columns with them.
void DepthwiseRow(const std::vector<DepthwiseTap>& taps, int64_t columns, int64_t in_step, int64_t channels,
                  float* out, int64_t out_step) {
  int64_t inner_first = 0, inner_end = columns;
  for (const DepthwiseTap& tap : taps) {
    inner_first = std::max(inner_first, tap.first);
    inner_end = std::min(inner_end, tap.end);
  }
  inner_first = std::min(inner_first, columns);
  inner_end = std::max(inner_end, inner_first);
  DepthwiseColumns<true>(taps, 0, inner_first, in_step, channels, out, out_step);
  DepthwiseColumns<false>(taps, inner_first, inner_end, in_step, channels, out, out_step);
  DepthwiseColumns<true>(taps, inner_end, columns, in_step, channels, out, out_step);
}

// Rows of dx per task: at least this many pixels (or a whole image); one row per task was 1.3x slower alone.
constexpr int64_t kDepthwiseTaskPixels = 448;

// For each row of dx and phase of its columns, the taps that reach it (RowOfDy, ColumnTapsByPhase) read
// consecutive pixels of dy.
ffi::Error DepthwiseInputGradient(ffi::ThreadPool pool, Float32x4d dy, Float32x4d w, ffi::Result<Float32x4d> dx,
                                  int64_t stride, int64_t pad_top, int64_t pad_left) {
  const auto dy_dims = dy.dimensions(), w_dims = w.dimensions(), dx_dims = dx->dimensions();
  const int64_t n = dx_dims[0], c = dx_dims[3];
  const Shape s{dx_dims[1], dx_dims[2], c, dy_dims[1], dy_dims[2], dy_dims[3], w_dims[0], stride, pad_top, pad_left};
  const bool shapes_fit = dy_dims[0] == n && dy_dims[3] == c && w_dims[1] == s.k && w_dims[2] == 1 &&
                          w_dims[3] == c && stride >= 1;
  if (!shapes_fit) {
    return ffi::Error::InvalidArgument("kdep_jax CPU depthwise input gradient kernel: shapes that do not fit together");
  }
  const float* dy_data = dy.typed_data();
  const float* w_data = w.typed_data();
  float* dx_data = dx->typed_data();
  const int64_t band = BandRows(s.height, s.width, kDepthwiseTaskPixels);
  const int64_t bands = (s.height + band - 1) / band;
  const std::vector<std::vector<ColumnTap>> column_taps = ColumnTapsByPhase(s);
  ParallelFor(pool, n * bands, [&]() {
    return [&, taps = std::vector<DepthwiseTap>()](int64_t task) mutable {
      const int64_t image = task / bands, first_row = task % bands * band;
      for (int64_t hi = first_row; hi < std::min(s.height, first_row + band); ++hi) {
        for (int64_t phase = 0; phase < static_cast<int64_t>(column_taps.size()); ++phase) {
          const int64_t columns = (s.width - phase + s.stride - 1) / s.stride;
          taps.clear();
          for (int64_t i = 0; i < s.k; ++i) {
            const int64_t ho = RowOfDy(s, hi, i);
            if (ho < 0) continue;
            for (const auto& [j, shift] : column_taps[phase]) {
              taps.push_back({dy_data + ((image * s.out_height + ho) * s.out_width + shift) * c,
                              w_data + (i * s.k + j) * c, std::max<int64_t>(0, -shift),
                              std::min(columns, s.out_width - shift)});
            }
          }
          DepthwiseRow(taps, columns, c, c, dx_data + ((image * s.height + hi) * s.width + phase) * c,
                       s.stride * c);
        }
      }
    };
  });
  return ffi::Error::Success();
}

// Each channel's mean and biased variance over the (N, H, W) of x (N, H, W, C), float32 or bfloat16
// (`layers.BatchNorm` in training): float64 sums of x and x^2 over chunks of kMomentRows pixels, added in chunk order
// (the shapes fix the order, never the threads), and var = E[x^2] - E[x]^2, which float64 keeps from cancelling
// (where float32 needs a second pass over x less its mean). One chunk per task.
constexpr int64_t kMomentRows = 256;

inline float Bfloat16ToFloat(uint16_t value) {
  const uint32_t bits = static_cast<uint32_t>(value) << 16;
  float result;
  std::memcpy(&result, &bits, 4);
  return result;
}

inline float AsFloat(float value) { return value; }
inline float AsFloat(uint16_t value) { return Bfloat16ToFloat(value); }

// Adds one pixel's c values and their squares to a chunk's float64 sums (c sums of x, then c of x^2).
template <typename Value>
inline void AddMoments(const Value* __restrict values, int64_t c, double* __restrict sums) {
  double* __restrict squares = sums + c;
  for (int64_t ch = 0; ch < c; ++ch) {
    const double value = AsFloat(values[ch]);
    sums[ch] += value;
    squares[ch] += value * value;
  }
}

// The mean and biased variance from the chunks' sums (`AddMoments`), added in chunk order.
void FinishMoments(const std::vector<double>& partial, int64_t chunks, int64_t c, int64_t pixels, float* mean,
                   float* var) {
  for (int64_t ch = 0; ch < c; ++ch) {
    double sum = 0.0, square = 0.0;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      sum += partial[chunk * 2 * c + ch];
      square += partial[chunk * 2 * c + c + ch];
    }
    const double m = sum / pixels;
    mean[ch] = static_cast<float>(m);
    var[ch] = static_cast<float>(std::max(square / pixels - m * m, 0.0));
  }
}

template <typename Value, typename Buffer>
ffi::Error BatchMoments(ffi::ThreadPool& pool, const Buffer& x, ffi::Result<Float32x1d>& mean,
                        ffi::Result<Float32x1d>& var) {
  const auto dims = x.dimensions();
  const int64_t c = dims[3], pixels = dims[0] * dims[1] * dims[2];
  if (mean->element_count() != c || var->element_count() != c || pixels < 1) {
    return ffi::Error::InvalidArgument("kdep_jax CPU batch-moments kernel: shapes that do not fit together");
  }
  const Value* x_data = reinterpret_cast<const Value*>(x.typed_data());
  const int64_t chunks = (pixels + kMomentRows - 1) / kMomentRows;
  std::vector<double> partial(chunks * 2 * c, 0.0);  // per chunk: c sums of x, then c of x^2
  ParallelFor(pool, chunks, [&]() {
    return [&](int64_t chunk) {
      for (int64_t pixel = chunk * kMomentRows; pixel < std::min(pixels, (chunk + 1) * kMomentRows); ++pixel) {
        AddMoments(x_data + pixel * c, c, partial.data() + chunk * 2 * c);
      }
    };
  });
  FinishMoments(partial, chunks, c, pixels, mean->typed_data(), var->typed_data());
  return ffi::Error::Success();
}

ffi::Error BatchMomentsOfFloat32(ffi::ThreadPool pool, Float32x4d x, ffi::Result<Float32x1d> mean,
                                 ffi::Result<Float32x1d> var) {
  return BatchMoments<float>(pool, x, mean, var);
}

ffi::Error BatchMomentsOfBfloat16(ffi::ThreadPool pool, Bfloat16x4d x, ffi::Result<Float32x1d> mean,
                                  ffi::Result<Float32x1d> var) {
  return BatchMoments<uint16_t>(pool, x, mean, var);
}

// A k x k max-pool's output y (N, Ho, Wo, C) of x (N, H, W, C), padded with -inf (jnp.maximum's: a NaN wins), and
// for each output the tap that holds the maximum (int8), numbered i * k + j in row-major order: the first (torch's
// rule; a padded tap holds -inf), or k * k where none does (a NaN maximum). One output row per task.
// Each of c channels' maximum over a window's k * k taps (tap(i, j): its c values, or null in the padding): -inf where
// no tap lies in x, a NaN where a tap holds one (as `layers.max_pool`).
template <typename Tap>
inline void WindowMaximum(const Tap& tap, int64_t k, int64_t c, float* __restrict max_of) {
  std::fill_n(max_of, c, -std::numeric_limits<float>::infinity());
  for (int64_t number = 0; number < k * k; ++number) {
    const float* __restrict values = tap(number / k, number % k);
    if (values == nullptr) continue;
    for (int64_t ch = 0; ch < c; ++ch) {
      max_of[ch] = values[ch] > max_of[ch] || values[ch] != values[ch] ? values[ch] : max_of[ch];
    }
  }
}

// The int8 number of the first of a window's taps that holds each channel's maximum (k * k where none does: a NaN
// maximum), through `held`: loops that compare floats and write int8 do not vectorise.
template <typename Tap>
inline void WindowTaps(const Tap& tap, int64_t k, int64_t c, const float* __restrict max_of, int32_t* __restrict held,
                       int8_t* taps) {
  std::fill_n(held, c, static_cast<int32_t>(k * k));
  for (int64_t number = k * k - 1; number >= 0; --number) {
    const float* __restrict values = tap(number / k, number % k);
    const int32_t held_tap = static_cast<int32_t>(number);
    if (values == nullptr) {
      for (int64_t ch = 0; ch < c; ++ch) {
        held[ch] = max_of[ch] == -std::numeric_limits<float>::infinity() ? held_tap : held[ch];
      }
    } else {
      for (int64_t ch = 0; ch < c; ++ch) held[ch] = values[ch] == max_of[ch] ? held_tap : held[ch];
    }
  }
  std::transform(held, held + c, taps, [](int32_t t) { return static_cast<int8_t>(t); });
}

ffi::Error MaxPool(ffi::ThreadPool pool, Float32x4d x, ffi::Result<Float32x4d> y, ffi::Result<Int8x4d> taps,
                   int64_t k, int64_t stride, int64_t pad_top, int64_t pad_left) {
  const auto x_dims = x.dimensions(), y_dims = y->dimensions(), taps_dims = taps->dimensions();
  const int64_t n = x_dims[0], height = x_dims[1], width = x_dims[2], c = x_dims[3];
  const int64_t out_height = y_dims[1], out_width = y_dims[2];
  const bool shapes_fit = std::equal(y_dims.begin(), y_dims.end(), taps_dims.begin()) && y_dims[0] == n &&
                          y_dims[3] == c && k >= 1 && k * k <= 127 && stride >= 1 && pad_top >= 0 && pad_left >= 0;
  if (!shapes_fit) {
    return ffi::Error::InvalidArgument("kdep_jax CPU max-pool kernel: shapes that do not fit together");
  }
  const float* x_data = x.typed_data();
  float* y_data = y->typed_data();
  int8_t* taps_data = taps->typed_data();
  ParallelFor(pool, n * out_height, [&]() {
    // Each output pixel's maximum and tap in float32 and int32 first: loops that compare floats and write int8 do
    // not vectorise.
    return [&, maximum = std::vector<float>(c), held = std::vector<int32_t>(c)](int64_t row) mutable {
      const int64_t image = row / out_height, ho = row % out_height;
      for (int64_t wo = 0; wo < out_width; ++wo) {
        auto in_image = [&](int64_t i, int64_t j) -> const float* {
          const int64_t hi = ho * stride + i - pad_top, wi = wo * stride + j - pad_left;
          return hi >= 0 && hi < height && wi >= 0 && wi < width ? x_data + ((image * height + hi) * width + wi) * c
                                                                 : nullptr;
        };
        float* __restrict max_of = maximum.data();
        int32_t* __restrict tap_of = held.data();
        WindowMaximum(in_image, k, c, max_of);
        const int64_t at = (row * out_width + wo) * c;
        WindowTaps(in_image, k, c, max_of, tap_of, taps_data + at);
        std::copy_n(max_of, c, y_data + at);
      }
    };
  });
  return ffi::Error::Success();
}

// The input gradient dx (N, H, W, C) of a k x k max-pool with `stride` and padding, from its output gradient dy
// (N, Ho, Wo, C) and, for each output, the tap that holds its window's maximum (N, Ho, Wo, C; int8), numbered
// i * k + j in row-major order (layers.max_pool's forward pass picks the first, torch's rule): a tap in the padding,
// or a number from k * k up (a NaN maximum, which equals no tap), takes the gradient away. One image per task, its
// windows in order: the sums do not depend on the threads.
ffi::Error MaxPoolGradient(ffi::ThreadPool pool, Int8x4d taps, Float32x4d dy, ffi::Result<Float32x4d> dx,
                           int64_t k, int64_t stride, int64_t pad_top, int64_t pad_left) {
  const auto taps_dims = taps.dimensions(), dy_dims = dy.dimensions(), dx_dims = dx->dimensions();
  const int64_t n = dx_dims[0], height = dx_dims[1], width = dx_dims[2], c = dx_dims[3];
  const int64_t out_height = dy_dims[1], out_width = dy_dims[2];
  const bool shapes_fit = std::equal(dy_dims.begin(), dy_dims.end(), taps_dims.begin()) && dy_dims[0] == n &&
                          dy_dims[3] == c && k >= 1 && stride >= 1 && pad_top >= 0 && pad_left >= 0;
  if (!shapes_fit) {
    return ffi::Error::InvalidArgument("kdep_jax CPU max-pool gradient kernel: shapes that do not fit together");
  }
  const int8_t* taps_data = taps.typed_data();
  const float* dy_data = dy.typed_data();
  float* dx_data = dx->typed_data();
  ParallelFor(pool, n, [&]() {
    return [&, held = std::vector<int32_t>(c)](int64_t image) mutable {  // int32: see MaxPool
      float* dx_image = dx_data + image * height * width * c;
      std::fill_n(dx_image, height * width * c, 0.0f);
      int32_t* __restrict tap = held.data();
      for (int64_t ho = 0; ho < out_height; ++ho) {
        for (int64_t wo = 0; wo < out_width; ++wo) {
          std::copy_n(taps_data + ((image * out_height + ho) * out_width + wo) * c, c, tap);
          const float* __restrict grad = dy_data + ((image * out_height + ho) * out_width + wo) * c;
          for (int64_t i = 0; i < k; ++i) {
            for (int64_t j = 0; j < k; ++j) {
              const int64_t hi = ho * stride + i - pad_top, wi = wo * stride + j - pad_left;
              if (hi < 0 || hi >= height || wi < 0 || wi >= width) continue;  // a padded tap takes nothing
              float* __restrict dx_pixel = dx_image + (hi * width + wi) * c;
              const int32_t number = static_cast<int32_t>(i * k + j);
              for (int64_t ch = 0; ch < c; ++ch) dx_pixel[ch] += tap[ch] == number ? grad[ch] : 0.0f;
            }
          }
        }
      }
    };
  });
  return ffi::Error::Success();
}

// Multi-head self-attention's core, softmax(q k^T * scale) v per head (`layers.attention`, ViT's blocks): from the
// fused q/k/v projection's output qkv (N, T, 3C), each token's q, k and v side by side with the heads side by side
// within each (C = heads x head_dim), to out (N, T, C), the heads side by side as the out-projection reads them. XLA
// runs it as two batched products around a softmax, the heads split out of the tokens and merged back by copies.
// Here a task is one image's head: its keys packed transposed, then kAttentionRows queries at a time, their logits
// summed in registers over kAttentionVectors vectors of keys, the softmax of each row in float32, and the weighted sum
// of the values in registers. Each output is summed by one thread in one order: it does not depend on the threads.
#if defined(__AVX512F__)
constexpr int kAttentionRows = 6;  // 6 x 4 sums, 4 loaded vectors and a broadcast: 29 of 32 registers
#else
constexpr int kAttentionRows = 2;  // 2 x 4 sums, 4 loaded vectors and a broadcast: 13 of 16 registers
#endif
constexpr int kAttentionVectors = 4;  // vectors of keys (logits) or of a value's features (outputs) a row sums at once
using IntVector = int32_t __attribute__((vector_size(sizeof(Vector)), aligned(4)));

inline Vector Splat(float value) { return Vector{} + value; }

// exp(x) for x <= 0 (a logit less its row's maximum) as Cephes' expf computes it, within 2 ulp: 2^n exp(r) with
// r = x - n ln 2 in [-ln 2 / 2, ln 2 / 2] and exp(r) a polynomial. Below -87 it gives exp(-87), 1.6e-38, where a row's
// weights, whose maximum is exp(0) = 1, cannot tell the difference.
inline Vector ExpOfNonPositive(Vector x) {
  x = x < -87.0f ? Splat(-87.0f) : x;
  const Vector rounder = Splat(12582912.0f);  // 1.5 x 2^23: adding and subtracting it rounds to an integer
  const Vector n = (x * 1.44269504088896341f + rounder) - rounder;
  const Vector r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln 2 in two parts, so r keeps its low bits
  Vector p = Splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const IntVector bits = (__builtin_convertvector(n, IntVector) + 127) << 23;  // 2^n, n >= -126
  Vector power;
  std::memcpy(&power, &bits, sizeof(Vector));
  return p * power;
}

struct AttentionHead {
  const float* q;  // the head's first query; tokens `stride` floats apart, as are the keys' and values'
  const float* k;
  const float* v;
  float* out;  // the head's output for the first token, `out_stride` floats apart
  int64_t tokens, head_dim, stride, out_stride, padded_tokens;
  float scale;
  const float* keys_transposed;  // (head_dim, padded_tokens), zeros past the last token
};

// Rows first_row ... first_row + R - 1 of the logits for keys key0 ... key0 + V * kLanes - 1, scaled, into `logits`
// (R rows of padded_tokens).
template <int R, int V>
void AttentionLogits(const AttentionHead& h, int64_t first_row, int64_t key0, float* logits) {
  Vector sums[R][V] = {};
  for (int64_t d = 0; d < h.head_dim; ++d) {
    Vector keys[V];
    for (int v = 0; v < V; ++v) keys[v] = Load(h.keys_transposed + d * h.padded_tokens + key0 + v * kLanes);
    for (int r = 0; r < R; ++r) {
      const float query = h.q[(first_row + r) * h.stride + d];
      for (int v = 0; v < V; ++v) sums[r][v] += query * keys[v];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) {
      const Vector scaled = sums[r][v] * h.scale;
      std::memcpy(logits + r * h.padded_tokens + key0 + v * kLanes, &scaled, sizeof(Vector));
    }
  }
}

template <int R, int V = kAttentionVectors>
void AttentionLogitsUpTo(const AttentionHead& h, int64_t first_row, int64_t key0, int64_t vectors, float* logits) {
  if (vectors >= V) return AttentionLogits<R, V>(h, first_row, key0, logits);
  if constexpr (V > 1) AttentionLogitsUpTo<R, V - 1>(h, first_row, key0, vectors, logits);
}

// The softmax of one row of logits, in place, left unnormalised: exp(logit - max), zeros past the last token; returns
// 1 / the row's sum, by which the weighted values are multiplied.
float UnnormalisedSoftmax(float* row, int64_t tokens, int64_t padded_tokens) {
  std::fill(row + tokens, row + padded_tokens, -std::numeric_limits<float>::infinity());
  Vector maxima = Load(row);
  for (int64_t j = kLanes; j < padded_tokens; j += kLanes) {
    const Vector logits = Load(row + j);
    maxima = maxima > logits ? maxima : logits;
  }
  float max = maxima[0];
  for (int64_t lane = 1; lane < kLanes; ++lane) max = std::max(max, maxima[lane]);
  Vector sums{};
  for (int64_t j = 0; j < padded_tokens; j += kLanes) {
    Vector e = ExpOfNonPositive(Load(row + j) - max);
    if (j + kLanes > tokens) {
      for (int64_t lane = tokens - j; lane < kLanes; ++lane) e[lane] = 0.0f;
    }
    sums += e;
    std::memcpy(row + j, &e, sizeof(Vector));
  }
  float sum = 0.0f;
  for (int64_t lane = 0; lane < kLanes; ++lane) sum += sums[lane];
  return 1.0f / sum;
}

// Rows first_row ... first_row + R - 1 of the output, features d0 ... d0 + kAttentionVectors * kLanes - 1: the
// values weighted by `weights` (R rows of padded_tokens), times each row's `scales`.
template <int R>
void AttentionValues(const AttentionHead& h, int64_t first_row, int64_t d0, const float* weights, const float* scales) {
  Vector sums[R][kAttentionVectors] = {};
  for (int64_t j = 0; j < h.tokens; ++j) {
    Vector values[kAttentionVectors];
    for (int v = 0; v < kAttentionVectors; ++v) values[v] = Load(h.v + j * h.stride + d0 + v * kLanes);
    for (int r = 0; r < R; ++r) {
      const float weight = weights[r * h.padded_tokens + j];
      for (int v = 0; v < kAttentionVectors; ++v) sums[r][v] += weight * values[v];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < kAttentionVectors; ++v) {
      const Vector out = sums[r][v] * scales[r];
      std::memcpy(h.out + (first_row + r) * h.out_stride + d0 + v * kLanes, &out, sizeof(Vector));
    }
  }
}

template <int R>
void AttentionRows(const AttentionHead& h, int64_t first_row, float* weights) {
  const int64_t key_vectors = h.padded_tokens / kLanes;
  // Blocks of keys as even as kAttentionVectors allows (13 vectors: 4, 3, 3, 3, not 4, 4, 4, 1, whose last block
  // would load a broadcast per product).
  for (int64_t vector = 0; vector < key_vectors;) {
    const int64_t left = key_vectors - vector, blocks = (left + kAttentionVectors - 1) / kAttentionVectors;
    const int64_t block = (left + blocks - 1) / blocks;
    AttentionLogitsUpTo<R>(h, first_row, vector * kLanes, block, weights);
    vector += block;
  }
  float scales[R];
  for (int r = 0; r < R; ++r) scales[r] = UnnormalisedSoftmax(weights + r * h.padded_tokens, h.tokens, h.padded_tokens);
  for (int64_t d0 = 0; d0 < h.head_dim; d0 += kAttentionVectors * kLanes) {
    AttentionValues<R>(h, first_row, d0, weights, scales);
  }
}

template <int R = kAttentionRows>
void AttentionRowsUpTo(const AttentionHead& h, int64_t first_row, int64_t rows, float* weights) {
  if (rows >= R) return AttentionRows<R>(h, first_row, weights);
  if constexpr (R > 1) AttentionRowsUpTo<R - 1>(h, first_row, rows, weights);
}

using Float32x3d = ffi::Buffer<ffi::F32, 3>;

ffi::Error Attention(ffi::ThreadPool pool, Float32x3d qkv, ffi::Result<Float32x3d> out, int64_t heads, float scale) {
  const auto dims = qkv.dimensions(), out_dims = out->dimensions();
  const int64_t n = dims[0], tokens = dims[1], channels = out_dims[2];
  const bool shapes_fit = heads >= 1 && out_dims[0] == n && out_dims[1] == tokens && dims[2] == 3 * channels &&
                          channels % heads == 0 && (channels / heads) % (kAttentionVectors * kLanes) == 0;
  if (!shapes_fit) return ffi::Error::InvalidArgument("kdep_jax CPU attention kernel: shapes that do not fit together");
  const int64_t head_dim = channels / heads, padded_tokens = (tokens + kLanes - 1) / kLanes * kLanes;
  const float* qkv_data = qkv.typed_data();
  float* out_data = out->typed_data();
  ParallelFor(pool, n * heads, [&]() {
    return [&, keys_transposed = std::vector<float>(head_dim * padded_tokens, 0.0f),
            weights = std::vector<float>(kAttentionRows * padded_tokens)](int64_t task) mutable {
      const int64_t image = task / heads, head = task % heads;
      const float* q = qkv_data + image * tokens * 3 * channels + head * head_dim;
      const AttentionHead h{q, q + channels, q + 2 * channels, out_data + image * tokens * channels + head * head_dim,
                            tokens, head_dim, 3 * channels, channels, padded_tokens, scale, keys_transposed.data()};
      for (int64_t j0 = 0; j0 < tokens; j0 += kLanes) {  // a vector of keys at a time: its rows stay in the L1 cache
        const int64_t end = std::min(tokens, j0 + kLanes);
        for (int64_t d = 0; d < head_dim; ++d) {
          for (int64_t j = j0; j < end; ++j) keys_transposed[d * padded_tokens + j] = h.k[j * h.stride + d];
        }
      }
      for (int64_t row = 0; row < tokens; row += kAttentionRows) {
        AttentionRowsUpTo(h, row, std::min<int64_t>(kAttentionRows, tokens - row), weights.data());
      }
    };
  });
  return ffi::Error::Success();
}

// A dense (Linear) layer's product y (M, N) = x (M, K) w (K, N) (`layers.dense`, the transformers' Linear layers),
// with w packed by the caller as (N / kVectorOutBlock, K, kVectorOutBlock): each block of output columns' weights in
// the order the micro-kernel reads them. First x is copied into panels of kSumRows rows, interleaved so that a
// step along K reads kSumRows consecutive floats (zeros past the last row). Then a task is a block of panels (as many
// rows as stay in the L2 cache with their K) and a group of column blocks: for each column block (its weights read
// from the L2 cache, once per panel) and each panel, kSumRows x kSumLanes sums in registers over up to kDenseDepth
// of K, added to y from the second pass over K on. Each output is summed by one task in one order.
constexpr int64_t kDenseDepth = 768;  // the K of one pass: a panel's K x kSumRows floats stay in the L1 cache
constexpr int64_t kDensePanelsPerTask = 28;  // panels of x in a task's block: 392 rows x 768 floats, 1.2 MB

template <int64_t Columns>
void DensePanel(const float* x_panel, const float* w_block, int64_t depth, float* y, int64_t n, int64_t rows,
                bool accumulate) {
  constexpr int64_t V = Columns / kLanes;
  Vector sums[kSumRows][V] = {};
#pragma GCC unroll 4
  for (int64_t k = 0; k < depth; ++k) {
    Vector weights[V];
    for (int64_t v = 0; v < V; ++v) weights[v] = Load(w_block + k * kVectorOutBlock + v * kLanes);
    for (int r = 0; r < kSumRows; ++r) {
      const float input = x_panel[k * kSumRows + r];
      for (int64_t v = 0; v < V; ++v) sums[r][v] += input * weights[v];
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t v = 0; v < V; ++v) {
      Vector out = sums[r][v];
      if (accumulate) out += Load(y + r * n + v * kLanes);
      std::memcpy(y + r * n + v * kLanes, &out, sizeof(Vector));
    }
  }
}

using Float32x2d = ffi::Buffer<ffi::F32, 2>;

ffi::Error Dense(ffi::ThreadPool pool, Float32x2d x, Float32x3d w, ffi::Result<Float32x2d> y) {
  const auto x_dims = x.dimensions(), w_dims = w.dimensions();
  const int64_t m = x_dims[0], depth = x_dims[1], blocks = w_dims[0], n = blocks * kVectorOutBlock;
  const bool shapes_fit = w_dims[1] == depth && w_dims[2] == kVectorOutBlock && y->dimensions()[0] == m &&
                          y->dimensions()[1] == n;
  if (!shapes_fit) return ffi::Error::InvalidArgument("kdep_jax CPU dense kernel: shapes that do not fit together");
  if (m == 0 || n == 0) return ffi::Error::Success();
  const int64_t panels = (m + kSumRows - 1) / kSumRows;
  const int64_t row_blocks = (panels + kDensePanelsPerTask - 1) / kDensePanelsPerTask;
  const int64_t panels_per_block = (panels + row_blocks - 1) / row_blocks;
  // About 8 tasks per thread, and as many for each thread where the blocks allow (9 tasks on 2 threads would leave
  // one idle for the last).
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t groups = std::clamp<int64_t>((8 * threads + row_blocks - 1) / row_blocks, 1, blocks);
  while (groups < blocks && row_blocks * groups % threads != 0) ++groups;
  const float* x_data = x.typed_data();
  const float* w_data = w.typed_data();
  float* y_data = y->typed_data();
  // Kept from call to call (on each thread that calls the kernel), so that its pages are not mapped afresh each time.
  thread_local std::vector<float> x_panels;
  if (x_panels.size() < static_cast<size_t>(panels * depth * kSumRows)) x_panels.resize(panels * depth * kSumRows);
  float* panels_data = x_panels.data();  // the helpers' own thread_local vectors are other ones
  ParallelFor(pool, panels, [&]() {
    return [&](int64_t panel) {
      float* to = panels_data + panel * depth * kSumRows;
      const int64_t rows = std::min<int64_t>(kSumRows, m - panel * kSumRows);
      for (int64_t k = 0; k < depth; ++k) {
        for (int64_t r = 0; r < kSumRows; ++r) {
          to[k * kSumRows + r] = r < rows ? x_data[(panel * kSumRows + r) * depth + k] : 0.0f;
        }
      }
    };
  });
  ParallelFor(pool, row_blocks * groups, [&]() {
    return [&](int64_t task) {
      const int64_t row_block = task / groups, group = task % groups;
      const int64_t first_panel = row_block * panels_per_block;
      const int64_t end_panel = std::min(panels, first_panel + panels_per_block);
      const int64_t first_block = blocks * group / groups, end_block = blocks * (group + 1) / groups;
      for (int64_t k0 = 0; k0 < depth; k0 += kDenseDepth) {
        const int64_t part = std::min(kDenseDepth, depth - k0);
        for (int64_t block = first_block; block < end_block; ++block) {
          for (int64_t panel = first_panel; panel < end_panel; ++panel) {
            const float* x_panel = panels_data + (panel * depth + k0) * kSumRows;
            const int64_t rows = std::min<int64_t>(kSumRows, m - panel * kSumRows);
            for (int64_t c = 0; c < kVectorOutBlock; c += kSumLanes) {
              DensePanel<kSumLanes>(x_panel, w_data + (block * depth + k0) * kVectorOutBlock + c, part,
                                    y_data + panel * kSumRows * n + block * kVectorOutBlock + c, n, rows, k0 > 0);
            }
          }
        }
      }
    };
  });
  return ffi::Error::Success();
}


// A dense conv's forward pass in bfloat16 on the AMX tiles: y (N, Ho, Wo, Cout) = x (N, H, W, Cin) conv w (k, k, Cin,
// Cout), all bfloat16, Cin and Cout multiples of 32. Each tile product multiplies 16 pixels' 32 input
// channels by their weights for 16 output channels; a tile loads 16 rows one stride apart, so the input a tap reads
// for 16 consecutive outputs must lie one stride apart. A task copies its band of rows into s * s phase planes, each
// the padded input's pixels (s r + pi, s c + pj): in plane (i % s, j % s) tap (i, j) reads, for the outputs
// q = row * width + column of a grid (width = Wo + (k - 1) / s, its last columns computed and dropped), the pixels
// q + (i / s) * width + j / s, consecutive. The sums are float32, added tap by tap and 32 channels at a time, and
// rounded to bfloat16 once (AmxOutput).
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
constexpr int64_t kAmxPixels = 32, kAmxChannels = 32;  // a block of outputs: two tiles of rows by two of columns
constexpr int64_t kAmxBandValues = 1 << 18;  // the bfloat16 values of a task's phase planes, at most (512 KiB)
constexpr int64_t kAmxCachedWeightBytes = 1 << 20;  // weights that stay in the L2 cache (2 MiB a core), at most

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// The kernel asks Linux once per process for the tiles' state (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA).
bool AmxPermitted() {
  static const bool permitted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return permitted;
}

// An allocator of memory from a 64-byte boundary, so that each 64-byte row a tile loads lies in one cache line; its
// values are left as they come (the kernels write what they read).
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64})); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t{64}); }
  template <typename U>
  void construct(U* p) {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
  bool operator==(const CacheLineAllocator&) const { return true; }
  bool operator!=(const CacheLineAllocator&) const { return false; }
};
using TileValues = std::vector<uint16_t, CacheLineAllocator<uint16_t>>;

// w (k, k, Cin, Cout) as the tiles read it: (Cout / 32, k * k, Cin / 2, 32, 2), two input channels side by side.
TileValues PackAmxWeights(const uint16_t* w, int64_t taps, int64_t cin, int64_t cout) {
  TileValues packed(taps * cin * cout);
  for (int64_t b = 0; b < cout / kAmxChannels; ++b) {
    for (int64_t t = 0; t < taps; ++t) {
      for (int64_t c = 0; c < cin; ++c) {
        uint16_t* to = packed.data() + ((b * taps + t) * (cin / 2) + c / 2) * 2 * kAmxChannels + c % 2;
        for (int64_t l = 0; l < kAmxChannels; ++l) to[2 * l] = w[(t * cin + c) * cout + b * kAmxChannels + l];
      }
    }
  }
  return packed;
}

// The nearest bfloat16 to `value` (ties to even), as XLA rounds; a NaN stays a NaN.
inline uint16_t RoundToBfloat16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  return value != value ? static_cast<uint16_t>((bits >> 16) | 0x40)
                        : static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

#if defined(__AVX512BF16__)
// `layers.relu` of 16 values: 0 where a value is below 0; a NaN stays.
inline __m512 Relu(__m512 value) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(value, _mm512_setzero_ps(), _CMP_LT_OQ), value,
                              _mm512_setzero_ps());
}

// 16 bfloat16 values as floats (exactly).
inline __m512 LoadBfloat16(const uint16_t* from) {
  const __m512i bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(from)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
}
#endif

// x's values as the tiles read them: x's own, or relu(x * scale + shift) (a BatchNorm's affine map, per channel, and
// `layers.relu`), computed as XLA computes `layers._activation` (the product rounded before the addition: no fused
// multiply-add) and rounded to bfloat16.
struct AmxInput {
  const uint16_t* x = nullptr;
  const float *scale = nullptr, *shift = nullptr;

  // Copies the `channels` values from offset `from` on to `to`.
  void Copy(int64_t from, int64_t channels, uint16_t* to) const {
    if (scale == nullptr) {
      std::memcpy(to, x + from, channels * 2);
      return;
    }
    int64_t c = 0;
#if defined(__AVX512BF16__)
    for (; c + 32 <= channels; c += 32) {  // VCVTNE2PS2BF16 rounds as RoundToBfloat16 (and flushes denormals)
      const __m512 low = Activation(LoadBfloat16(x + from + c), c);
      const __m512 high = Activation(LoadBfloat16(x + from + c + 16), c + 16);
      _mm512_storeu_si512(to + c, (__m512i)_mm512_cvtne2ps_pbh(high, low));
    }
#endif
    for (; c < channels; ++c) {
      float product = Bfloat16ToFloat(x[from + c]) * scale[c];
      asm("" : "+x"(product));
      const float value = product + shift[c];
      to[c] = RoundToBfloat16(value < 0.0f ? 0.0f : value);
    }
  }

#if defined(__AVX512BF16__)
  // relu(x * scale + shift) of 16 channels from c on.
  __m512 Activation(__m512 values, int64_t c) const {
    __m512 product = _mm512_mul_ps(values, _mm512_loadu_ps(scale + c));
    asm("" : "+v"(product));
    return Relu(_mm512_add_ps(product, _mm512_loadu_ps(shift + c)));
  }
#endif
};

// Where the sums go, rounded to bfloat16 (once, where XLA's bfloat16 conv rounds too): y's values; or, at the end of
// a ResNet block in eval mode, sums * scale + shift (its last BatchNorm's map, per channel) plus a residual of y's
// shape, relu'd where relu (XLA:CPU would read the sums back and round again, slowly). The residual itself may come
// through a BatchNorm's map (residual_scale, residual_shift: the downsampling shortcut's), rounded to bfloat16 as
// XLA rounds that BatchNorm's output.
struct AmxOutput {
  uint16_t* y = nullptr;
  const float *scale = nullptr, *shift = nullptr;
  const uint16_t* residual = nullptr;
  const float *residual_scale = nullptr, *residual_shift = nullptr;
  bool relu = false;

  // Writes the 32 channels from c0 on of the output at offset `to` from their sums.
  void Write(const float* sums, int64_t to, int64_t c0) const {
    int64_t c = 0;
#if defined(__AVX512BF16__)
    __m512 halves[2];
    for (; c < kAmxChannels; c += 16) {
      __m512 value = _mm512_loadu_ps(sums + c);
      if (scale != nullptr) {
        __m512 product = _mm512_mul_ps(value, _mm512_loadu_ps(scale + c0 + c));
        asm("" : "+v"(product));
        value = _mm512_add_ps(_mm512_add_ps(product, _mm512_loadu_ps(shift + c0 + c)), Residual(to + c, c0 + c));
      }
      halves[c / 16] = relu ? Relu(value) : value;
    }
    _mm512_storeu_si512(y + to, (__m512i)_mm512_cvtne2ps_pbh(halves[1], halves[0]));
#endif
    for (; c < kAmxChannels; ++c) {
      float value = sums[c];
      if (scale != nullptr) {
        float product = value * scale[c0 + c];
        asm("" : "+x"(product));
        float residual_value = Bfloat16ToFloat(residual[to + c]);
        if (residual_scale != nullptr) {
          float residual_product = residual_value * residual_scale[c0 + c];
          asm("" : "+x"(residual_product));
          residual_value = Bfloat16ToFloat(RoundToBfloat16(residual_product + residual_shift[c0 + c]));
        }
        value = product + shift[c0 + c] + residual_value;
      }
      y[to + c] = RoundToBfloat16(relu && value < 0.0f ? 0.0f : value);
    }
  }

#if defined(__AVX512BF16__)
  // The residual's 16 values at offset `to` on, of the channels from c on.
  __m512 Residual(int64_t to, int64_t c) const {
    const __m512 value = LoadBfloat16(residual + to);
    if (residual_scale == nullptr) return value;
    __m512 product = _mm512_mul_ps(value, _mm512_loadu_ps(residual_scale + c));
    asm("" : "+v"(product));
    const __m256bh rounded = _mm512_cvtneps_pbh(_mm512_add_ps(product, _mm512_loadu_ps(residual_shift + c)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)rounded), 16));
  }
#endif
};

// Adds to the four sum tiles the products of two tiles of a (16 rows of 32 values, the second from row 16 on; rows
// a_row values apart) with two of b (16 rows of 16 pairs, the second from value 32 on; rows b_row values apart).
inline void AmxProducts(const uint16_t* a, int64_t a_row, const uint16_t* b, int64_t b_row) {
  _tile_loadd(4, a, a_row * 2);
  _tile_loadd(5, a + 16 * a_row, a_row * 2);
  _tile_loadd(6, b, b_row * 2);
  _tile_loadd(7, b + 32, b_row * 2);
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(1, 4, 7);
  _tile_dpbf16ps(2, 5, 6);
  _tile_dpbf16ps(3, 5, 7);
}

// Adds to the four sum tiles the products of 32 outputs' inputs (`in`, tile rows `in_stride` values apart, 16 rows
// on from in + 16 * in_stride) with a tap's weights for 32 output channels (`w`, as PackAmxWeights lays them out).
inline void AmxTap(const uint16_t* in, int64_t in_stride, const uint16_t* w, int64_t cin) {
  for (int64_t c = 0; c < cin; c += kAmxChannels) {
    AmxProducts(in + c, in_stride, w + c * kAmxChannels, 2 * kAmxChannels);
  }
}

// Stores the four sum tiles in `sums`: 32 outputs' 32 float32 sums, output after output, `row` values apart.
inline void AmxStore(float* sums, int64_t row) {
  _tile_stored(0, sums, row * 4);
  _tile_stored(1, sums + 16, row * 4);
  _tile_stored(2, sums + 16 * row, row * 4);
  _tile_stored(3, sums + 16 * row + 16, row * 4);
}

ffi::Error AmxConvOf(ffi::ThreadPool& pool, const AmxInput& input, ffi::Span<const int64_t> x_dims,
                     Bfloat16x4d& w, const AmxOutput& output, ffi::Span<const int64_t> y_dims, int64_t stride,
                     int64_t pad_top, int64_t pad_left) {
  const auto w_dims = w.dimensions();
  const int64_t n = x_dims[0];
  const Shape s{x_dims[1], x_dims[2], x_dims[3], y_dims[1], y_dims[2], y_dims[3], w_dims[0],
                stride, pad_top, pad_left};
  const bool shapes_fit = y_dims[0] == n && w_dims[1] == s.k && w_dims[2] == s.in_channels &&
                          w_dims[3] == s.out_channels && s.in_channels % kAmxChannels == 0 &&
                          s.out_channels % kAmxChannels == 0 && stride >= 1 && pad_top >= 0 && pad_left >= 0;
  if (!shapes_fit) return ffi::Error::InvalidArgument("kdep_jax AMX conv kernel: shapes that do not fit together");
  if (n == 0 || s.out_height <= 0 || s.out_width <= 0) return ffi::Error::Success();
  if (!AmxPermitted()) return ffi::Error::Internal("kdep_jax AMX conv kernel: Linux did not grant the AMX tiles");
  const int64_t cin = s.in_channels, cout = s.out_channels, taps = s.k * s.k, reach = (s.k - 1) / s.stride;
  const int64_t phases = std::min(s.k, s.stride), width = s.out_width + reach;
  // A 1x1 conv with stride 1 reads x itself: its outputs' inputs are x's pixels, one after another.
  const bool reads_x = input.scale == nullptr && s.k == 1 && s.stride == 1 && s.height == s.out_height &&
                      s.width == s.out_width;
  // A task's outputs: a band of rows of one image, or whole images (as many as fill the budget, a quarter of the
  // batch per thread at most), so that each block of weights read into the cache serves many outputs.
  const int64_t image_values = phases * phases * ((s.out_height + reach + 1) * width + kAmxPixels) * cin;
  const int64_t chunk = std::clamp<int64_t>(kAmxBandValues / image_values, 1,
                                            std::max<int64_t>(1, n / (4 * pool.num_threads())));
  const int64_t band = std::clamp<int64_t>(kAmxBandValues / (phases * phases * width * cin) - reach - 1, 1,
                                           s.out_height);
  const int64_t bands = chunk > 1 ? 1 : (s.out_height + band - 1) / band, chunks = (n + chunk - 1) / chunk;
  const int64_t band_rows_max = chunk > 1 ? s.out_height : band;
  const int64_t plane_pixels = (band_rows_max + reach + 1) * width + kAmxPixels;
  const int64_t image_planes = reads_x ? 0 : phases * phases * plane_pixels * cin;
  const TileValues packed = PackAmxWeights(w.typed_data(), taps, cin, cout);
  // Where all the weights stay in the L2 cache, each block of outputs takes all its channels before the next, so
  // that its output rows are written whole, once; larger weights are read a block of channels at a time.
  const bool weights_cached = packed.size() * 2 <= kAmxCachedWeightBytes;
  // The sums of a block of outputs: all their channels where the weights are cached, so that each output's row (and
  // its residual's) is written (read) whole, one after the other, as the hardware prefetches; else 32 channels.
  const int64_t sums_row = weights_cached ? cout : kAmxChannels;
  ParallelFor(pool, chunks * bands, [&]() {
    return [&, planes = TileValues(chunk * image_planes + (reads_x ? kAmxPixels * cin : 0)),
            sums = std::vector<float>(kAmxPixels * sums_row)](int64_t task) mutable {
      const int64_t first_image = task / bands * chunk, images = std::min(chunk, n - first_image);
      const int64_t first_row = task % bands * band;
      const int64_t band_rows = std::min(band_rows_max, s.out_height - first_row);
      const int64_t outputs = band_rows * width;  // per image; whole images, one run, where reads_x
      for (int64_t image = 0; image < images && !reads_x; ++image) {
        const int64_t x_image = (first_image + image) * s.height * s.width * cin;
        for (int64_t pi = 0; pi < phases; ++pi) {
          for (int64_t pj = 0; pj < phases; ++pj) {
            uint16_t* plane = planes.data() + image * image_planes + (pi * phases + pj) * plane_pixels * cin;
            std::fill(plane, plane + plane_pixels * cin, uint16_t{0});
            for (int64_t r = 0; r < band_rows + reach; ++r) {
              const int64_t row = (first_row + r) * s.stride + pi - s.pad_top;
              if (row < 0 || row >= s.height) continue;
              for (int64_t c = 0; c < width; ++c) {
                const int64_t column = c * s.stride + pj - s.pad_left;
                if (column < 0 || column >= s.width) continue;
                input.Copy(x_image + (row * s.width + column) * cin, cin, plane + (r * width + c) * cin);
              }
            }
          }
        }
      }
      // Where x is read itself, the last block of the batch is copied out with zeros after it: its tiles' rows
      // run past x's end.
      const int64_t run = reads_x ? images * outputs : outputs, runs = reads_x ? 1 : images;
      const uint16_t* x_run =
          reads_x ? input.x + ((first_image * s.height + first_row) * s.width) * cin : nullptr;
      const bool ends_x = reads_x && first_image + images == n && run % kAmxPixels != 0;
      if (ends_x) {
        const int64_t last = run / kAmxPixels * kAmxPixels;
        std::fill(planes.begin(), planes.end(), uint16_t{0});
        std::memcpy(planes.data(), x_run + last * cin, (run - last) * cin * 2);
      }
      TileConfig config;
      for (int t = 0; t < 8; ++t) config.rows[t] = 16, config.bytes_per_row[t] = 64;
      _tile_loadconfig(&config);
      // The sums of 32 channels (block b) of 32 outputs (from q on) of one image (of the run, where reads_x), in
      // `sums` from channel b * 32 on where all channels are kept, else from 0.
      auto sum_block = [&](int64_t b, int64_t image, int64_t q) {
        const uint16_t* w_block = packed.data() + b * taps * cin * kAmxChannels;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        if (reads_x) {
          const bool copied = ends_x && q + kAmxPixels > run;
          AmxTap(copied ? planes.data() : x_run + q * cin, cin, w_block, cin);
        } else {
          const uint16_t* image_planes_data = planes.data() + image * image_planes;
          for (int64_t i = 0; i < s.k; ++i) {
            for (int64_t j = 0; j < s.k; ++j) {
              const uint16_t* plane =
                  image_planes_data + ((i % s.stride) * phases + j % s.stride) * plane_pixels * cin;
              AmxTap(plane + (q + i / s.stride * width + j / s.stride) * cin, cin,
                     w_block + (i * s.k + j) * cin * kAmxChannels, cin);
            }
          }
        }
        AmxStore(sums.data() + (weights_cached ? b * kAmxChannels : 0), sums_row);
      };
      // Writes the outputs from q on of channel blocks [first, last) from their sums.
      auto write_blocks = [&](int64_t first, int64_t last, int64_t image, int64_t q) {
        const int64_t y_run = ((first_image + image) * s.out_height + first_row) * s.out_width * cout;
        for (int64_t p = 0; p < kAmxPixels && q + p < run; ++p) {
          const int64_t row = (q + p) / width, column = (q + p) % width;
          if (column >= s.out_width) continue;
          for (int64_t b = first; b < last; ++b) {
            output.Write(sums.data() + p * sums_row + (b - first) * kAmxChannels,
                         y_run + (row * s.out_width + column) * cout + b * kAmxChannels, b * kAmxChannels);
          }
        }
      };
      for (int64_t image = 0; image < runs && weights_cached; ++image) {
        for (int64_t q = 0; q < run; q += kAmxPixels) {
          for (int64_t b = 0; b < cout / kAmxChannels; ++b) sum_block(b, image, q);
          write_blocks(0, cout / kAmxChannels, image, q);
        }
      }
      for (int64_t b = 0; b < cout / kAmxChannels && !weights_cached; ++b) {
        for (int64_t image = 0; image < runs; ++image) {
          for (int64_t q = 0; q < run; q += kAmxPixels) {
            sum_block(b, image, q);
            write_blocks(b, b + 1, image, q);
          }
        }
      }
      _tile_release();
    };
  });
  return ffi::Error::Success();
}
ffi::Error AmxConv(ffi::ThreadPool pool, Bfloat16x4d x, Bfloat16x4d w, ffi::Result<Bfloat16x4d> y, int64_t stride,
                   int64_t pad_top, int64_t pad_left) {
  AmxInput input;
  input.x = x.typed_data();
  AmxOutput output;
  output.y = y->typed_data();
  return AmxConvOf(pool, input, x.dimensions(), w, output, y->dimensions(), stride, pad_top, pad_left);
}

bool WidthsFit(Bfloat16x4d& x, Float32x1d& scale, Float32x1d& shift) {
  return scale.element_count() == x.dimensions()[3] && shift.element_count() == x.dimensions()[3];
}

ffi::Error AmxConvOfActivation(ffi::ThreadPool pool, Bfloat16x4d x, Float32x1d scale, Float32x1d shift,
                               Bfloat16x4d w, ffi::Result<Bfloat16x4d> y, int64_t stride, int64_t pad_top,
                               int64_t pad_left) {
  if (!WidthsFit(x, scale, shift)) {
    return ffi::Error::InvalidArgument("kdep_jax AMX conv kernel: an activation of another width than x");
  }
  AmxInput input;
  input.x = x.typed_data(), input.scale = scale.typed_data(), input.shift = shift.typed_data();
  AmxOutput output;
  output.y = y->typed_data();
  return AmxConvOf(pool, input, x.dimensions(), w, output, y->dimensions(), stride, pad_top, pad_left);
}

// AmxConvOfActivation at the end of a ResNet block: y = [relu](sums * out_scale + out_shift + r), where r is the
// residual, or bfloat16(residual * residual_scale + residual_shift) where those are not empty.
ffi::Error AmxConvOfActivationToBlockEnd(ffi::ThreadPool pool, Bfloat16x4d x, Float32x1d scale, Float32x1d shift,
                                         Bfloat16x4d w, Float32x1d out_scale, Float32x1d out_shift,
                                         Bfloat16x4d residual, Float32x1d residual_scale, Float32x1d residual_shift,
                                         ffi::Result<Bfloat16x4d> y, int64_t stride, int64_t pad_top,
                                         int64_t pad_left, int64_t relu) {
  const auto y_dims = y->dimensions(), residual_dims = residual.dimensions();
  const bool residual_mapped = residual_scale.element_count() != 0;
  if (!WidthsFit(x, scale, shift) || out_scale.element_count() != y_dims[3] ||
      out_shift.element_count() != y_dims[3] ||
      !std::equal(residual_dims.begin(), residual_dims.end(), y_dims.begin(), y_dims.end()) ||
      residual_shift.element_count() != residual_scale.element_count() ||
      (residual_mapped && residual_scale.element_count() != y_dims[3])) {
    return ffi::Error::InvalidArgument("kdep_jax AMX conv kernel: an activation or residual of another shape");
  }
  AmxInput input;
  input.x = x.typed_data(), input.scale = scale.typed_data(), input.shift = shift.typed_data();
  AmxOutput output;
  output.y = y->typed_data(), output.scale = out_scale.typed_data(), output.shift = out_shift.typed_data();
  output.residual = residual.typed_data(), output.relu = relu != 0;
  if (residual_mapped) {
    output.residual_scale = residual_scale.typed_data(), output.residual_shift = residual_shift.typed_data();
  }
  return AmxConvOf(pool, input, x.dimensions(), w, output, y_dims, stride, pad_top, pad_left);
}

// A dense conv's weight gradient in bfloat16 on the AMX tiles: dw (k, k, Cin, Cout), float32, from x (N, H, W, Cin)
// and the output gradient g (N, Ho, Wo, Cout), both bfloat16, Cin and Cout multiples of 32. A tile product here
// multiplies 16 input channels' values at 32 outputs' taps by those outputs' gradients for 16 output channels. So x
// is first copied into the forward pass's phase planes (AmxConvOf) transposed, a row per channel, along which tap
// (i, j) reads, for the outputs q of the grid, the pixels q + (i / s) * width + j / s, consecutive; and g into the
// grid (its dropped columns zero) with pairs of consecutive outputs side by side, as the tiles read their second
// operand. Then each chunk of images (kAmxGradientChunkPixels outputs) keeps each tap's sums for 32 by 32 channels in
// four tiles over its outputs, block of channels by block, so that the rows each block reads stay in the L2 cache
// for its taps; several chunks' sums go into float64 partials, added in chunk order (as `WeightGradient`'s), one
// chunk's into dw.
constexpr int64_t kAmxGradientChunkPixels = 4096;

struct AmxGradientLayout {
  int64_t reach, phases, width, grid, plane_pixels;  // grid: an image's outputs, in blocks of kAmxPixels

  explicit AmxGradientLayout(const Shape& s)
      : reach((s.k - 1) / s.stride), phases(std::min(s.k, s.stride)), width(s.out_width + reach),
        grid((s.out_height * width + kAmxPixels - 1) / kAmxPixels * kAmxPixels),
        plane_pixels(grid + reach * (width + 1)) {}  // as far as the last block's furthest tap reads
};

#if defined(__AVX512BW__)
// Two-source permutes of 32 bfloat16 values: for each block size m (16, 8, 4, 2, 1), the indices that swap the
// off-diagonal m x m blocks of rows i and i + m (Transpose32x32); then those that interleave two rows' values.
struct PermuteIndices {
  alignas(64) uint16_t swap[5][2][32], interleave[2][32];

  PermuteIndices() {
    for (int level = 0; level < 5; ++level) {
      const int m = 16 >> level;
      for (int column = 0; column < 32; ++column) {
        const bool upper = column & m;
        swap[level][0][column] = static_cast<uint16_t>(upper ? 32 | (column ^ m) : column);
        swap[level][1][column] = static_cast<uint16_t>(upper ? 32 | column : column | m);
      }
    }
    for (int k = 0; k < 32; ++k) {
      interleave[0][k] = static_cast<uint16_t>((k & 1) << 5 | k >> 1);
      interleave[1][k] = static_cast<uint16_t>((k & 1) << 5 | (16 + (k >> 1)));
    }
  }
};

const PermuteIndices& Permutes() {
  static const PermuteIndices indices;
  return indices;
}

// rows[r][c] <- rows[c][r] (32 rows of 32 bfloat16 values), by swapping the off-diagonal blocks of every size.
inline void Transpose32x32(__m512i rows[32]) {
  const PermuteIndices& indices = Permutes();
  for (int level = 0; level < 5; ++level) {
    const int m = 16 >> level;
    const __m512i first = _mm512_load_si512(indices.swap[level][0]), second = _mm512_load_si512(indices.swap[level][1]);
    for (int i = 0; i < 32; ++i) {
      if (i & m) continue;
      const __m512i a = rows[i], b = rows[i | m];
      rows[i] = _mm512_permutex2var_epi16(a, first, b);
      rows[i | m] = _mm512_permutex2var_epi16(a, second, b);
    }
  }
}
#endif

// A tile's second operand from the output gradients of two consecutive outputs (null: zeros), Cout values each:
// their values side by side, channel by channel.
void InterleavePairs(const uint16_t* even, const uint16_t* odd, int64_t cout, uint16_t* to) {
  int64_t c = 0;
#if defined(__AVX512BW__)
  const PermuteIndices& indices = Permutes();
  const __m512i low = _mm512_load_si512(indices.interleave[0]), high = _mm512_load_si512(indices.interleave[1]);
  for (; c + 32 <= cout; c += 32) {
    const __m512i a = even ? _mm512_loadu_si512(even + c) : _mm512_setzero_si512();
    const __m512i b = odd ? _mm512_loadu_si512(odd + c) : _mm512_setzero_si512();
    _mm512_storeu_si512(to + 2 * c, _mm512_permutex2var_epi16(a, low, b));
    _mm512_storeu_si512(to + 2 * c + 32, _mm512_permutex2var_epi16(a, high, b));
  }
#endif
  for (; c < cout; ++c) {
    to[2 * c] = even ? even[c] : uint16_t{0};
    to[2 * c + 1] = odd ? odd[c] : uint16_t{0};
  }
}

// An image's transposed phase planes (phases * phases * Cin rows of plane_pixels) and gradient pairs (grid / 2
// rows of Cout pairs), zero where nothing is read. The planes are copied 32 pixels by 32 channels at a time
// (transposed in registers where the CPU has AVX512-BW; else a channel's row at a time, the pixels' values in the L1
// cache). Copying them value by value took 44% of a 56 px conv's weight gradient (Intel Xeon).
void CopyAmxGradientImage(const uint16_t* x, const uint16_t* g, uint16_t* planes, uint16_t* pairs, const Shape& s,
                          const AmxGradientLayout& l) {
  const int64_t cin = s.in_channels, cout = s.out_channels;
  std::fill(planes, planes + l.phases * l.phases * cin * l.plane_pixels, uint16_t{0});
  for (int64_t phase = 0; phase < l.phases * l.phases; ++phase) {
    const int64_t pi = phase / l.phases, pj = phase % l.phases;
    // the grid's columns that read x: column c * stride + pj - pad_left in [0, W)
    const int64_t first = std::max<int64_t>(0, (s.pad_left - pj + s.stride - 1) / s.stride);
    const int64_t last = std::min(l.width, (s.width - 1 + s.pad_left - pj) / s.stride + 1);
    uint16_t* plane = planes + phase * cin * l.plane_pixels;
    for (int64_t r = 0; r * l.width < l.plane_pixels; ++r) {
      const int64_t row = r * s.stride + pi - s.pad_top;
      if (row < 0 || row >= s.height) continue;
      const int64_t end = std::min(last, l.plane_pixels - r * l.width);
      for (int64_t c0 = first; c0 < end; c0 += kAmxPixels) {
        const int64_t count = std::min(kAmxPixels, end - c0);
        const uint16_t* from = x + (row * s.width + c0 * s.stride + pj - s.pad_left) * cin;
        uint16_t* to = plane + r * l.width + c0;
#if defined(__AVX512BW__)
        const __mmask32 written = count == 32 ? ~__mmask32{0} : (__mmask32{1} << count) - 1;
        for (int64_t c1 = 0; c1 < cin; c1 += 32) {
          __m512i rows[32];
          for (int p = 0; p < 32; ++p) {
            rows[p] = p < count ? _mm512_loadu_si512(from + p * s.stride * cin + c1) : _mm512_setzero_si512();
          }
          Transpose32x32(rows);
          for (int c = 0; c < 32; ++c) _mm512_mask_storeu_epi16(to + (c1 + c) * l.plane_pixels, written, rows[c]);
        }
#else
        for (int64_t c = 0; c < cin; ++c) {
          for (int64_t p = 0; p < count; ++p) to[c * l.plane_pixels + p] = from[p * s.stride * cin + c];
        }
#endif
      }
    }
  }
  // a grid output's gradient, or zeros (a dropped column, past the last row)
  auto gradient = [&](int64_t q) -> const uint16_t* {
    const int64_t row = q / l.width, column = q % l.width;
    return row < s.out_height && column < s.out_width ? g + (row * s.out_width + column) * cout : nullptr;
  };
  for (int64_t q = 0; q < l.grid; q += 2) InterleavePairs(gradient(q), gradient(q + 1), cout, pairs + q * cout);
}

// The sums of a chunk's images for output channel blocks [block_begin, block_end): stored in dw where the chunk is
// the batch (partial null), else added to `partial` (dw's shape).
void AddAmxGradientChunk(const uint16_t* planes, const uint16_t* pairs, int64_t images, int64_t block_begin,
                         int64_t block_end, double* partial, float* dw, const Shape& s, const AmxGradientLayout& l) {
  const int64_t cin = s.in_channels, cout = s.out_channels, image_planes = l.phases * l.phases * cin * l.plane_pixels;
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.rows[t] = 16, config.bytes_per_row[t] = 64;
  _tile_loadconfig(&config);
  float sums[kAmxChannels * kAmxChannels];
  for (int64_t b = block_begin; b < block_end; ++b) {
    for (int64_t c0 = 0; c0 < cin; c0 += kAmxChannels) {
      for (int64_t i = 0; i < s.k; ++i) {
        for (int64_t j = 0; j < s.k; ++j) {
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
          const int64_t tap = ((i % s.stride) * l.phases + j % s.stride) * cin * l.plane_pixels +
                              c0 * l.plane_pixels + i / s.stride * l.width + j / s.stride;
          for (int64_t image = 0; image < images; ++image) {
            const uint16_t* in = planes + image * image_planes + tap;
            const uint16_t* grad = pairs + image * l.grid * cout + b * kAmxChannels * 2;
            for (int64_t q = 0; q < l.grid; q += kAmxPixels) {
              AmxProducts(in + q, l.plane_pixels, grad + q * cout, 2 * cout);
            }
          }
          const int64_t offset = ((i * s.k + j) * cin + c0) * cout + b * kAmxChannels;
          if (partial == nullptr) {
            AmxStore(dw + offset, cout);
            continue;
          }
          AmxStore(sums, kAmxChannels);
          double* to = partial + offset;
          for (int64_t c = 0; c < kAmxChannels; ++c) {
            for (int64_t o = 0; o < kAmxChannels; ++o) to[c * cout + o] += sums[c * kAmxChannels + o];
          }
        }
      }
    }
  }
  _tile_release();
}

ffi::Error AmxConvWeightGradient(ffi::ThreadPool pool, Bfloat16x4d x, Bfloat16x4d g, ffi::Result<Float32x4d> dw,
                                 int64_t stride, int64_t pad_top, int64_t pad_left) {
  const auto x_dims = x.dimensions(), g_dims = g.dimensions(), dw_dims = dw->dimensions();
  const int64_t n = x_dims[0];
  const Shape s{x_dims[1], x_dims[2], x_dims[3], g_dims[1], g_dims[2], g_dims[3], dw_dims[0],
                stride, pad_top, pad_left};
  const bool shapes_fit = g_dims[0] == n && dw_dims[1] == s.k && dw_dims[2] == s.in_channels &&
                          dw_dims[3] == s.out_channels && s.in_channels % kAmxChannels == 0 &&
                          s.out_channels % kAmxChannels == 0 && stride >= 1 && pad_top >= 0 && pad_left >= 0;
  if (!shapes_fit) return ffi::Error::InvalidArgument("kdep_jax AMX weight gradient: shapes that do not fit together");
  const int64_t size = dw->element_count();
  if (n == 0 || s.out_height <= 0 || s.out_width <= 0) {
    std::fill(dw->typed_data(), dw->typed_data() + size, 0.0f);
    return ffi::Error::Success();
  }
  if (!AmxPermitted()) return ffi::Error::Internal("kdep_jax AMX conv kernel: Linux did not grant the AMX tiles");
  const AmxGradientLayout l(s);
  const int64_t image_planes = l.phases * l.phases * s.in_channels * l.plane_pixels;
  const int64_t image_pairs = l.grid * s.out_channels;
  TileValues planes(n * image_planes), pairs(n * image_pairs);
  ParallelFor(pool, n, [&]() {
    return [&](int64_t image) {
      CopyAmxGradientImage(x.typed_data() + image * s.height * s.width * s.in_channels,
                           g.typed_data() + image * s.out_height * s.out_width * s.out_channels,
                           planes.data() + image * image_planes, pairs.data() + image * image_pairs, s, l);
    };
  });
  const int64_t out_pixels = s.out_height * s.out_width, parts = s.out_channels / kAmxChannels;
  const int64_t chunk_images = std::clamp<int64_t>((kAmxGradientChunkPixels + out_pixels - 1) / out_pixels, 1, n);
  const int64_t chunks = (n + chunk_images - 1) / chunk_images;
  const int64_t groups = std::clamp<int64_t>(4 * pool.num_threads() / chunks, 1, parts);
  // One chunk's float32 sums are dw's values: float64 partials would give the same after 19 MB of them zeroed, added
  // to and rounded for ResNet-18's 3x3 convs at 7 px, whose x and g are 1.6 MB each (there 14 -> 9 ms; Intel Xeon).
  std::vector<double> partials(chunks > 1 ? chunks * size : 0, 0.0);
  ParallelFor(pool, chunks * groups, [&]() {
    return [&](int64_t task) {
      const int64_t chunk = task / groups, group = task % groups, first_image = chunk * chunk_images;
      AddAmxGradientChunk(planes.data() + first_image * image_planes, pairs.data() + first_image * image_pairs,
                          std::min(chunk_images, n - first_image), group * parts / groups,
                          (group + 1) * parts / groups, chunks > 1 ? partials.data() + chunk * size : nullptr,
                          dw->typed_data(), s, l);
    };
  });
  if (chunks == 1) return ffi::Error::Success();
  for (int64_t chunk = 1; chunk < chunks; ++chunk) {
    for (int64_t t = 0; t < size; ++t) partials[t] += partials[chunk * size + t];
  }
  RoundedSums(size)(partials.data(), dw->typed_data(), s);
  return ffi::Error::Success();
}

// A conv whose input channels do not come in blocks of 32 (a stem's, on the RGB image) on the AMX tiles, of bfloat16
// x and w, to float32 sums (what the float32 kernel gives a bfloat16 stem, `layers._conv_forms`). One row of an
// output's patch, its k taps' Cin values along a row of x (consecutive in x), is copied into `row_depth` values (k *
// Cin rounded up to 32, zeros after): the patch rows of each input row, one per output column, serve the k output rows
// that read it. The conv is then, tap row i by tap row, the product of the patch rows by the kernel's row i as
// (row_depth, Cout), 32 outputs of an output row by 32 channels at a time; a tap row in the padding is skipped. Its
// weight gradient: the patch rows transposed by the output gradient, tap row by tap row.
#if defined(__AVX512BW__)
// The first `count` of 32 lanes (clamped to 0 and 32).
inline __mmask32 FirstLanes(int64_t count) {
  return count >= 32 ? ~__mmask32{0} : count <= 0 ? __mmask32{0} : (__mmask32{1} << count) - 1;
}
#endif

struct AmxPatchRows {
  Shape s;
  int64_t row_values, row_depth, pitch;  // pitch: an input row's patch rows, in blocks of kAmxPixels

  explicit AmxPatchRows(const Shape& shape)
      : s(shape), row_values(shape.k * shape.in_channels),
        row_depth((row_values + kAmxChannels - 1) / kAmxChannels * kAmxChannels),
        pitch((shape.out_width + kAmxPixels - 1) / kAmxPixels * kAmxPixels) {}

  // A task's output rows: as many as keep its patch rows within kAmxBandValues.
  int64_t Band() const {
    return std::clamp<int64_t>((kAmxBandValues / (pitch * row_depth) - s.k) / s.stride + 1, 1, s.out_height);
  }
  // The input rows [first, last) that output rows [oy0, oy1) read.
  int64_t FirstRow(int64_t oy0) const { return std::max<int64_t>(0, oy0 * s.stride - s.pad_top); }
  int64_t LastRow(int64_t oy1) const { return std::min(s.height, (oy1 - 1) * s.stride - s.pad_top + s.k); }

  // Copies the patch rows of output columns [ox0, ox1) from a row of x to `to`, row_depth values each, where the
  // values past row_values are zeros already.
  void Copy(const uint16_t* x_row, int64_t ox0, int64_t ox1, uint16_t* to) const {
    const int64_t cin = s.in_channels;
    for (int64_t ox = ox0; ox < ox1; ++ox, to += row_depth) {
      const int64_t column = ox * s.stride - s.pad_left;
      // the values [first, last) lie in x
      const int64_t first = std::max<int64_t>(0, -column) * cin, last = std::min(s.k, s.width - column) * cin;
      const uint16_t* from = x_row + column * cin;
#if defined(__AVX512BW__)
      if (first == 0 && last == row_values && row_depth == 32) {  // most: one vector, its zeros after row_values
        _mm512_storeu_si512(to, _mm512_maskz_loadu_epi16(FirstLanes(row_values), from));
        continue;
      }
      for (int64_t v = 0; v < row_values; v += 32) {
        const __mmask32 read = FirstLanes(last - v) & ~FirstLanes(first - v);
        const __m512i values = read ? _mm512_maskz_loadu_epi16(read, from + v) : _mm512_setzero_si512();
        _mm512_mask_storeu_epi16(to + v, FirstLanes(row_values - v), values);
      }
#else
      for (int64_t v = 0; v < row_values; ++v) to[v] = v >= first && v < last ? from[v] : uint16_t{0};
#endif
    }
  }

  // The float32 sums of output rows [oy0, oy1) of an image, stored from `y_rows` on, Wo * Cout values a row: their
  // input rows' patch rows copied into `rows` first, then their products with the packed kernel (`Weights`) on the
  // tiles (configured by the caller); `sums` holds a block of outputs short of kAmxPixels.
  void Sums(const uint16_t* x_image, const TileValues& packed, int64_t oy0, int64_t oy1, uint16_t* rows, float* sums,
            float* y_rows) const {
    const int64_t cout = s.out_channels, first_row = FirstRow(oy0), last_row = LastRow(oy1);
    for (int64_t r = first_row; r < last_row; ++r) {
      Copy(x_image + r * s.width * s.in_channels, 0, s.out_width, rows + (r - first_row) * pitch * row_depth);
    }
    for (int64_t oy = oy0; oy < oy1; ++oy) {
      float* y_row = y_rows + (oy - oy0) * s.out_width * cout;
      for (int64_t ox0 = 0; ox0 < s.out_width; ox0 += kAmxPixels) {
        const int64_t count = std::min(kAmxPixels, s.out_width - ox0);
        for (int64_t b = 0; b < cout / kAmxChannels; ++b) {
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
          for (int64_t i = 0; i < s.k; ++i) {
            const int64_t r = oy * s.stride + i - s.pad_top;
            if (r < 0 || r >= s.height) continue;
            AmxTap(rows + ((r - first_row) * pitch + ox0) * row_depth, row_depth,
                   packed.data() + (b * s.k + i) * row_depth * kAmxChannels, row_depth);
          }
          AmxStore(count == kAmxPixels ? y_row + ox0 * cout + b * kAmxChannels : sums + b * kAmxChannels, cout);
        }
        if (count < kAmxPixels) std::copy(sums, sums + count * cout, y_row + ox0 * cout);
      }
    }
  }

  // The kernel (k, k, Cin, Cout) as (k, row_depth, Cout), zero rows after row_values, as the tiles read it.
  TileValues Weights(const uint16_t* w) const {
    const int64_t cout = s.out_channels;
    std::vector<uint16_t> rows(s.k * row_depth * cout, uint16_t{0});
    for (int64_t i = 0; i < s.k; ++i) {
      std::copy(w + i * row_values * cout, w + (i + 1) * row_values * cout, rows.begin() + i * row_depth * cout);
    }
    return PackAmxWeights(rows.data(), s.k, row_depth, cout);
  }
};

// The shapes of a patch conv's x, kernel (or dw) and y (or g) fit: y's channels in blocks of 32.
bool PatchShapesFit(const Shape& s, int64_t n, ffi::Span<const int64_t> w_dims, int64_t y_n) {
  return y_n == n && w_dims[1] == s.k && w_dims[2] == s.in_channels && w_dims[3] == s.out_channels &&
         s.out_channels % kAmxChannels == 0 && s.stride >= 1 && s.pad_top >= 0 && s.pad_left >= 0;
}

// The patch conv's x, w and sums' shapes; an error where they do not fit.
ffi::Error PatchConvShape(Bfloat16x4d& x, Bfloat16x4d& w, ffi::Span<const int64_t> y_dims, int64_t stride,
                          int64_t pad_top, int64_t pad_left, Shape& s) {
  const auto x_dims = x.dimensions(), w_dims = w.dimensions();
  s = Shape{x_dims[1], x_dims[2], x_dims[3], y_dims[1], y_dims[2], y_dims[3], w_dims[0], stride, pad_top, pad_left};
  if (!PatchShapesFit(s, x_dims[0], w_dims, y_dims[0])) {
    return ffi::Error::InvalidArgument("kdep_jax AMX patch conv kernel: shapes that do not fit together");
  }
  if (!AmxPermitted()) return ffi::Error::Internal("kdep_jax AMX conv kernel: Linux did not grant the AMX tiles");
  return ffi::Error::Success();
}

// Loads the tile configuration of AmxProducts' eight 16 x 64-byte tiles.
void ConfigureTiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.rows[t] = 16, config.bytes_per_row[t] = 64;
  _tile_loadconfig(&config);
}

ffi::Error AmxPatchConv(ffi::ThreadPool pool, Bfloat16x4d x, Bfloat16x4d w, ffi::Result<Float32x4d> y,
                        int64_t stride, int64_t pad_top, int64_t pad_left) {
  Shape s;
  if (ffi::Error error = PatchConvShape(x, w, y->dimensions(), stride, pad_top, pad_left, s); error.failure()) {
    return error;
  }
  const int64_t n = x.dimensions()[0];
  if (n == 0 || s.out_height <= 0 || s.out_width <= 0) return ffi::Error::Success();
  const AmxPatchRows patches(s);
  const int64_t band = patches.Band(), bands = (s.out_height + band - 1) / band, cout = s.out_channels;
  const TileValues packed = patches.Weights(w.typed_data());
  ParallelFor(pool, n * bands, [&]() {
    return [&, rows = TileValues(((band - 1) * s.stride + s.k) * patches.pitch * patches.row_depth, uint16_t{0}),
            sums = std::vector<float>(kAmxPixels * cout)](int64_t task) mutable {
      const int64_t image = task / bands, oy0 = task % bands * band, oy1 = std::min(s.out_height, oy0 + band);
      ConfigureTiles();
      patches.Sums(x.typed_data() + image * s.height * s.width * s.in_channels, packed, oy0, oy1, rows.data(),
                   sums.data(), y->typed_data() + (image * s.out_height + oy0) * s.out_width * cout);
      _tile_release();
    };
  });
  return ffi::Error::Success();
}

// The patch conv's float32 sums max-pooled (pool_size x pool_size windows, -inf padding; `layers.max_pool`), as
// `AmxPatchConv` then `MaxPool` give them, without writing the sums out: each task's band of pooled rows from the
// conv rows it reads (those of two bands' common edge computed twice), kept in the L2 cache. A ResNet's stem pools
// its conv's sums (`layers.pools_before_activation`): in eval mode this alone; in training with each output's tap
// (`MaxPool`'s) and the sums' batch statistics (`BatchMoments`', bit for bit: each task adds the chunks of pixels
// that lie in the conv rows it owns, and keeps the values of a chunk it shares for the caller to add in order).
constexpr int64_t kAmxPooledSumValues = 1 << 17;  // a task's conv rows' float32 sums, at most (512 KiB)

struct PoolShape {
  int64_t size, stride, pad;
};

// The shapes of the patch conv's x and w, with its sums' max-pool of pooled_dims (N, Ho, Wo, Cout); padding the same on
// both sides; an error where they do not fit.
ffi::Error PooledConvShape(Bfloat16x4d& x, Bfloat16x4d& w, ffi::Span<const int64_t> pooled_dims, int64_t stride,
                           int64_t pad_top, int64_t pad_left, const PoolShape& p, Shape& s) {
  const auto x_dims = x.dimensions(), w_dims = w.dimensions();
  const int64_t steps = std::max<int64_t>(stride, 1);
  const int64_t sums_dims[4] = {pooled_dims[0], (x_dims[1] + 2 * pad_top - w_dims[0]) / steps + 1,
                                (x_dims[2] + 2 * pad_left - w_dims[0]) / steps + 1, pooled_dims[3]};
  if (ffi::Error error = PatchConvShape(x, w, ffi::Span<const int64_t>(sums_dims, 4), stride, pad_top, pad_left, s);
      error.failure()) {
    return error;
  }
  if (p.size < 1 || p.stride < 1 || p.pad < 0 || p.size * p.size > 127 ||
      pooled_dims[1] != (s.out_height + 2 * p.pad - p.size) / p.stride + 1 ||
      pooled_dims[2] != (s.out_width + 2 * p.pad - p.size) / p.stride + 1) {
    return ffi::Error::InvalidArgument("kdep_jax AMX patch conv kernel: a pool of another shape");
  }
  return ffi::Error::Success();
}

// Where training asks for them: each pooled output's tap (int8) and the sums' mean and variance.
struct PoolTraining {
  int8_t* taps;
  float *mean, *var;
};

ffi::Error PatchConvPool(ffi::ThreadPool& pool, Bfloat16x4d& x, Bfloat16x4d& w, float* y,
                         ffi::Span<const int64_t> y_dims, int64_t stride, int64_t pad_top, int64_t pad_left,
                         const PoolShape& p, const PoolTraining* training) {
  Shape s;
  if (ffi::Error error = PooledConvShape(x, w, y_dims, stride, pad_top, pad_left, p, s); error.failure()) return error;
  const int64_t n = x.dimensions()[0], height = s.out_height, width = s.out_width, cout = s.out_channels;
  const int64_t out_height = y_dims[1], out_width = y_dims[2];
  if (n == 0 || out_height <= 0 || out_width <= 0 || height <= 0 || width <= 0) return ffi::Error::Success();
  const AmxPatchRows patches(s);
  const int64_t conv_rows_max = std::max<int64_t>(kAmxPooledSumValues / (width * cout), p.size);
  const int64_t band = std::clamp<int64_t>((conv_rows_max - p.size) / p.stride + 1, 1, out_height);
  const int64_t bands = (out_height + band - 1) / band, conv_rows = (band - 1) * p.stride + p.size + p.stride;
  // A task's conv rows [r0, r1): its windows', and in training those it owns, [own0, own1) (the bands' own rows
  // cover the conv's rows once, windows or not).
  auto owned_end = [&](int64_t b) {
    return b == bands - 1 ? height : std::clamp<int64_t>((b + 1) * band * p.stride - p.pad, 0, height);
  };
  const int64_t image_pixels = height * width, pixels = n * image_pixels;
  const int64_t chunks = (pixels + kMomentRows - 1) / kMomentRows;
  std::vector<double> partial(training ? chunks * 2 * cout : 0, 0.0);
  // the chunks that tasks share (a task's first pixel inside them), each with a slot for its pixels' sums
  std::vector<int64_t> slot(training ? chunks : 0, -1);
  int64_t slots = 0;
  for (int64_t task = 1; training && task < n * bands; ++task) {
    const int64_t b = task % bands, first = task / bands * image_pixels + (b == 0 ? 0 : owned_end(b - 1)) * width;
    if (first % kMomentRows != 0 && first < pixels && slot[first / kMomentRows] < 0) {
      slot[first / kMomentRows] = slots++;
    }
  }
  std::vector<float> shared(slots * kMomentRows * cout);
  const TileValues packed = patches.Weights(w.typed_data());
  ParallelFor(pool, n * bands, [&]() {
    return [&, rows = TileValues(((conv_rows - 1) * s.stride + s.k) * patches.pitch * patches.row_depth, uint16_t{0}),
            sums = std::vector<float>(kAmxPixels * cout), band_sums = std::vector<float>(conv_rows * width * cout),
            held = std::vector<int32_t>(cout)](int64_t task) mutable {
      const int64_t image = task / bands, b = task % bands, p0 = b * band, p1 = std::min(out_height, p0 + band);
      const int64_t own0 = b == 0 ? 0 : owned_end(b - 1), own1 = owned_end(b);
      int64_t r0 = std::max<int64_t>(0, p0 * p.stride - p.pad);
      int64_t r1 = std::min(height, (p1 - 1) * p.stride - p.pad + p.size);
      if (training) r0 = std::min(r0, own0), r1 = std::max(r1, own1);
      ConfigureTiles();
      patches.Sums(x.typed_data() + image * s.height * s.width * s.in_channels, packed, r0, r1, rows.data(),
                   sums.data(), band_sums.data());
      _tile_release();
      for (int64_t po = p0; po < p1; ++po) {
        for (int64_t q = 0; q < out_width; ++q) {
          auto tap = [&](int64_t i, int64_t j) -> const float* {
            const int64_t r = po * p.stride + i - p.pad, c = q * p.stride + j - p.pad;
            return r >= r0 && r < r1 && c >= 0 && c < width ? band_sums.data() + ((r - r0) * width + c) * cout
                                                            : nullptr;
          };
          const int64_t at = ((image * out_height + po) * out_width + q) * cout;
          WindowMaximum(tap, p.size, cout, y + at);
          if (training) WindowTaps(tap, p.size, cout, y + at, held.data(), training->taps + at);
        }
      }
      for (int64_t pixel = image * image_pixels + own0 * width; training && pixel < image * image_pixels + own1 * width;
           ++pixel) {
        const float* values = band_sums.data() + (pixel - image * image_pixels - r0 * width) * cout;
        const int64_t chunk = pixel / kMomentRows;
        if (slot[chunk] < 0) {
          AddMoments(values, cout, partial.data() + chunk * 2 * cout);
        } else {
          std::copy(values, values + cout, shared.begin() + (slot[chunk] * kMomentRows + pixel % kMomentRows) * cout);
        }
      }
    };
  });
  if (training == nullptr) return ffi::Error::Success();
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {  // the shared chunks' sums, pixel by pixel as BatchMoments adds
    for (int64_t pixel = chunk * kMomentRows; slot[chunk] >= 0 && pixel < std::min(pixels, (chunk + 1) * kMomentRows);
         ++pixel) {
      AddMoments(shared.data() + (slot[chunk] * kMomentRows + pixel % kMomentRows) * cout, cout,
                 partial.data() + chunk * 2 * cout);
    }
  }
  FinishMoments(partial, chunks, cout, pixels, training->mean, training->var);
  return ffi::Error::Success();
}

ffi::Error AmxPatchConvMaxPool(ffi::ThreadPool pool, Bfloat16x4d x, Bfloat16x4d w, ffi::Result<Float32x4d> y,
                               int64_t stride, int64_t pad_top, int64_t pad_left, int64_t pool_size,
                               int64_t pool_stride, int64_t pool_pad) {
  const auto y_dims = y->dimensions();
  return PatchConvPool(pool, x, w, y->typed_data(), y_dims, stride, pad_top, pad_left,
                       {pool_size, pool_stride, pool_pad}, nullptr);
}

ffi::Error AmxPatchConvPoolStatistics(ffi::ThreadPool pool, Bfloat16x4d x, Bfloat16x4d w, ffi::Result<Float32x4d> y,
                                      ffi::Result<Int8x4d> taps, ffi::Result<Float32x1d> mean,
                                      ffi::Result<Float32x1d> var, int64_t stride, int64_t pad_top, int64_t pad_left,
                                      int64_t pool_size, int64_t pool_stride, int64_t pool_pad) {
  const auto y_dims = y->dimensions(), taps_dims = taps->dimensions();
  if (!std::equal(y_dims.begin(), y_dims.end(), taps_dims.begin(), taps_dims.end()) ||
      mean->element_count() != y_dims[3] || var->element_count() != y_dims[3]) {
    return ffi::Error::InvalidArgument("kdep_jax AMX patch conv kernel: taps or statistics of another shape");
  }
  const PoolTraining training{taps->typed_data(), mean->typed_data(), var->typed_data()};
  return PatchConvPool(pool, x, w, y->typed_data(), y_dims, stride, pad_top, pad_left,
                       {pool_size, pool_stride, pool_pad}, &training);
}

// dw (k, k, Cin, Cout): for each image (a task; float64 partials added in image order), band by band of `band` output
// rows, its patch rows transposed (row_depth rows of pitch outputs per input row) by its gradient pairs, from the
// band's bfloat16 output gradient rows that gradient_rows(image, oy0, oy1) gives (a worker's, from
// make_gradient_rows()).
template <typename MakeGradientRows>
void PatchWeightGradient(ffi::ThreadPool& pool, Bfloat16x4d& x, const Shape& s, int64_t band, float* dw,
                         MakeGradientRows make_gradient_rows) {
  const int64_t n = x.dimensions()[0];
  const AmxPatchRows patches(s);
  const int64_t cout = s.out_channels, depth = patches.row_depth, pitch = patches.pitch;
  const int64_t partial_size = s.k * depth * cout;
  std::vector<double> partials(n * partial_size, 0.0);
  ParallelFor(pool, n, [&]() {
    return [&, gradient_rows = make_gradient_rows(),
            transposed = TileValues(((band - 1) * s.stride + s.k) * depth * pitch, uint16_t{0}),
            block = TileValues(kAmxPixels * depth, uint16_t{0}),
            pairs = TileValues(band * pitch * cout, uint16_t{0})](int64_t image) mutable {
      ConfigureTiles();
      float sums[kAmxChannels * kAmxChannels];
      double* partial = partials.data() + image * partial_size;
      const uint16_t* x_image = x.typed_data() + image * s.height * s.width * s.in_channels;
      for (int64_t oy0 = 0; oy0 < s.out_height; oy0 += band) {
        const int64_t oy1 = std::min(s.out_height, oy0 + band);
        const int64_t first_row = patches.FirstRow(oy0), last_row = patches.LastRow(oy1);
        const uint16_t* g_band = gradient_rows(image, oy0, oy1);
        for (int64_t r = first_row; r < last_row; ++r) {
          for (int64_t ox0 = 0; ox0 < s.out_width; ox0 += kAmxPixels) {
            const int64_t count = std::min(kAmxPixels, s.out_width - ox0);
            patches.Copy(x_image + r * s.width * s.in_channels, ox0, ox0 + count, block.data());
            std::fill(block.begin() + count * depth, block.end(), uint16_t{0});
            for (int64_t v0 = 0; v0 < depth; v0 += 32) {
              uint16_t* to = transposed.data() + ((r - first_row) * depth + v0) * pitch + ox0;
#if defined(__AVX512BW__)
              __m512i values[32];
              for (int p = 0; p < 32; ++p) values[p] = _mm512_loadu_si512(block.data() + p * depth + v0);
              Transpose32x32(values);
              for (int v = 0; v < 32; ++v) _mm512_storeu_si512(to + v * pitch, values[v]);
#else
              for (int64_t v = 0; v < 32; ++v) {
                for (int64_t p = 0; p < 32; ++p) to[v * pitch + p] = block[p * depth + v0 + v];
              }
#endif
            }
          }
        }
        for (int64_t oy = oy0; oy < oy1; ++oy) {
          const uint16_t* g_row = g_band + (oy - oy0) * s.out_width * cout;
          for (int64_t q = 0; q < pitch; q += 2) {
            InterleavePairs(q < s.out_width ? g_row + q * cout : nullptr,
                            q + 1 < s.out_width ? g_row + (q + 1) * cout : nullptr, cout,
                            pairs.data() + ((oy - oy0) * pitch + q) * cout);
          }
        }
        for (int64_t i = 0; i < s.k; ++i) {
          for (int64_t b = 0; b < cout / kAmxChannels; ++b) {
            for (int64_t v0 = 0; v0 < depth; v0 += kAmxChannels) {
              _tile_zero(0);
              _tile_zero(1);
              _tile_zero(2);
              _tile_zero(3);
              for (int64_t oy = oy0; oy < oy1; ++oy) {
                const int64_t r = oy * s.stride + i - s.pad_top;
                if (r < 0 || r >= s.height) continue;
                for (int64_t ox0 = 0; ox0 < s.out_width; ox0 += kAmxPixels) {
                  AmxProducts(transposed.data() + ((r - first_row) * depth + v0) * pitch + ox0, pitch,
                              pairs.data() + ((oy - oy0) * pitch + ox0) * cout + b * kAmxChannels * 2, 2 * cout);
                }
              }
              AmxStore(sums, kAmxChannels);
              double* to = partial + (i * depth + v0) * cout + b * kAmxChannels;
              for (int64_t v = 0; v < kAmxChannels; ++v) {
                for (int64_t o = 0; o < kAmxChannels; ++o) to[v * cout + o] += sums[v * kAmxChannels + o];
              }
            }
          }
        }
      }
      _tile_release();
    };
  });
  for (int64_t image = 1; image < n; ++image) {
    for (int64_t t = 0; t < partial_size; ++t) partials[t] += partials[image * partial_size + t];
  }
  for (int64_t i = 0; i < s.k; ++i) {  // dw's rows: each tap row's first row_values
    for (int64_t t = 0; t < patches.row_values * cout; ++t) {
      dw[i * patches.row_values * cout + t] = static_cast<float>(partials[i * depth * cout + t]);
    }
  }
}

ffi::Error AmxPatchConvWeightGradient(ffi::ThreadPool pool, Bfloat16x4d x, Bfloat16x4d g, ffi::Result<Float32x4d> dw,
                                      int64_t stride, int64_t pad_top, int64_t pad_left) {
  const auto x_dims = x.dimensions(), g_dims = g.dimensions(), dw_dims = dw->dimensions();
  const int64_t n = x_dims[0];
  const Shape s{x_dims[1], x_dims[2], x_dims[3], g_dims[1], g_dims[2], g_dims[3], dw_dims[0],
                stride, pad_top, pad_left};
  if (!PatchShapesFit(s, n, dw_dims, g_dims[0])) {
    return ffi::Error::InvalidArgument("kdep_jax AMX patch weight gradient: shapes that do not fit together");
  }
  if (n == 0 || s.out_height <= 0 || s.out_width <= 0) {
    std::fill(dw->typed_data(), dw->typed_data() + dw->element_count(), 0.0f);
    return ffi::Error::Success();
  }
  if (!AmxPermitted()) return ffi::Error::Internal("kdep_jax AMX conv kernel: Linux did not grant the AMX tiles");
  const int64_t band_values = s.out_width * s.out_channels;
  PatchWeightGradient(pool, x, s, AmxPatchRows(s).Band(), dw->typed_data(), [&]() {
    return [&](int64_t image, int64_t oy0, int64_t) {
      return g.typed_data() + (image * s.out_height + oy0) * band_values;
    };
  });
  return ffi::Error::Success();
}

// The weight gradient of `AmxPatchConvPoolStatistics`: each band's output gradient, rounded to bfloat16, from the
// pooled outputs' gradients (at their taps) and those of the batch statistics, offset + slope * sums per channel
// (`layers.pooled_conv_statistics`), with the band's sums computed again.
ffi::Error AmxPatchConvPoolWeightGradient(ffi::ThreadPool pool, Bfloat16x4d x, Bfloat16x4d w, Int8x4d taps,
                                          Float32x4d g_pooled, Float32x1d slope, Float32x1d offset,
                                          ffi::Result<Float32x4d> dw, int64_t stride, int64_t pad_top,
                                          int64_t pad_left, int64_t pool_size, int64_t pool_stride,
                                          int64_t pool_pad) {
  const auto g_dims = g_pooled.dimensions(), taps_dims = taps.dimensions();
  Shape s;
  const PoolShape p{pool_size, pool_stride, pool_pad};
  if (ffi::Error error = PooledConvShape(x, w, g_dims, stride, pad_top, pad_left, p, s); error.failure()) {
    return error;
  }
  const int64_t n = x.dimensions()[0], height = s.out_height, width = s.out_width, cout = s.out_channels;
  const int64_t out_height = g_dims[1], out_width = g_dims[2];
  if (!std::equal(g_dims.begin(), g_dims.end(), taps_dims.begin(), taps_dims.end()) ||
      slope.element_count() != cout || offset.element_count() != cout || dw->element_count() != w.element_count()) {
    return ffi::Error::InvalidArgument("kdep_jax AMX patch weight gradient: taps or statistics of another shape");
  }
  if (n == 0 || height <= 0 || width <= 0) {
    std::fill(dw->typed_data(), dw->typed_data() + dw->element_count(), 0.0f);
    return ffi::Error::Success();
  }
  const AmxPatchRows patches(s);
  const int64_t band = std::max<int64_t>(1, patches.Band() / 2);  // the sums and gradient in the L2 cache too
  const TileValues packed = patches.Weights(w.typed_data());
  const float *slope_data = slope.typed_data(), *offset_data = offset.typed_data();
  PatchWeightGradient(pool, x, s, band, dw->typed_data(), [&]() {
    return [&, rows = TileValues(((band - 1) * s.stride + s.k) * patches.pitch * patches.row_depth, uint16_t{0}),
            sums = std::vector<float>(kAmxPixels * cout), band_sums = std::vector<float>(band * width * cout),
            rounded = TileValues(band * width * cout)](int64_t image, int64_t oy0, int64_t oy1) mutable {
      patches.Sums(x.typed_data() + image * s.height * s.width * s.in_channels, packed, oy0, oy1, rows.data(),
                   sums.data(), band_sums.data());
      for (int64_t t = 0; t < (oy1 - oy0) * width; ++t) {
        float* __restrict g = band_sums.data() + t * cout;
        for (int64_t c = 0; c < cout; ++c) g[c] = offset_data[c] + slope_data[c] * g[c];
      }
      // the pooled outputs whose windows reach rows [oy0, oy1), each output's gradient to its tap there
      const int64_t first = std::max<int64_t>(0, (oy0 + pool_pad - pool_size + pool_stride) / pool_stride);
      const int64_t last = std::min(out_height, (oy1 - 1 + pool_pad) / pool_stride + 1);
      for (int64_t po = first; po < last; ++po) {
        for (int64_t q = 0; q < out_width; ++q) {
          const int64_t at = ((image * out_height + po) * out_width + q) * cout;
          const int8_t* __restrict held = taps.typed_data() + at;
          const float* __restrict grad = g_pooled.typed_data() + at;
          for (int64_t t = 0; t < pool_size * pool_size; ++t) {
            const int64_t r = po * pool_stride - pool_pad + t / pool_size;
            const int64_t col = q * pool_stride - pool_pad + t % pool_size;
            if (r < oy0 || r >= oy1 || col < 0 || col >= width) continue;
            float* __restrict g = band_sums.data() + ((r - oy0) * width + col) * cout;
            const int8_t tap = static_cast<int8_t>(t);
            for (int64_t c = 0; c < cout; ++c) g[c] += held[c] == tap ? grad[c] : 0.0f;
          }
        }
      }
      int64_t t = 0;
      const int64_t values = (oy1 - oy0) * width * cout;
#if defined(__AVX512BF16__)
      for (; t + 32 <= values; t += 32) {  // VCVTNE2PS2BF16 rounds as RoundToBfloat16 (and flushes denormals)
        const __m512 low = _mm512_loadu_ps(band_sums.data() + t), high = _mm512_loadu_ps(band_sums.data() + t + 16);
        _mm512_storeu_si512(rounded.data() + t, (__m512i)_mm512_cvtne2ps_pbh(high, low));
      }
#endif
      for (; t < values; ++t) rounded[t] = RoundToBfloat16(band_sums[t]);
      return static_cast<const uint16_t*>(rounded.data());
    };
  });
  return ffi::Error::Success();
}
#else
ffi::Error NoAmx() { return ffi::Error::Internal("kdep_jax's CPU kernels were built for a CPU without AMX tiles"); }
ffi::Error AmxConvWeightGradient(ffi::ThreadPool, Bfloat16x4d, Bfloat16x4d, ffi::Result<Float32x4d>, int64_t, int64_t,
                                 int64_t) {
  return NoAmx();
}
ffi::Error AmxConv(ffi::ThreadPool, Bfloat16x4d, Bfloat16x4d, ffi::Result<Bfloat16x4d>, int64_t, int64_t, int64_t) {
  return NoAmx();
}
ffi::Error AmxPatchConv(ffi::ThreadPool, Bfloat16x4d, Bfloat16x4d, ffi::Result<Float32x4d>, int64_t, int64_t,
                        int64_t) {
  return NoAmx();
}
ffi::Error AmxPatchConvWeightGradient(ffi::ThreadPool, Bfloat16x4d, Bfloat16x4d, ffi::Result<Float32x4d>, int64_t,
                                      int64_t, int64_t) {
  return NoAmx();
}
ffi::Error AmxPatchConvMaxPool(ffi::ThreadPool, Bfloat16x4d, Bfloat16x4d, ffi::Result<Float32x4d>, int64_t, int64_t,
                               int64_t, int64_t, int64_t, int64_t) {
  return NoAmx();
}
ffi::Error AmxPatchConvPoolStatistics(ffi::ThreadPool, Bfloat16x4d, Bfloat16x4d, ffi::Result<Float32x4d>,
                                      ffi::Result<Int8x4d>, ffi::Result<Float32x1d>, ffi::Result<Float32x1d>, int64_t,
                                      int64_t, int64_t, int64_t, int64_t, int64_t) {
  return NoAmx();
}
ffi::Error AmxPatchConvPoolWeightGradient(ffi::ThreadPool, Bfloat16x4d, Bfloat16x4d, Int8x4d, Float32x4d, Float32x1d,
                                          Float32x1d, ffi::Result<Float32x4d>, int64_t, int64_t, int64_t, int64_t,
                                          int64_t, int64_t) {
  return NoAmx();
}
ffi::Error AmxConvOfActivation(ffi::ThreadPool, Bfloat16x4d, Float32x1d, Float32x1d, Bfloat16x4d,
                               ffi::Result<Bfloat16x4d>, int64_t, int64_t, int64_t) {
  return NoAmx();
}
ffi::Error AmxConvOfActivationToBlockEnd(ffi::ThreadPool, Bfloat16x4d, Float32x1d, Float32x1d, Bfloat16x4d, Float32x1d,
                                         Float32x1d, Bfloat16x4d, Float32x1d, Float32x1d, ffi::Result<Bfloat16x4d>,
                                         int64_t, int64_t, int64_t, int64_t) {
  return NoAmx();
}
#endif

}  // namespace

// Whether this build has the AMX kernels: the compiler knew the CPU's AMX instructions (`cpu_kernels.amx_runs_here`).
extern "C" int KdepHasAmx() {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  return 1;
#else
  return 0;
#endif
}

// The convs' handlers take two 4-d buffers (x and the kernel, the output gradient or x and dy) and give one, with a
// stride and the top and left padding.
#define KDEP_CONV_HANDLER(name, function, Input, Output)     \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, function,              \
                                ffi::Ffi::Bind()             \
                                    .Ctx<ffi::ThreadPool>()  \
                                    .Arg<Input>()            \
                                    .Arg<Input>()            \
                                    .Ret<Output>()           \
                                    .Attr<int64_t>("stride") \
                                    .Attr<int64_t>("pad_top") \
                                    .Attr<int64_t>("pad_left"))

KDEP_CONV_HANDLER(KdepDepthwiseWeightGradient, DepthwiseWeightGradient, Float32x4d, Float32x4d);
KDEP_CONV_HANDLER(KdepConvWeightGradient, ConvWeightGradient, Float32x4d, Float32x4d);
KDEP_CONV_HANDLER(KdepConv, Conv, Float32x4d, Float32x4d);
KDEP_CONV_HANDLER(KdepConvInputGradient, ConvInputGradient, Float32x4d, Float32x4d);
KDEP_CONV_HANDLER(KdepWinogradConv, WinogradConv<2>, Float32x4d, Float32x4d);
KDEP_CONV_HANDLER(KdepWinogradConv4x4, WinogradConv<4>, Float32x4d, Float32x4d);
KDEP_CONV_HANDLER(KdepWinogradWeightGradient, WinogradWeightGradient, Float32x4d, Float32x4d);
KDEP_CONV_HANDLER(KdepDepthwiseInputGradient, DepthwiseInputGradient, Float32x4d, Float32x4d);
XLA_FFI_DEFINE_HANDLER_SYMBOL(KdepWinogradWeightGradientOfActivation, WinogradWeightGradientOfActivation,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Float32x4d>()
                                  .Arg<Float32x1d>()
                                  .Arg<Float32x1d>()
                                  .Arg<Float32x4d>()
                                  .Ret<Float32x4d>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(KdepMaxPool, MaxPool,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Float32x4d>()
                                  .Ret<Float32x4d>()
                                  .Ret<Int8x4d>()
                                  .Attr<int64_t>("kernel_size")
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(KdepMaxPoolGradient, MaxPoolGradient,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Int8x4d>()
                                  .Arg<Float32x4d>()
                                  .Ret<Float32x4d>()
                                  .Attr<int64_t>("kernel_size")
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(KdepBatchMoments, BatchMomentsOfFloat32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Float32x4d>()
                                  .Ret<Float32x1d>()
                                  .Ret<Float32x1d>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(KdepBatchMomentsBfloat16, BatchMomentsOfBfloat16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Bfloat16x4d>()
                                  .Ret<Float32x1d>()
                                  .Ret<Float32x1d>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(KdepAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Float32x3d>()
                                  .Ret<Float32x3d>()
                                  .Attr<int64_t>("heads")
                                  .Attr<float>("scale"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(KdepDense, Dense,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Float32x2d>()
                                  .Arg<Float32x3d>()
                                  .Ret<Float32x2d>());
KDEP_CONV_HANDLER(KdepAmxConv, AmxConv, Bfloat16x4d, Bfloat16x4d);
KDEP_CONV_HANDLER(KdepAmxConvWeightGradient, AmxConvWeightGradient, Bfloat16x4d, Float32x4d);
KDEP_CONV_HANDLER(KdepAmxPatchConv, AmxPatchConv, Bfloat16x4d, Float32x4d);
KDEP_CONV_HANDLER(KdepAmxPatchConvWeightGradient, AmxPatchConvWeightGradient, Bfloat16x4d, Float32x4d);
// The pooled patch convs' attributes: the conv's stride and top and left padding, the pool's size, stride and padding.
#define KDEP_POOL_ATTRIBUTES                                                                   \
  .Attr<int64_t>("stride").Attr<int64_t>("pad_top").Attr<int64_t>("pad_left").Attr<int64_t>("pool_size") \
      .Attr<int64_t>("pool_stride").Attr<int64_t>("pool_pad")
XLA_FFI_DEFINE_HANDLER_SYMBOL(KdepAmxPatchConvMaxPool, AmxPatchConvMaxPool,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Bfloat16x4d>()
                                  .Arg<Bfloat16x4d>()
                                  .Ret<Float32x4d>()
                                  KDEP_POOL_ATTRIBUTES);
XLA_FFI_DEFINE_HANDLER_SYMBOL(KdepAmxPatchConvPoolStatistics, AmxPatchConvPoolStatistics,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Bfloat16x4d>()
                                  .Arg<Bfloat16x4d>()
                                  .Ret<Float32x4d>()
                                  .Ret<Int8x4d>()
                                  .Ret<Float32x1d>()
                                  .Ret<Float32x1d>()
                                  KDEP_POOL_ATTRIBUTES);
XLA_FFI_DEFINE_HANDLER_SYMBOL(KdepAmxPatchConvPoolWeightGradient, AmxPatchConvPoolWeightGradient,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Bfloat16x4d>()
                                  .Arg<Bfloat16x4d>()
                                  .Arg<Int8x4d>()
                                  .Arg<Float32x4d>()
                                  .Arg<Float32x1d>()
                                  .Arg<Float32x1d>()
                                  .Ret<Float32x4d>()
                                  KDEP_POOL_ATTRIBUTES);
XLA_FFI_DEFINE_HANDLER_SYMBOL(KdepAmxConvOfActivation, AmxConvOfActivation,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Bfloat16x4d>()
                                  .Arg<Float32x1d>()
                                  .Arg<Float32x1d>()
                                  .Arg<Bfloat16x4d>()
                                  .Ret<Bfloat16x4d>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(KdepAmxConvOfActivationToBlockEnd, AmxConvOfActivationToBlockEnd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Bfloat16x4d>()
                                  .Arg<Float32x1d>()
                                  .Arg<Float32x1d>()
                                  .Arg<Bfloat16x4d>()
                                  .Arg<Float32x1d>()
                                  .Arg<Float32x1d>()
                                  .Arg<Bfloat16x4d>()
                                  .Arg<Float32x1d>()
                                  .Arg<Float32x1d>()
                                  .Ret<Bfloat16x4d>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("relu"));
