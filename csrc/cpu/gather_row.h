// Pass 3's inner loop (deconv_kernels.cpp), included there once per instruction set: inside a
// namespace that defines `Lanes` structs for that ISA and under `#pragma GCC target` for it, so that
// the loop and the intrinsics it inlines are compiled for the same ISA. (Inlining one function
// into another of a different target is an error in GCC, so the loop cannot be shared as a
// template called from per-ISA wrappers.) No include guard: it is meant to be included repeatedly.
//
// Needs, in the including scope: GatherArgs and RoutedValue (deconv_kernels.cpp).

// Pass 3 for output row y: row[x * B + c] for every x. `Lanes` is the vector type: B / Lanes::width
// vector registers of accumulators per output position; per routed value, one broadcast and one
// vector FMA per register of weights. An FMA waits for the previous one into the same register
// (4 cycles on current cores) while the core could start two per cycle, so the unpooled positions
// under (y, x) take turns among kChains independent sets of accumulators (statically: the sets stay
// in registers), summed once at the end: a fixed order, the same for any number of threads.
template <int B, typename Lanes>
void gather_output_row(const GatherArgs<typename Lanes::value_t>& a, int64_t y, typename Lanes::value_t* row) {
  using acc_t = typename Lanes::value_t;
  using vec_t = typename Lanes::vec_t;
  constexpr int kRegisters = B / Lanes::width;
  static_assert(kRegisters * Lanes::width == B, "a channel block is a whole number of vectors");
  // as many chains as the accumulator registers allow (Lanes::accumulators), at most 4
  constexpr int kChains = Lanes::accumulators / kRegisters >= 4   ? 4
                          : Lanes::accumulators / kRegisters >= 2 ? 2
                                                                  : 1;
  // the non-empty unpooled positions under one output position, gathered before they are added
  // (there are at most kh * kw; more than kMaxSegments are added kMaxSegments at a time)
  constexpr int kMaxSegments = 64;
  const int64_t tap_stride = a.out_per_group * B;  // between consecutive (ky, kx) in a.weight
  const RoutedValue<acc_t>* segment_begin[kMaxSegments];
  const RoutedValue<acc_t>* segment_end[kMaxSegments];
  const acc_t* segment_weight[kMaxSegments];

  const auto add_segment = [&](int segment, vec_t* acc) {
    const acc_t* tap_weight = segment_weight[segment];
    for (const RoutedValue<acc_t>* v = segment_begin[segment]; v != segment_end[segment]; ++v) {
      const acc_t* w = tap_weight + int64_t(v->channel) * B;
      const vec_t value = Lanes::broadcast(v->value);
      for (int r = 0; r < kRegisters; ++r) acc[r] = Lanes::fma(Lanes::load(w + r * Lanes::width), value, acc[r]);
    }
  };

  for (int64_t x = 0; x < a.output_w; ++x) {
    vec_t acc[kChains][kRegisters];
    for (int chain = 0; chain < kChains; ++chain) {
      for (int r = 0; r < kRegisters; ++r) acc[chain][r] = Lanes::zero();
    }
    int segments = 0;
    const auto add_segments = [&]() {
      int segment = 0;
      for (; segment + kChains <= segments; segment += kChains) {
        for (int chain = 0; chain < kChains; ++chain) add_segment(segment + chain, acc[chain]);
      }
      for (; segment < segments; ++segment) add_segment(segment, acc[0]);
      segments = 0;
    };
    // the non-empty (position, tap) pairs under (y, x)
    for (int64_t i = a.rows->begin[y]; i < a.rows->begin[y + 1]; ++i) {
      const int64_t row_offset = a.rows->window[i] * a.unpooled_w;
      const acc_t* row_weight = a.weight + a.rows->tap[i] * a.kernel_w * tap_stride;
      for (int64_t k = a.cols->begin[x]; k < a.cols->begin[x + 1]; ++k) {
        const int64_t position = row_offset + a.cols->window[k];
        const int64_t first = a.offsets[position], last = a.offsets[position + 1];
        if (first == last) continue;
        segment_begin[segments] = a.routed + first;
        segment_end[segments] = a.routed + last;
        segment_weight[segments] = row_weight + a.cols->tap[k] * tap_stride;
        if (++segments == kMaxSegments) add_segments();
      }
    }
    add_segments();
    for (int r = 0; r < kRegisters; ++r) {
      vec_t sum = acc[0][r];
      for (int chain = 1; chain < kChains; ++chain) sum = Lanes::add(sum, acc[chain][r]);
      Lanes::store(row + x * B + r * Lanes::width, sum);
    }
  }
}
