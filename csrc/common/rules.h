// The reverse rules of the ReLU that precedes a max pool (docs/DESIGN.md, section 1), as compile-time policy
// types shared by the CPU and CUDA kernels.
//
// At an unpooled position i the kernels compute s_i = sum over the pooled values w whose switch
// selects i of g_w * m_w, then finish(s_i):
//   "deconvnet"  m_w = 1, finish = relu         (the forward mask is ignored: the paper's rule)
//   "guided"     m_w = positive[w], finish = relu
//   "gradient"   m_w = positive[w], finish = identity (with m_w = 1: max_pool2d's backward)
// positive[w] says whether the pool's forward output at w was > 0, which at the switch is whether
// the ReLU before the pool let its input through. m_w = 0 drops g_w (as ReLU's backward selects
// zero, so a NaN gradient there gives 0, not NaN). Where the caller has no mask (positive=None),
// "guided" and "gradient" run with m_w = 1.
//
// A rule is a template parameter of the one kernel of each op, chosen once per call next to the
// dtype dispatch (dispatch_rule below), so the inner loops carry no branch on the rule.
#pragma once

#include <cstdint>

#include "common/geometry.h"

namespace deconvcuda {
namespace rules {

enum class RuleKind { kDeconvnet, kGuided, kGradient };

template <bool kMasked, bool kRectifies>
struct Rule {
  // Whether the kernel must read `positive` (and so be given one).
  static constexpr bool masked = kMasked;
  static constexpr bool rectifies = kRectifies;

  // Whether pooled value `index` is routed at all: false where the mask drops it.
  DECONV_HOST_DEVICE static bool routes(const bool* positive, int64_t index) {
    if constexpr (kMasked) {
      return positive[index];
    } else {
      (void)positive;
      (void)index;
      return true;
    }
  }

  // The value of an unpooled position from its sum.
  template <typename acc_t>
  DECONV_HOST_DEVICE static acc_t finish(acc_t sum) {
    if constexpr (kRectifies) {
      return geometry::rectify(sum);
    } else {
      return sum;
    }
  }
};

using Deconvnet = Rule<false, true>;     // also "guided" without a mask
using Guided = Rule<true, true>;
using Gradient = Rule<true, false>;
using PoolGradient = Rule<false, false>;  // "gradient" without a mask: max_pool2d's backward

// Calls f(Rule{}) with the policy of `kind`; `masked` says whether the caller passed `positive`.
template <typename F>
void dispatch_rule(RuleKind kind, bool masked, F&& f) {
  switch (kind) {
    case RuleKind::kDeconvnet:
      f(Deconvnet{});
      return;
    case RuleKind::kGuided:
      if (masked) {
        f(Guided{});
      } else {
        f(Deconvnet{});
      }
      return;
    case RuleKind::kGradient:
      if (masked) {
        f(Gradient{});
      } else {
        f(PoolGradient{});
      }
      return;
  }
}

}  // namespace rules
}  // namespace deconvcuda
