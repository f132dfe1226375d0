// Argument checks and output shapes of every op, shared by the CPU and CUDA kernels (host code).
// Each message names the op, the argument and what was expected; deconvcuda/ops.py's fake kernels
// raise the same messages so that torch.compile tracing fails the way eager execution does.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>

#include "common/geometry.h"
#include "common/rules.h"

namespace deconvcuda {
namespace checks {

// Python's name of a dtype ("torch.int64"), so that messages read as the user wrote them.
inline std::string dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(dtype);
  }
}

inline void check_pair(const char* op, const char* name, at::IntArrayRef values) {
  TORCH_CHECK(values.size() == 2, op, ": ", name, " must have 2 elements, got ", values.size());
}

inline void check_positive_pair(const char* op, const char* name, at::IntArrayRef values) {
  check_pair(op, name, values);
  TORCH_CHECK(values[0] > 0 && values[1] > 0, op, ": ", name, " must be positive, got ", values);
}

inline void check_non_negative_pair(const char* op, const char* name, at::IntArrayRef values) {
  check_pair(op, name, values);
  TORCH_CHECK(values[0] >= 0 && values[1] >= 0, op, ": ", name, " must be non-negative, got ", values);
}

inline void check_4d(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D [N, C, H, W], got ", t.dim(), "-D with shape ",
              t.sizes());
}

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": ", name, " must be float32, float64, float16 or bfloat16, got ", dtype_name(dtype));
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const char* other_name,
                             const at::Tensor& other) {
  TORCH_CHECK(t.scalar_type() == other.scalar_type(), op, ": ", name, " must have the dtype of ", other_name,
              " (", dtype_name(other.scalar_type()), "), got ", dtype_name(t.scalar_type()));
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const char* other_name,
                              const at::Tensor& other) {
  TORCH_CHECK(t.device() == other.device(), op, ": ", name, " must be on the device of ", other_name, " (",
              other.device(), "), got ", t.device());
}

inline void check_switches(const char* op, const at::Tensor& switches, const at::Tensor& grad) {
  TORCH_CHECK(switches.scalar_type() == at::kByte, op, ": switches must be uint8, got ", dtype_name(switches.scalar_type()));
  check_same_device(op, "switches", switches, "grad", grad);
  TORCH_CHECK(switches.sizes() == grad.sizes(), op, ": switches must have the shape of grad ", grad.sizes(),
              ", got ", switches.sizes());
}

// rule: one of the names the rule registry gives the kernels (deconvcuda/rules.py).
inline rules::RuleKind check_rule(const char* op, c10::string_view rule) {
  if (rule == "deconvnet") return rules::RuleKind::kDeconvnet;
  if (rule == "guided") return rules::RuleKind::kGuided;
  if (rule == "gradient") return rules::RuleKind::kGradient;
  TORCH_CHECK(false, op, ": rule must be \"deconvnet\", \"guided\" or \"gradient\", got \"", std::string(rule), "\"");
}

// positive: a bool per pooled value, shaped and placed like grad. Checked whenever it is given, also
// under "deconvnet", which does not read it, so that a wrong mask never goes unnoticed.
inline void check_positive(const char* op, const std::optional<at::Tensor>& positive, const at::Tensor& grad) {
  if (!positive.has_value()) return;
  const at::Tensor& mask = *positive;
  TORCH_CHECK(mask.scalar_type() == at::kBool, op,
              ": positive must be bool (whether the pool's forward output was > 0), got ",
              dtype_name(mask.scalar_type()));
  check_same_device(op, "positive", mask, "grad", grad);
  TORCH_CHECK(mask.sizes() == grad.sizes(), op, ": positive must have the shape of grad ", grad.sizes(), ", got ",
              mask.sizes());
}

// The kernels' view of `positive`: NCHW-contiguous, and its data (nullptr where there is none; the
// rules that read it are only dispatched when there is one: rules::dispatch_rule).
struct Mask {
  at::Tensor tensor;
  explicit Mask(const std::optional<at::Tensor>& positive)
      : tensor(positive.has_value() ? positive->contiguous() : at::Tensor()) {}
  bool present() const { return tensor.defined(); }
  const bool* data() const { return tensor.defined() ? tensor.const_data_ptr<bool>() : nullptr; }
};

