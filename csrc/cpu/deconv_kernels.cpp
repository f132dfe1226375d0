// CPU kernels of the four deconvcuda operators (schemas in csrc/ops.cpp, semantics in docs/DESIGN.md).
//
// Layout: the kernels live in an anonymous namespace, templated on the scalar type; the op
// functions below them check their arguments (csrc/common/checks.h), make the inputs NCHW
// contiguous, dispatch on the dtype and register themselves in the TORCH_LIBRARY_IMPL block at the
// end. Every index computation goes through csrc/common/geometry.h, which the CUDA kernels share.
//
// Memory format: inputs of any strides and memory format (channels_last included) are read through
// `.contiguous()`, and every output is a new NCHW-contiguous tensor; except max_pool2d_switches,
// which pools a channels-last input as it is and returns channels-last outputs (as PyTorch's
// max_pool2d does).
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
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#endif

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
// 1. Per (n, c_out) plane, one walk over the pooled values: the list of the unpooled map's non-zero
//    values, at most one per pooled window (the position its switch selects; where windows overlap,
//    each position once, from the first window that selects it, carrying the summed value). Zeros
//    (the relu's, the mask's) are dropped here, so everything after scales with the number of
//    routed values, not with the map's size.
// 2. Per (n, group): those lists regrouped by position (compressed rows: for every unpooled
//    position, the (c_out, value) pairs routed there, in increasing c_out).
// 3. One of two, by the layer's shape (scatters_rows):
//    - a gather per output row and block of B input channels (GatherPass, gather_row.h): every
//      output position (y, x) visits the unpooled positions its transposed-conv taps reach (tables
//      made once per call, so no division in the loops), and for each value routed there reads ONE
//      filter tap, the B weights weight[c_out, block, ky, kx], contiguous in the packed layout
//      [group, block, kh, kw, c_out, B] (channels last, made once per call), and adds value *
//      weights to B accumulators held in registers: B-wide vector FMAs, no scalar loop over one
//      channel (with_channel_block picks B);
//    - for a layer with at most 4 input channels per group (an image's first conv), a scatter per
//      output plane (ScatterPass, scatter_rows.h): each unpooled position's values add their filter
//      rows to the output rows they reach, the vectors running along the filter row instead of
//      across a block of 3 channels.
//
// Pass 3 is compiled for the build's baseline ISA (a plain multiply-add) and, on x86-64 with GCC,
// for AVX2 + FMA and for AVX-512F (explicit FMA intrinsics), picked at run time by what the CPU has
// and what PyTorch uses (isa_for_this_cpu; the build's flags are the baseline's: a wheel built here
// must run on any x86-64). Each output element is computed by one task in a fixed order, so results
// are the same for any number of threads, and on one machine bit for bit.

template <typename acc_t>
struct UnpooledValue {
  int32_t position;  // y * unpooled_w + x in the unpooled map (the conv's output; < 2^31: checked by the op)
  acc_t value;       // the rule's finish of the unpooled sum, never zero
};

template <typename acc_t>
struct RoutedValue {
  int32_t channel;  // c_out within its group (< 2^31: checked by the op)
  acc_t value;
};

// Rule::finish without a branch on the value: GCC compiles the relu `v < 0 ? 0 : v` to a jump here,
// and after the relu of a random seed half the values are negative, so it mispredicts half the
// time (a third of pass 1 at AlexNet's pool1). MAXSS/MAXSD with zero first is the same function,
// NaN included: where either operand is NaN the second one, the value, is returned.
template <typename Rule, typename acc_t>
inline acc_t finish_without_branch(acc_t sum) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  if constexpr (Rule::rectifies && std::is_same_v<acc_t, float>) {
    return _mm_cvtss_f32(_mm_max_ss(_mm_setzero_ps(), _mm_set_ss(sum)));
  } else if constexpr (Rule::rectifies && std::is_same_v<acc_t, double>) {
    return _mm_cvtsd_f64(_mm_max_sd(_mm_setzero_pd(), _mm_set_sd(sum)));
  }
#endif
  return Rule::finish(sum);
}

// Pass 1 for one plane under the rule `Rule` (rules.h); returns how many values it wrote. Where
// windows overlap, several may select one position: their values are first summed in `sums` (the
// plane's unpooled map, all zero on entry and on return), in row-major window order (the gather's
// order, geometry::unpooled_sum), and the position is listed once, at the first window selecting
// it: listing a position takes its sum and leaves a zero, which the later windows selecting it see
// and skip. `sums` has one more slot than the map; `targets` holds pooled_h * pooled_w positions.
template <typename Rule, typename scalar_t, typename acc_t>
int64_t collect_unpooled_values(const scalar_t* grad, const bool* positive, const uint8_t* switches,
                                int64_t pooled_h, int64_t pooled_w, int64_t unpooled_h, int64_t unpooled_w,
                                const Pool2d& pool, const TapOffsets& offsets, bool overlapping, acc_t* sums,
                                int32_t* targets, UnpooledValue<acc_t>* values) {
  // the selected position of pooled value `index`, or -1 where it routes nothing
  const auto target = [&](int64_t py, int64_t px, int64_t index) -> int32_t {
    const int64_t tap = switches[index];
    if (tap >= offsets.taps || !Rule::routes(positive, index)) return -1;  // no tap, or masked
    const int64_t y = py * pool.stride_h - pool.padding_h + offsets.dy[tap];
    const int64_t x = px * pool.stride_w - pool.padding_w + offsets.dx[tap];
    if (y < 0 || y >= unpooled_h || x < 0 || x >= unpooled_w) return -1;  // a tap in the padding
    return static_cast<int32_t>(y * unpooled_w + x);
  };
  int64_t count = 0;
  if (!overlapping) {
    for (int64_t py = 0; py < pooled_h; ++py) {
      for (int64_t px = 0; px < pooled_w; ++px) {
        const int64_t index = py * pooled_w + px;
        const int32_t position = target(py, px, index);
        const acc_t value = finish_without_branch<Rule>(static_cast<acc_t>(grad[index]));
        // Written always, kept only where it routes something non-zero (a zero adds nothing to any
        // sum: the accumulators start at +0, so not even a sign is lost). No branch on the value:
        // after the relu, half of them are zero at random, and a branch would mispredict half the time.
        values[count] = UnpooledValue<acc_t>{position, value};
        count += (position >= 0) & (value != acc_t(0));
      }
    }
    return count;
  }
  // Values that route nothing go to slot `nowhere` (one past the map), which stays zero: so the
  // walks have no branch on the data (after the relu, half the values are zero at random).
  const int32_t nowhere = static_cast<int32_t>(unpooled_h * unpooled_w);
  for (int64_t py = 0; py < pooled_h; ++py) {
    for (int64_t px = 0; px < pooled_w; ++px) {
      const int64_t index = py * pooled_w + px;
      const int32_t position = target(py, px, index);
      const bool routed = position >= 0;
      targets[index] = routed ? position : nowhere;
      sums[routed ? position : nowhere] += routed ? static_cast<acc_t>(grad[index]) : acc_t(0);
    }
  }
  // Take each position's sum (a later window selecting it finds the zero left behind), then finish
  // and keep the non-zero ones, compacting in place: two loops without a branch on the data.
  const int64_t pooled_area = pooled_h * pooled_w;
  for (int64_t index = 0; index < pooled_area; ++index) {
    const int32_t position = targets[index];
    values[index] = UnpooledValue<acc_t>{position, sums[position]};
    sums[position] = acc_t(0);
  }
  for (int64_t index = 0; index < pooled_area; ++index) {
    const acc_t value = finish_without_branch<Rule>(values[index].value);
    values[count] = UnpooledValue<acc_t>{values[index].position, value};
    count += value != acc_t(0);  // zero: the rule's, a position listed already, or nowhere
  }
  return count;
}

