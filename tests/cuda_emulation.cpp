// The CUDA kernels' per-thread work (csrc/cuda/elements.cuh), run on the CPU.
//
// Each op below checks its arguments and prepares its inputs as its twin in
// csrc/cuda/deconv_kernels.cu does, then, where the .cu file launches a grid-stride loop over work
// items, runs the same element function once per work item on the host (where it launches the
// fused op's staged kernel: that kernel's blocks one by one, shared-memory staging included, with
// the same helpers). So on a machine without a GPU the tests can compare the CUDA kernels' exact
// arithmetic with the reference: every index, the summation order, the accumulation type and the
// rounding are the ones the GPU runs. What this cannot show is anything about the launch itself
// (grid sizes, streams, memory spaces, barriers).
//
// Built on demand by tests/test_cuda_emulation.py with torch.utils.cpp_extension.load; registers
// the library `deconvcuda_cuda_emulation` with the schemas of csrc/ops.cpp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/geometry.h"
#include "common/rules.h"
#include "cuda/elements.cuh"

namespace {

using namespace deconvcuda;

// The host's stand-in for a kernel launch: every work item once, in any order (each writes only
// its own outputs, as on the GPU).
template <typename F>
void for_each_work_item(int64_t total, F&& element) {
  at::parallel_for(0, total, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) element(index);
  });
}

// max_pool2d_switches with the index type the .cu file picks (cuda_elements::fits_int32), or 64-bit
// indices where `index64` (so the tests can compare the two paths).
std::tuple<at::Tensor, at::Tensor> max_pool2d_switches_indexed(const at::Tensor& input, at::IntArrayRef kernel_size,
                                                               at::IntArrayRef stride, at::IntArrayRef padding,
                                                               at::IntArrayRef dilation, bool ceil_mode, bool index64) {
  const auto pool = checks::check_max_pool2d_switches(input, kernel_size, stride, padding, dilation, ceil_mode);
  const int64_t height = input.size(2), width = input.size(3);
  const int64_t pooled_h =
      geometry::pool_output_size(height, pool.kernel_h, pool.stride_h, pool.padding_h, pool.dilation_h, ceil_mode);
  const int64_t pooled_w =
      geometry::pool_output_size(width, pool.kernel_w, pool.stride_w, pool.padding_w, pool.dilation_w, ceil_mode);
  at::Tensor output = at::empty({input.size(0), input.size(1), pooled_h, pooled_w}, input.options());
  at::Tensor switches = at::empty(output.sizes(), input.options().dtype(at::kByte));
  if (output.numel() == 0) return {output, switches};
  const at::Tensor input_nchw = input.contiguous();
  const bool small = !index64 && cuda_elements::fits_int32({input.numel(), output.numel()});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "max_pool2d_switches", [&] {
    const scalar_t* in = input_nchw.const_data_ptr<scalar_t>();
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    uint8_t* sw = switches.mutable_data_ptr<uint8_t>();
    for_each_work_item(output.numel(), [&](int64_t index) {
      if (small) {
        cuda_elements::max_pool2d_switches_element<int32_t>(index, in, out, sw, height, width, pooled_h, pooled_w,
                                                            pool);
      } else {
        cuda_elements::max_pool2d_switches_element<int64_t>(index, in, out, sw, height, width, pooled_h, pooled_w,
                                                            pool);
      }
    });
  });
  return {output, switches};
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_switches(const at::Tensor& input, at::IntArrayRef kernel_size,
                                                       at::IntArrayRef stride, at::IntArrayRef padding,
                                                       at::IntArrayRef dilation, bool ceil_mode) {
  return max_pool2d_switches_indexed(input, kernel_size, stride, padding, dilation, ceil_mode, /*index64=*/false);
}

// What deconv_kernels.cu's occupancy query returns on an H100 for the staged kernels (132
// multiprocessors, 3 blocks of 256 threads each: ptxas gives them 55 to 99 registers a thread in
// float32), so that the emulation picks the channels per thread the GPU would for most shapes.
int64_t emulated_resident_threads(int64_t /*channels*/, int64_t /*shared_bytes*/) { return 132 * 3 * 256; }