// Kernel, stride, padding and dilation of a max pool, checked as PyTorch's max_pool2d checks them,
// plus the uint8 limit of the switches.
inline geometry::Pool2d pool_geometry(const char* op, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_positive_pair(op, "kernel_size", kernel_size);
  check_positive_pair(op, "stride", stride);
  check_non_negative_pair(op, "padding", padding);
  check_positive_pair(op, "dilation", dilation);
  // kernel_size[0] <= 256 / kernel_size[1], not the product, which can overflow for huge sizes
  TORCH_CHECK(kernel_size[0] <= geometry::kMaxKernelTaps / kernel_size[1], op,
              ": kernel_size must have at most 256 taps (16x16) so that a uint8 switch can name each, got ",
              kernel_size);
  TORCH_CHECK(padding[0] <= kernel_size[0] / 2 && padding[1] <= kernel_size[1] / 2, op,
              ": padding must be at most half of kernel_size ", kernel_size, ", got ", padding);
  return geometry::Pool2d{kernel_size[0], kernel_size[1], stride[0],  stride[1],
                          padding[0],     padding[1],     dilation[0], dilation[1]};
}

inline geometry::Conv2d conv_geometry(const char* op, const at::Tensor& weight, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef dilation, const char* stride_name,
                                      const char* padding_name, const char* dilation_name) {
  check_positive_pair(op, stride_name, stride);
  check_non_negative_pair(op, padding_name, padding);
  check_positive_pair(op, dilation_name, dilation);
  return geometry::Conv2d{weight.size(2), weight.size(3), stride[0],  stride[1],
                          padding[0],     padding[1],     dilation[0], dilation[1]};
}

// max_pool2d_switches: returns the pool geometry; the output shape follows from pool_output_size.
inline geometry::Pool2d check_max_pool2d_switches(const at::Tensor& input, at::IntArrayRef kernel_size,
                                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                                  at::IntArrayRef dilation, bool ceil_mode) {
  constexpr const char* op = "max_pool2d_switches";
  check_4d(op, "input", input);
  check_floating(op, "input", input);
  const auto pool = pool_geometry(op, kernel_size, stride, padding, dilation);
  const int64_t out_h = geometry::pool_output_size(input.size(2), pool.kernel_h, pool.stride_h, pool.padding_h,
                                                   pool.dilation_h, ceil_mode);
  const int64_t out_w = geometry::pool_output_size(input.size(3), pool.kernel_w, pool.stride_w, pool.padding_w,
                                                   pool.dilation_w, ceil_mode);
  TORCH_CHECK(out_h >= 1 && out_w >= 1, op, ": input of spatial size ", input.sizes().slice(2),
              " is too small for kernel_size ", kernel_size, ", dilation ", dilation, " and padding ", padding,
              " (output would be ", out_h, "x", out_w, ")");
  return pool;
}

// The pooled size must be what the pool input_size gives, with or without ceil_mode (the two
// differ by at most one window; unpooling works for either).
inline void check_input_size_pools_to(const char* op, at::IntArrayRef input_size, const at::Tensor& grad,
                                      const geometry::Pool2d& pool) {
  check_positive_pair(op, "input_size", input_size);
  const int64_t pooled[2] = {grad.size(2), grad.size(3)};
  const int64_t kernel[2] = {pool.kernel_h, pool.kernel_w};
  const int64_t stride[2] = {pool.stride_h, pool.stride_w};
  const int64_t padding[2] = {pool.padding_h, pool.padding_w};
  const int64_t dilation[2] = {pool.dilation_h, pool.dilation_w};
  for (int axis = 0; axis < 2; ++axis) {
    const int64_t floor_size =
        geometry::pool_output_size(input_size[axis], kernel[axis], stride[axis], padding[axis], dilation[axis], false);
    const int64_t ceil_size =
        geometry::pool_output_size(input_size[axis], kernel[axis], stride[axis], padding[axis], dilation[axis], true);
    TORCH_CHECK(pooled[axis] == floor_size || pooled[axis] == ceil_size, op, ": input_size ", input_size,
                " pools to ", floor_size, " (ceil_mode: ", ceil_size, ") along dim ", axis + 2, ", but grad has ",
                pooled[axis]);
  }
}

