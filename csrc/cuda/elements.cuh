// The work of one CUDA thread for one output element, as __host__ __device__ functions.
//
// The kernels in deconv_kernels.cu are grid-stride loops over these functions and nothing else (the
// fused op's staged kernel adds only its block's loops and barriers around the functions of its
// steps and of its staging, all here), so the exact arithmetic of the CUDA kernels (index math,
// summation order, rounding) is plain C++ that the host compiler builds too:
// tests/cuda_emulation.cpp runs every element on the CPU and the tests compare it with the
// reference on machines without a GPU (tests/test_cuda_emulation.py).
//
// index_t: every element computes its indices in int32_t where each tensor of the launch has fewer
// than 2^31 elements (fits_int32, decided once per launch), else in int64_t; the emulation runs
// both, and the tests compare them bit for bit.
//
// Only headers that compile for the host and the device are included here.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <type_traits>

#include "common/geometry.h"
#include "common/rules.h"

namespace deconvcuda {
namespace cuda_elements {

using geometry::Conv2d;
using geometry::Pool2d;

// --------------------------------------------------------------------------------------------- //
// Launch-wide helpers (host code)
// --------------------------------------------------------------------------------------------- //

// Whether every index of a call fits int32 (each tensor has fewer than 2^31 elements): then the
// elements decompose their work item and compute their offsets in 32 bits, which the GPU divides
// several times faster than 64-bit integers.
inline bool fits_int32(std::initializer_list<int64_t> numels) {
  for (const int64_t numel : numels) {
    if (numel >= (int64_t(1) << 31)) return false;
  }
  return true;
}

// --------------------------------------------------------------------------------------------- //
// max_pool2d_switches
// --------------------------------------------------------------------------------------------- //

// One pooled output (n, c, py, px) = `work_item` of the [N, C, pooled_h, pooled_w] output and its
// switch (geometry::window_max: PyTorch's rule for ties and NaN).
template <typename index_t, typename scalar_t>
DECONV_HOST_DEVICE void max_pool2d_switches_element(int64_t work_item, const scalar_t* input, scalar_t* output,
                                                    uint8_t* switches, int64_t height, int64_t width,
                                                    int64_t pooled_h, int64_t pooled_w, const Pool2d& pool) {
  const index_t index = static_cast<index_t>(work_item);
  const index_t pooled_w_ = static_cast<index_t>(pooled_w), pooled_h_ = static_cast<index_t>(pooled_h);
  const index_t height_ = static_cast<index_t>(height), width_ = static_cast<index_t>(width);
  const index_t px = index % pooled_w_;
  const index_t py = (index / pooled_w_) % pooled_h_;
  const index_t plane = index / (pooled_w_ * pooled_h_);
  const auto best = geometry::window_max<scalar_t, at::opmath_type<scalar_t>, index_t>(
      input + plane * height_ * width_, height_, width_, pool, py, px);
  output[index] = static_cast<scalar_t>(best.value);
  switches[index] = static_cast<uint8_t>(best.tap);
}

// --------------------------------------------------------------------------------------------- //
// unpool_relu
// --------------------------------------------------------------------------------------------- //

// One position (n, c, y, x) = `work_item` of the [N, C, height, width] pool input: the rule's finish
// (rules.h) of the sum of the pooled values whose switch selects it and that the rule routes. A
// switch that names no tap, or a tap in the padding, matches no position, so it is never followed
// outside the tensors. `positive` is read only by the masked rules.
template <typename Rule, typename index_t, typename scalar_t>
DECONV_HOST_DEVICE void unpool_relu_element(int64_t work_item, const scalar_t* grad, const bool* positive,
                                            const uint8_t* switches, scalar_t* output, int64_t height, int64_t width,
                                            int64_t pooled_h, int64_t pooled_w, const Pool2d& pool) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t index = static_cast<index_t>(work_item);
  const index_t height_ = static_cast<index_t>(height), width_ = static_cast<index_t>(width);
  const index_t pooled_h_ = static_cast<index_t>(pooled_h), pooled_w_ = static_cast<index_t>(pooled_w);
  const index_t x = index % width_;
  const index_t y = (index / width_) % height_;
  const index_t plane_offset = (index / (width_ * height_)) * (pooled_h_ * pooled_w_);
  const acc_t sum = geometry::unpooled_sum<Rule, scalar_t, acc_t, index_t>(
      grad + plane_offset, Rule::masked ? positive + plane_offset : nullptr, switches + plane_offset, pooled_w_, 1,
      pooled_w_, 1, pooled_h_, pooled_w_, pool, y, x);
  output[index] = static_cast<scalar_t>(Rule::finish(sum));
}

// --------------------------------------------------------------------------------------------- //
// unpool_relu_deconv2d: the fused sparse gather
// --------------------------------------------------------------------------------------------- //
// out[n, ci, y, x] = sum over co in ci's group, conv taps (cy, cx) with
//   (oy, ox) = the conv-output position that tap (cy, cx) maps onto (y, x):
//   weight[co, ci % C_in_per_group, cy, cx] * U[n, co, oy, ox],
// U = relu(unpooled grad), [N, C_out, height, width]. U is zero except at positions some window's
// switch selects, at most one per window. So instead of walking the kh x kw conv taps, a thread walks
// the pooled windows whose span reaches the conv-output rows and columns that map onto (y, x), and
// keeps the windows whose selected position is one of those (oy, ox).
//
// Two passes:
//   route (route_element, once per pooled value): decodes the window's switch into the position it
//     selects and the value it routes there: the rule's mask applied, the rule's finish, and for
//     overlapping pools (AlexNet's 3x3 stride 2) the sum of every window selecting that position,
//     kept at the first such window only. The position is stored as the output row and column
//     where the conv filter's first tap lands on it (its origin), so that the gather finds the tap
//     that maps it onto a pixel by one subtraction a side. One Routed entry a pooled value: 8 bytes
//     for float32, float16 and bfloat16 where the indices are 32-bit.
//   gather (accumulate_fused): a work item is one output pixel and a tile of kChannels output
//     channels ci, accumulated in registers; for each co of its group it reads the entries of the
//     windows under the pixel, keeps those whose position is under the filter, loads the kChannels
//     taps of that filter position at once and does kChannels fused multiply-adds. Per entry that is
//     one load and a few 32-bit integer instructions, shared by the tile's channels; the switch is
//     never decoded again. (bench/README.md counts them against cuDNN's dense path.)
//
// The gather is split in three (fused_work_item, accumulate_fused, store_fused) so that the staged
// kernel can run the walk over co in chunks, with the chunk's filter slice in shared memory, and
// still add every term in the same order as the one-piece element: the walk is over co (ascending),
// then windows (row-major), and a chunk is a range of co. Where the taps are read from is a
// FilterSlice; what is added, and in which order, does not depend on it, nor on kChannels, nor on
// index_t, so every launch (and the host emulation) gives the same bits.

// The multiply-add of the fused gather, written as one fused multiply-add on both sides: nvcc
// would contract `acc += w * v` into an FMA and the host compiler (ISO C++ mode) would not, so only
// an explicit fma makes the host emulation bit-exact with the device.
template <typename acc_t>
DECONV_HOST_DEVICE acc_t multiply_add(acc_t a, acc_t b, acc_t c) {
#ifdef __CUDA_ARCH__
  return fma(a, b, c);  // CUDA's overloads for float and double
#else
  return std::fma(a, b, c);
#endif
}

// Whether the fused op's indices are 32-bit (host code, decided once per call): every tensor has
// fewer than 2^31 elements, and every origin (below) and filter span fits int16, which leaves
// int16_t::min free to mean "nothing routed". Else the op runs with 64-bit indices and origins.
inline bool fused_fits_int32(int64_t grad_numel, int64_t weight_numel, int64_t output_numel, int64_t height,
                             int64_t width, const Conv2d& conv) {
  const int64_t limit = std::numeric_limits<int16_t>::max();
  const auto axis_fits = [&](int64_t size, int64_t kernel, int64_t stride, int64_t padding, int64_t dilation) {
    return padding <= limit && (size - 1) * stride - padding <= limit && dilation * (kernel - 1) <= limit;
  };
  return fits_int32({grad_numel, weight_numel, output_numel}) &&
         axis_fits(height, conv.kernel_h, conv.stride_h, conv.padding_h, conv.dilation_h) &&
         axis_fits(width, conv.kernel_w, conv.stride_w, conv.padding_w, conv.dilation_w);
}

// The type of a Routed entry's origin: int16_t with 32-bit indices (fused_fits_int32), else int64_t.
template <typename index_t>
using origin_type = std::conditional_t<std::is_same<index_t, int32_t>::value, int16_t, int64_t>;

// What the route pass leaves for one pooled value: `value`, routed to the position sy, sx of the
// conv's output (the pool's input) that the window's switch selects, given by its origin
//   origin_y = sy * conv_stride_h - conv_padding_h   (likewise origin_x),
// the output row on which the conv filter's first tap lands on sy: the filter tap cy that maps sy onto
// output row y is (y - origin_y) / conv_dilation_h, where 0 <= y - origin_y <= conv_dilation_h *
// (kh - 1) and the dilation divides it (geometry::tap_of). kNotRouted where the window routes nothing
// (its switch names no tap or a tap outside the pool's input, the mask drops it, or, overlapping,
// an earlier window selects the same position): the smallest origin_t, which puts every pixel more
// than a filter span away. Aligned so that one load reads it.
template <typename acc_t, typename index_t>
struct alignas(sizeof(acc_t) + 2 * sizeof(origin_type<index_t>) <= 8 ? 8 : 16) Routed {
  acc_t value;
  origin_type<index_t> origin_y, origin_x;
};

template <typename index_t>
constexpr origin_type<index_t> kNotRouted = std::numeric_limits<origin_type<index_t>>::min();

// Reads one entry: on the GPU in one 8- or 16-byte load (the compiler would otherwise load its value
// and its origins apart).
template <typename Entry>
DECONV_HOST_DEVICE Entry load_entry(const Entry* entry) {
#ifdef __CUDA_ARCH__
  static_assert(sizeof(Entry) == 8 || sizeof(Entry) == 16 || sizeof(Entry) == 32, "Routed's size");
  using Vector = std::conditional_t<sizeof(Entry) == 8, uint2, uint4>;
  Vector raw[sizeof(Entry) / sizeof(Vector)];
  for (size_t v = 0; v < sizeof(Entry) / sizeof(Vector); ++v) raw[v] = reinterpret_cast<const Vector*>(entry)[v];
  Entry result;
  memcpy(&result, raw, sizeof(Entry));
  return result;
#else
  return *entry;
#endif
}

// The route pass's element: pooled value `work_item` of grad's [N, C_out, pooled_h, pooled_w].
// `overlapping`: whether neighbouring windows can share a position (geometry::windows_overlap).
template <typename Rule, typename index_t, typename scalar_t>
DECONV_HOST_DEVICE void route_element(int64_t work_item, const scalar_t* grad, const bool* positive,
                                      const uint8_t* switches, Routed<at::opmath_type<scalar_t>, index_t>* routed,
                                      int64_t height, int64_t width, int64_t pooled_h, int64_t pooled_w,
                                      const Pool2d& pool, const Conv2d& conv, bool overlapping) {
  using acc_t = at::opmath_type<scalar_t>;
  using origin_t = origin_type<index_t>;
  const index_t index = static_cast<index_t>(work_item);
  const index_t pooled_h_ = static_cast<index_t>(pooled_h), pooled_w_ = static_cast<index_t>(pooled_w);
  const index_t kernel_w = static_cast<index_t>(pool.kernel_w);
  const index_t px = index % pooled_w_;
  const index_t py = (index / pooled_w_) % pooled_h_;
  const index_t plane_offset = (index / (pooled_w_ * pooled_h_)) * (pooled_h_ * pooled_w_);
  Routed<acc_t, index_t> entry{acc_t(0), kNotRouted<index_t>, kNotRouted<index_t>};
  const index_t tap = static_cast<index_t>(switches[index]);
  if (tap < static_cast<index_t>(pool.kernel_h) * kernel_w) {
    const index_t sy = geometry::position_of<index_t>(py, tap / kernel_w, pool.stride_h, pool.padding_h,
                                                      pool.dilation_h);
    const index_t sx = geometry::position_of<index_t>(px, tap % kernel_w, pool.stride_w, pool.padding_w,
                                                      pool.dilation_w);
    const origin_t origin_y = static_cast<origin_t>(sy * static_cast<index_t>(conv.stride_h) -
                                                    static_cast<index_t>(conv.padding_h));
    const origin_t origin_x = static_cast<origin_t>(sx * static_cast<index_t>(conv.stride_w) -
                                                    static_cast<index_t>(conv.padding_w));
    if (sy >= 0 && sy < static_cast<index_t>(height) && sx >= 0 && sx < static_cast<index_t>(width)) {
      if (overlapping) {
        // (sy, sx) may be selected by several windows: counted once, with all their values
        if (geometry::first_window_selecting<index_t>(switches + plane_offset, pooled_w_, 1, pooled_h_, pooled_w_,
                                                      pool, sy, sx, py, px)) {
          entry = Routed<acc_t, index_t>{Rule::finish(geometry::unpooled_sum<Rule, scalar_t, acc_t, index_t>(
                                             grad + plane_offset, Rule::masked ? positive + plane_offset : nullptr,
                                             switches + plane_offset, pooled_w_, 1, pooled_w_, 1, pooled_h_,
                                             pooled_w_, pool, sy, sx)),
                                         origin_y, origin_x};
        }
      } else if (Rule::routes(positive, index)) {
        entry = Routed<acc_t, index_t>{Rule::finish(static_cast<acc_t>(grad[index])), origin_y, origin_x};
      }
    }
  }
  routed[index] = entry;
}

// Sizes of one fused call, passed to the kernel by value.
struct FusedShape {
  int64_t out_channels;              // C_out: grad's channels, weight.size(0)
  int64_t in_channels_per_group;     // weight.size(1)
  int64_t groups;
  int64_t channels_per_thread;       // input channels one work item computes (choose_fused_launch)
  int64_t channel_tiles;             // ceil(in_channels_per_group / channels_per_thread)
  int64_t pooled_h, pooled_w;        // grad's spatial size
  int64_t height, width;             // the pool's input = the conv's output (input_size)
  int64_t out_h, out_w;              // the deconv's output (output_size)

