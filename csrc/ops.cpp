// Every deconvcuda operator schema, declared once. The kernels live in cpu/ and cuda/, each file
// ending in its TORCH_LIBRARY_IMPL block; the fake (meta) kernels are in deconvcuda/ops.py.
//
// Size arguments are always explicit pairs here: the Python wrappers in deconvcuda/ops.py turn an
// int into a pair, stride=None into the kernel size and output_size=None into the smallest size.
#include <Python.h>
#include <torch/library.h>

// `import deconvcuda._C` loads this library, which registers the operators below. The module itself
// is empty: everything is reached through torch.ops.deconvcuda.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(deconvcuda, m) {
  // Max pooling that also returns, per output, the window-local index ky * kernel_w + kx of the
  // maximum as uint8 (the "switches"). First maximum in row-major window order; NaN is a maximum.
  m.def(
      "max_pool2d_switches(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] dilation, bool ceil_mode) -> (Tensor, Tensor)");
  // relu(sum of every pooled value routed back to its window's switch); input_size is the pool's input.
  // rule: the reverse of the ReLU before the pool (csrc/common/rules.h): "deconvnet" as above,
  // "guided" and "gradient" drop the values where `positive` (bool, shaped like grad: whether the
  // pool's forward output was > 0) is false, and "gradient" skips the relu.
  m.def(
      "unpool_relu(Tensor grad, Tensor switches, int[2] input_size, int[2] kernel_size, int[2] stride, "
      "int[2] padding, int[2] dilation, str rule=\"deconvnet\", Tensor? positive=None) -> Tensor");
  // The transposed convolution with the forward Conv2d's weight [C_out, C_in/groups, kh, kw]: the
  // input-gradient of conv2d, of spatial size output_size.
  m.def(
      "deconv2d(Tensor input, Tensor weight, int[2] stride, int[2] padding, int[2] dilation, int groups, "
      "int[2] output_size) -> Tensor");
  // deconv2d(unpool_relu(grad, switches, ...), weight, ...) in one pass that never writes the
  // unpooled map: the reverse of conv -> relu -> maxpool, under unpool_relu's rule and positive.
  m.def(
      "unpool_relu_deconv2d(Tensor grad, Tensor switches, Tensor weight, int[2] input_size, "
      "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, int[2] conv_stride, "
      "int[2] conv_padding, int[2] conv_dilation, int groups, int[2] output_size, "
      "str rule=\"deconvnet\", Tensor? positive=None) -> Tensor");
}