// Pass 1 for samples [n0, n0 + samples) of a batch: the list of plane p of the chunk (sample n0 + p /
// channels, channel p % channels) at values + p * pooled_h * pooled_w, its length in counts[p].
template <typename Rule, typename scalar_t, typename acc_t>
void collect_chunk(const scalar_t* grad, const bool* positive, const uint8_t* switches, int64_t n0, int64_t samples,
                   int64_t channels, int64_t pooled_h, int64_t pooled_w, int64_t unpooled_h, int64_t unpooled_w,
                   const Pool2d& pool, UnpooledValue<acc_t>* values, int64_t* counts) {
  const TapOffsets tap_offsets(pool);
  const bool overlapping = geometry::windows_overlap(pool.kernel_h, pool.stride_h, pool.dilation_h) ||
                           geometry::windows_overlap(pool.kernel_w, pool.stride_w, pool.dilation_w);
  const int64_t pooled_area = pooled_h * pooled_w;
  const int64_t unpooled_area = unpooled_h * unpooled_w;
  at::parallel_for(0, samples * channels, grain_for(pooled_area * 4), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sums(overlapping ? unpooled_area + 1 : 0, acc_t(0));
    std::vector<int32_t> targets(overlapping ? pooled_area : 0);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t offset = (n0 * channels + plane) * pooled_area;
      counts[plane] = collect_unpooled_values<Rule, scalar_t, acc_t>(
          grad + offset, Rule::masked ? positive + offset : nullptr, switches + offset, pooled_h, pooled_w,
          unpooled_h, unpooled_w, pool, tap_offsets, overlapping, sums.data(), targets.data(),
          values + plane * pooled_area);
    }
  });
}

// For every output coordinate along one axis, the conv windows (unpooled positions) whose taps
// reach it and the tap that does: entries [begin[o], begin[o + 1]) of `window` and `tap`.
struct TapTable {
  std::vector<int64_t> begin;
  std::vector<int64_t> window;
  std::vector<int64_t> tap;

  TapTable(int64_t outputs, int64_t windows, int64_t kernel, int64_t stride, int64_t padding, int64_t dilation) {
    begin.reserve(outputs + 1);
    for (int64_t o = 0; o < outputs; ++o) {
      begin.push_back(static_cast<int64_t>(window.size()));
      const auto range = geometry::windows_spanning(o, windows, kernel, stride, padding, dilation);
      for (int64_t w = range.first; w <= range.last; ++w) {
        const int64_t t = geometry::tap_of(o, w, kernel, stride, padding, dilation);
        if (t == geometry::kNoTap) continue;  // dilation skips o
        window.push_back(w);
        tap.push_back(t);
      }
    }
    begin.push_back(static_cast<int64_t>(window.size()));
  }
};

// What pass 3 reads, for one (sample, group): the compressed rows of pass 2, the packed weights of
// one channel block, the tap tables.
template <typename acc_t>
struct GatherArgs {
  const RoutedValue<acc_t>* routed;
  const int64_t* offsets;  // [unpooled_h * unpooled_w + 1]
  const acc_t* weight;     // [kh, kw, out_per_group, B]
  int64_t out_per_group;
  int64_t unpooled_w;
  int64_t kernel_w;
  const TapTable* rows;
  const TapTable* cols;
  int64_t output_w;
};

// What the scattering pass 3 (scatter_rows.h) reads, for one (sample, group) and one input channel
// c_in of the group: pass 2's compressed rows, the group's filters for c_in, per-axis tap ranges.
template <typename acc_t>
struct ScatterArgs {
  const RoutedValue<acc_t>* routed;
  const int64_t* offsets;              // [unpooled_h * unpooled_w + 1]
  const acc_t* weight;                 // [c_out / groups, kh, kw]: weight[group's c_out, c_in, :, :]
  int64_t unpooled_h, unpooled_w;
  const geometry::TapRange* row_taps;  // [unpooled_h]: the filter rows ky whose output row is inside
  const geometry::TapRange* col_taps;  // [unpooled_w]: the taps kx whose output column is inside
  int64_t stride_h, stride_w, padding_h, padding_w, dilation_h;
  int64_t kernel_h, kernel_w, output_w;
};

// Pass 3's loop, once per instruction set (csrc/cpu/gather_row.h says why it is included thrice).
namespace baseline {
// One lane, plain multiply-add (std::fma is a library call without FMA hardware); the compiler
// may vectorise it for what the baseline has.
template <typename acc_t>
struct Lanes {
  using value_t = acc_t;
  using vec_t = acc_t;
  static constexpr int width = 1;
  static constexpr int accumulators = 8;
  static inline vec_t zero() { return acc_t(0); }
  static inline vec_t add(vec_t a, vec_t b) { return a + b; }
  static inline vec_t broadcast(acc_t value) { return value; }
  static inline vec_t load(const acc_t* p) { return *p; }
  static inline void store(acc_t* p, vec_t v) { *p = v; }
  static inline vec_t fma(vec_t a, vec_t b, vec_t c) { return c + a * b; }
  using mask_t = bool;  // whether the one lane is in
  static inline mask_t first(int64_t n) { return n > 0; }
  static inline vec_t load_first(const acc_t* p, mask_t in) { return in ? *p : acc_t(0); }
  static inline void store_first(acc_t* p, vec_t v, mask_t in) {
    if (in) *p = v;
  }
};
#include "cpu/gather_row.h"
#include "cpu/scatter_rows.h"
#include "cpu/pool_rows.h"
}  // namespace baseline

