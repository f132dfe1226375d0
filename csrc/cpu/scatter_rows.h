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
// the position's values (about five at AlexNet's pool1) and is stored once; several segments go
// together, so that their FMA chains run side by side: up to 8 rows where a row fits one or two
// vectors (add_short_rows, the common case), else kSegments (ky, k) pieces of longer rows.
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
  using vec_t = typename Lanes::vec_t;
  using mask_t = typename Lanes::mask_t;
  constexpr int kSegments = 4;
  const int64_t filter_size = a.kernel_h * a.kernel_w;
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
        if (length <= 2 * Lanes::width) {
          // The common case, a row in one or two vectors (AlexNet's conv1: 11 taps, one AVX-512 or
          // two AVX2 vectors): 8, 4, 2, 1 rows at a time (4, 2, 1 of two vectors).
          const int64_t out_step = a.dilation_h * a.output_w;
          int64_t ky = rows.first;
          acc_t* out = plane + (y * a.stride_h - a.padding_h + ky * a.dilation_h) * a.output_w + x * a.stride_w -
                       a.padding_w + cols.first;
          const auto add = [&](auto rows_at_once, auto vectors) {
            constexpr int R = decltype(rows_at_once)::value, V = decltype(vectors)::value;
            add_short_rows<R, V, Lanes>(first, last, a.weight + ky * a.kernel_w + cols.first, filter_size,
                                        a.kernel_w, out, out_step, Lanes::first(length - (V - 1) * Lanes::width));
            ky += R;
            out += R * out_step;
          };
          const auto add_rows = [&](auto vectors) {
            if constexpr (decltype(vectors)::value == 1) {
              while (rows.end - ky >= 8) add(std::integral_constant<int, 8>(), vectors);
            }
            while (rows.end - ky >= 4) add(std::integral_constant<int, 4>(), vectors);
            if (rows.end - ky >= 2) add(std::integral_constant<int, 2>(), vectors);
            if (rows.end - ky >= 1) add(std::integral_constant<int, 1>(), vectors);
          };
          if (length <= Lanes::width) {
            add_rows(std::integral_constant<int, 1>());
          } else {
            add_rows(std::integral_constant<int, 2>());
          }
          continue;
        }
        // The segments, (ky, k) for ky in rows and k = 0, width, ... < length, kSegments at a time;
        // the last group is padded with empty ones (no lane: they load zeros and store nothing).
        int64_t ky = rows.first, k = 0;
        while (ky < rows.end) {
          int64_t out_at[kSegments], weight_at[kSegments];
          mask_t lanes[kSegments];
          vec_t acc[kSegments];
          for (int j = 0; j < kSegments; ++j) {
            if (ky < rows.end) {
              out_at[j] = (y * a.stride_h - a.padding_h + ky * a.dilation_h) * a.output_w + x * a.stride_w -
                          a.padding_w + cols.first + k;
              weight_at[j] = ky * a.kernel_w + cols.first + k;
              lanes[j] = Lanes::first(std::min<int64_t>(Lanes::width, length - k));
              k += Lanes::width;
              if (k >= length) k = 0, ++ky;
            } else {
              out_at[j] = out_at[0];
              weight_at[j] = weight_at[0];
              lanes[j] = Lanes::first(0);
            }
            acc[j] = Lanes::load_first(plane + out_at[j], lanes[j]);
          }
          for (const RoutedValue<acc_t>* v = first; v != last; ++v) {
            const acc_t* filter = a.weight + int64_t(v->channel) * filter_size;
            const vec_t value = Lanes::broadcast(v->value);
            for (int j = 0; j < kSegments; ++j) {
              acc[j] = Lanes::fma(Lanes::load_first(filter + weight_at[j], lanes[j]), value, acc[j]);
            }
          }
          for (int j = 0; j < kSegments; ++j) Lanes::store_first(plane + out_at[j], acc[j], lanes[j]);
        }
      }
    }
  }
}
