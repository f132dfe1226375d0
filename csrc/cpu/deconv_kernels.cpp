// CPU kernels of the four deconvcuda operators (schemas in csrc/ops.cpp, semantics in DESIGN.md).
//
// Layout: the kernels live in an anonymous namespace, templated on the scalar type; the op
// functions below them check their arguments (csrc/common/checks.h), make the inputs NCHW
// contiguous, dispatch on the dtype and register themselves in the TORCH_LIBRARY_IMPL block at the
// end. Every index computation goes through csrc/common/geometry.h, which the CUDA kernels share.
//
// Memory format: inputs of any strides and memory format (channels_last included) are read through
// `.contiguous()`, and every output is a new NCHW-contiguous tensor.
//
// Precision: half and bfloat16 are read and accumulated in float32 (at::opmath_type), float32 in
// float32 and float64 in float64; only the final value is rounded to the input's dtype.
//
// Determinism: every output element is computed by one thread, in an order that does not depend on
// the number of threads (gather, or accumulation into a tile that one task owns; no atomics), so
// results repeat bit for bit.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/geometry.h"
#include "common/rules.h"

namespace deconvcuda {
namespace ops {

namespace {

using geometry::Conv2d;
using geometry::Pool2d;

// How many items of `work_per_item` elementary steps at::parallel_for should hand to one thread at
// least, so that small problems are not split into tasks that cost more to start than to run.
int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, work_per_item));
}

// --------------------------------------------------------------------------------------------- //
// max_pool2d_switches
// --------------------------------------------------------------------------------------------- //

// One thread per run of (n, c) planes; each window by geometry::window_max, the CUDA kernel's rule
// for ties and NaN (PyTorch's).
template <typename scalar_t>
void max_pool2d_switches_kernel(const scalar_t* input, scalar_t* output, uint8_t* switches, int64_t planes,
                                int64_t input_h, int64_t input_w, int64_t output_h, int64_t output_w,
                                const Pool2d& pool) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t work_per_plane = output_h * output_w * pool.kernel_h * pool.kernel_w;
  at::parallel_for(0, planes, grain_for(work_per_plane), [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const scalar_t* in = input + plane * input_h * input_w;
      scalar_t* out = output + plane * output_h * output_w;
      uint8_t* switch_out = switches + plane * output_h * output_w;
      for (int64_t oy = 0; oy < output_h; ++oy) {
        for (int64_t ox = 0; ox < output_w; ++ox) {
          const auto best = geometry::window_max<scalar_t, acc_t>(in, input_h, input_w, pool, oy, ox);
          out[oy * output_w + ox] = static_cast<scalar_t>(best.value);
          switch_out[oy * output_w + ox] = static_cast<uint8_t>(best.tap);
        }
      }
    }
  });
}

// --------------------------------------------------------------------------------------------- //
// unpool_relu
// --------------------------------------------------------------------------------------------- //

// Where tap t of a pool window lands, relative to the window's first position: (dy[t], dx[t]), for
// every uint8 switch value; `valid[t]` is false for values that name no tap. Made once per call, so
// the kernels decode a switch with two loads instead of a division by kernel_w.
struct TapOffsets {
  int64_t dy[geometry::kMaxKernelTaps + 1];
  int64_t dx[geometry::kMaxKernelTaps + 1];
  int64_t taps;

  explicit TapOffsets(const Pool2d& pool) : taps(pool.kernel_h * pool.kernel_w) {
    for (int64_t tap = 0; tap < taps; ++tap) {
      dy[tap] = (tap / pool.kernel_w) * pool.dilation_h;
      dx[tap] = (tap % pool.kernel_w) * pool.dilation_w;
    }
  }
};