template <int B, typename acc_t>
using GatherRowFn = void (*)(const GatherArgs<acc_t>&, int64_t, acc_t*);

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// AVX2 + FMA (x86-64 since 2013) and AVX-512F, compiled for that ISA only and called only where
// the CPU reports it (__builtin_cpu_supports), so the rest of the library keeps the build's
// baseline ISA and the same wheel runs on any x86-64.
#define DECONV_X86_SIMD 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
struct FloatLanes {
  using value_t = float;
  using vec_t = __m256;
  static constexpr int width = 8;
  static constexpr int accumulators = 8;  // of 16 vector registers: half for accumulators
  static inline vec_t zero() { return _mm256_setzero_ps(); }
  static inline vec_t add(vec_t a, vec_t b) { return _mm256_add_ps(a, b); }
  static inline vec_t broadcast(float value) { return _mm256_set1_ps(value); }
  static inline vec_t load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, vec_t v) { _mm256_storeu_ps(p, v); }
  static inline vec_t fma(vec_t a, vec_t b, vec_t c) { return _mm256_fmadd_ps(a, b, c); }
  using mask_t = __m256i;  // the first n lanes, for n in [0, 8]
  static inline mask_t first(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static inline vec_t load_first(const float* p, mask_t in) { return _mm256_maskload_ps(p, in); }
  static inline void store_first(float* p, vec_t v, mask_t in) { _mm256_maskstore_ps(p, in, v); }
};
struct DoubleLanes {
  using value_t = double;
  using vec_t = __m256d;
  static constexpr int width = 4;
  static constexpr int accumulators = 8;  // of 16 vector registers: half for accumulators
  static inline vec_t zero() { return _mm256_setzero_pd(); }
  static inline vec_t add(vec_t a, vec_t b) { return _mm256_add_pd(a, b); }
  static inline vec_t broadcast(double value) { return _mm256_set1_pd(value); }
  static inline vec_t load(const double* p) { return _mm256_loadu_pd(p); }
  static inline void store(double* p, vec_t v) { _mm256_storeu_pd(p, v); }
  static inline vec_t fma(vec_t a, vec_t b, vec_t c) { return _mm256_fmadd_pd(a, b, c); }
  using mask_t = __m256i;  // the first n lanes, for n in [0, 4]
  static inline mask_t first(int64_t n) {
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
  }
  static inline vec_t load_first(const double* p, mask_t in) { return _mm256_maskload_pd(p, in); }
  static inline void store_first(double* p, vec_t v, mask_t in) { _mm256_maskstore_pd(p, in, v); }
};
// 128-bit vectors with FMA (VEX-encoded, so AVX2 machines have them): for blocks of 4 channels
struct FloatQuadLanes {
  using value_t = float;
  using vec_t = __m128;
  static constexpr int width = 4;
  static constexpr int accumulators = 8;  // of 16 vector registers: half for accumulators
  static inline vec_t zero() { return _mm_setzero_ps(); }
  static inline vec_t add(vec_t a, vec_t b) { return _mm_add_ps(a, b); }
  static inline vec_t broadcast(float value) { return _mm_set1_ps(value); }
  static inline vec_t load(const float* p) { return _mm_loadu_ps(p); }
  static inline void store(float* p, vec_t v) { _mm_storeu_ps(p, v); }
  static inline vec_t fma(vec_t a, vec_t b, vec_t c) { return _mm_fmadd_ps(a, b, c); }
  using mask_t = __m128i;  // the first n lanes, for n in [0, 4]
  static inline mask_t first(int64_t n) {
    return _mm_cmpgt_epi32(_mm_set1_epi32(static_cast<int>(n)), _mm_setr_epi32(0, 1, 2, 3));
  }
  static inline vec_t load_first(const float* p, mask_t in) { return _mm_maskload_ps(p, in); }
  static inline void store_first(float* p, vec_t v, mask_t in) { _mm_maskstore_ps(p, in, v); }
};
#include "cpu/gather_row.h"
#include "cpu/scatter_rows.h"
#include "cpu/pool_rows.h"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f")
namespace avx512 {
struct FloatLanes {
  using value_t = float;
  using vec_t = __m512;
  static constexpr int width = 16;
  static constexpr int accumulators = 16;  // of 32 vector registers: half for accumulators
  static inline vec_t zero() { return _mm512_setzero_ps(); }
  static inline vec_t add(vec_t a, vec_t b) { return _mm512_add_ps(a, b); }
  static inline vec_t broadcast(float value) { return _mm512_set1_ps(value); }
  static inline vec_t load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, vec_t v) { _mm512_storeu_ps(p, v); }
  static inline vec_t fma(vec_t a, vec_t b, vec_t c) { return _mm512_fmadd_ps(a, b, c); }
  using mask_t = __mmask16;  // the first n lanes, for n in [0, 16]
  static inline mask_t first(int64_t n) { return static_cast<mask_t>((1u << n) - 1); }
  static inline vec_t load_first(const float* p, mask_t in) { return _mm512_maskz_loadu_ps(in, p); }
  static inline void store_first(float* p, vec_t v, mask_t in) { _mm512_mask_storeu_ps(p, in, v); }
};
struct DoubleLanes {
  using value_t = double;
  using vec_t = __m512d;
  static constexpr int width = 8;
  static constexpr int accumulators = 16;  // of 32 vector registers: half for accumulators
  static inline vec_t zero() { return _mm512_setzero_pd(); }
  static inline vec_t add(vec_t a, vec_t b) { return _mm512_add_pd(a, b); }
  static inline vec_t broadcast(double value) { return _mm512_set1_pd(value); }
  static inline vec_t load(const double* p) { return _mm512_loadu_pd(p); }
  static inline void store(double* p, vec_t v) { _mm512_storeu_pd(p, v); }
  static inline vec_t fma(vec_t a, vec_t b, vec_t c) { return _mm512_fmadd_pd(a, b, c); }
  using mask_t = __mmask8;  // the first n lanes, for n in [0, 8]
  static inline mask_t first(int64_t n) { return static_cast<mask_t>((1u << n) - 1); }
  static inline vec_t load_first(const double* p, mask_t in) { return _mm512_maskz_loadu_pd(in, p); }
  static inline void store_first(double* p, vec_t v, mask_t in) { _mm512_mask_storeu_pd(p, in, v); }
};
#include "cpu/gather_row.h"
#include "cpu/scatter_rows.h"
#include "cpu/pool_rows.h"
}  // namespace avx512
#pragma GCC pop_options
#endif

#ifdef DECONV_X86_SIMD
// The widest instruction set the loops of this file use: what the CPU has, capped by PyTorch's own
// choice for its CPU kernels, so that ATEN_CPU_CAPABILITY=default|avx2 (read once, at the first call) runs the
// narrower loops on a wider CPU: tests do, and users can rule out a vector unit the same way for both.
enum class Isa { kBaseline, kAvx2, kAvx512 };

