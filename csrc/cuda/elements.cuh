// The work of one CUDA thread for one output element, as __host__ __device__ functions.
//
// The kernels in deconv_kernels.cu are grid-stride loops over these functions and nothing else (the
// fused op's staged kernel adds only its block's loops and barriers around the functions of its
// steps and of its staging, all here), so the exact arithmetic of the CUDA kernels (index math,
// summation order, rounding) is plain C++ that the host compiler builds too:
// tests/cuda_emulation.cpp runs every element on the CPU and the tests compare it with the
// reference on machines without a GPU (tests/test_cuda_emulation.py).
//
// Only headers that compile for the host and the device are included here.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "common/geometry.h"
#include "common/rules.h"

namespace deconvcuda {
namespace cuda_elements {

using geometry::Conv2d;
using geometry::Pool2d;

// --------------------------------------------------------------------------------------------- //
// max_pool2d_switches
// --------------------------------------------------------------------------------------------- //

// One pooled output (n, c, py, px) = `index` of the [N, C, pooled_h, pooled_w] output and its switch
// (geometry::window_max: PyTorch's rule for ties and NaN).
template <typename scalar_t>
DECONV_HOST_DEVICE void max_pool2d_switches_element(int64_t index, const scalar_t* input, scalar_t* output,
                                                    uint8_t* switches, int64_t height, int64_t width,
                                                    int64_t pooled_h, int64_t pooled_w, const Pool2d& pool) {
  const int64_t px = index % pooled_w;
  const int64_t py = (index / pooled_w) % pooled_h;
  const int64_t plane = index / (pooled_w * pooled_h);
  const auto best = geometry::window_max<scalar_t, at::opmath_type<scalar_t>>(input + plane * height * width,
                                                                               height, width, pool, py, px);
  output[index] = static_cast<scalar_t>(best.value);
  switches[index] = static_cast<uint8_t>(best.tap);
}

// --------------------------------------------------------------------------------------------- //
// unpool_relu
// --------------------------------------------------------------------------------------------- //

// One position (n, c, y, x) = `index` of the [N, C, height, width] pool input: the rule's finish
// (rules.h) of the sum of the pooled values whose switch selects it and that the rule routes. A
// switch that names no tap, or a tap in the padding, matches no position, so it is never followed
// outside the tensors. `positive` is read only by the masked rules.
template <typename Rule, typename index_t, typename scalar_t>
DECONV_HOST_DEVICE void unpool_relu_element(int64_t work_item, const scalar_t* grad, const bool* positive,
                                            const uint8_t* switches, scalar_t* output, int64_t height, int64_t width,
                                            int64_t pooled_h, int64_t pooled_w, const Pool2d& pool) {
  using acc_t = at::opmath_type<scalar_t>;
  // index_t: int32_t where every tensor of the call has fewer than 2^31 elements (fits_int32)
  const index_t index = static_cast<index_t>(work_item);
  const index_t x = index % static_cast<index_t>(width);
  const index_t y = (index / static_cast<index_t>(width)) % static_cast<index_t>(height);
  const index_t plane_offset =
      (index / static_cast<index_t>(width * height)) * static_cast<index_t>(pooled_h * pooled_w);
  const acc_t sum = geometry::unpooled_sum<Rule, scalar_t, acc_t>(
      grad + plane_offset, Rule::masked ? positive + plane_offset : nullptr, switches + plane_offset, pooled_w, 1,
      pooled_w, 1, pooled_h, pooled_w, pool, y, x);
  output[work_item] = static_cast<scalar_t>(Rule::finish(sum));
}

// --------------------------------------------------------------------------------------------- //
// unpool_relu_deconv2d: the fused sparse gather
// --------------------------------------------------------------------------------------------- //
// out[n, ci, y, x] = sum over co in ci's group, conv taps (cy, cx) with
//   (oy, ox) = the conv-output position that tap (cy, cx) maps onto (y, x):
//   weight[co, ci % C_in_per_group, cy, cx] * U[n, co, oy, ox],
// U = relu(unpooled grad), [N, C_out, height, width]. U is zero except at positions some window's
// switch selects, at most one per window. So instead of walking the kh x kw conv taps, a thread walks
// the pooled windows whose span reaches the conv-output rows and columns that map onto (y, x), reads
// each window's switch, and keeps the windows whose selected position is one of those (oy, ox).
//
// Work, per image, for a k x k pool of stride k (P = pooled_h * pooled_w windows per channel,
// height * width = k^2 P) and a kh x kw conv of stride 1, C = C_out / groups channels per group:
//   dense (unpool_relu, then cuDNN): writes and reads U, 2 * C_out * k^2 P elements, plus
//     2 * C_in * C * k^2 P * kh * kw FLOPs, of which all but 1 in k^2 multiply zeros.
//   gather (here): each output pixel visits about (kh / k + 1) * (kw / k + 1) windows per co (4 for
//     a 3x3 conv under a 2x2 pool, against 9 dense taps); about kh * kw / k^2 of them select a
//     position under the filter (9/4), so 2 * C_in * C * P * kh * kw FLOPs: 1/k^2 of dense. U is
//     never written; the bytes moved are grad and switches (C_out * P * (sizeof(scalar_t) + 1),
//     re-read from L1/L2 by neighbouring pixels), the weight and the output, once.
// Per visit the cost is integer work (switch decode, bounds, tap match) plus one weight load and
// FMA per output channel, so each work item computes several output channels of one pixel (how
// many is chosen per launch: choose_channels_per_thread): the decode is done once for all of them.
// Overlapping pools (AlexNet's 3x3 stride 2) add up to one unpooled_sum per visit, and each
// selected position is counted once, at the first window that selects it.
//
// The element is split in three (fused_work_item, accumulate_fused, store_fused) so that the
// staged kernel can run the walk over output channels in chunks, with the chunk's filter slice in
// shared memory, and still add every term in the same order as the one-piece element: the walk is
// over co (ascending), then windows (row-major), and a chunk is a range of co. Where the taps are
// read from is a FilterSlice; what is added, and in which order, does not depend on it, so both
// kernels (and the host emulation) give the same bits.

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

// Input channels per work item, chosen per launch (host code). A work item walks every output
// channel of its group and every pooled window under its pixel, decoding each switch once for all
// of its channels: more channels per item divide that integer work, fewer give more items. So: 8
// or 4 (no more than the group has) where that still leaves `resident_threads` work items (what the
// GPU runs at once: enough to hide latency), else 1. Three sizes only: each is a kernel instance
// per rule and dtype.
inline int64_t choose_channels_per_thread(int64_t batch, int64_t groups, int64_t in_channels_per_group,
                                          int64_t out_h, int64_t out_w, int64_t resident_threads) {
  const int64_t pixels = batch * groups * out_h * out_w;
  for (const int64_t channels : {int64_t(8), int64_t(4)}) {
    if (channels > in_channels_per_group * 2 - 1) continue;  // at most the next power of two above it
    if (pixels * geometry::ceil_div(in_channels_per_group, channels) >= resident_threads) return channels;
  }
  return 1;
}

// f(std::integral_constant<int, C>) for C = channels_per_thread (8, 4 or 1).
template <typename F>
void with_channels_per_thread(int64_t channels_per_thread, F&& f) {
  switch (channels_per_thread) {
    case 8: f(std::integral_constant<int, 8>()); return;
    case 4: f(std::integral_constant<int, 4>()); return;
    default: f(std::integral_constant<int, 1>()); return;
  }
}

// Whether every index of a call fits int32 (each tensor has fewer than 2^31 elements): then the
// elements decompose their work item and compute their offsets in 32 bits, which the GPU divides
// several times faster than 64-bit integers.
inline bool fits_int32(std::initializer_list<int64_t> numels) {
  for (const int64_t numel : numels) {
    if (numel >= (int64_t(1) << 31)) return false;
  }
  return true;
}

// One work item of the fused gather: output pixel (y, x) of image n, for input channels
// [first_channel, first_channel + channels) of group `group` (counted within the group; channels <=
// kChannels, fewer in a group's last tile), with what its walk over pooled windows needs, computed
// once per item: the conv-output positions some conv tap maps onto (y, x), clipped to the pool's
// input, and the pooled windows whose span reaches them.
template <typename index_t>
struct FusedWorkItem {
  index_t n, group, first_channel, channels, y, x;
  geometry::WindowRange conv_rows, conv_cols;
  geometry::WindowRange window_rows, window_cols;  // meaningful only where reaches_any()