// Per plane, one walk over the pooled values in row-major order: each value the rule routes is
// added to the position its switch selects, in a plane of sums that stays in cache; then the rule's
// finish (relu, or nothing) turns the sums into the output. Where windows overlap, a position's
// contributions add up in row-major window order: the same order as geometry::unpooled_sum's
// gather (the CUDA kernel's), so for any number of threads the bits are the same. A switch that
// names no tap, or a tap in the padding, is skipped, never followed outside the plane. float32 and
// float64 sum in the output itself; half and bfloat16 in a float32 plane per thread.
template <typename Rule, typename scalar_t>
void unpool_relu_kernel(const scalar_t* grad, const bool* positive, const uint8_t* switches, scalar_t* output,
                        int64_t planes, int64_t pooled_h, int64_t pooled_w, int64_t input_h, int64_t input_w,
                        const Pool2d& pool) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool in_place = std::is_same_v<acc_t, scalar_t>;
  const TapOffsets offsets(pool);
  const int64_t pooled_area = pooled_h * pooled_w;
  const int64_t input_area = input_h * input_w;
  at::parallel_for(0, planes, grain_for(pooled_area + 2 * input_area), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(in_place ? 0 : input_area);
    for (int64_t plane = begin; plane < end; ++plane) {
      const scalar_t* grad_plane = grad + plane * pooled_area;
      const bool* positive_plane = Rule::masked ? positive + plane * pooled_area : nullptr;
      const uint8_t* switch_plane = switches + plane * pooled_area;
      scalar_t* out = output + plane * input_area;
      acc_t* sums = in_place ? reinterpret_cast<acc_t*>(out) : scratch.data();
      std::fill(sums, sums + input_area, acc_t(0));
      for (int64_t py = 0; py < pooled_h; ++py) {
        const int64_t y0 = py * pool.stride_h - pool.padding_h;
        for (int64_t px = 0; px < pooled_w; ++px) {
          const int64_t index = py * pooled_w + px;
          const int64_t tap = switch_plane[index];
          if (tap >= offsets.taps || !Rule::routes(positive_plane, index)) continue;
          const int64_t y = y0 + offsets.dy[tap];
          const int64_t x = px * pool.stride_w - pool.padding_w + offsets.dx[tap];
          if (y < 0 || y >= input_h || x < 0 || x >= input_w) continue;  // a tap in the padding
          sums[y * input_w + x] += static_cast<acc_t>(grad_plane[index]);
        }
      }
      if (!in_place || Rule::rectifies) {
        for (int64_t i = 0; i < input_area; ++i) {
          out[i] = static_cast<scalar_t>(Rule::finish(sums[i]));
        }
      }
    }
  });
}

// --------------------------------------------------------------------------------------------- //
// unpool_relu_deconv2d
// --------------------------------------------------------------------------------------------- //
//
// Three passes over a chunk of samples; none of them writes the unpooled map.
//
// 1. Per (n, c_out) plane: the list of the unpooled map's non-zero values, at most one per pooled
//    window (the position its switch selects; where windows overlap, each position once, from the
//    first window that selects it, carrying the summed value). ReLU zeros are dropped here, so
//    everything after scales with the number of non-zero values, not with the map's size.
// 2. Per (n, group): those lists regrouped by position (compressed rows: for every unpooled
//    position, the (c_out, value) pairs routed there, in increasing c_out).
// 3. A gather per output row and block of B channels of c_in: every output position (y, x) visits
//    the unpooled positions its transposed-conv taps reach (the conv windows that contain it), and
//    for each pair routed there adds value * weight[c_out, c_in, ky, kx] for the B channels at once,
//    in registers. The weight is packed as [group, c_in block, kh, kw, c_out, B] so that those B
//    weights are contiguous.
//
// Each output element is computed by one thread in a fixed order (unpooled position, then c_out),
// so results are the same for any number of threads.

template <typename acc_t>
struct UnpooledValue {
  int64_t y;  // position in the unpooled map (the conv's output): [0, unpooled_h) x [0, unpooled_w)
  int64_t x;
  acc_t value;  // relu(unpooled sum), never zero
};

template <typename acc_t>
struct RoutedValue {
  int64_t channel;  // c_out within its group
  acc_t value;
};

