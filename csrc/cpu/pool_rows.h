// max_pool2d_switches' loops (deconv_kernels.cpp), included there once per instruction set, like
// gather_row.h: plain C++ that the compiler vectorises for the ISA of the including namespace. No
// include guard: it is meant to be included repeatedly.
//
// Both loops visit a window's taps in row-major order and take a tap when `value > max ||
// isnan(value)`, starting from -inf at the window's first tap inside the input:
// geometry::window_max's rule (PyTorch's), so values and switches are the same bit for bit.
// `take ? a : b` rather than an `if`: the compiler turns it into vector blends.

// Output row oy of one NCHW plane, for the output columns [first, end) whose windows lie wholly
// inside the input's columns: tap by tap, each over all those columns at once (consecutive outputs
// read input columns kStride apart; kStride = 0: pool.stride_w, known only at run time).
// `best`, `best_tap`: scratch of at least `end` values.
template <int kStride, typename scalar_t, typename acc_t>
void pool_row_inside(const scalar_t* plane, int64_t width, const Pool2d& pool, int64_t oy, geometry::TapRange rows,
                     int64_t first, int64_t end, acc_t* best, int32_t* best_tap, scalar_t* out, uint8_t* switch_out) {
  const int64_t stride = kStride != 0 ? kStride : pool.stride_w;
  const int32_t first_tap = static_cast<int32_t>(rows.first * pool.kernel_w);
  for (int64_t ox = first; ox < end; ++ox) {
    best[ox] = -std::numeric_limits<acc_t>::infinity();
    best_tap[ox] = first_tap;
  }
  for (int64_t ky = rows.first; ky < rows.end; ++ky) {
    const scalar_t* row = plane + geometry::position_of(oy, ky, pool.stride_h, pool.padding_h, pool.dilation_h) * width;
    for (int64_t kx = 0; kx < pool.kernel_w; ++kx) {
      const int64_t offset = kx * pool.dilation_w - pool.padding_w;  // input column of output 0's tap kx
      const int32_t tap = static_cast<int32_t>(ky * pool.kernel_w + kx);
      for (int64_t ox = first; ox < end; ++ox) {
        const acc_t value = static_cast<acc_t>(row[ox * stride + offset]);
        const bool take = value > best[ox] || value != value;
        best[ox] = take ? value : best[ox];
        best_tap[ox] = take ? tap : best_tap[ox];
      }
    }
  }
  for (int64_t ox = first; ox < end; ++ox) {
    out[ox] = static_cast<scalar_t>(best[ox]);
    switch_out[ox] = static_cast<uint8_t>(best_tap[ox]);
  }
}

// One output position (n, oy, ox) of a channels-last input [N, H, W, C]: every tap of the window
// inside the input (rows x cols), each over all C channels at once. `best`, `best_tap`: scratch of
// C values; `out`, `switch_out`: the position's C outputs.
template <typename scalar_t, typename acc_t>
void pool_position_channels_last(const scalar_t* image, int64_t width, int64_t channels, const Pool2d& pool,
                                 int64_t oy, int64_t ox, geometry::TapRange rows, geometry::TapRange cols, acc_t* best,
                                 int32_t* best_tap, scalar_t* out, uint8_t* switch_out) {
  const int32_t first_tap = static_cast<int32_t>(rows.first * pool.kernel_w + cols.first);
  for (int64_t c = 0; c < channels; ++c) {
    best[c] = -std::numeric_limits<acc_t>::infinity();
    best_tap[c] = first_tap;
  }
  for (int64_t ky = rows.first; ky < rows.end; ++ky) {
    const int64_t y = geometry::position_of(oy, ky, pool.stride_h, pool.padding_h, pool.dilation_h);
    for (int64_t kx = cols.first; kx < cols.end; ++kx) {
      const int64_t x = geometry::position_of(ox, kx, pool.stride_w, pool.padding_w, pool.dilation_w);
      const scalar_t* in = image + (y * width + x) * channels;
      const int32_t tap = static_cast<int32_t>(ky * pool.kernel_w + kx);
      for (int64_t c = 0; c < channels; ++c) {
        const acc_t value = static_cast<acc_t>(in[c]);
        const bool take = value > best[c] || value != value;
        best[c] = take ? value : best[c];
        best_tap[c] = take ? tap : best_tap[c];
      }
    }
  }
  for (int64_t c = 0; c < channels; ++c) {
    out[c] = static_cast<scalar_t>(best[c]);
    switch_out[c] = static_cast<uint8_t>(best_tap[c]);
  }
}