struct UnpoolCall {
  geometry::Pool2d pool;
  rules::RuleKind rule;
};

inline UnpoolCall check_unpool_relu(const at::Tensor& grad, const at::Tensor& switches, at::IntArrayRef input_size,
                                    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, c10::string_view rule,
                                    const std::optional<at::Tensor>& positive) {
  constexpr const char* op = "unpool_relu";
  check_4d(op, "grad", grad);
  check_floating(op, "grad", grad);
  check_switches(op, switches, grad);
  const auto pool = pool_geometry(op, kernel_size, stride, padding, dilation);
  check_input_size_pools_to(op, input_size, grad, pool);
  const auto kind = check_rule(op, rule);
  check_positive(op, positive, grad);
  return UnpoolCall{pool, kind};
}

// The weight of the forward Conv2d [C_out, C_in / groups, kh, kw] against the deconv's input
// [N, C_out, H, W], and the requested output size against what a transposed conv can produce.
inline geometry::Conv2d check_deconv_weight_and_size(const char* op, const char* input_name, const at::Tensor& input,
                                                     const at::Tensor& weight, int64_t input_h, int64_t input_w,
                                                     at::IntArrayRef stride, at::IntArrayRef padding,
                                                     at::IntArrayRef dilation, int64_t groups,
                                                     at::IntArrayRef output_size, const char* stride_name,
                                                     const char* padding_name, const char* dilation_name) {
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be 4-D [C_out, C_in / groups, kh, kw], got ", weight.dim(),
              "-D with shape ", weight.sizes());
  check_same_dtype(op, "weight", weight, input_name, input);
  check_same_device(op, "weight", weight, input_name, input);
  TORCH_CHECK(groups > 0, op, ": groups must be positive, got ", groups);
  TORCH_CHECK(weight.size(0) % groups == 0, op, ": weight.size(0) (", weight.size(0),
              ") must be divisible by groups (", groups, ")");
  TORCH_CHECK(input.size(1) == weight.size(0), op, ": ", input_name, " must have weight.size(0) = ",
              weight.size(0), " channels (the forward conv's C_out), got ", input.size(1));
  const auto conv = conv_geometry(op, weight, stride, padding, dilation, stride_name, padding_name, dilation_name);
  check_positive_pair(op, "output_size", output_size);
  const int64_t in[2] = {input_h, input_w};
  const int64_t kernel[2] = {conv.kernel_h, conv.kernel_w};
  for (int axis = 0; axis < 2; ++axis) {
    const int64_t smallest = geometry::deconv_min_output_size(in[axis], kernel[axis], stride[axis], padding[axis],
                                                              dilation[axis]);
    TORCH_CHECK(output_size[axis] >= smallest && output_size[axis] <= smallest + stride[axis] - 1 &&
                    output_size[axis] >= 1,
                op, ": output_size ", output_size, " cannot be reached along dim ", axis + 2,
                ": a transposed conv of ", in[axis], " positions gives ", smallest, " to ",
                smallest + stride[axis] - 1);
  }
  return conv;
}

inline geometry::Conv2d check_deconv2d(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                       at::IntArrayRef output_size) {
  constexpr const char* op = "deconv2d";
  check_4d(op, "input", input);
  check_floating(op, "input", input);
  return check_deconv_weight_and_size(op, "input", input, weight, input.size(2), input.size(3), stride, padding,
                                      dilation, groups, output_size, "stride", "padding", "dilation");
}

struct FusedGeometry {
  geometry::Pool2d pool;
  geometry::Conv2d conv;
  rules::RuleKind rule;
};