// Pass 1 for one plane under the rule `Rule` (rules.h); returns how many values it wrote.
template <typename Rule, typename scalar_t, typename acc_t>
int64_t collect_unpooled_values(const scalar_t* grad, const bool* positive, const uint8_t* switches,
                                int64_t pooled_h, int64_t pooled_w,
                                int64_t unpooled_h, int64_t unpooled_w, const Pool2d& pool,
                                UnpooledValue<acc_t>* values) {
  const bool overlapping = geometry::windows_overlap(pool.kernel_h, pool.stride_h, pool.dilation_h) ||
                           geometry::windows_overlap(pool.kernel_w, pool.stride_w, pool.dilation_w);
  const int64_t taps = pool.kernel_h * pool.kernel_w;
  int64_t count = 0;
  for (int64_t py = 0; py < pooled_h; ++py) {
    for (int64_t px = 0; px < pooled_w; ++px) {
      const int64_t tap = switches[py * pooled_w + px];
      if (tap >= taps) continue;  // names no tap of the window: routes nothing
      const int64_t y = geometry::position_of(py, tap / pool.kernel_w, pool.stride_h, pool.padding_h, pool.dilation_h);
      const int64_t x = geometry::position_of(px, tap % pool.kernel_w, pool.stride_w, pool.padding_w, pool.dilation_w);
      if (y < 0 || y >= unpooled_h || x < 0 || x >= unpooled_w) continue;  // a tap in the padding
      acc_t value;
      if (overlapping) {
        // Other windows may select (y, x) too: the first of them carries the whole sum, the others
        // nothing, so that the position counts once.
        if (!geometry::first_window_selecting(switches, pooled_w, 1, pooled_h, pooled_w, pool, y, x, py, px)) {
          continue;
        }
        value = Rule::finish(geometry::unpooled_sum<Rule, scalar_t, acc_t>(grad, positive, switches, pooled_w, 1,
                                                                           pooled_w, 1, pooled_h, pooled_w, pool, y, x));
      } else {
        if (!Rule::routes(positive, py * pooled_w + px)) continue;
        value = Rule::finish(static_cast<acc_t>(grad[py * pooled_w + px]));
      }
      // A zero adds nothing to any sum (the accumulators start at +0, so not even a sign is lost).
      if (value == acc_t(0)) continue;
      values[count++] = UnpooledValue<acc_t>{y, x, value};
    }
  }
  return count;
}

// Pass 3 for one output row of one sample, group and block of B channels. `routed` and `offsets`
// are the sample's and group's compressed rows; `weight` points at the packed [kh, kw, c_out, B]
// weights of the group and block; `row` is scratch for [output_w, B] accumulators.
template <int B, typename acc_t>
void gather_output_row(const RoutedValue<acc_t>* routed, const int64_t* offsets, const acc_t* weight,
                       int64_t out_per_group, int64_t unpooled_h, int64_t unpooled_w, const Conv2d& conv, int64_t y,
                       int64_t output_w, acc_t* row) {
  const int64_t tap_stride = out_per_group * B;  // between consecutive (ky, kx) in `weight`
  const auto unpooled_rows =
      geometry::windows_spanning(y, unpooled_h, conv.kernel_h, conv.stride_h, conv.padding_h, conv.dilation_h);
  for (int64_t x = 0; x < output_w; ++x) {
    acc_t acc[B] = {};
    const auto unpooled_cols =
        geometry::windows_spanning(x, unpooled_w, conv.kernel_w, conv.stride_w, conv.padding_w, conv.dilation_w);
    for (int64_t oy = unpooled_rows.first; oy <= unpooled_rows.last; ++oy) {
      // The conv window oy reads row y through tap ky (or not at all, where dilation skips it).
      const int64_t ky = geometry::tap_of(y, oy, conv.kernel_h, conv.stride_h, conv.padding_h, conv.dilation_h);
      if (ky == geometry::kNoTap) continue;
      for (int64_t ox = unpooled_cols.first; ox <= unpooled_cols.last; ++ox) {
        const int64_t kx = geometry::tap_of(x, ox, conv.kernel_w, conv.stride_w, conv.padding_w, conv.dilation_w);
        if (kx == geometry::kNoTap) continue;
        const acc_t* tap_weight = weight + (ky * conv.kernel_w + kx) * tap_stride;
        const int64_t position = oy * unpooled_w + ox;
        for (int64_t i = offsets[position]; i < offsets[position + 1]; ++i) {
          const RoutedValue<acc_t> routed_value = routed[i];
          const acc_t* channel_weight = tap_weight + routed_value.channel * B;
          for (int c = 0; c < B; ++c) {
            acc[c] += channel_weight[c] * routed_value.value;
          }
        }
      }
    }
    for (int c = 0; c < B; ++c) {
      row[x * B + c] = acc[c];
    }
  }
}

// Unpooled values held at once (passes 1 and 2 of a chunk of samples): bounds the scratch memory
// to about 40 bytes each.
constexpr int64_t kValuesPerChunk = int64_t(1) << 20;