Isa isa_for_this_cpu() {
  static const Isa isa = [] {
    const std::string aten = at::get_cpu_capability();  // "DEFAULT", "AVX2", "AVX512", ...
    if (aten == "AVX512" && __builtin_cpu_supports("avx512f")) return Isa::kAvx512;
    if ((aten == "AVX512" || aten == "AVX2") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      return Isa::kAvx2;
    }
    return Isa::kBaseline;
  }();
  return isa;
}
#endif

// The pass-3 gather for this CPU and block width: the widest vectors that divide B.
template <int B, typename acc_t>
GatherRowFn<B, acc_t> gather_output_row_for_this_cpu() {
#ifdef DECONV_X86_SIMD
  constexpr bool is_float = std::is_same_v<acc_t, float>;
  using Avx512 = std::conditional_t<is_float, avx512::FloatLanes, avx512::DoubleLanes>;
  using Avx2 = std::conditional_t<is_float, avx2::FloatLanes, avx2::DoubleLanes>;
  const Isa isa = isa_for_this_cpu();
  if constexpr (B % Avx512::width == 0) {
    if (isa == Isa::kAvx512) return &avx512::gather_output_row<B, Avx512>;
  }
  if constexpr (B % Avx2::width == 0) {
    if (isa != Isa::kBaseline) return &avx2::gather_output_row<B, Avx2>;
  }
  if constexpr (is_float && B % avx2::FloatQuadLanes::width == 0) {
    if (isa != Isa::kBaseline) return &avx2::gather_output_row<B, avx2::FloatQuadLanes>;
  }
#endif
  return &baseline::gather_output_row<B, baseline::Lanes<acc_t>>;
}

template <typename acc_t>
using ScatterPlaneFn = void (*)(const ScatterArgs<acc_t>&, acc_t*);

// The pass-3 scatter for this CPU: its widest vectors (a filter row of AlexNet's conv1 is 11 taps:
// one masked AVX-512 vector, two AVX2 ones).
template <typename acc_t>
ScatterPlaneFn<acc_t> scatter_plane_for_this_cpu() {
#ifdef DECONV_X86_SIMD
  constexpr bool is_float = std::is_same_v<acc_t, float>;
  using Avx512 = std::conditional_t<is_float, avx512::FloatLanes, avx512::DoubleLanes>;
  using Avx2 = std::conditional_t<is_float, avx2::FloatLanes, avx2::DoubleLanes>;
  const Isa isa = isa_for_this_cpu();
  if (isa == Isa::kAvx512) return &avx512::scatter_plane<Avx512>;
  if (isa == Isa::kAvx2) return &avx2::scatter_plane<Avx2>;
#endif
  return &baseline::scatter_plane<baseline::Lanes<acc_t>>;
}

// --------------------------------------------------------------------------------------------- //
// max_pool2d_switches
// --------------------------------------------------------------------------------------------- //
//
// Two loops (pool_rows.h), by the input's memory format, both vectorised by the compiler for the
// ISA isa_for_this_cpu picks: channels-last inputs over the channels of a position; NCHW inputs
// over the output columns of a row whose windows lie inside the input (the others, near the left
// and right edges, one window at a time by geometry::window_max). One task per run of (n, c)
// planes, or of (n, oy) rows for channels-last; outputs in the input's memory format, as PyTorch's
// max_pool2d does.

template <typename scalar_t>
using PoolRowFn = void (*)(const scalar_t*, int64_t, const Pool2d&, int64_t, geometry::TapRange, int64_t, int64_t,
                           at::opmath_type<scalar_t>*, int32_t*, scalar_t*, uint8_t*);

template <int kStride, typename scalar_t>
PoolRowFn<scalar_t> pool_row_inside_for_this_cpu() {
  using acc_t = at::opmath_type<scalar_t>;
#ifdef DECONV_X86_SIMD
  if (isa_for_this_cpu() == Isa::kAvx512) return &avx512::pool_row_inside<kStride, scalar_t, acc_t>;
  if (isa_for_this_cpu() == Isa::kAvx2) return &avx2::pool_row_inside<kStride, scalar_t, acc_t>;
#endif
  return &baseline::pool_row_inside<kStride, scalar_t, acc_t>;
}

template <typename scalar_t>
using PoolPositionFn = void (*)(const scalar_t*, int64_t, int64_t, const Pool2d&, int64_t, int64_t, geometry::TapRange,
                                geometry::TapRange, at::opmath_type<scalar_t>*, int32_t*, scalar_t*, uint8_t*);

template <typename scalar_t>
PoolPositionFn<scalar_t> pool_position_channels_last_for_this_cpu() {
  using acc_t = at::opmath_type<scalar_t>;
#ifdef DECONV_X86_SIMD
  if (isa_for_this_cpu() == Isa::kAvx512) return &avx512::pool_position_channels_last<scalar_t, acc_t>;
  if (isa_for_this_cpu() == Isa::kAvx2) return &avx2::pool_position_channels_last<scalar_t, acc_t>;
#endif
  return &baseline::pool_position_channels_last<scalar_t, acc_t>;
}

// For every window along one axis (a pool's output position; for the scattering pass 3, an
// unpooled position, whose conv taps reach the output), the taps that land inside a map of `size`
// (geometry::taps_inside), made once per call so that the loops divide nothing.
std::vector<geometry::TapRange> taps_inside_table(int64_t windows, int64_t size, int64_t kernel, int64_t stride,
                                                  int64_t padding, int64_t dilation) {
  std::vector<geometry::TapRange> table(windows);
  for (int64_t w = 0; w < windows; ++w) table[w] = geometry::taps_inside(w, size, kernel, stride, padding, dilation);
  return table;
}

// NCHW inputs whose output rows are shorter than kShortRow are pooled channels-last where they
// have at least kChannelsToFill channels (max_pool2d_switches_cpu).
constexpr int64_t kShortRow = 16;
constexpr int64_t kChannelsToFill = 16;