inline FusedGeometry check_unpool_relu_deconv2d(const at::Tensor& grad, const at::Tensor& switches,
                                                const at::Tensor& weight, at::IntArrayRef input_size,
                                                at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                                at::IntArrayRef padding, at::IntArrayRef dilation,
                                                at::IntArrayRef conv_stride, at::IntArrayRef conv_padding,
                                                at::IntArrayRef conv_dilation, int64_t groups,
                                                at::IntArrayRef output_size, c10::string_view rule,
                                                const std::optional<at::Tensor>& positive) {
  constexpr const char* op = "unpool_relu_deconv2d";
  check_4d(op, "grad", grad);
  check_floating(op, "grad", grad);
  check_switches(op, switches, grad);
  const auto pool = pool_geometry(op, kernel_size, stride, padding, dilation);
  check_input_size_pools_to(op, input_size, grad, pool);
  const auto conv = check_deconv_weight_and_size(op, "grad", grad, weight, input_size[0], input_size[1],
                                                 conv_stride, conv_padding, conv_dilation, groups, output_size,
                                                 "conv_stride", "conv_padding", "conv_dilation");
  const auto kind = check_rule(op, rule);
  check_positive(op, positive, grad);
  return FusedGeometry{pool, conv, kind};
}

// Whether PyTorch lets cuDNN convolutions use TF32, asked as PyTorch's own convolutions ask. Torch
// versions differ: allowTF32CuDNN() (before per-operator precision), allowTF32CuDNN("conv") (the
// first per-operator API) and allowTF32CuDNN(Float32Op::CONV). Where per-operator flags exist, the
// operator-less question raises as soon as a user sets them differently for conv and rnn, so the
// overload is chosen by the member's signature (the three are never overloaded with each other).
template <typename Member>
struct ConvTf32Query;

template <typename Context>
struct ConvTf32Query<bool (Context::*)() const> {
  static bool ask(const Context& context) { return context.allowTF32CuDNN(); }
};

template <typename Context>
struct ConvTf32Query<bool (Context::*)(const std::string&) const> {
  static bool ask(const Context& context) { return context.allowTF32CuDNN("conv"); }
};

template <typename Context, typename Op>
struct ConvTf32Query<bool (Context::*)(std::optional<Op>) const> {
  static bool ask(const Context& context) { return context.allowTF32CuDNN(Op::CONV); }
};

inline bool conv_allows_tf32(const at::Context& context) {
  return ConvTf32Query<decltype(&at::Context::allowTF32CuDNN)>::ask(context);
}

// deconv2d on any device: ATen's transposed convolution (cuDNN / oneDNN, tensor cores where
// PyTorch would use them), asked for a deterministic algorithm so results repeat bit for bit.
inline at::Tensor deconv2d_aten(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                at::IntArrayRef output_size) {
  const int64_t output_padding[2] = {
      output_size[0] - geometry::deconv_min_output_size(input.size(2), weight.size(2), stride[0], padding[0], dilation[0]),
      output_size[1] - geometry::deconv_min_output_size(input.size(3), weight.size(3), stride[1], padding[1], dilation[1])};
  auto& context = at::globalContext();
  return at::_convolution(input, weight, /*bias=*/std::nullopt, stride, padding, dilation, /*transposed=*/true,
                          output_padding, groups, /*benchmark=*/false, /*deterministic=*/true,
                          context.userEnabledCuDNN(), conv_allows_tf32(context));
}

// deconv2d on every device: the checks, then ATen's transposed convolution (oneDNN on the CPU, cuDNN
// on CUDA), which already is the gradient of the forward conv. The output follows the input's memory
// format, as ATen's convolutions do (channels-last runs two to four times faster on the CPU).
inline at::Tensor deconv2d(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                           at::IntArrayRef output_size) {
  check_deconv2d(input, weight, stride, padding, dilation, groups, output_size);
  if (input.numel() == 0 || weight.numel() == 0) {
    // No sample, or a sum over no channel or no tap: zeros (ATen's convolutions reject some of
    // these shapes).
    return at::zeros({input.size(0), weight.size(1) * groups, output_size[0], output_size[1]},
                     input.options().memory_format(input.suggest_memory_format()));
  }
  const auto format = input.suggest_memory_format();
  return deconv2d_aten(input.contiguous(format), weight.contiguous(), stride, padding, dilation, groups, output_size)
      .contiguous(format);
}

}  // namespace checks
}  // namespace deconvcuda
