// Pass 3 by scattering filter rows (deconv_kernels.cpp), for convolutions with few input channels
// per group (an image's first conv: 3), where a block of input channels would fill a fraction of a
// vector. Included there once per instruction set, like gather_row.h and for the same reason. No
// include guard: it is meant to be included repeatedly.
//
// Needs, in the including scope: ScatterArgs and RoutedValue (deconv_kernels.cpp).

// One output plane (sample, c_in), all zero on entry. Per unpooled position, the values pass 2
// routed there add value * weight[c_out, c_in, ky, :] to the output row segment that filter row ky
// reaches, for every ky whose output row is inside. The vectors run along the filter row (11 taps of
// AlexNet's conv1 in one masked 16-lane vector, where a block of its 3 input channels would fill 3
// of 4 lanes), masked to the taps inside the plane. A row segment is loaded once per position, gets
// the position's values (about five at AlexNet's pool1) and is stored once; up to 8 rows go
// together (add_short_rows), so that their FMA chains run side by side. A row is taken in pieces
// of at most two vectors (one piece for AlexNet's conv1: one AVX-512 or two AVX2 vectors).
//
// Positions of one row are visited in `phases` passes (x = phase, phase + phases, ...), so that
// two positions visited one after the other write disjoint segments: a load that overlaps a store
// still in flight waits for it. One task owns the plane and adds in a fixed order, so the bits do
// not depend on the number of threads.

// R filter rows of one position, each inside V vectors (the last one masked to `last_lanes`): the
// rows' outputs are loaded once, get every value routed to the position, and are stored once. R * V
// accumulators in registers: independent FMA chains.
template <int R, int V, typename Lanes>
inline void add_short_rows(const RoutedValue<typename Lanes::value_t>* first,
                           const RoutedValue<typename Lanes::value_t>* last, const typename Lanes::value_t* weight,
                           int64_t filter_size, int64_t kernel_w, typename Lanes::value_t* out, int64_t out_step,
                           typename Lanes::mask_t last_lanes) {
  using vec_t = typename Lanes::vec_t;
  const typename Lanes::mask_t all_lanes = Lanes::first(Lanes::width);
  const auto lanes = [&](int v) { return v == V - 1 ? last_lanes : all_lanes; };
  vec_t acc[R][V];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) acc[r][v] = Lanes::load_first(out + r * out_step + v * Lanes::width, lanes(v));
  }
  for (const RoutedValue<typename Lanes::value_t>* routed = first; routed != last; ++routed) {
    const typename Lanes::value_t* rows = weight + int64_t(routed->channel) * filter_size;
    const vec_t value = Lanes::broadcast(routed->value);
    for (int r = 0; r < R; ++r) {
      for (int v = 0; v < V; ++v) {
        acc[r][v] = Lanes::fma(Lanes::load_first(rows + r * kernel_w + v * Lanes::width, lanes(v)), value, acc[r][v]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) Lanes::store_first(out + r * out_step + v * Lanes::width, acc[r][v], lanes(v));
  }
}

template <typename Lanes>
void scatter_plane(const ScatterArgs<typename Lanes::value_t>& a, typename Lanes::value_t* plane) {
  using acc_t = typename Lanes::value_t;
  constexpr int64_t kPiece = 2 * Lanes::width;  // the most taps of a row added at once
  const int64_t filter_size = a.kernel_h * a.kernel_w;
  const int64_t out_step = a.dilation_h * a.output_w;  // between the output rows of consecutive ky
  const int64_t phases = std::min(a.unpooled_w, std::max<int64_t>(1, (a.kernel_w + a.stride_w - 1) / a.stride_w));
  for (int64_t y = 0; y < a.unpooled_h; ++y) {
    const geometry::TapRange rows = a.row_taps[y];
    if (rows.first >= rows.end) continue;
    for (int64_t phase = 0; phase < phases; ++phase) {
      for (int64_t x = phase; x < a.unpooled_w; x += phases) {
        const int64_t position = y * a.unpooled_w + x;
        const RoutedValue<acc_t>* first = a.routed + a.offsets[position];
        const RoutedValue<acc_t>* last = a.routed + a.offsets[position + 1];
        const geometry::TapRange cols = a.col_taps[x];
        if (first == last || cols.first >= cols.end) continue;
        const int64_t length = cols.end - cols.first;  // the taps of a filter row inside the plane
        for (int64_t k = 0; k < length; k += kPiece) {  // taps [cols.first + k, + piece) of every row
          const int64_t piece = std::min(length - k, kPiece);
          int64_t ky = rows.first;
          acc_t* out = plane + (y * a.stride_h - a.padding_h + ky * a.dilation_h) * a.output_w + x * a.stride_w -
                       a.padding_w + cols.first + k;
          const auto add = [&](auto rows_at_once, auto vectors) {
            constexpr int R = decltype(rows_at_once)::value, V = decltype(vectors)::value;
            add_short_rows<R, V, Lanes>(first, last, a.weight + ky * a.kernel_w + cols.first + k, filter_size,
                                        a.kernel_w, out, out_step, Lanes::first(piece - (V - 1) * Lanes::width));
            ky += R;
            out += R * out_step;
          };
          const auto add_rows = [&](auto vectors) {  // 8, 4, 2, 1 rows at a time (4, 2, 1 of two vectors)
            if constexpr (decltype(vectors)::value == 1) {
              while (rows.end - ky >= 8) add(std::integral_constant<int, 8>(), vectors);
            }
            while (rows.end - ky >= 4) add(std::integral_constant<int, 4>(), vectors);
            if (rows.end - ky >= 2) add(std::integral_constant<int, 2>(), vectors);
            if (rows.end - ky >= 1) add(std::integral_constant<int, 1>(), vectors);
          };
          if (piece <= Lanes::width) {
            add_rows(std::integral_constant<int, 1>());
          } else {
            add_rows(std::integral_constant<int, 2>());
          }
        }
      }
    }
  }
}