template <typename scalar_t>
void max_pool2d_switches_kernel(const scalar_t* input, scalar_t* output, uint8_t* switches, int64_t planes,
                                int64_t input_h, int64_t input_w, int64_t output_h, int64_t output_w,
                                const Pool2d& pool) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto rows = taps_inside_table(output_h, input_h, pool.kernel_h, pool.stride_h, pool.padding_h, pool.dilation_h);
  const auto cols = taps_inside_table(output_w, input_w, pool.kernel_w, pool.stride_w, pool.padding_w, pool.dilation_w);
  // the output columns whose windows lie wholly inside the input's columns: a contiguous range
  int64_t inside_first = output_w, inside_end = output_w;
  for (int64_t ox = 0; ox < output_w; ++ox) {
    if (cols[ox].first == 0 && cols[ox].end == pool.kernel_w) {
      if (inside_first == output_w) inside_first = ox;
      inside_end = ox + 1;
    }
  }
  // strides 1 and 2 (nearly every CNN's pools) as constants: the compiler then loads the strided
  // input columns with a few shuffles
  const PoolRowFn<scalar_t> pool_row = pool.stride_w == 1   ? pool_row_inside_for_this_cpu<1, scalar_t>()
                                       : pool.stride_w == 2 ? pool_row_inside_for_this_cpu<2, scalar_t>()
                                                            : pool_row_inside_for_this_cpu<0, scalar_t>();
  const int64_t work_per_plane = output_h * output_w * pool.kernel_h * pool.kernel_w;
  at::parallel_for(0, planes, grain_for(work_per_plane), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> best(output_w);
    std::vector<int32_t> best_tap(output_w);
    for (int64_t plane = begin; plane < end; ++plane) {
      const scalar_t* in = input + plane * input_h * input_w;
      scalar_t* out = output + plane * output_h * output_w;
      uint8_t* switch_out = switches + plane * output_h * output_w;
      for (int64_t oy = 0; oy < output_h; ++oy) {
        scalar_t* out_row = out + oy * output_w;
        uint8_t* switch_row = switch_out + oy * output_w;
        pool_row(in, input_w, pool, oy, rows[oy], inside_first, inside_end, best.data(), best_tap.data(), out_row,
                 switch_row);
        const auto pool_window = [&](int64_t ox) {  // a window reaching past the left or right edge
          const auto window = geometry::window_max<scalar_t, acc_t>(in, input_h, input_w, pool, oy, ox);
          out_row[ox] = static_cast<scalar_t>(window.value);
          switch_row[ox] = static_cast<uint8_t>(window.tap);
        };
        for (int64_t ox = 0; ox < inside_first; ++ox) pool_window(ox);
        for (int64_t ox = inside_end; ox < output_w; ++ox) pool_window(ox);
      }
    }
  });
}

// `input`, `output`, `switches`: channels-last [N, H, W, C] and [N, output_h, output_w, C].
template <typename scalar_t>
void max_pool2d_switches_channels_last_kernel(const scalar_t* input, scalar_t* output, uint8_t* switches,
                                              int64_t batch, int64_t channels, int64_t input_h, int64_t input_w,
                                              int64_t output_h, int64_t output_w, const Pool2d& pool) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto rows = taps_inside_table(output_h, input_h, pool.kernel_h, pool.stride_h, pool.padding_h, pool.dilation_h);
  const auto cols = taps_inside_table(output_w, input_w, pool.kernel_w, pool.stride_w, pool.padding_w, pool.dilation_w);
  const PoolPositionFn<scalar_t> pool_position = pool_position_channels_last_for_this_cpu<scalar_t>();
  const int64_t work_per_row = output_w * channels * pool.kernel_h * pool.kernel_w;
  at::parallel_for(0, batch * output_h, grain_for(work_per_row), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> best(channels);
    std::vector<int32_t> best_tap(channels);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / output_h, oy = row % output_h;
      const scalar_t* image = input + n * input_h * input_w * channels;
      for (int64_t ox = 0; ox < output_w; ++ox) {
        const int64_t at = (row * output_w + ox) * channels;
        pool_position(image, input_w, channels, pool, oy, ox, rows[oy], cols[ox], best.data(), best_tap.data(),
                      output + at, switches + at);
      }
    }
  });
}

// Scratch memory of the fused op, kept from call to call on the calling thread, one buffer per
// kSlot of up to kKeptElements elements (16 MiB in all for float32, 32 for float64; larger ones
// are allocated per call). A fresh allocation of several MiB comes from the kernel page by page,
// each page zeroed on its first touch: that was a third of the op's time at VGG16's first block.
template <typename T, int kSlot>
class Scratch {
 public:
  static constexpr int64_t kKeptElements = int64_t(1) << 20;

  explicit Scratch(int64_t count) {
    std::vector<T>& buffer = count <= kKeptElements ? kept() : own_;
    if (static_cast<int64_t>(buffer.size()) < count) buffer.resize(count);
    data_ = buffer.data();
  }
  T* get() const { return data_; }

 private:
  static std::vector<T>& kept() {
    thread_local std::vector<T> buffer;
    return buffer;
  }
  std::vector<T> own_;
  T* data_ = nullptr;
};

// The sizes of one call of the fused op.
struct FusedShape {
  int64_t batch;
  int64_t conv_out_channels, pooled_h, pooled_w, unpooled_h, unpooled_w;  // grad and the unpooled map
  int64_t conv_in_channels, output_h, output_w;                           // the output
  int64_t groups;

  int64_t out_per_group() const { return conv_out_channels / groups; }  // planes of grad per group
  int64_t in_per_group() const { return conv_in_channels / groups; }    // planes of output per group
  int64_t pooled_area() const { return pooled_h * pooled_w; }
  int64_t unpooled_area() const { return unpooled_h * unpooled_w; }
  int64_t output_area() const { return output_h * output_w; }
};

// Unpooled values held at once (passes 1 and 2 of a chunk of samples): bounds the scratch memory
// to about 40 bytes each.
constexpr int64_t kValuesPerChunk = int64_t(1) << 20;

// Pass 2 for one (sample, group): the values of its `channels` lists regrouped by position, a
// counting sort stable in c_out (for every unpooled position, offsets[position] .. offsets[position
// + 1] of `routed` hold the (c_out, value) pairs routed there, in increasing c_out). The channels
// are split into `parts` consecutive ranges, counted and placed by parallel tasks (1: by the calling
// thread); a range's values at a position follow those of the ranges before it, so the result is
// the same for any `parts`. `part_cursors`: parts * unpooled_area scratch.
template <typename acc_t>
void regroup_by_position(const UnpooledValue<acc_t>* lists, const int64_t* list_length, int64_t channels,
                         int64_t pooled_area, int64_t unpooled_area, int64_t parts, int64_t* part_cursors,
                         int64_t* offsets, RoutedValue<acc_t>* routed) {
  const auto for_each_part = [&](auto&& f) {
    if (parts == 1) {
      f(0);
    } else {
      at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
        for (int64_t part = begin; part < end; ++part) f(part);
      });
    }
  };
  const auto first_channel = [&](int64_t part) { return part * channels / parts; };
  for_each_part([&](int64_t part) {  // values per position, per part
    int64_t* count = part_cursors + part * unpooled_area;
    std::fill(count, count + unpooled_area, 0);
    for (int64_t channel = first_channel(part); channel < first_channel(part + 1); ++channel) {
      const UnpooledValue<acc_t>* list = lists + channel * pooled_area;
      for (int64_t i = 0; i < list_length[channel]; ++i) ++count[list[i].position];
    }
  });
  int64_t total = 0;  // the counts become each part's first slot at each position
  for (int64_t position = 0; position < unpooled_area; ++position) {
    offsets[position] = total;
    for (int64_t part = 0; part < parts; ++part) {
      int64_t& cursor = part_cursors[part * unpooled_area + position];
      const int64_t count = cursor;
      cursor = total;
      total += count;
    }
  }
  offsets[unpooled_area] = total;
  for_each_part([&](int64_t part) {
    int64_t* cursor = part_cursors + part * unpooled_area;
    for (int64_t channel = first_channel(part); channel < first_channel(part + 1); ++channel) {
      const UnpooledValue<acc_t>* list = lists + channel * pooled_area;
      for (int64_t i = 0; i < list_length[channel]; ++i) {
        routed[cursor[list[i].position]++] = RoutedValue<acc_t>{static_cast<int32_t>(channel), list[i].value};
      }
    }
  });
}