// unpool_relu with the index type the .cu file picks (cuda_elements::fits_int32), or 64-bit
// indices where `index64` (so the tests can compare the two paths).
at::Tensor unpool_relu_indexed(const at::Tensor& grad, const at::Tensor& switches, at::IntArrayRef input_size,
                               at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, c10::string_view rule,
                               const std::optional<at::Tensor>& positive, bool index64) {
  const auto call =
      checks::check_unpool_relu(grad, switches, input_size, kernel_size, stride, padding, dilation, rule, positive);
  const int64_t height = input_size[0], width = input_size[1];
  at::Tensor output = at::empty({grad.size(0), grad.size(1), height, width}, grad.options());
  if (output.numel() == 0) return output;
  if (grad.numel() == 0) return output.zero_();
  const at::Tensor grad_nchw = grad.contiguous();
  const at::Tensor switches_nchw = switches.contiguous();
  const checks::Mask mask(positive);
  const bool small = !index64 && cuda_elements::fits_int32({grad.numel(), output.numel()});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "unpool_relu", [&] {
    const scalar_t* g = grad_nchw.const_data_ptr<scalar_t>();
    const uint8_t* sw = switches_nchw.const_data_ptr<uint8_t>();
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    rules::dispatch_rule(call.rule, mask.present(), [&](auto rule_type) {
      using Rule = decltype(rule_type);
      for_each_work_item(output.numel(), [&](int64_t index) {
        if (small) {
          cuda_elements::unpool_relu_element<Rule, int32_t>(index, g, mask.data(), sw, out, height, width,
                                                            grad.size(2), grad.size(3), call.pool);
        } else {
          cuda_elements::unpool_relu_element<Rule, int64_t>(index, g, mask.data(), sw, out, height, width,
                                                            grad.size(2), grad.size(3), call.pool);
        }
      });
    });
  });
  return output;
}

at::Tensor unpool_relu(const at::Tensor& grad, const at::Tensor& switches, at::IntArrayRef input_size,
                       at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, c10::string_view rule, const std::optional<at::Tensor>& positive) {
  return unpool_relu_indexed(grad, switches, input_size, kernel_size, stride, padding, dilation, rule, positive,
                             /*index64=*/false);
}

// The route pass of deconv_kernels.cu (route_kernel) on the host: one Routed entry per pooled value.
template <typename Rule, typename index_t, typename scalar_t>
std::vector<cuda_elements::Routed<at::opmath_type<scalar_t>, index_t>> route_on_host(
    const at::Tensor& grad, const bool* positive, const at::Tensor& switches, int64_t height, int64_t width,
    const geometry::Pool2d& pool, const geometry::Conv2d& conv) {
  std::vector<cuda_elements::Routed<at::opmath_type<scalar_t>, index_t>> routed(grad.numel());
  const bool overlapping = geometry::windows_overlap(pool.kernel_h, pool.stride_h, pool.dilation_h) ||
                           geometry::windows_overlap(pool.kernel_w, pool.stride_w, pool.dilation_w);
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  const uint8_t* sw = switches.const_data_ptr<uint8_t>();
  for_each_work_item(grad.numel(), [&](int64_t index) {
    cuda_elements::route_element<Rule, index_t>(index, g, positive, sw, routed.data(), height, width, grad.size(2),
                                                grad.size(3), pool, conv, overlapping);
  });
  return routed;
}

