// The CUDA kernels' per-thread work (csrc/cuda/elements.cuh), run on the CPU.
//
// Each op below checks its arguments and prepares its inputs as its twin in
// csrc/cuda/deconv_kernels.cu does, then, where the .cu file launches a grid-stride loop over work
// items, runs the same element function once per work item on the host. So on a machine without a
// GPU the tests can compare the CUDA kernels' exact arithmetic with the reference: every index, the
// summation order, the accumulation type and the rounding are the ones the GPU runs. What this
// cannot show is anything about the launch itself (grid sizes, streams, memory spaces).
//
// Built on demand by tests/test_cuda_emulation.py with torch.utils.cpp_extension.load; registers
// the library `deconvcuda_cuda_emulation` with the schemas of csrc/ops.cpp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

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

std::tuple<at::Tensor, at::Tensor> max_pool2d_switches(const at::Tensor& input, at::IntArrayRef kernel_size,
                                                       at::IntArrayRef stride, at::IntArrayRef padding,
                                                       at::IntArrayRef dilation, bool ceil_mode) {
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "max_pool2d_switches", [&] {
    const scalar_t* in = input_nchw.const_data_ptr<scalar_t>();
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    uint8_t* sw = switches.mutable_data_ptr<uint8_t>();
    for_each_work_item(output.numel(), [&](int64_t index) {
      cuda_elements::max_pool2d_switches_element(index, in, out, sw, height, width, pooled_h, pooled_w, pool);
    });
  });
  return {output, switches};
}

// An H100's resident threads (132 multiprocessors x 2048): what deconv_kernels.cu's
// resident_threads() returns there, so that the emulation picks the channels per thread it would.
constexpr int64_t kEmulatedResidentThreads = 132 * 2048;

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

// unpool_relu_deconv2d with the launch choices of the .cu file (channels per thread for an H100,
// 32-bit indices where they fit), or with `channels_per_thread` (8, 4 or 1; 0: the .cu file's
// choice) and 64-bit indices where `index64`, for the tests to compare every variant.
at::Tensor unpool_relu_deconv2d_variant(const at::Tensor& grad, const at::Tensor& switches, const at::Tensor& weight,
                                        at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                        at::IntArrayRef conv_stride, at::IntArrayRef conv_padding,
                                        at::IntArrayRef conv_dilation, int64_t groups, at::IntArrayRef output_size,
                                        c10::string_view rule, const std::optional<at::Tensor>& positive,
                                        int64_t channels_per_thread, bool index64) {
  const auto fused = checks::check_unpool_relu_deconv2d(grad, switches, weight, input_size, kernel_size, stride,
                                                        padding, dilation, conv_stride, conv_padding, conv_dilation,
                                                        groups, output_size, rule, positive);
  const int64_t batch = grad.size(0), in_channels = weight.size(1) * groups;
  const bool small =
      !index64 && cuda_elements::fits_int32(
                      {grad.numel(), weight.numel(), batch * in_channels * output_size[0] * output_size[1]});
  if (channels_per_thread == 0) {
    channels_per_thread = small ? cuda_elements::choose_channels_per_thread(batch, groups, weight.size(1),
                                                                            output_size[0], output_size[1],
                                                                            kEmulatedResidentThreads)
                                : 1;
  }
  TORCH_CHECK(channels_per_thread == 1 || channels_per_thread == 4 || channels_per_thread == 8,
              "unpool_relu_deconv2d_variant: channels_per_thread must be 0, 1, 4 or 8, got ", channels_per_thread);
  const auto shape = cuda_elements::FusedShape::of(weight.size(0), weight.size(1), groups, grad.size(2),
                                                   grad.size(3), input_size[0], input_size[1], output_size[0],
                                                   output_size[1], channels_per_thread);
  at::Tensor output = at::empty({batch, in_channels, output_size[0], output_size[1]}, grad.options());
  if (output.numel() == 0) return output;
  if (grad.numel() == 0 || weight.numel() == 0) return output.zero_();
  const at::Tensor grad_nchw = grad.contiguous();
  const at::Tensor switches_nchw = switches.contiguous();
  const at::Tensor weight_oihw = weight.contiguous();
  const checks::Mask mask(positive);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "unpool_relu_deconv2d", [&] {
    const scalar_t* g = grad_nchw.const_data_ptr<scalar_t>();
    const uint8_t* sw = switches_nchw.const_data_ptr<uint8_t>();
    const scalar_t* w = weight_oihw.const_data_ptr<scalar_t>();
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    rules::dispatch_rule(fused.rule, mask.present(), [&](auto rule_type) {
      using Rule = decltype(rule_type);
      cuda_elements::with_channels_per_thread(channels_per_thread, [&](auto channels) {
        constexpr int kChannels = decltype(channels)::value;
        for_each_work_item(shape.work_items(batch), [&](int64_t index) {
          if (small) {
            cuda_elements::unpool_relu_deconv2d_element<Rule, kChannels, int32_t>(index, g, mask.data(), sw, w, out,
                                                                                  shape, fused.pool, fused.conv);
          } else {
            cuda_elements::unpool_relu_deconv2d_element<Rule, kChannels, int64_t>(index, g, mask.data(), sw, w, out,
                                                                                  shape, fused.pool, fused.conv);
          }
        });
      });
    });
  });
  return output;
}

at::Tensor unpool_relu_deconv2d(const at::Tensor& grad, const at::Tensor& switches, const at::Tensor& weight,
                                at::IntArrayRef input_size, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, at::IntArrayRef conv_stride,
                                at::IntArrayRef conv_padding, at::IntArrayRef conv_dilation, int64_t groups,
                                at::IntArrayRef output_size, c10::string_view rule,
                                const std::optional<at::Tensor>& positive) {
  return unpool_relu_deconv2d_variant(grad, switches, weight, input_size, kernel_size, stride, padding, dilation,
                                      conv_stride, conv_padding, conv_dilation, groups, output_size, rule, positive,
                                      /*channels_per_thread=*/0, /*index64=*/false);
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
  m.def("unpool_relu_indexed(Tensor grad, Tensor switches, int[2] input_size, int[2] kernel_size, int[2] stride, "
        "int[2] padding, int[2] dilation, str rule, Tensor? positive, bool index64) -> Tensor",
        TORCH_FN(unpool_relu_indexed));
  m.def("unpool_relu_deconv2d_variant(Tensor grad, Tensor switches, Tensor weight, int[2] input_size, "
        "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, int[2] conv_stride, "
        "int[2] conv_padding, int[2] conv_dilation, int groups, int[2] output_size, str rule, Tensor? positive, "
        "int channels_per_thread, bool index64) -> Tensor",
        TORCH_FN(unpool_relu_deconv2d_variant));
}