  // Whether any conv-output position maps onto (y, x); where none does, the pixel is 0.
  DECONV_HOST_DEVICE bool reaches_any() const {
    return conv_rows.first <= conv_rows.last && conv_cols.first <= conv_cols.last;
  }
};

// The work item of channel tile `tile` of `group`, image n, output pixel (y, x). index_t: int32_t
// where fits_int32 says so for grad, weight and output, else int64_t.
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
  item.conv_rows =
      geometry::windows_spanning(y, shape.height, conv.kernel_h, conv.stride_h, conv.padding_h, conv.dilation_h);
  item.conv_cols =
      geometry::windows_spanning(x, shape.width, conv.kernel_w, conv.stride_w, conv.padding_w, conv.dilation_w);
  item.window_rows = geometry::WindowRange{0, -1};
  item.window_cols = geometry::WindowRange{0, -1};
  if (item.reaches_any()) {
    item.window_rows = geometry::windows_spanning_range(item.conv_rows.first, item.conv_rows.last, shape.pooled_h,
                                                        pool.kernel_h, pool.stride_h, pool.padding_h, pool.dilation_h);
    item.window_cols = geometry::windows_spanning_range(item.conv_cols.first, item.conv_cols.last, shape.pooled_w,
                                                        pool.kernel_w, pool.stride_w, pool.padding_w, pool.dilation_w);
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

// Where a work item reads its weight taps: tap (cy, cx) of weight[co, first_channel + t] is
//   taps[(co - first_out_channel) * out_channel_stride + t * kernel_h * kernel_w + cy * kernel_w + cx]
// for the output channels co the slice holds. That is the weight's own layout, restricted to one
// channel tile: the weight itself in global memory (out_channel_stride = C_in_per_group * kh * kw,
// taps pointing at weight[first_out_channel, first_channel]), or a staged copy of some of its output
// channels (stage_filter_tap: out_channel_stride = kChannels * kh * kw).
template <typename scalar_t, typename index_t>
struct FilterSlice {
  const scalar_t* taps;
  index_t first_out_channel;
  index_t out_channel_stride;
};

// The fused gather's sum for one work item over the output channels [co_begin, co_end) of its
// group, added to `acc` (one per input channel of the item) in the order the one-piece walk adds
// them: co ascending, then pooled windows row-major. Calling it for consecutive ranges of co that
// cover the group gives the same bits as one call for the whole group. `filters` must hold the
// taps of every co in the range.
template <typename Rule, int kChannels, typename index_t, typename scalar_t>
DECONV_HOST_DEVICE void accumulate_fused(const FusedWorkItem<index_t>& item, index_t co_begin, index_t co_end,
                                         const scalar_t* grad, const bool* positive, const uint8_t* switches,
                                         const FilterSlice<scalar_t, index_t>& filters_slice, const FusedShape& shape,
                                         const Pool2d& pool, const Conv2d& conv,
                                         at::opmath_type<scalar_t> (&acc)[kChannels]) {
  using acc_t = at::opmath_type<scalar_t>;
  if (!item.reaches_any()) return;
  const index_t y = item.y, x = item.x;
  const index_t channels = item.channels;
  const index_t taps_per_filter = static_cast<index_t>(conv.kernel_h * conv.kernel_w);
  const int pool_taps = static_cast<int>(pool.kernel_h * pool.kernel_w);  // <= 256
  const int pool_kernel_w = static_cast<int>(pool.kernel_w);
  const bool pool_overlaps = geometry::windows_overlap(pool.kernel_h, pool.stride_h, pool.dilation_h) ||
                             geometry::windows_overlap(pool.kernel_w, pool.stride_w, pool.dilation_w);
  const index_t pooled_w = static_cast<index_t>(shape.pooled_w);
  const geometry::WindowRange conv_rows = item.conv_rows, conv_cols = item.conv_cols;
  const geometry::WindowRange window_rows = item.window_rows, window_cols = item.window_cols;
  const index_t plane_size = static_cast<index_t>(shape.pooled_h) * pooled_w;
  const index_t out_channels = static_cast<index_t>(shape.out_channels);

  for (index_t co = co_begin; co < co_end; ++co) {
    const index_t plane_offset = (item.n * out_channels + co) * plane_size;
    const scalar_t* grad_plane = grad + plane_offset;
    const uint8_t* switch_plane = switches + plane_offset;
    const bool* positive_plane = Rule::masked ? positive + plane_offset : nullptr;
    // weight[co, first_channel + t, :, :] starts at filters + t * taps_per_filter.
    const scalar_t* filters =
        filters_slice.taps + (co - filters_slice.first_out_channel) * filters_slice.out_channel_stride;

    for (index_t py = static_cast<index_t>(window_rows.first); py <= static_cast<index_t>(window_rows.last); ++py) {
      for (index_t px = static_cast<index_t>(window_cols.first); px <= static_cast<index_t>(window_cols.last); ++px) {
        const int switch_tap = switch_plane[py * pooled_w + px];
        if (switch_tap >= pool_taps) continue;  // names no tap
        const int64_t sy = geometry::position_of(py, switch_tap / pool_kernel_w, pool.stride_h, pool.padding_h,
                                                 pool.dilation_h);
        const int64_t sx = geometry::position_of(px, switch_tap % pool_kernel_w, pool.stride_w, pool.padding_w,
                                                 pool.dilation_w);
        // Outside the conv-output rows/columns under (y, x); this also rejects positions outside
        // [0, height) x [0, width), the ranges being clipped to them.
        if (sy < conv_rows.first || sy > conv_rows.last || sx < conv_cols.first || sx > conv_cols.last) continue;
        const int64_t cy = geometry::tap_of(y, sy, conv.kernel_h, conv.stride_h, conv.padding_h, conv.dilation_h);
        const int64_t cx = geometry::tap_of(x, sx, conv.kernel_w, conv.stride_w, conv.padding_w, conv.dilation_w);
        if (cy == geometry::kNoTap || cx == geometry::kNoTap) continue;  // conv dilation skips (sy, sx)

        acc_t value;
        if (pool_overlaps) {
          // (sy, sx) may be selected by several windows: count it once, with all their values.
          if (!geometry::first_window_selecting(switch_plane, shape.pooled_w, 1, shape.pooled_h, shape.pooled_w,
                                                pool, sy, sx, py, px)) {
            continue;
          }
          value = Rule::finish(geometry::unpooled_sum<Rule, scalar_t, acc_t>(
              grad_plane, positive_plane, switch_plane, shape.pooled_w, 1, shape.pooled_w, 1, shape.pooled_h,
              shape.pooled_w, pool, sy, sx));
        } else {
          if (!Rule::routes(positive_plane, py * pooled_w + px)) continue;
          value = Rule::finish(static_cast<acc_t>(grad_plane[py * pooled_w + px]));
        }
        const scalar_t* tap = filters + static_cast<index_t>(cy * conv.kernel_w + cx);
        for (int t = 0; t < kChannels; ++t) {
          if (t < channels) acc[t] = multiply_add(static_cast<acc_t>(tap[t * taps_per_filter]), value, acc[t]);
        }
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

// The work item `work_item` of [N, groups, channel_tiles, out_h, out_w], every output channel of its
// group in one walk, its taps read from the weight where it lies (global memory on the GPU): the
// global-memory kernel's element, under the rule `Rule` (rules.h).
template <typename Rule, int kChannels, typename index_t, typename scalar_t>
DECONV_HOST_DEVICE void unpool_relu_deconv2d_element(int64_t work_item, const scalar_t* grad, const bool* positive,
                                                     const uint8_t* switches, const scalar_t* weight,
                                                     scalar_t* output, const FusedShape& shape, const Pool2d& pool,
                                                     const Conv2d& conv) {
  using acc_t = at::opmath_type<scalar_t>;
  const FusedWorkItem<index_t> item = fused_work_item_at<kChannels, index_t>(work_item, shape, pool, conv);
  const index_t in_per_group = static_cast<index_t>(shape.in_channels_per_group);
  const index_t out_per_group = static_cast<index_t>(shape.out_channels / shape.groups);
  const index_t taps_per_filter = static_cast<index_t>(conv.kernel_h * conv.kernel_w);
  const index_t first_out_channel = item.group * out_per_group;
  const FilterSlice<scalar_t, index_t> filters{
      weight + (first_out_channel * in_per_group + item.first_channel) * taps_per_filter, first_out_channel,
      in_per_group * taps_per_filter};
  acc_t acc[kChannels];
  for (int t = 0; t < kChannels; ++t) acc[t] = acc_t(0);
  accumulate_fused<Rule, kChannels, index_t, scalar_t>(item, first_out_channel, first_out_channel + out_per_group,
                                                       grad, positive, switches, filters, shape, pool, conv, acc);
  store_fused<kChannels, index_t, scalar_t>(item, acc, output, shape);
}

// --------------------------------------------------------------------------------------------- //
// unpool_relu_deconv2d, staged: the filter slice of a block in shared memory
// --------------------------------------------------------------------------------------------- //
// Every work item of one (group, channel tile) reads the same taps: weight[co, first_channel + t]
// for every co of the group. The staged kernel gives a block only items of one (group, tile), copies
// those taps into shared memory a chunk of output channels at a time, laid out
//   staged[(co - co_begin) * kChannels * kh * kw + t * kh * kw + cy * kw + cx]   (FilterSlice's layout)
// i.e. [out_channels_per_chunk][kChannels][kh][kw], and walks the chunk's co from there. Rows t >=
// channels (a group's last, partial tile) are neither written nor read. The chunk is as many output
// channels as kStagedFilterBytes holds (staged_out_channels_per_chunk).

// Threads per block of every kernel; the staged kernel's items of one block are this many
// consecutive items of its slice (and the host emulation's blocks are as large).
constexpr int kThreadsPerBlock = 256;

// Shared memory for one block's staged filter chunk. Today registers limit the staged kernel's
// occupancy first (ptxas for sm_90: 94 to 108 a thread, so 2 blocks of 256 threads on a
// multiprocessor, as the global-memory kernel before it), so a larger budget would cost nothing
// now; 24 KiB leaves room for 8 blocks (8 * (24 + 1 reserved) = 200 of an H100's 228 KiB) should
// the registers come down, and stays under 48 KiB, the most a kernel may use without opting in
// (cudaFuncSetAttribute), on every GPU. It holds 85 output channels of a VGG16 filter chunk (8
// input channels, 3 x 3, float32): one pair of barriers per 85 output channels walked.
constexpr int64_t kStagedFilterBytes = 24 * 1024;

// Output channels per staged chunk (host code): the fewest chunks of equal size (the last one may be
// shorter) whose [chunk][channels_per_thread][taps_per_filter] elements of element_size bytes fit
// `budget_bytes`; 0 where not even one output channel fits (a huge filter): the caller uses the
// global-memory kernel then.
inline int64_t staged_out_channels_per_chunk(int64_t out_channels_per_group, int64_t channels_per_thread,
                                             int64_t taps_per_filter, int64_t element_size,
                                             int64_t budget_bytes = kStagedFilterBytes) {
  const int64_t bytes_per_out_channel = channels_per_thread * taps_per_filter * element_size;
  if (out_channels_per_group <= 0 || bytes_per_out_channel <= 0) return 0;
  const int64_t fits = budget_bytes / bytes_per_out_channel;
  if (fits == 0) return 0;
  const int64_t chunks = geometry::ceil_div(out_channels_per_group, fits);
  return geometry::ceil_div(out_channels_per_group, chunks);
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
  const index_t out_per_group = static_cast<index_t>(shape.out_channels / shape.groups);
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

// Elements a block copies for a chunk of co_count output channels of a tile of `channels` input
// channels: stage_filter_tap's indices are [0, this).
template <typename index_t>
DECONV_HOST_DEVICE index_t staged_taps(index_t co_count, index_t channels, index_t taps_per_filter) {
  return co_count * channels * taps_per_filter;
}

// Copies element `index` of the chunk that starts at output channel co_begin: each co's taps for
// the tile's input channels [first_channel, first_channel + channels) are one run of
// channels * kh * kw elements in the weight, so consecutive indices (consecutive threads) read
// consecutive addresses.
template <int kChannels, typename index_t, typename scalar_t>
DECONV_HOST_DEVICE void stage_filter_tap(index_t index, scalar_t* staged, const scalar_t* weight, index_t co_begin,
                                         index_t first_channel, index_t channels, index_t in_channels_per_group,
                                         index_t taps_per_filter) {
  const index_t run = channels * taps_per_filter;
  const index_t co = index / run;
  const index_t offset = index % run;
  staged[co * (kChannels * taps_per_filter) + offset] =
      weight[((co_begin + co) * in_channels_per_group + first_channel) * taps_per_filter + offset];
}

// The FilterSlice of a staged chunk that starts at output channel co_begin.
template <int kChannels, typename index_t, typename scalar_t>
DECONV_HOST_DEVICE FilterSlice<scalar_t, index_t> staged_filter_slice(const scalar_t* staged, index_t co_begin,
                                                                      index_t taps_per_filter) {
  return FilterSlice<scalar_t, index_t>{staged, co_begin, static_cast<index_t>(kChannels * taps_per_filter)};
}

// How one fused call is launched (host code): decided here once, for the .cu file and for the host
// emulation alike.
struct FusedLaunch {
  int64_t channels_per_thread;     // 8, 4 or 1
  int64_t out_channels_per_chunk;  // > 0: the staged kernel, chunks of this many output channels;
                                   // 0: the global-memory kernel
};

// 64-bit indices (`index32` false): the global-memory kernel, one channel per thread, so that the
// rare path adds one kernel instance per rule and dtype. 32-bit: choose_channels_per_thread's
// channels, fewer where a chunk of even one output channel would not fit the staging budget, and
// the staged kernel; the global-memory kernel with one channel per thread only where not even one
// output channel of one input channel fits (a filter of over 6144 taps in float32). So the global
// kernel has two instances (int32, int64) and the staged kernel three (8, 4, 1).
inline FusedLaunch choose_fused_launch(int64_t batch, int64_t groups, int64_t in_channels_per_group,
                                       int64_t out_channels, int64_t taps_per_filter, int64_t element_size,
                                       int64_t out_h, int64_t out_w, bool index32, int64_t resident_threads) {
  if (!index32) return FusedLaunch{1, 0};
  int64_t channels =
      choose_channels_per_thread(batch, groups, in_channels_per_group, out_h, out_w, resident_threads);
  for (;;) {
    const int64_t chunk =
        staged_out_channels_per_chunk(out_channels / groups, channels, taps_per_filter, element_size);
    if (chunk > 0 || channels == 1) return FusedLaunch{channels, chunk};
    channels = channels == 8 ? 4 : 1;
  }
}

}  // namespace cuda_elements
}  // namespace deconvcuda