// The staged kernel of deconv_kernels.cu (unpool_relu_deconv2d_staged_kernel) on the host: block
// (slice, row of items) by block, each chunk of output channels staged with stage_filter_tap into a
// buffer of the kernel's shared-memory layout, then every active thread's item accumulated from it,
// then stored; the same helpers, in the same order, as the kernel. The buffer is NaN wherever the
// staging does not write and sits between NaN guard regions as large as itself, so a read of a tap
// the kernel would not have staged, or one past the staged slice, shows as NaN in the output.
template <int kChannels, typename scalar_t>
void staged_kernel_on_host(int64_t batch, const cuda_elements::Routed<at::opmath_type<scalar_t>, int32_t>* routed,
                           const scalar_t* weight, scalar_t* output, const cuda_elements::FusedShape& shape,
                           const geometry::Pool2d& pool, const geometry::Conv2d& conv,
                           int64_t out_channels_per_chunk) {
  using index_t = int32_t;
  using acc_t = at::opmath_type<scalar_t>;
  struct Sums {
    acc_t value[kChannels];
  };
  constexpr int64_t kThreads = cuda_elements::kThreadsPerBlock;
  const int64_t items = batch * shape.out_h * shape.out_w;
  const int64_t item_blocks = geometry::ceil_div(items, kThreads);
  const int64_t slices = shape.groups * shape.channel_tiles;
  const index_t in_per_group = static_cast<index_t>(shape.in_channels_per_group);
  const index_t taps_per_filter = static_cast<index_t>(conv.kernel_h * conv.kernel_w);
  // the launch's shared memory, in elements
  const int64_t staged_size =
      cuda_elements::staged_bytes(out_channels_per_chunk, kChannels, taps_per_filter, sizeof(scalar_t)) /
      static_cast<int64_t>(sizeof(scalar_t));
  // One block per (slice, row of items): blockIdx.x = slice, blockIdx.y = row.
  at::parallel_for(0, slices * item_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> buffer(3 * staged_size);
    scalar_t* staged = buffer.data() + staged_size;
    std::vector<cuda_elements::FusedWorkItem<index_t>> thread_items(kThreads);
    std::vector<Sums> sums(kThreads);
    for (int64_t block_id = begin; block_id < end; ++block_id) {
      const auto slice =
          cuda_elements::staged_slice<kChannels, index_t>(static_cast<index_t>(block_id % slices), shape);
      const int64_t block = block_id / slices;
      for (int64_t thread = 0; thread < kThreads; ++thread) {
        const int64_t item_index = block * kThreads + thread;
        if (item_index < items) {
          thread_items[thread] = cuda_elements::staged_work_item<kChannels, index_t>(
              slice, static_cast<index_t>(item_index), shape, pool, conv);
        }
        for (int t = 0; t < kChannels; ++t) sums[thread].value[t] = acc_t(0);
      }
      for (index_t co_begin = slice.first_out_channel; co_begin < slice.end_out_channel;) {
        const index_t co_end =
            cuda_elements::staged_chunk_end(slice, co_begin, static_cast<index_t>(out_channels_per_chunk));
        std::fill(buffer.begin(), buffer.end(), std::numeric_limits<scalar_t>::quiet_NaN());
        const index_t count = cuda_elements::staged_taps<kChannels>(co_end - co_begin, taps_per_filter);
        for (index_t i = 0; i < count; ++i) {
          cuda_elements::stage_filter_tap<kChannels>(i, staged, weight, co_begin, slice.first_channel, slice.channels,
                                                     in_per_group, taps_per_filter);
        }
        const auto filters = cuda_elements::staged_filter_slice<kChannels, index_t, scalar_t>(staged, co_begin,
                                                                                             taps_per_filter);
        for (int64_t thread = 0; thread < kThreads && block * kThreads + thread < items; ++thread) {
          cuda_elements::accumulate_fused<kChannels, index_t, scalar_t>(thread_items[thread], co_begin, co_end, routed,
                                                                        filters, shape, conv, sums[thread].value);
        }
        co_begin = co_end;
      }
      for (int64_t thread = 0; thread < kThreads && block * kThreads + thread < items; ++thread) {
        cuda_elements::store_fused<kChannels, index_t, scalar_t>(thread_items[thread], sums[thread].value, output,
                                                                 shape);
      }
    }
  });
}