// Passes 1 and 2 over chunks of samples, and pass 3 (`pass3`, GatherPass or ScatterPass) on each
// chunk's compressed rows.
template <typename Rule, typename scalar_t, typename Pass3>
void unpool_relu_deconv2d_kernel(const scalar_t* grad, const bool* positive, const uint8_t* switches,
                                 const FusedShape& shape, const Pool2d& pool, const Pass3& pass3) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t out_per_group = shape.out_per_group();
  const int64_t pooled_area = shape.pooled_area();
  const int64_t unpooled_area = shape.unpooled_area();
  const int64_t values_per_sample = std::max<int64_t>(1, shape.conv_out_channels * pooled_area);
  const int64_t chunk = std::clamp<int64_t>(kValuesPerChunk / values_per_sample, 1, shape.batch);
  // Every list may be full (no zero, no repeated position), so each plane gets pooled_area.
  Scratch<UnpooledValue<acc_t>, 0> values(chunk * shape.conv_out_channels * pooled_area);
  Scratch<RoutedValue<acc_t>, 1> routed(chunk * shape.conv_out_channels * pooled_area);
  Scratch<int64_t, 2> counts(chunk * shape.conv_out_channels);
  Scratch<int64_t, 3> offsets(chunk * shape.groups * (unpooled_area + 1));

  for (int64_t n0 = 0; n0 < shape.batch; n0 += chunk) {
    const int64_t samples = std::min(chunk, shape.batch - n0);

    collect_chunk<Rule>(grad, positive, switches, n0, samples, shape.conv_out_channels, shape.pooled_h,
                        shape.pooled_w, shape.unpooled_h, shape.unpooled_w, pool, values.get(), counts.get());

    // Pass 2: per (sample, group), the values regrouped by position.
    const int64_t work_per_group = out_per_group * pooled_area + unpooled_area;
    const int64_t threads = at::get_num_threads();
    const auto regroup = [&](int64_t sample_group, int64_t parts, int64_t* part_cursors) {
      const int64_t first_plane = sample_group * out_per_group;  // = sample * C_out + group * out_per_group
      regroup_by_position(values.get() + first_plane * pooled_area, counts.get() + first_plane, out_per_group,
                          pooled_area, unpooled_area, parts, part_cursors,
                          offsets.get() + sample_group * (unpooled_area + 1), routed.get() + first_plane * pooled_area);
    };
    if (samples * shape.groups >= threads) {
      at::parallel_for(0, samples * shape.groups, grain_for(work_per_group), [&](int64_t begin, int64_t end) {
        std::vector<int64_t> cursors(unpooled_area);
        for (int64_t sample_group = begin; sample_group < end; ++sample_group) regroup(sample_group, 1, cursors.data());
      });
    } else {
      // Fewer (sample, group)s than threads (one image at VGG16's first block): each one's channels
      // split among the threads instead.
      std::vector<int64_t> cursors(threads * unpooled_area);
      for (int64_t sample_group = 0; sample_group < samples * shape.groups; ++sample_group) {
        regroup(sample_group, threads, cursors.data());
      }
    }

    pass3(n0, samples, routed.get(), offsets.get());
  }
}

// Pass 3 by gathering: one task per (group, channel block, sample, output row); consecutive tasks
// share the block's packed weights, which then stay in L2 from one sample to the next.
// `weight_packed`: [groups, channel_blocks, kh, kw, c_out / groups, B] in the accumulate type, zero
// beyond c_in / groups (pack_weight).
template <int B, typename scalar_t>
struct GatherPass {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t* weight_packed;
  scalar_t* output;
  const FusedShape& shape;
  const Conv2d& conv;
  const TapTable rows, cols;
  const GatherRowFn<B, acc_t> gather_output_row = gather_output_row_for_this_cpu<B, acc_t>();

  GatherPass(const acc_t* weight_packed, scalar_t* output, const FusedShape& shape, const Conv2d& conv)
      : weight_packed(weight_packed),
        output(output),
        shape(shape),
        conv(conv),
        rows(shape.output_h, shape.unpooled_h, conv.kernel_h, conv.stride_h, conv.padding_h, conv.dilation_h),
        cols(shape.output_w, shape.unpooled_w, conv.kernel_w, conv.stride_w, conv.padding_w, conv.dilation_w) {}

  void operator()(int64_t n0, int64_t samples, const RoutedValue<acc_t>* routed, const int64_t* offsets) const {
    const int64_t out_per_group = shape.out_per_group(), in_per_group = shape.in_per_group();
    const int64_t output_h = shape.output_h, output_w = shape.output_w;
    const int64_t channel_blocks = (in_per_group + B - 1) / B;
    const int64_t packed_block_size = conv.kernel_h * conv.kernel_w * out_per_group * B;
    const int64_t tasks = samples * shape.groups * channel_blocks * output_h;
    const int64_t work_per_row = output_w * conv.kernel_h * conv.kernel_w * B * 4;
    at::parallel_for(0, tasks, grain_for(work_per_row), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> row(output_w * B);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t y = task % output_h;
        const int64_t sample = (task / output_h) % samples;
        const int64_t channel_block = (task / (output_h * samples)) % channel_blocks;
        const int64_t group = task / (output_h * samples * channel_blocks);
        const int64_t sample_group = sample * shape.groups + group;
        const GatherArgs<acc_t> args{routed + sample_group * out_per_group * shape.pooled_area(),
                                     offsets + sample_group * (shape.unpooled_area() + 1),
                                     weight_packed + (group * channel_blocks + channel_block) * packed_block_size,
                                     out_per_group,
                                     shape.unpooled_w,
                                     conv.kernel_w,
                                     &rows,
                                     &cols,
                                     output_w};
        gather_output_row(args, y, row.data());
        // [x, B] -> output[n, c_in, y, :] for the block's real channels, 16 positions at a time:
        // the transposed reads then stay in a few KiB of L1 instead of striding through all of `row`.
        const int64_t channels = std::min<int64_t>(B, in_per_group - channel_block * B);
        scalar_t* out = output + (((n0 + sample) * shape.conv_in_channels + group * in_per_group +
                                   channel_block * B) * output_h + y) * output_w;
        constexpr int64_t kStrip = 16;
        for (int64_t x0 = 0; x0 < output_w; x0 += kStrip) {
          const int64_t x1 = std::min(output_w, x0 + kStrip);
          for (int64_t c = 0; c < channels; ++c) {
            scalar_t* out_row = out + c * output_h * output_w;
            for (int64_t x = x0; x < x1; ++x) out_row[x] = static_cast<scalar_t>(row[x * B + c]);
          }
        }
      }
    });
  }
};