  // The sizes of a call whose arguments checks::check_unpool_relu_deconv2d has accepted.
  static FusedShape of(int64_t out_channels, int64_t in_channels_per_group, int64_t groups, int64_t pooled_h,
                       int64_t pooled_w, int64_t height, int64_t width, int64_t out_h, int64_t out_w,
                       int64_t channels_per_thread) {
    return FusedShape{out_channels, in_channels_per_group, groups, channels_per_thread,
                      geometry::ceil_div(in_channels_per_group, channels_per_thread),
                      pooled_h, pooled_w, height, width, out_h, out_w};
  }

  // Work items of a batch: one per (n, group, channel tile, output pixel).
  int64_t work_items(int64_t batch) const { return batch * groups * channel_tiles * out_h * out_w; }
};

// One work item of the fused gather: output pixel (y, x) of image n, for input channels
// [first_channel, first_channel + channels) of group `group` (counted within the group; channels <=
// kChannels, fewer in a group's last tile), with what its walk over pooled windows needs, computed
// once per item: the conv-output positions some conv tap maps onto (y, x), clipped to the pool's
// input, and the pooled windows whose span reaches them.
template <typename index_t>
struct FusedWorkItem {
  index_t n, group, first_channel, channels, y, x;
  geometry::WindowRangeOf<index_t> conv_rows, conv_cols;
  geometry::WindowRangeOf<index_t> window_rows, window_cols;  // meaningful only where reaches_any()