// unpool_relu_deconv2d as the .cu file launches it (cuda_elements::choose_fused_launch with an H100's
// occupancy, emulated_resident_threads), or a variant, for the tests to compare them all:
//   channels_per_thread  0: the launch's choice; 32, 16, 4 or 1: that many (and the staging budget's
//                        chunk for it, or the global-memory kernel where none fits)
//   index64              64-bit indices and origins (the global-memory kernel only, as on the GPU)
//   out_channels_per_chunk  0: as above; -1: the global-memory kernel (one channel a thread); k > 0:
//                        the staged kernel with chunks of k output channels
at::Tensor unpool_relu_deconv2d_variant(const at::Tensor& grad, const at::Tensor& switches, const at::Tensor& weight,
                                        at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                        at::IntArrayRef conv_stride, at::IntArrayRef conv_padding,
                                        at::IntArrayRef conv_dilation, int64_t groups, at::IntArrayRef output_size,
                                        c10::string_view rule, const std::optional<at::Tensor>& positive,
                                        int64_t channels_per_thread, bool index64, int64_t out_channels_per_chunk) {
  const auto fused = checks::check_unpool_relu_deconv2d(grad, switches, weight, input_size, kernel_size, stride,
                                                        padding, dilation, conv_stride, conv_padding, conv_dilation,
                                                        groups, output_size, rule, positive);
  TORCH_CHECK(channels_per_thread == 0 || channels_per_thread == 1 || channels_per_thread == 4 ||
                  channels_per_thread == 16 || channels_per_thread == 32,
              "unpool_relu_deconv2d_variant: channels_per_thread must be 0, 1, 4, 16 or 32, got ",
              channels_per_thread);
  TORCH_CHECK(out_channels_per_chunk >= -1,
              "unpool_relu_deconv2d_variant: out_channels_per_chunk must be -1, 0 or positive, got ",
              out_channels_per_chunk);
  const int64_t batch = grad.size(0), in_channels = weight.size(1) * groups;
  const int64_t taps_per_filter = weight.size(2) * weight.size(3);
  const int64_t output_numel = batch * in_channels * output_size[0] * output_size[1];
  const bool index32 = !index64 && cuda_elements::fused_fits_int32(grad.numel(), weight.numel(), output_numel,
                                                                   input_size[0], input_size[1], fused.conv);
  cuda_elements::FusedLaunch plan = cuda_elements::choose_fused_launch(
      batch, groups, weight.size(1), weight.size(0), taps_per_filter, weight.element_size(), output_size[0],
      output_size[1], index32, emulated_resident_threads);
  if (channels_per_thread != 0) {
    plan.channels_per_thread = channels_per_thread;
    plan.out_channels_per_chunk =
        index32 ? cuda_elements::staged_out_channels_per_chunk(weight.size(0) / groups, channels_per_thread,
                                                               taps_per_filter, weight.element_size())
                : 0;
  }
  if (out_channels_per_chunk != 0) plan.out_channels_per_chunk = std::max<int64_t>(out_channels_per_chunk, 0);
  TORCH_CHECK(index32 || plan.out_channels_per_chunk == 0,
              "unpool_relu_deconv2d_variant: the staged kernel has 32-bit indices only (index64=True needs "
              "out_channels_per_chunk=-1 or 0)");
  if (plan.out_channels_per_chunk == 0) plan.channels_per_thread = 1;  // the global-memory kernel's
  const auto shape = cuda_elements::FusedShape::of(weight.size(0), weight.size(1), groups, grad.size(2),
                                                   grad.size(3), input_size[0], input_size[1], output_size[0],
                                                   output_size[1], plan.channels_per_thread);
  at::Tensor output = at::empty({batch, in_channels, output_size[0], output_size[1]}, grad.options());
  if (output.numel() == 0) return output;
  if (grad.numel() == 0 || weight.numel() == 0) return output.zero_();
  const at::Tensor grad_nchw = grad.contiguous();
  const at::Tensor switches_nchw = switches.contiguous();
  const at::Tensor weight_oihw = weight.contiguous();
  const checks::Mask mask(positive);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "unpool_relu_deconv2d", [&] {
    const scalar_t* w = weight_oihw.const_data_ptr<scalar_t>();
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    const auto run = [&](auto index_type) {
      using index_t = decltype(index_type);
      std::vector<cuda_elements::Routed<at::opmath_type<scalar_t>, index_t>> routed;
      rules::dispatch_rule(fused.rule, mask.present(), [&](auto rule_type) {
        routed = route_on_host<decltype(rule_type), index_t, scalar_t>(grad_nchw, mask.data(), switches_nchw,
                                                                        input_size[0], input_size[1], fused.pool,
                                                                        fused.conv);
      });
      if (plan.out_channels_per_chunk == 0) {
        for_each_work_item(shape.work_items(batch), [&](int64_t index) {
          cuda_elements::unpool_relu_deconv2d_element<index_t, scalar_t>(index, routed.data(), w, out, shape,
                                                                         fused.pool, fused.conv);
        });
        return;
      }
      if constexpr (std::is_same<index_t, int32_t>::value) {
        cuda_elements::with_channels_per_thread(plan.channels_per_thread, [&](auto channels) {
          staged_kernel_on_host<decltype(channels)::value, scalar_t>(batch, routed.data(), w, out, shape, fused.pool,
                                                                     fused.conv, plan.out_channels_per_chunk);
        });
      }
    };
    if (index32) {
      run(int32_t{});
    } else {
      run(int64_t{});
    }
  });
  return output;
}

// The launch the .cu file picks (choose_fused_launch, for an H100), as [channels_per_thread,
// out_channels_per_chunk]: the tests check which kernel a shape gets.
std::vector<int64_t> fused_launch(int64_t batch, int64_t groups, int64_t in_channels_per_group, int64_t out_channels,
                                  int64_t taps_per_filter, int64_t element_size, int64_t out_h, int64_t out_w,
                                  bool index32) {
  const auto plan = cuda_elements::choose_fused_launch(batch, groups, in_channels_per_group, out_channels,
                                                       taps_per_filter, element_size, out_h, out_w, index32,
                                                       emulated_resident_threads);
  return {plan.channels_per_thread, plan.out_channels_per_chunk};
}

