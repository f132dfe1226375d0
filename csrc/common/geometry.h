// Index math shared by the CPU and CUDA kernels, written once.
//
// One spatial axis at a time: a pooling (or convolution) window w covers input positions
// w * stride - padding + tap * dilation for tap in [0, kernel). Every function here is a pure
// function of integers so that both compilers inline it.
//
// The index type: every function computes in int64_t unless it is called as f<int32_t>(...), which
// the CUDA kernels do where every tensor of a launch has fewer than 2^31 elements (the GPU divides
// 32-bit integers several times faster than 64-bit ones, which it does in a software routine). The
// arguments are not deduced (NonDeduced), so a call without a template argument converts them to
// int64_t exactly as a plain int64_t function would: the CPU kernels call them so.
#pragma once

#include <cstdint>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DECONV_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DECONV_HOST_DEVICE inline
#endif

namespace deconvcuda {
namespace geometry {

// Switches are uint8 window-local indices, so a window holds at most 256 taps (16x16).
constexpr int64_t kMaxKernelTaps = 256;
// A switch value that points at no tap: never written by max_pool2d_switches, ignored everywhere.
constexpr int64_t kNoTap = -1;

template <typename T>
struct Identity {
  using type = T;
};
// A parameter of this type takes part in no template argument deduction.
template <typename T>
using NonDeduced = typename Identity<T>::type;

// Division rounding toward minus infinity, for possibly negative numerators and positive divisors.
template <typename index_t = int64_t>
DECONV_HOST_DEVICE index_t floor_div(NonDeduced<index_t> a, NonDeduced<index_t> b) {
  const index_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

template <typename index_t = int64_t>
DECONV_HOST_DEVICE index_t ceil_div(NonDeduced<index_t> a, NonDeduced<index_t> b) {
  return -floor_div<index_t>(-a, b);
}

// Output length of max_pool2d along one axis, exactly as PyTorch's pooling_output_shape: with
// ceil_mode the last window must still start inside the input or its left padding.
DECONV_HOST_DEVICE int64_t pool_output_size(int64_t input, int64_t kernel, int64_t stride,
                                            int64_t padding, int64_t dilation, bool ceil_mode) {
  const int64_t span = input + 2 * padding - dilation * (kernel - 1) - 1 + (ceil_mode ? stride - 1 : 0);
  int64_t out = floor_div(span, stride) + 1;
  if (ceil_mode && (out - 1) * stride >= input + padding) {
    --out;
  }
  return out;
}

// Output length of conv2d along one axis (the forward convolution that deconv2d reverses).
DECONV_HOST_DEVICE int64_t conv_output_size(int64_t input, int64_t kernel, int64_t stride,
                                            int64_t padding, int64_t dilation) {
  return floor_div(input + 2 * padding - dilation * (kernel - 1) - 1, stride) + 1;
}

// The smallest input length whose convolution has `output` positions: the default output length of
// the transposed convolution. Every length in [smallest, smallest + stride - 1] convolves to
// `output` as well; output_size picks one of them.
DECONV_HOST_DEVICE int64_t deconv_min_output_size(int64_t output, int64_t kernel, int64_t stride,
                                                  int64_t padding, int64_t dilation) {
  return (output - 1) * stride - 2 * padding + dilation * (kernel - 1) + 1;
}

// Whether neighbouring windows can share an input position (AlexNet's 3x3 stride 2 pools do).
DECONV_HOST_DEVICE bool windows_overlap(int64_t kernel, int64_t stride, int64_t dilation) {
  return dilation * (kernel - 1) + 1 > stride;
}

// The first and last window (inclusive, clipped to [0, windows)) whose span
// [w * stride - padding, w * stride - padding + dilation * (kernel - 1)] contains `position`.
// first > last when there is none. A window in that range contains the position only where
// tap_of() says so (dilation can skip it).
template <typename index_t>
struct WindowRangeOf {
  index_t first;
  index_t last;
};
using WindowRange = WindowRangeOf<int64_t>;

template <typename index_t = int64_t>
DECONV_HOST_DEVICE WindowRangeOf<index_t> windows_spanning(NonDeduced<index_t> position, NonDeduced<index_t> windows,
                                                           NonDeduced<index_t> kernel, NonDeduced<index_t> stride,
                                                           NonDeduced<index_t> padding, NonDeduced<index_t> dilation) {
  index_t first = ceil_div<index_t>(position + padding - dilation * (kernel - 1), stride);
  index_t last = floor_div<index_t>(position + padding, stride);
  if (first < 0) first = 0;
  if (last > windows - 1) last = windows - 1;
  return WindowRangeOf<index_t>{first, last};
}

// The windows whose span reaches some position in [first, last]: from the first window spanning
// `first` to the last window spanning `last` (clipped to [0, windows)).
template <typename index_t = int64_t>
DECONV_HOST_DEVICE WindowRangeOf<index_t> windows_spanning_range(NonDeduced<index_t> first, NonDeduced<index_t> last,
                                                                 NonDeduced<index_t> windows, NonDeduced<index_t> kernel,
                                                                 NonDeduced<index_t> stride, NonDeduced<index_t> padding,
                                                                 NonDeduced<index_t> dilation) {
  return WindowRangeOf<index_t>{windows_spanning<index_t>(first, windows, kernel, stride, padding, dilation).first,
                                windows_spanning<index_t>(last, windows, kernel, stride, padding, dilation).last};
}

// The tap of window `window` that lands on `position`, or kNoTap.
template <typename index_t = int64_t>
DECONV_HOST_DEVICE index_t tap_of(NonDeduced<index_t> position, NonDeduced<index_t> window, NonDeduced<index_t> kernel,
                                  NonDeduced<index_t> stride, NonDeduced<index_t> padding,
                                  NonDeduced<index_t> dilation) {
  const index_t offset = position + padding - window * stride;
  if (offset < 0 || offset % dilation != 0) return kNoTap;
  const index_t tap = offset / dilation;
  return tap < kernel ? tap : kNoTap;
}

// The input position that tap `tap` of window `window` reads.
template <typename index_t = int64_t>
DECONV_HOST_DEVICE index_t position_of(NonDeduced<index_t> window, NonDeduced<index_t> tap, NonDeduced<index_t> stride,
                                       NonDeduced<index_t> padding, NonDeduced<index_t> dilation) {
  return window * stride - padding + tap * dilation;
}

// The taps [first, end) of window `window` that read inside [0, size). `first` is the first tap
// at a position >= 0 even when end <= first (a window that lies wholly in the padding, which
// dilation makes possible): PyTorch's max_pool2d reports that tap as the index of such a window,
// and max_pool2d_switches reports it too.
template <typename index_t>
struct TapRangeOf {
  index_t first;
  index_t end;
};
using TapRange = TapRangeOf<int64_t>;

template <typename index_t = int64_t>
DECONV_HOST_DEVICE TapRangeOf<index_t> taps_inside(NonDeduced<index_t> window, NonDeduced<index_t> size,
                                                   NonDeduced<index_t> kernel, NonDeduced<index_t> stride,
                                                   NonDeduced<index_t> padding, NonDeduced<index_t> dilation) {
  const index_t start = window * stride - padding;
  const index_t first = start < 0 ? ceil_div<index_t>(-start, dilation) : 0;
  index_t end = floor_div<index_t>(size - 1 - start, dilation) + 1;
  if (end > kernel) end = kernel;
  return TapRangeOf<index_t>{first, end};
}

// Pooling geometry of both axes, passed to kernels by value.
struct Pool2d {
  int64_t kernel_h, kernel_w;
  int64_t stride_h, stride_w;
  int64_t padding_h, padding_w;
  int64_t dilation_h, dilation_w;
};

// Convolution geometry of both axes (groups are handled by the callers' channel loops).
struct Conv2d {
  int64_t kernel_h, kernel_w;
  int64_t stride_h, stride_w;
  int64_t padding_h, padding_w;
  int64_t dilation_h, dilation_w;
};

// The maximum of pooled window (py, px) of one [height, width] plane and its switch, the window-local
// tap ky * kernel_w + kx, by PyTorch's max_pool2d rule: start from the first tap at a position >= 0
// with value -inf, and take a tap when `value > max || isnan(value)`, in row-major window order. So
// the first maximum wins ties and a later NaN replaces an earlier one. A window that dilation puts
// wholly in the padding keeps -inf and its first tap, as in PyTorch. The tap is < 256: the first
// tap at a position >= 0 is at most padding <= kernel / 2 (checks.h), and kernel_h * kernel_w <= 256.
template <typename acc_t, typename index_t = int64_t>
struct WindowMax {
  acc_t value;
  index_t tap;
};

template <typename scalar_t, typename acc_t, typename index_t = int64_t>
DECONV_HOST_DEVICE WindowMax<acc_t, index_t> window_max(const scalar_t* plane, NonDeduced<index_t> height,
                                                        NonDeduced<index_t> width, const Pool2d& pool,
                                                        NonDeduced<index_t> py, NonDeduced<index_t> px) {
  const TapRangeOf<index_t> rows = taps_inside<index_t>(py, height, pool.kernel_h, pool.stride_h, pool.padding_h,
                                                        pool.dilation_h);
  const TapRangeOf<index_t> cols = taps_inside<index_t>(px, width, pool.kernel_w, pool.stride_w, pool.padding_w,
                                                        pool.dilation_w);
  WindowMax<acc_t, index_t> best{-std::numeric_limits<acc_t>::infinity(),
                                 rows.first * static_cast<index_t>(pool.kernel_w) + cols.first};
  for (index_t ky = rows.first; ky < rows.end; ++ky) {
    const index_t y = position_of<index_t>(py, ky, pool.stride_h, pool.padding_h, pool.dilation_h);
    for (index_t kx = cols.first; kx < cols.end; ++kx) {
      const index_t x = position_of<index_t>(px, kx, pool.stride_w, pool.padding_w, pool.dilation_w);
      const acc_t value = static_cast<acc_t>(plane[y * width + x]);
      if (value > best.value || value != value) {  // value != value: NaN, without <cmath> on the device
        best = WindowMax<acc_t, index_t>{value, ky * static_cast<index_t>(pool.kernel_w) + kx};
      }
    }
  }
  return best;
}

// The value that unpooling routes to input position (y, x) of one channel, before the rule's
// finish (rules.h): the sum of every pooled value whose window's switch points at (y, x) and that
// the rule routes (Rule::routes reads `positive`, laid out as `grad`, only for the masked rules).
// Windows overlap only where the pool is overlapping; then contributions add up (this is
// max_pool2d's gradient). `grad`, `positive` and `switches` point at one [pooled_h, pooled_w] plane
// with the given row strides (in elements).
template <typename Rule, typename scalar_t, typename acc_t, typename index_t = int64_t>
DECONV_HOST_DEVICE acc_t unpooled_sum(const scalar_t* grad, const bool* positive, const uint8_t* switches,
                                      NonDeduced<index_t> grad_row_stride, NonDeduced<index_t> grad_col_stride,
                                      NonDeduced<index_t> switch_row_stride, NonDeduced<index_t> switch_col_stride,
                                      NonDeduced<index_t> pooled_h, NonDeduced<index_t> pooled_w, const Pool2d& pool,
                                      NonDeduced<index_t> y, NonDeduced<index_t> x) {
  acc_t sum = acc_t(0);
  const index_t kernel_w = static_cast<index_t>(pool.kernel_w);
  const WindowRangeOf<index_t> rows =
      windows_spanning<index_t>(y, pooled_h, pool.kernel_h, pool.stride_h, pool.padding_h, pool.dilation_h);
  const WindowRangeOf<index_t> cols =
      windows_spanning<index_t>(x, pooled_w, pool.kernel_w, pool.stride_w, pool.padding_w, pool.dilation_w);
  for (index_t py = rows.first; py <= rows.last; ++py) {
    const index_t ky = tap_of<index_t>(y, py, pool.kernel_h, pool.stride_h, pool.padding_h, pool.dilation_h);
    if (ky == kNoTap) continue;
    for (index_t px = cols.first; px <= cols.last; ++px) {
      const index_t kx = tap_of<index_t>(x, px, pool.kernel_w, pool.stride_w, pool.padding_w, pool.dilation_w);
      if (kx == kNoTap) continue;
      const index_t at = py * grad_row_stride + px * grad_col_stride;
      if (static_cast<index_t>(switches[py * switch_row_stride + px * switch_col_stride]) == ky * kernel_w + kx &&
          Rule::routes(positive, at)) {
        sum += static_cast<acc_t>(grad[at]);
      }
    }
  }
  return sum;
}

// Whether pooled window (py, px) is the first window, in row-major order, whose switch selects
// input position (y, x). The fused kernel walks pooled windows and must count each selected
// position once even when overlapping windows select it twice.
template <typename index_t = int64_t>
DECONV_HOST_DEVICE bool first_window_selecting(const uint8_t* switches, NonDeduced<index_t> switch_row_stride,
                                               NonDeduced<index_t> switch_col_stride, NonDeduced<index_t> pooled_h,
                                               NonDeduced<index_t> pooled_w, const Pool2d& pool, NonDeduced<index_t> y,
                                               NonDeduced<index_t> x, NonDeduced<index_t> py, NonDeduced<index_t> px) {
  const index_t kernel_w = static_cast<index_t>(pool.kernel_w);
  const WindowRangeOf<index_t> rows =
      windows_spanning<index_t>(y, pooled_h, pool.kernel_h, pool.stride_h, pool.padding_h, pool.dilation_h);
  const WindowRangeOf<index_t> cols =
      windows_spanning<index_t>(x, pooled_w, pool.kernel_w, pool.stride_w, pool.padding_w, pool.dilation_w);
  for (index_t qy = rows.first; qy <= rows.last; ++qy) {
    const index_t ky = tap_of<index_t>(y, qy, pool.kernel_h, pool.stride_h, pool.padding_h, pool.dilation_h);
    if (ky == kNoTap) continue;
    for (index_t qx = cols.first; qx <= cols.last; ++qx) {
      if (qy == py && qx == px) return true;
      const index_t kx = tap_of<index_t>(x, qx, pool.kernel_w, pool.stride_w, pool.padding_w, pool.dilation_w);
      if (kx == kNoTap) continue;
      if (static_cast<index_t>(switches[qy * switch_row_stride + qx * switch_col_stride]) == ky * kernel_w + kx) {
        return false;
      }
    }
  }
  return true;
}

// The ReLU of the reverse pass: g = max(g, 0). NaN stays NaN, as torch.relu leaves it.
template <typename acc_t>
DECONV_HOST_DEVICE acc_t rectify(acc_t value) {
  return value < acc_t(0) ? acc_t(0) : value;
}

}  // namespace geometry
}  // namespace deconvcuda