  // Whether any conv-output position maps onto (y, x); where none does, the pixel is 0.
  DECONV_HOST_DEVICE bool reaches_any() const {
    return conv_rows.first <= conv_rows.last && conv_cols.first <= conv_cols.last;
  }
};

// The work item of channel tile `tile` of `group`, image n, output pixel (y, x).
template <int kChannels, typename index_t>
DECONV_HOST_DEVICE FusedWorkItem<index_t> fused_work_item(index_t n, index_t group, index_t tile, index_t y, index_t x,
                                                          const FusedShape& shape, const Pool2d& pool,
                                                          const Conv2d& conv) {
  FusedWorkItem<index_t> item;
  item.n = n;
  item.group = group;
  item.y = y;
  item.x = x;
  const index_t in_per_group = static_cast<index_t>(shape.in_channels_per_group);
  item.first_channel = tile * kChannels;
  item.channels = in_per_group - item.first_channel < kChannels ? in_per_group - item.first_channel : kChannels;
  item.conv_rows = geometry::windows_spanning<index_t>(y, shape.height, conv.kernel_h, conv.stride_h, conv.padding_h,
                                                       conv.dilation_h);
  item.conv_cols = geometry::windows_spanning<index_t>(x, shape.width, conv.kernel_w, conv.stride_w, conv.padding_w,
                                                       conv.dilation_w);
  item.window_rows = geometry::WindowRangeOf<index_t>{0, -1};
  item.window_cols = geometry::WindowRangeOf<index_t>{0, -1};
  if (item.reaches_any()) {
    item.window_rows = geometry::windows_spanning_range<index_t>(item.conv_rows.first, item.conv_rows.last,
                                                                 shape.pooled_h, pool.kernel_h, pool.stride_h,
                                                                 pool.padding_h, pool.dilation_h);
    item.window_cols = geometry::windows_spanning_range<index_t>(item.conv_cols.first, item.conv_cols.last,
                                                                 shape.pooled_w, pool.kernel_w, pool.stride_w,
                                                                 pool.padding_w, pool.dilation_w);
  }
  return item;
}

// The work item `work_item` of [N, groups, channel_tiles, out_h, out_w]: the global-memory kernel's
// order (and the host emulation's).
template <int kChannels, typename index_t>
DECONV_HOST_DEVICE FusedWorkItem<index_t> fused_work_item_at(int64_t work_item, const FusedShape& shape,
                                                             const Pool2d& pool, const Conv2d& conv) {
  const index_t index = static_cast<index_t>(work_item);
  const index_t out_w = static_cast<index_t>(shape.out_w), out_h = static_cast<index_t>(shape.out_h);
  const index_t channel_tiles = static_cast<index_t>(shape.channel_tiles);
  const index_t groups = static_cast<index_t>(shape.groups);
  const index_t x = index % out_w;
  const index_t y = (index / out_w) % out_h;
  index_t rest = index / (out_w * out_h);
  const index_t tile = rest % channel_tiles;
  rest /= channel_tiles;
  const index_t group = rest % groups;
  const index_t n = rest / groups;
  return fused_work_item<kChannels, index_t>(n, group, tile, y, x, shape, pool, conv);
}

// Where a work item reads its weight taps: the kChannels taps of filter position (cy, cx) of output
// channel co, one per input channel t of the item, are
//   taps[(co - first_out_channel) * out_channel_stride + (cy * kernel_w + cx) * tap_stride + t]
// for the output channels co the slice holds: consecutive, so that one load can read them. The
// weight itself in global memory has that layout for one channel (kChannels = 1: out_channel_stride
// = C_in_per_group * kh * kw, tap_stride = 1); the staged chunks in shared memory have it for any
// kChannels (stage_filter_tap).
template <typename scalar_t, typename index_t>
struct FilterSlice {
  const scalar_t* taps;
  index_t first_out_channel;
  index_t out_channel_stride;
  index_t tap_stride;
};

// The kChannels consecutive taps at `taps`, as acc_t. On the GPU in as few loads as their alignment
// allows (16, 8 or 4 bytes each): the staged layout puts them a multiple of their own size (or of 16
// bytes) from the 16-byte aligned start of shared memory.
template <int kChannels, typename scalar_t, typename acc_t>
DECONV_HOST_DEVICE void load_taps(const scalar_t* taps, acc_t (&values)[kChannels]) {
#ifdef __CUDA_ARCH__
  constexpr int kBytes = kChannels * static_cast<int>(sizeof(scalar_t));
  if constexpr (kBytes % 4 == 0) {
    using Vector = std::conditional_t<kBytes % 16 == 0, uint4, std::conditional_t<kBytes % 8 == 0, uint2, uint32_t>>;
    constexpr int kVectors = kBytes / static_cast<int>(sizeof(Vector));
    Vector raw[kVectors];
    for (int v = 0; v < kVectors; ++v) raw[v] = reinterpret_cast<const Vector*>(taps)[v];
    const scalar_t* elements = reinterpret_cast<const scalar_t*>(raw);
    for (int t = 0; t < kChannels; ++t) values[t] = static_cast<acc_t>(elements[t]);
  } else {
    for (int t = 0; t < kChannels; ++t) values[t] = static_cast<acc_t>(taps[t]);
  }
#else
  for (int t = 0; t < kChannels; ++t) values[t] = static_cast<acc_t>(taps[t]);
#endif
}

// The fused gather's sum for one work item over the output channels [co_begin, co_end) of its
// group, added to `acc` (one per input channel of the item) in the order the one-piece walk adds
// them: co ascending, then pooled windows row-major. Calling it for consecutive ranges of co that
// cover the group gives the same bits as one call for the whole group. `filters` must hold the
// taps of every co in the range. The tile's channels past item.channels accumulate whatever the
// slice holds there (zeros when staged) and are never stored.
template <int kChannels, typename index_t, typename scalar_t>
DECONV_HOST_DEVICE void accumulate_fused(const FusedWorkItem<index_t>& item, index_t co_begin, index_t co_end,
                                         const Routed<at::opmath_type<scalar_t>, index_t>* routed,
                                         const FilterSlice<scalar_t, index_t>& filters, const FusedShape& shape,
                                         const Conv2d& conv, at::opmath_type<scalar_t> (&acc)[kChannels]) {
  using acc_t = at::opmath_type<scalar_t>;
  // offsets in unsigned arithmetic: a pixel before an origin, or a kNotRouted origin, wraps to more
  // than any filter span, so one comparison a side rejects all three
  using unsigned_t = std::make_unsigned_t<index_t>;
  if (!item.reaches_any()) return;
  const index_t pooled_w = static_cast<index_t>(shape.pooled_w);
  const index_t plane_size = static_cast<index_t>(shape.pooled_h) * pooled_w;
  const index_t out_channels = static_cast<index_t>(shape.out_channels);
  const index_t kernel_w = static_cast<index_t>(conv.kernel_w);
  const unsigned_t dilation_h = static_cast<unsigned_t>(conv.dilation_h);
  const unsigned_t dilation_w = static_cast<unsigned_t>(conv.dilation_w);
  const bool dilated = dilation_h != 1 || dilation_w != 1;
  const unsigned_t span_h = dilation_h * static_cast<unsigned_t>(conv.kernel_h - 1);
  const unsigned_t span_w = dilation_w * static_cast<unsigned_t>(conv.kernel_w - 1);
  const unsigned_t y = static_cast<unsigned_t>(item.y), x = static_cast<unsigned_t>(item.x);
  const index_t rows = item.window_rows.last - item.window_rows.first + 1;
  const index_t cols = item.window_cols.last - item.window_cols.first + 1;
  const index_t first_window = item.window_rows.first * pooled_w + item.window_cols.first;

  for (index_t co = co_begin; co < co_end; ++co) {
    const Routed<acc_t, index_t>* row = routed + ((item.n * out_channels + co) * plane_size + first_window);
    const scalar_t* co_taps = filters.taps + (co - filters.first_out_channel) * filters.out_channel_stride;
    for (index_t wy = 0; wy < rows; ++wy, row += pooled_w) {
      const Routed<acc_t, index_t>* window = row;
      for (index_t wx = 0; wx < cols; ++wx, ++window) {
        const Routed<acc_t, index_t> entry = load_entry(window);
        unsigned_t cy = y - static_cast<unsigned_t>(static_cast<index_t>(entry.origin_y));
        unsigned_t cx = x - static_cast<unsigned_t>(static_cast<index_t>(entry.origin_x));
        if (cy > span_h || cx > span_w) continue;  // not under the filter, or nothing routed
        if (dilated) {
          if (cy % dilation_h != 0 || cx % dilation_w != 0) continue;  // conv dilation skips the position
          cy /= dilation_h;
          cx /= dilation_w;
        }
        acc_t taps[kChannels];
        load_taps<kChannels>(co_taps + (static_cast<index_t>(cy) * kernel_w + static_cast<index_t>(cx)) *
                                           filters.tap_stride,
                             taps);
        for (int t = 0; t < kChannels; ++t) acc[t] = multiply_add(taps[t], entry.value, acc[t]);
      }
    }
  }
}

// Writes a work item's sums (rounded to scalar_t) to its channels of output pixel (y, x).
template <int kChannels, typename index_t, typename scalar_t>
DECONV_HOST_DEVICE void store_fused(const FusedWorkItem<index_t>& item,
                                    const at::opmath_type<scalar_t> (&acc)[kChannels], scalar_t* output,
                                    const FusedShape& shape) {
  const index_t out_w = static_cast<index_t>(shape.out_w), out_h = static_cast<index_t>(shape.out_h);
  const index_t in_per_group = static_cast<index_t>(shape.in_channels_per_group);
  const index_t in_channels = in_per_group * static_cast<index_t>(shape.groups);
  const index_t first_output_channel = item.group * in_per_group + item.first_channel;
  scalar_t* out = output + ((item.n * in_channels + first_output_channel) * out_h + item.y) * out_w + item.x;
  for (int t = 0; t < kChannels; ++t) {
    if (t < item.channels) out[t * out_h * out_w] = static_cast<scalar_t>(acc[t]);
  }
}

// The work item `work_item` of [N, groups, in_channels_per_group, out_h, out_w], one input channel a
// thread, every output channel of its group in one walk, its taps read from the weight where it lies
// (global memory on the GPU): the global-memory kernel's element.
template <typename index_t, typename scalar_t>
DECONV_HOST_DEVICE void unpool_relu_deconv2d_element(int64_t work_item,
                                                     const Routed<at::opmath_type<scalar_t>, index_t>* routed,
                                                     const scalar_t* weight, scalar_t* output, const FusedShape& shape,
                                                     const Pool2d& pool, const Conv2d& conv) {
  using acc_t = at::opmath_type<scalar_t>;
  const FusedWorkItem<index_t> item = fused_work_item_at<1, index_t>(work_item, shape, pool, conv);
  const index_t in_per_group = static_cast<index_t>(shape.in_channels_per_group);
  const index_t out_per_group = static_cast<index_t>(shape.out_channels) / static_cast<index_t>(shape.groups);
  const index_t taps_per_filter = static_cast<index_t>(conv.kernel_h * conv.kernel_w);
  const index_t first_out_channel = item.group * out_per_group;
  const FilterSlice<scalar_t, index_t> filters{
      weight + (first_out_channel * in_per_group + item.first_channel) * taps_per_filter, first_out_channel,
      in_per_group * taps_per_filter, 1};
  acc_t acc[1] = {acc_t(0)};
  accumulate_fused<1, index_t, scalar_t>(item, first_out_channel, first_out_channel + out_per_group, routed, filters,
                                         shape, conv, acc);
  store_fused<1, index_t, scalar_t>(item, acc, output, shape);
}

// --------------------------------------------------------------------------------------------- //
// unpool_relu_deconv2d, staged: the filter slice of a block in shared memory
// --------------------------------------------------------------------------------------------- //
// Every work item of one (group, channel tile) reads the same taps: weight[co, first_channel + t]
// for every co of the group. The staged kernel gives a block only items of one (group, tile), copies
// those taps into shared memory a chunk of output channels at a time, laid out
//   staged[(co - co_begin) * kh * kw * tap_stride + (cy * kw + cx) * tap_stride + t]  (FilterSlice's)
// i.e. [out_channels_per_chunk][kh][kw][tap_stride], the tile's kChannels channels of one filter
// position consecutive (one to eight 16-byte loads), zeros for the channels past a group's last,
// partial tile, and walks the chunk's co from there. tap_stride (staged_tap_stride) pads the
// positions to an odd number of 16-byte units where they fill whole units, so that the 32 threads of
// a warp, which read a few different positions of one co at once, read different banks. The chunk
// is as many output channels as kStagedFilterBytes holds (staged_out_channels_per_chunk).

// Threads per block of every kernel; the staged kernel's items of one block are this many
// consecutive items of its slice (and the host emulation's blocks are as large).
constexpr int kThreadsPerBlock = 256;

// Channels per thread of the staged kernel, largest first (choose_fused_launch); 1 is the fallback.
// Each is one kernel instance per dtype.
constexpr int64_t kChannelTiles[] = {32, 16, 4};

// Shared memory for one block's staged filter chunk: 24 KiB leaves room for 8 blocks of 256 threads
// on a multiprocessor of an A100 or H100 (8 * (24 + 1 reserved) = 200 of their 164 / 228 KiB) and
// stays under 48 KiB, the most a kernel may use without opting in (cudaFuncSetAttribute). It holds 18
// output channels of a VGG16 filter chunk at 32 input channels a thread (3 x 3, float32, positions
// padded to 144 bytes): one pair of barriers per 18 output channels walked.
constexpr int64_t kStagedFilterBytes = 24 * 1024;

// Elements from one filter position to the next in a staged chunk (see above).
DECONV_HOST_DEVICE constexpr int64_t staged_tap_stride(int64_t channels_per_thread, int64_t element_size) {
  return (channels_per_thread * element_size) % 16 != 0 || (channels_per_thread * element_size / 16) % 2 == 1
             ? channels_per_thread
             : channels_per_thread + 16 / element_size;
}

// Output channels per staged chunk (host code): the fewest chunks of equal size (the last one may be
// shorter) whose [chunk][taps_per_filter][tap_stride] elements of element_size bytes fit
// `budget_bytes`; 0 where not even one output channel fits (a huge filter): the caller uses the
// global-memory kernel then.
inline int64_t staged_out_channels_per_chunk(int64_t out_channels_per_group, int64_t channels_per_thread,
                                             int64_t taps_per_filter, int64_t element_size,
                                             int64_t budget_bytes = kStagedFilterBytes) {
  const int64_t bytes_per_out_channel =
      taps_per_filter * staged_tap_stride(channels_per_thread, element_size) * element_size;
  if (out_channels_per_group <= 0 || bytes_per_out_channel <= 0) return 0;
  const int64_t fits = budget_bytes / bytes_per_out_channel;
  if (fits == 0) return 0;
  const int64_t chunks = geometry::ceil_div(out_channels_per_group, fits);
  return geometry::ceil_div(out_channels_per_group, chunks);
}

// Shared memory of a staged launch: a chunk of out_channels_per_chunk output channels.
inline int64_t staged_bytes(int64_t out_channels_per_chunk, int64_t channels_per_thread, int64_t taps_per_filter,
                            int64_t element_size) {
  return out_channels_per_chunk * taps_per_filter * staged_tap_stride(channels_per_thread, element_size) *
         element_size;
}

// One block's slice of the staged kernel (blockIdx.x): a channel tile of a group, the input channels
// [first_channel, first_channel + channels) of the group, and the group's output channels
// [first_out_channel, end_out_channel), which the block stages and walks chunk by chunk.
template <typename index_t>
struct StagedSlice {
  index_t group, tile, first_channel, channels, first_out_channel, end_out_channel;
};

template <int kChannels, typename index_t>
DECONV_HOST_DEVICE StagedSlice<index_t> staged_slice(index_t slice, const FusedShape& shape) {
  const index_t channel_tiles = static_cast<index_t>(shape.channel_tiles);
  const index_t in_per_group = static_cast<index_t>(shape.in_channels_per_group);
  const index_t out_per_group = static_cast<index_t>(shape.out_channels) / static_cast<index_t>(shape.groups);
  StagedSlice<index_t> result;
  result.group = slice / channel_tiles;
  result.tile = slice % channel_tiles;
  result.first_channel = result.tile * kChannels;
  result.channels =
      in_per_group - result.first_channel < kChannels ? in_per_group - result.first_channel : kChannels;
  result.first_out_channel = result.group * out_per_group;
  result.end_out_channel = result.first_out_channel + out_per_group;
  return result;
}

// The work item `index` of a slice's [N, out_h, out_w] (consecutive threads: consecutive x).
template <int kChannels, typename index_t>
DECONV_HOST_DEVICE FusedWorkItem<index_t> staged_work_item(const StagedSlice<index_t>& slice, index_t index,
                                                           const FusedShape& shape, const Pool2d& pool,
                                                           const Conv2d& conv) {
  const index_t out_w = static_cast<index_t>(shape.out_w), out_h = static_cast<index_t>(shape.out_h);
  return fused_work_item<kChannels, index_t>(index / (out_w * out_h), slice.group, slice.tile,
                                             (index / out_w) % out_h, index % out_w, shape, pool, conv);
}

// The end of the chunk that starts at output channel co_begin: at most `out_channels_per_chunk`
// channels, never past the slice's end (computed from the distance to it, so never past 2^31 either).
template <typename index_t>
DECONV_HOST_DEVICE index_t staged_chunk_end(const StagedSlice<index_t>& slice, index_t co_begin,
                                            index_t out_channels_per_chunk) {
  return slice.end_out_channel - co_begin < out_channels_per_chunk ? slice.end_out_channel
                                                                   : co_begin + out_channels_per_chunk;
}

// Elements a block writes for a chunk of co_count output channels: stage_filter_tap's indices are
// [0, this), the tile's channels with their padding.
template <int kChannels, typename index_t>
DECONV_HOST_DEVICE index_t staged_taps(index_t co_count, index_t taps_per_filter) {
  return co_count * taps_per_filter * kChannels;
}

// Stages element `index` of the chunk that starts at output channel co_begin. The indices run over
// [co][t][tap], the weight's own order, so that consecutive threads read consecutive addresses
// (each co's taps for the tile's input channels are one run of channels * kh * kw elements); each
// lands at its place in the staged layout, 0 for a channel t >= channels (a group's last tile).
template <int kChannels, typename index_t, typename scalar_t>
DECONV_HOST_DEVICE void stage_filter_tap(index_t index, scalar_t* staged, const scalar_t* weight, index_t co_begin,
                                         index_t first_channel, index_t channels, index_t in_channels_per_group,
                                         index_t taps_per_filter) {
  const index_t per_co = kChannels * taps_per_filter;
  const index_t co = index / per_co;
  const index_t rest = index % per_co;
  const index_t t = rest / taps_per_filter;
  const index_t tap = rest % taps_per_filter;
  constexpr index_t tap_stride = static_cast<index_t>(staged_tap_stride(kChannels, sizeof(scalar_t)));
  staged[(co * taps_per_filter + tap) * tap_stride + t] =
      t < channels ? weight[((co_begin + co) * in_channels_per_group + first_channel + t) * taps_per_filter + tap]
                   : scalar_t(0);
}

// The FilterSlice of a staged chunk that starts at output channel co_begin.
template <int kChannels, typename index_t, typename scalar_t>
DECONV_HOST_DEVICE FilterSlice<scalar_t, index_t> staged_filter_slice(const scalar_t* staged, index_t co_begin,
                                                                      index_t taps_per_filter) {
  constexpr index_t tap_stride = static_cast<index_t>(staged_tap_stride(kChannels, sizeof(scalar_t)));
  return FilterSlice<scalar_t, index_t>{staged, co_begin, taps_per_filter * tap_stride, tap_stride};
}

// How one fused call is launched (host code): decided here once, for the .cu file and for the host
// emulation alike.
struct FusedLaunch {
  int64_t channels_per_thread;     // 32, 16, 4 or 1
  int64_t out_channels_per_chunk;  // > 0: the staged kernel, chunks of this many output channels;
                                   // 0: the global-memory kernel (one channel a thread)
};

// f(std::integral_constant<int, C>) for C = channels_per_thread (kChannelTiles or 1).
template <typename F>
void with_channels_per_thread(int64_t channels_per_thread, F&& f) {
  switch (channels_per_thread) {
    case 32: f(std::integral_constant<int, 32>()); return;
    case 16: f(std::integral_constant<int, 16>()); return;
    case 4: f(std::integral_constant<int, 4>()); return;
    default: f(std::integral_constant<int, 1>()); return;
  }
}

// Channels per thread and where the taps are read from. A work item walks every output channel of
// its group and every pooled window under its pixel, reading each window's entry once for all of its
// channels: more channels per item divide that integer work, fewer give more items. So the largest
// of kChannelTiles that the group can fill (at most the next power of two above its channel count),
// whose chunk fits the staging budget, and that still leaves at least as many work items as the GPU
// runs at once: `resident_threads(channels, shared_bytes)`, the staged kernel's resident threads with
// that many channels and that much shared memory (on the GPU: cudaOccupancyMaxActiveBlocksPerMultiprocessor
// for that kernel instance); else one channel a thread. 64-bit indices (`index32` false), and filters
// so large that not one output channel of one input channel fits the budget: the global-memory
// kernel, one channel a thread.
template <typename ResidentThreads>
FusedLaunch choose_fused_launch(int64_t batch, int64_t groups, int64_t in_channels_per_group, int64_t out_channels,
                                int64_t taps_per_filter, int64_t element_size, int64_t out_h, int64_t out_w,
                                bool index32, ResidentThreads&& resident_threads) {
  if (!index32) return FusedLaunch{1, 0};
  const int64_t pixels = batch * groups * out_h * out_w;
  const int64_t out_per_group = out_channels / groups;
  for (const int64_t channels : kChannelTiles) {
    if (channels > in_channels_per_group * 2 - 1) continue;  // at most the next power of two above it
    const int64_t chunk = staged_out_channels_per_chunk(out_per_group, channels, taps_per_filter, element_size);
    if (chunk == 0) continue;
    const int64_t items = pixels * geometry::ceil_div(in_channels_per_group, channels);
    if (items >= resident_threads(channels, staged_bytes(chunk, channels, taps_per_filter, element_size))) {
      return FusedLaunch{channels, chunk};
    }
  }
  return FusedLaunch{1, staged_out_channels_per_chunk(out_per_group, 1, taps_per_filter, element_size)};
}

}  // namespace cuda_elements
}  // namespace deconvcuda