// Whether a fused call runs with 32-bit indices (cuda_elements::fused_fits_int32).
bool fused_index32(int64_t grad_numel, int64_t weight_numel, int64_t output_numel, int64_t height, int64_t width,
                   at::IntArrayRef conv_kernel, at::IntArrayRef conv_stride, at::IntArrayRef conv_padding,
                   at::IntArrayRef conv_dilation) {
  const geometry::Conv2d conv{conv_kernel[0], conv_kernel[1], conv_stride[0],   conv_stride[1],
                              conv_padding[0], conv_padding[1], conv_dilation[0], conv_dilation[1]};
  return cuda_elements::fused_fits_int32(grad_numel, weight_numel, output_numel, height, width, conv);
}

at::Tensor unpool_relu_deconv2d(const at::Tensor& grad, const at::Tensor& switches, const at::Tensor& weight,
                                at::IntArrayRef input_size, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, at::IntArrayRef conv_stride,
                                at::IntArrayRef conv_padding, at::IntArrayRef conv_dilation, int64_t groups,
                                at::IntArrayRef output_size, c10::string_view rule,
                                const std::optional<at::Tensor>& positive) {
  return unpool_relu_deconv2d_variant(grad, switches, weight, input_size, kernel_size, stride, padding, dilation,
                                      conv_stride, conv_padding, conv_dilation, groups, output_size, rule, positive,
                                      /*channels_per_thread=*/0, /*index64=*/false, /*out_channels_per_chunk=*/0);
}

}  // namespace

// deconv2d has no element of its own on CUDA (it is cuDNN's transposed convolution), so it is not
// emulated here.
TORCH_LIBRARY(deconvcuda_cuda_emulation, m) {
  m.def("max_pool2d_switches(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, "
        "int[2] dilation, bool ceil_mode) -> (Tensor, Tensor)",
        TORCH_FN(max_pool2d_switches));
  m.def("unpool_relu(Tensor grad, Tensor switches, int[2] input_size, int[2] kernel_size, int[2] stride, "
        "int[2] padding, int[2] dilation, str rule=\"deconvnet\", Tensor? positive=None) -> Tensor",
        TORCH_FN(unpool_relu));
  m.def("unpool_relu_deconv2d(Tensor grad, Tensor switches, Tensor weight, int[2] input_size, "
        "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, int[2] conv_stride, "
        "int[2] conv_padding, int[2] conv_dilation, int groups, int[2] output_size, "
        "str rule=\"deconvnet\", Tensor? positive=None) -> Tensor",
        TORCH_FN(unpool_relu_deconv2d));
  // The launch variants the .cu file can pick, for the tests to compare.
  m.def("max_pool2d_switches_indexed(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, "
        "int[2] dilation, bool ceil_mode, bool index64) -> (Tensor, Tensor)",
        TORCH_FN(max_pool2d_switches_indexed));
  m.def("unpool_relu_indexed(Tensor grad, Tensor switches, int[2] input_size, int[2] kernel_size, int[2] stride, "
        "int[2] padding, int[2] dilation, str rule, Tensor? positive, bool index64) -> Tensor",
        TORCH_FN(unpool_relu_indexed));
  m.def("unpool_relu_deconv2d_variant(Tensor grad, Tensor switches, Tensor weight, int[2] input_size, "
        "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, int[2] conv_stride, "
        "int[2] conv_padding, int[2] conv_dilation, int groups, int[2] output_size, str rule, Tensor? positive, "
        "int channels_per_thread, bool index64, int out_channels_per_chunk) -> Tensor",
        TORCH_FN(unpool_relu_deconv2d_variant));
  m.def("fused_launch(int batch, int groups, int in_channels_per_group, int out_channels, int taps_per_filter, "
        "int element_size, int out_h, int out_w, bool index32) -> int[]",
        TORCH_FN(fused_launch));
  m.def("fused_index32(int grad_numel, int weight_numel, int output_numel, int height, int width, "
        "int[2] conv_kernel, int[2] conv_stride, int[2] conv_padding, int[2] conv_dilation) -> bool",
        TORCH_FN(fused_index32));
}