// `weight_packed`: [groups, channel_blocks, kh, kw, c_out / groups, B] in the accumulate type,
// zero beyond c_in / groups.
template <typename Rule, int B, typename scalar_t>
void unpool_relu_deconv2d_kernel(const scalar_t* grad, const bool* positive, const uint8_t* switches,
                                 const at::opmath_type<scalar_t>* weight_packed, scalar_t* output, int64_t batch,
                                 int64_t conv_out_channels, int64_t pooled_h, int64_t pooled_w, int64_t unpooled_h,
                                 int64_t unpooled_w, int64_t conv_in_channels, int64_t output_h, int64_t output_w,
                                 int64_t groups, const Pool2d& pool, const Conv2d& conv) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t out_per_group = conv_out_channels / groups;  // planes of grad per group
  const int64_t in_per_group = conv_in_channels / groups;    // planes of output per group
  const int64_t channel_blocks = (in_per_group + B - 1) / B;
  const int64_t pooled_area = pooled_h * pooled_w;
  const int64_t unpooled_area = unpooled_h * unpooled_w;
  const int64_t packed_block_size = conv.kernel_h * conv.kernel_w * out_per_group * B;

  const int64_t values_per_sample = std::max<int64_t>(1, conv_out_channels * pooled_area);
  const int64_t chunk = std::clamp<int64_t>(kValuesPerChunk / values_per_sample, 1, batch);
  // Every list may be full (no ReLU zero, no repeated position), so each plane gets pooled_area.
  std::unique_ptr<UnpooledValue<acc_t>[]> values(new UnpooledValue<acc_t>[chunk * conv_out_channels * pooled_area]);
  std::unique_ptr<RoutedValue<acc_t>[]> routed(new RoutedValue<acc_t>[chunk * conv_out_channels * pooled_area]);
  std::vector<int64_t> counts(chunk * conv_out_channels);
  std::vector<int64_t> offsets(chunk * groups * (unpooled_area + 1));

  for (int64_t n0 = 0; n0 < batch; n0 += chunk) {
    const int64_t samples = std::min(chunk, batch - n0);

    // Pass 1: the non-zero unpooled values of every plane.
    at::parallel_for(0, samples * conv_out_channels, grain_for(pooled_area * 4), [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t offset = (n0 * conv_out_channels + plane) * pooled_area;
        counts[plane] = collect_unpooled_values<Rule, scalar_t, acc_t>(
            grad + offset, Rule::masked ? positive + offset : nullptr, switches + offset, pooled_h, pooled_w,
            unpooled_h, unpooled_w, pool, values.get() + plane * pooled_area);
      }
    });

    // Pass 2: per (sample, group), the values regrouped by position (a counting sort, stable in c_out).
    const int64_t work_per_group = out_per_group * pooled_area + unpooled_area;
    at::parallel_for(0, samples * groups, grain_for(work_per_group), [&](int64_t begin, int64_t end) {
      std::vector<int64_t> cursor(unpooled_area);
      for (int64_t sample_group = begin; sample_group < end; ++sample_group) {
        const int64_t first_plane = sample_group * out_per_group;  // = sample * C_out + group * out_per_group
        int64_t* position_offsets = offsets.data() + sample_group * (unpooled_area + 1);
        std::fill(position_offsets, position_offsets + unpooled_area + 1, 0);
        for (int64_t channel = 0; channel < out_per_group; ++channel) {
          const UnpooledValue<acc_t>* list = values.get() + (first_plane + channel) * pooled_area;
          for (int64_t i = 0; i < counts[first_plane + channel]; ++i) {
            ++position_offsets[list[i].y * unpooled_w + list[i].x + 1];
          }
        }
        for (int64_t position = 0; position < unpooled_area; ++position) {
          position_offsets[position + 1] += position_offsets[position];
        }
        std::copy(position_offsets, position_offsets + unpooled_area, cursor.begin());
        RoutedValue<acc_t>* group_routed = routed.get() + first_plane * pooled_area;
        for (int64_t channel = 0; channel < out_per_group; ++channel) {
          const UnpooledValue<acc_t>* list = values.get() + (first_plane + channel) * pooled_area;
          for (int64_t i = 0; i < counts[first_plane + channel]; ++i) {
            group_routed[cursor[list[i].y * unpooled_w + list[i].x]++] = RoutedValue<acc_t>{channel, list[i].value};
          }
        }
      }
    });

    // Pass 3: one task per (sample, group, channel block, output row).
    const int64_t tasks = samples * groups * channel_blocks * output_h;
    const int64_t work_per_row = output_w * conv.kernel_h * conv.kernel_w * B * 4;
    at::parallel_for(0, tasks, grain_for(work_per_row), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> row(output_w * B);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t y = task % output_h;
        const int64_t channel_block = (task / output_h) % channel_blocks;
        const int64_t sample_group = task / (output_h * channel_blocks);
        const int64_t group = sample_group % groups;
        const int64_t sample = sample_group / groups;
        gather_output_row<B, acc_t>(routed.get() + sample_group * out_per_group * pooled_area,
                                    offsets.data() + sample_group * (unpooled_area + 1),
                                    weight_packed + (group * channel_blocks + channel_block) * packed_block_size,
                                    out_per_group, unpooled_h, unpooled_w, conv, y, output_w, row.data());
        // [x, B] -> output[n, c_in, y, :] for the block's real channels.
        const int64_t channels = std::min<int64_t>(B, in_per_group - channel_block * B);
        for (int64_t c = 0; c < channels; ++c) {
          const int64_t c_in = group * in_per_group + channel_block * B + c;
          scalar_t* out = output + (((n0 + sample) * conv_in_channels + c_in) * output_h + y) * output_w;
          for (int64_t x = 0; x < output_w; ++x) {
            out[x] = static_cast<scalar_t>(row[x * B + c]);
          }
        }
      }
    });
  }
}