// Pass 3 by scattering filter rows (scatter_rows.h): one task per output plane (sample, c_in).
// `weight_rows`: [groups, c_in / groups, c_out / groups, kh, kw] in the accumulate type, so that
// a plane's filters are contiguous (about 30 KiB at AlexNet's conv1: they stay in L1).
template <typename scalar_t>
struct ScatterPass {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr bool in_place = std::is_same_v<acc_t, scalar_t>;  // float, double: add into the output
  const acc_t* weight_rows;
  scalar_t* output;
  const FusedShape& shape;
  const Conv2d& conv;
  const std::vector<geometry::TapRange> row_taps, col_taps;
  const ScatterPlaneFn<acc_t> scatter_plane = scatter_plane_for_this_cpu<acc_t>();

  ScatterPass(const acc_t* weight_rows, scalar_t* output, const FusedShape& shape, const Conv2d& conv)
      : weight_rows(weight_rows),
        output(output),
        shape(shape),
        conv(conv),
        row_taps(taps_inside_table(shape.unpooled_h, shape.output_h, conv.kernel_h, conv.stride_h, conv.padding_h,
                                   conv.dilation_h)),
        col_taps(taps_inside_table(shape.unpooled_w, shape.output_w, conv.kernel_w, conv.stride_w, conv.padding_w,
                                   /*dilation: 1 here, scatters_rows=*/1)) {}

  void operator()(int64_t n0, int64_t samples, const RoutedValue<acc_t>* routed, const int64_t* offsets) const {
    const int64_t out_per_group = shape.out_per_group(), in_per_group = shape.in_per_group();
    const int64_t output_area = shape.output_area();
    const int64_t filter_size = conv.kernel_h * conv.kernel_w;
    // a plane's work: about a quarter of the group's pooled values route something, each to kh rows
    const int64_t work_per_plane = out_per_group * shape.pooled_area() / 4 * conv.kernel_h;
    at::parallel_for(0, samples * shape.conv_in_channels, grain_for(work_per_plane), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch(in_place ? 0 : output_area);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t sample = task / shape.conv_in_channels;
        const int64_t in_channel = task % shape.conv_in_channels;  // = group * in_per_group + channel in group
        const int64_t sample_group = sample * shape.groups + in_channel / in_per_group;
        scalar_t* out = output + ((n0 + sample) * shape.conv_in_channels + in_channel) * output_area;
        acc_t* plane = in_place ? reinterpret_cast<acc_t*>(out) : scratch.data();
        std::fill(plane, plane + output_area, acc_t(0));
        const ScatterArgs<acc_t> args{routed + sample_group * out_per_group * shape.pooled_area(),
                                      offsets + sample_group * (shape.unpooled_area() + 1),
                                      weight_rows + in_channel * out_per_group * filter_size,
                                      shape.unpooled_h,
                                      shape.unpooled_w,
                                      row_taps.data(),
                                      col_taps.data(),
                                      conv.stride_h,
                                      conv.stride_w,
                                      conv.padding_h,
                                      conv.padding_w,
                                      conv.dilation_h,
                                      conv.kernel_h,
                                      conv.kernel_w,
                                      shape.output_w};
        scatter_plane(args, plane);
        if (!in_place) {
          for (int64_t i = 0; i < output_area; ++i) out[i] = static_cast<scalar_t>(plane[i]);
        }
      }
    });
  }
};

// Whether pass 3 scatters filter rows instead of gathering channel blocks: where a group's input
// channels would fill less than a 4-wide block (B = 1 or 4; an image's RGB) and a filter row is
// longer than that, so that a vector along the row does more useful multiply-adds than one across
// the block (dilation_w = 1: the row's taps land side by side).
bool scatters_rows(int64_t in_per_group, const Conv2d& conv) {
  return in_per_group <= 4 && conv.dilation_w == 1 && conv.kernel_w > in_per_group;
}

// Bytes of one block's packed weights (kh * kw * C_out / groups * B values) that pass 3 keeps
// re-reading, at random c_out: they should stay in the core's L2 cache (1 MiB on current x86 server
// cores), next to the compressed rows.
constexpr int64_t kWeightBlockBytes = int64_t(640) << 10;

// The width B of the channel blocks of pass 3: the whole of a small c_in / groups, else the widest
// of 64, 32 and 16 (float32: four, two, one AVX-512 registers of accumulators) whose block of
// packed weights fits kWeightBlockBytes. Wider blocks walk the compressed rows fewer times; a block
// that outgrows L2 waits on memory (measured on AlexNet's and VGG16's layers with bench/).
template <typename F>
void with_channel_block(int64_t in_per_group, int64_t block_bytes_per_channel, F&& f) {
  const auto fits = [&](int64_t b) { return b * block_bytes_per_channel <= kWeightBlockBytes; };
  if (in_per_group <= 1) {
    f(std::integral_constant<int, 1>());
  } else if (in_per_group <= 4) {
    f(std::integral_constant<int, 4>());
  } else if (in_per_group <= 8) {
    f(std::integral_constant<int, 8>());
  } else if (in_per_group <= 16 || !fits(32)) {
    f(std::integral_constant<int, 16>());
  } else if (in_per_group <= 32 || !fits(64)) {
    f(std::integral_constant<int, 32>());
  } else {
    f(std::integral_constant<int, 64>());
  }
}