// The width of the channel blocks of pass 3: the whole of a small c_in / groups, or 16 (four SSE
// or two AVX vectors of float32 accumulators).
template <typename F>
void with_channel_block(int64_t in_per_group, F&& f) {
  if (in_per_group <= 1) {
    f(std::integral_constant<int, 1>());
  } else if (in_per_group <= 4) {
    f(std::integral_constant<int, 4>());
  } else if (in_per_group <= 8) {
    f(std::integral_constant<int, 8>());
  } else {
    f(std::integral_constant<int, 16>());
  }
}

// [C_out, C_in / groups, kh, kw] -> [groups, blocks, kh, kw, C_out / groups, block], in `dtype`,
// zero-padded to a whole number of blocks.
at::Tensor pack_weight(const at::Tensor& weight, int64_t groups, int64_t block, at::ScalarType dtype) {
  const int64_t out_per_group = weight.size(0) / groups;
  const int64_t in_per_group = weight.size(1);
  const int64_t blocks = (in_per_group + block - 1) / block;
  at::Tensor padded = at::zeros({weight.size(0), blocks * block, weight.size(2), weight.size(3)},
                                weight.options().dtype(dtype));
  padded.narrow(1, 0, in_per_group).copy_(weight);
  return padded.view({groups, out_per_group, blocks, block, weight.size(2), weight.size(3)})
      .permute({0, 2, 4, 5, 1, 3})
      .contiguous();
}

// --------------------------------------------------------------------------------------------- //
// The operators
// --------------------------------------------------------------------------------------------- //

std::tuple<at::Tensor, at::Tensor> max_pool2d_switches_cpu(const at::Tensor& input, at::IntArrayRef kernel_size,
                                                           at::IntArrayRef stride, at::IntArrayRef padding,
                                                           at::IntArrayRef dilation, bool ceil_mode) {
  const Pool2d pool = checks::check_max_pool2d_switches(input, kernel_size, stride, padding, dilation, ceil_mode);
  const int64_t output_h = geometry::pool_output_size(input.size(2), pool.kernel_h, pool.stride_h, pool.padding_h,
                                                      pool.dilation_h, ceil_mode);
  const int64_t output_w = geometry::pool_output_size(input.size(3), pool.kernel_w, pool.stride_w, pool.padding_w,
                                                      pool.dilation_w, ceil_mode);
  at::Tensor output = at::empty({input.size(0), input.size(1), output_h, output_w}, input.options());
  at::Tensor switches = at::empty_like(output, output.options().dtype(at::kByte));
  if (output.numel() == 0) {
    return {output, switches};
  }
  const at::Tensor input_nchw = input.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "max_pool2d_switches", [&] {
    max_pool2d_switches_kernel<scalar_t>(input_nchw.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(),
                                         switches.mutable_data_ptr<uint8_t>(), input.size(0) * input.size(1),
                                         input.size(2), input.size(3), output_h, output_w, pool);
  });
  return {output, switches};
}