// [C_out, C_in / groups, kh, kw] -> [groups, blocks, kh, kw, C_out / groups, B] in acc_t, zero
// beyond C_in / groups. A loop of its own: a 6-D permuting copy through TensorIterator took a
// third of the fused op's time at VGG16's last block. Each task reads one filter's B channels
// (B * kh * kw contiguous values, from L1 after the first tap) and writes B contiguous values per tap.
template <int B, typename scalar_t>
at::Tensor pack_weight(const at::Tensor& weight, int64_t groups) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::Tensor weight_oihw = weight.contiguous();
  const int64_t out_per_group = weight.size(0) / groups;
  const int64_t in_per_group = weight.size(1);
  const int64_t taps = weight.size(2) * weight.size(3);
  const int64_t blocks = (in_per_group + B - 1) / B;
  at::Tensor packed = at::empty({groups, blocks, weight.size(2), weight.size(3), out_per_group, B},
                                weight.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  const scalar_t* source = weight_oihw.const_data_ptr<scalar_t>();
  acc_t* target = packed.mutable_data_ptr<acc_t>();
  // one task per (group, block, c_out)
  at::parallel_for(0, groups * blocks * out_per_group, grain_for(B * taps), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t channel = task % out_per_group;
      const int64_t block = (task / out_per_group) % blocks;
      const int64_t group = task / (out_per_group * blocks);
      const int64_t lanes = std::min<int64_t>(B, in_per_group - block * B);
      const scalar_t* filter = source + ((group * out_per_group + channel) * in_per_group + block * B) * taps;
      acc_t* out = target + ((group * blocks + block) * taps * out_per_group + channel) * B;
      for (int64_t tap = 0; tap < taps; ++tap) {
        acc_t* tap_out = out + tap * out_per_group * B;
        for (int64_t lane = 0; lane < lanes; ++lane) tap_out[lane] = static_cast<acc_t>(filter[lane * taps + tap]);
        for (int64_t lane = lanes; lane < B; ++lane) tap_out[lane] = acc_t(0);
      }
    }
  });
  return packed;
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
  // Outputs in the input's memory format, as PyTorch's max_pool2d. Short NCHW rows leave the row
  // loop's vectors mostly empty (6 outputs a row at AlexNet's pool5): with channels enough to fill
  // them, such an input is pooled channels-last through a transposed copy (4x faster there).
  const bool channels_last = input.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  if (input.size(0) == 0 || input.size(1) == 0) {  // no outputs: in the input's format, as max_pool2d's
    const auto input_format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
    const std::vector<int64_t> shape = {input.size(0), input.size(1), output_h, output_w};
    return {at::empty(shape, input.options().memory_format(input_format)),
            at::empty(shape, input.options().dtype(at::kByte).memory_format(input_format))};
  }
  const bool pool_channels_last = channels_last || (output_w < kShortRow && input.size(1) >= kChannelsToFill);
  const auto format = pool_channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor output =
      at::empty({input.size(0), input.size(1), output_h, output_w}, input.options().memory_format(format));
  at::Tensor switches = at::empty_like(output, output.options().dtype(at::kByte));
  const at::Tensor input_contiguous = input.contiguous(format);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "max_pool2d_switches", [&] {
    if (pool_channels_last) {
      max_pool2d_switches_channels_last_kernel<scalar_t>(
          input_contiguous.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(),
          switches.mutable_data_ptr<uint8_t>(), input.size(0), input.size(1), input.size(2), input.size(3), output_h,
          output_w, pool);
    } else {
      max_pool2d_switches_kernel<scalar_t>(input_contiguous.const_data_ptr<scalar_t>(),
                                           output.mutable_data_ptr<scalar_t>(), switches.mutable_data_ptr<uint8_t>(),
                                           input.size(0) * input.size(1), input.size(2), input.size(3), output_h,
                                           output_w, pool);
    }
  });
  if (pool_channels_last && !channels_last) {
    return {output.contiguous(), switches.contiguous()};
  }
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
  // The lists of passes 1 and 2 name a channel within its group and a position within a plane in
  // 32 bits (half the memory traffic of 64).
  TORCH_CHECK(weight.size(0) / groups <= std::numeric_limits<int32_t>::max() &&
                  input_size[0] * input_size[1] <= std::numeric_limits<int32_t>::max(),
              "unpool_relu_deconv2d: on the CPU, weight.size(0) / groups and input_size[0] * input_size[1] must be "
              "below 2^31, got ", weight.size(0) / groups, " and ", input_size[0] * input_size[1],
              "; use unpool_relu and deconv2d for such a layer");
  const at::Tensor grad_nchw = grad.contiguous();
  const at::Tensor switches_nchw = switches.contiguous();
  const checks::Mask mask(positive);
  const FusedShape shape{grad.size(0),    grad.size(1),   grad.size(2),    grad.size(3),    input_size[0],
                         input_size[1],   conv_in_channels, output_size[0], output_size[1], groups};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "unpool_relu_deconv2d", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto run = [&](const auto& pass3) {
      rules::dispatch_rule(geometry.rule, mask.present(), [&](auto rule_type) {
        unpool_relu_deconv2d_kernel<decltype(rule_type), scalar_t>(grad_nchw.const_data_ptr<scalar_t>(), mask.data(),
                                                                   switches_nchw.const_data_ptr<uint8_t>(), shape,
                                                                   geometry.pool, pass3);
      });
    };
    if (scatters_rows(shape.in_per_group(), geometry.conv)) {
      // [C_out, C_in / groups, kh, kw] -> [groups, C_in / groups, C_out / groups, kh, kw] in acc_t
      const at::Tensor weight_rows = weight.to(c10::CppTypeToScalarType<acc_t>::value)
                                         .view({groups, shape.out_per_group(), shape.in_per_group(), weight.size(2),
                                                weight.size(3)})
                                         .transpose(1, 2)
                                         .contiguous();
      run(ScatterPass<scalar_t>(weight_rows.const_data_ptr<acc_t>(), output.mutable_data_ptr<scalar_t>(), shape,
                                geometry.conv));
      return;
    }
    const int64_t block_bytes_per_channel =
        weight.size(2) * weight.size(3) * shape.out_per_group() * static_cast<int64_t>(sizeof(acc_t));
    with_channel_block(shape.in_per_group(), block_bytes_per_channel, [&](auto block) {
      constexpr int B = decltype(block)::value;
      const at::Tensor weight_packed = pack_weight<B, scalar_t>(weight, groups);
      run(GatherPass<B, scalar_t>(weight_packed.const_data_ptr<acc_t>(), output.mutable_data_ptr<scalar_t>(), shape,
                                  geometry.conv));
    });
  });
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(deconvcuda, CPU, m) {
  m.impl("max_pool2d_switches", TORCH_FN(max_pool2d_switches_cpu));
  m.impl("unpool_relu", TORCH_FN(unpool_relu_cpu));
  m.impl("deconv2d", TORCH_FN(checks::deconv2d));
  m.impl("unpool_relu_deconv2d", TORCH_FN(unpool_relu_deconv2d_cpu));
}

}  // namespace ops
}  // namespace deconvcuda