at::Tensor unpool_relu_cpu(const at::Tensor& grad, const at::Tensor& switches, at::IntArrayRef input_size,
                           at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, c10::string_view rule,
                           const std::optional<at::Tensor>& positive) {
  const auto call =
      checks::check_unpool_relu(grad, switches, input_size, kernel_size, stride, padding, dilation, rule, positive);
  at::Tensor output = at::empty({grad.size(0), grad.size(1), input_size[0], input_size[1]}, grad.options());
  if (output.numel() == 0) {
    return output;
  }
  if (grad.numel() == 0) {  // an empty pooled map (a pool that yields no window) routes nothing
    return output.zero_();
  }
  const at::Tensor grad_nchw = grad.contiguous();
  const at::Tensor switches_nchw = switches.contiguous();
  const checks::Mask mask(positive);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "unpool_relu", [&] {
    rules::dispatch_rule(call.rule, mask.present(), [&](auto rule_type) {
      unpool_relu_kernel<decltype(rule_type), scalar_t>(
          grad_nchw.const_data_ptr<scalar_t>(), mask.data(), switches_nchw.const_data_ptr<uint8_t>(),
          output.mutable_data_ptr<scalar_t>(), grad.size(0) * grad.size(1), grad.size(2), grad.size(3),
          input_size[0], input_size[1], call.pool);
    });
  });
  return output;
}

at::Tensor deconv2d_cpu(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                        at::IntArrayRef output_size) {
  checks::check_deconv2d(input, weight, stride, padding, dilation, groups, output_size);
  const int64_t output_channels = weight.size(1) * groups;
  if (input.numel() == 0 || weight.numel() == 0) {
    // No sample, or a sum over no channel or no tap: zeros (ATen's convolutions reject some of
    // these shapes).
    return at::zeros({input.size(0), output_channels, output_size[0], output_size[1]}, input.options());
  }
  // NCHW in, NCHW out, whatever memory format the caller's tensors have.
  return checks::deconv2d_aten(input.contiguous(), weight.contiguous(), stride, padding, dilation, groups,
                               output_size)
      .contiguous();
}

at::Tensor unpool_relu_deconv2d_cpu(const at::Tensor& grad, const at::Tensor& switches, const at::Tensor& weight,
                                    at::IntArrayRef input_size, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation, at::IntArrayRef conv_stride,
                                    at::IntArrayRef conv_padding, at::IntArrayRef conv_dilation, int64_t groups,
                                    at::IntArrayRef output_size, c10::string_view rule,
                                    const std::optional<at::Tensor>& positive) {
  const auto geometry = checks::check_unpool_relu_deconv2d(grad, switches, weight, input_size, kernel_size, stride,
                                                           padding, dilation, conv_stride, conv_padding,
                                                           conv_dilation, groups, output_size, rule, positive);
  const int64_t conv_in_channels = weight.size(1) * groups;
  at::Tensor output = at::empty({grad.size(0), conv_in_channels, output_size[0], output_size[1]}, grad.options());
  if (output.numel() == 0) {
    return output;
  }
  if (grad.numel() == 0 || weight.numel() == 0) {  // nothing to route, or no tap to route it through
    return output.zero_();
  }
  const at::Tensor grad_nchw = grad.contiguous();
  const at::Tensor switches_nchw = switches.contiguous();
  const checks::Mask mask(positive);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "unpool_relu_deconv2d", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_channel_block(weight.size(1), [&](auto block) {
      constexpr int B = decltype(block)::value;
      const at::Tensor weight_packed = pack_weight(weight, groups, B, c10::CppTypeToScalarType<acc_t>::value);
      rules::dispatch_rule(geometry.rule, mask.present(), [&](auto rule_type) {
        unpool_relu_deconv2d_kernel<decltype(rule_type), B, scalar_t>(
            grad_nchw.const_data_ptr<scalar_t>(), mask.data(), switches_nchw.const_data_ptr<uint8_t>(),
            weight_packed.const_data_ptr<acc_t>(), output.mutable_data_ptr<scalar_t>(), grad.size(0), grad.size(1),
            grad.size(2), grad.size(3), input_size[0], input_size[1], conv_in_channels, output_size[0],
            output_size[1], groups, geometry.pool, geometry.conv);
      });
    });
  });
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(deconvcuda, CPU, m) {
  m.impl("max_pool2d_switches", TORCH_FN(max_pool2d_switches_cpu));
  m.impl("unpool_relu", TORCH_FN(unpool_relu_cpu));
  m.impl("deconv2d", TORCH_FN(deconv2d_cpu));
  m.impl("unpool_relu_deconv2d", TORCH_FN(unpool_relu_deconv2d_cpu));
}

}  // namespace ops
}  // namespace deconvcuda
