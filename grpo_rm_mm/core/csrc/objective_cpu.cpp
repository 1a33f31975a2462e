// The fused GRPO-RM objective on the CPU: for a range of queries, the loss terms, the
// diagnostics' sums and the closed-form gradient with respect to the logits, in one call
// (five passes over each query's outputs, see group()). The formulas are those of
// grpo_rm_mm/core/fused.py (its module docstring), for the 'uniform' and 'pi_old' group
// weightings, the 'clip' and 'dual_clip' surrogates, the registered accuracy, uniformity and
// confidence-penalty rewards, query weights, a valid mask, an ignore index, pi_ref with a KL
// coefficient and both advantage conventions.
//
// Layout: logits, pi_old and pi_ref logits and the gradient are contiguous (B, C, S) arrays;
// labels (int64), the valid mask (uint8) and query weights are contiguous (B, S). Queries are
// (b, s) in that order. A query's C outputs are S elements apart (S == 1: adjacent).
//
// Every per-output step is vectorised: across a tile of queries copied into (C, T) scratch
// arrays (the tile layout), or across one query's outputs where they are adjacent and many
// (the row layout); see group(). The exponential is a branch-free polynomial for that reason.
// Nothing is checked here: the Python caller validates the arguments once
// (grpo_rm_mm/core/native.py) and chooses the layout. What the data can make wrong is
// reported, not raised: a counted label outside [0, C) and a non-finite input value set
// flags, and the caller then hands the call to the reference implementation, which raises
// the error.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>


// The build compiles this file once per instruction set (setup.py): GRPO_VECTOR_BYTES is the
// width of its vectors (16: SSE2 / NEON, 32: AVX2, 64: AVX-512) and GRPO_MODULE the module's
// name; grpo_rm_mm/core/native.py imports the widest one the CPU runs. (One vector width for
// every target, or GCC's target_clones, leaves the narrower targets several times slower:
// vectors wider than the registers are split through memory.)
#ifndef GRPO_VECTOR_BYTES
#define GRPO_VECTOR_BYTES 16
#endif
#ifndef GRPO_MODULE
#define GRPO_MODULE _objective_cpu
#endif
#define GRPO_STR2(x) #x
#define GRPO_STR(x) GRPO_STR2(x)
#define GRPO_CAT2(a, b) a##b
#define GRPO_CAT(a, b) GRPO_CAT2(a, b)
#define GRPO_INLINE inline __attribute__((always_inline))
#define GRPO_INLINE_LAMBDA __attribute__((always_inline))

namespace {

enum Weighting { kUniform = 0, kPiOld = 1 };
enum Surrogate { kClip = 0, kDualClip = 1 };
constexpr double kLogRatioClamp = 20.0;  // LOG_RATIO_CLAMP of objective.py
// how far inside the clamp, and above the smallest normal probability, a log ratio and a log
// probability must be for the ratio to be taken as p / p_old
constexpr double kRatioMargin = 0.5;
constexpr int kStats = 8;  // loss, reward, |A|, clipped, kl, kl_old, entropy, correct

struct Problem {
  const void* z;
  const void* old;     // nullptr: pi_old is the current policy (ratio 1)
  const void* ref;     // nullptr: no pi_ref
  const int64_t* y;
  const uint8_t* valid;  // nullptr: every query
  const void* weight;    // nullptr: u = 1
  void* grad;
  int64_t C, S;
  int rows;  // one query at a time, vectorised across its outputs (S == 1 only)
  int has_ignore;
  int64_t ignore_index;
  int weighting, surrogate;
  double eps_low, eps_high, dual_c, beta;
  int adv_unbiased, adv_scale_none;
  double adv_eps;
  double r_acc, r_uni, r_conf;  // reward coefficients (0: reward absent)
  double kappa;                 // -1 / n_valid: the loss's factor per query
  int diagnostics;
};

struct Sums {
  double stats[kStats] = {0, 0, 0, 0, 0, 0, 0, 0};
  int bad_label = 0;
  int nonfinite = 0;
};

// Vectors of the compute type (GCC vector extensions, one register wide), with the integer
// vector of the same lanes that comparisons give.
template <typename R>
struct Simd;
template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(GRPO_VECTOR_BYTES)));
  typedef int32_t M __attribute__((vector_size(GRPO_VECTOR_BYTES)));
  static constexpr int W = GRPO_VECTOR_BYTES / 4;
};
template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(GRPO_VECTOR_BYTES)));
  typedef int64_t M __attribute__((vector_size(GRPO_VECTOR_BYTES)));
  static constexpr int W = GRPO_VECTOR_BYTES / 8;
};

// exp(x) per lane, for x <= 88 (every argument here is a logit minus its group's maximum or a
// log ratio clamped to +-20; a lane past C may hold more, and its result is masked out).
// float: Cephes' expf (range reduction by ln 2 in two parts, degree-6 polynomial, about 1 ulp),
// branch-free, with 2^n applied as two factors so that results down to the subnormal range
// (x >= -103.9) are kept; double: the C library's exp.
GRPO_INLINE Simd<float>::V vexp(Simd<float>::V x) {
  using V = Simd<float>::V;
  using M = Simd<float>::M;
  const V lo = V{} - 104.0f;
  x = x < lo ? lo : x;
  const V shifter = V{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  V kf = x * 1.44269504088896341f + shifter;
  const M ki = (M)kf - 0x4B400000;      // the integer, from the bits
  kf -= shifter;
  V r = x - kf * 0.693359375f;
  r = r - kf * -2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const M k1 = ki >> 1, k2 = ki - k1;
  return p * (V)((k1 + 127) << 23) * (V)((k2 + 127) << 23);
}

GRPO_INLINE Simd<double>::V vexp(Simd<double>::V x) {
  for (int i = 0; i < Simd<double>::W; ++i) x[i] = std::exp(x[i]);
  return x;
}

template <typename V>
GRPO_INLINE V vmax(V a, V b) { return a > b ? a : b; }
template <typename V>
GRPO_INLINE V vmin(V a, V b) { return a < b ? a : b; }
template <typename V>
GRPO_INLINE V vabs(V a) { return a < 0 ? -a : a; }

// A 64-byte aligned array of n vectors (std::vector would not keep the vectors' alignment:
// GCC drops the attribute of a vector typedef used as a template argument).
template <typename V>
struct Aligned {
  V* ptr;
  explicit Aligned(int64_t n)
      : ptr(static_cast<V*>(std::aligned_alloc(GRPO_VECTOR_BYTES < 64 ? 64 : GRPO_VECTOR_BYTES, std::max<int64_t>(n, 1) * sizeof(V)))) {
    if (ptr == nullptr) throw std::bad_alloc();
  }
  ~Aligned() { std::free(ptr); }
  Aligned(const Aligned&) = delete;
  Aligned& operator=(const Aligned&) = delete;
  V* data() const { return ptr; }
};

// ---------------------------------------------------------------------------------------------
// Two layouts, one set of formulas (group()):
//
// * tiles: a tile of T = J W queries is copied into (C, J) arrays of vectors, a vector holding
//   one output of W queries; a group is one lane of vector column j, and a reduction over its
//   outputs is a sum of vectors over k, each lane its own query's;
// * rows (S == 1 with many outputs, where a tile would leave the L1 cache and its transposes
//   cost more than the arithmetic): one query's C outputs are CV vectors read from its rows,
//   the last holding C - (CV - 1) W of them (its other lanes masked out of every reduction);
//   a reduction over the group is a horizontal one, splat to every lane.
//
// Per group, five passes over the outputs: maxima (and the extremes that decide how the ratio
// is computed); exponentials (with the sums of the softmax and the rewards' wrong-class mass);
// rewards and their extremes and weighted mean; advantages in units of their scale with the
// surrogate, its gradient and the variance (the scale, 1 / (std + eps), multiplies the
// surrogate's terms afterwards: the clip's comparisons do not depend on it); the gradient
// through the log-softmax.

template <typename V>
GRPO_INLINE auto hsum(V v) {
  auto s = v[0];
  for (int i = 1; i < int(sizeof(V) / sizeof(s)); ++i) s += v[i];
  return s;
}
template <typename V>
GRPO_INLINE auto hmax(V v) {
  auto s = v[0];
  for (int i = 1; i < int(sizeof(V) / sizeof(s)); ++i) s = s > v[i] ? s : v[i];
  return s;
}
template <typename V>
GRPO_INLINE auto hmin(V v) {
  auto s = v[0];
  for (int i = 1; i < int(sizeof(V) / sizeof(s)); ++i) s = s < v[i] ? s : v[i];
  return s;
}

// Scratch arrays: logits of z, pi_old, pi_ref (the tile layout's copies); exponentials of z
// and pi_old; rewards; the surrogate's gradient and the KL's.
template <typename R>
struct Scratch {
  using V = typename Simd<R>::V;
  Aligned<V> xz, xo, xr, ez, eo, r, g, gkl;
  explicit Scratch(int64_t n) : xz(n), xo(n), xr(n), ez(n), eo(n), r(n), g(n), gkl(n) {}
};

// Where a group's outputs are in the scratch arrays, and how a reduction over them is done.
template <typename R, bool kRows>
struct Layout {
  using V = typename Simd<R>::V;
  using M = typename Simd<R>::M;
  static constexpr int W = Simd<R>::W;
  int64_t n;       // vectors per group: C (tiles), CV (rows)
  int64_t stride;  // tiles: J
  int64_t j;       // tiles: the group's vector column
  M tail{};        // rows: the last vector's lanes below C
  V lane{};        // rows: 0, 1, ..., W - 1
  int64_t tail_n = 0;                    // rows: C - (n - 1) W
  const R* in_row[3] = {};               // rows: the query's z, pi_old, pi_ref logits
  V in_last[3] = {};                     // rows: their last vectors, 0 past C
  R* grad_row = nullptr;                 // rows: the query's gradient

  // body(e, k, last) for the group's vectors: e its index in the arrays, k its output (tiles)
  // or vector (rows) index, last a std::bool_constant marking the masked final vector.
  template <typename F>
  GRPO_INLINE void each(F&& body) const {
    if constexpr (kRows) {
      for (int64_t k = 0; k + 1 < n; ++k) body(k, k, std::false_type{});
      body(n - 1, n - 1, std::true_type{});
    } else {
      for (int64_t k = 0; k < n; ++k) body(k * stride + j, k, std::false_type{});
    }
  }
  // v, or fill on the lanes past C of the last vector
  template <typename Last>
  GRPO_INLINE V masked(V v, V fill, Last) const {
    if constexpr (Last::value) return tail ? v : fill;
    return v;
  }
  template <typename Last>
  GRPO_INLINE M masked(M m, Last) const {
    if constexpr (Last::value) return m & tail;
    return m;
  }
  GRPO_INLINE V sum(V v) const {
    if constexpr (kRows) return V{} + hsum(v);
    return v;
  }
  GRPO_INLINE V max(V v) const {
    if constexpr (kRows) return V{} + hmax(v);
    return v;
  }
  GRPO_INLINE V min(V v) const {
    if constexpr (kRows) return V{} + hmin(v);
    return v;
  }
  // input I (0: z, 1: pi_old, 2: pi_ref) at e: tiles, from the scratch array x; rows, read
  // from the query's row (its last vector from in_last)
  template <int I, typename Last>
  GRPO_INLINE V input(const V* x, int64_t e, Last) const {
    if constexpr (!kRows) {
      return x[e];
    } else if constexpr (Last::value) {
      return in_last[I];
    } else {
      V v;
      std::memcpy(&v, in_row[I] + e * W, sizeof(V));
      return v;
    }
  }
  // the gradient at e: tiles, into the scratch array g; rows, into the query's gradient row
  template <typename Last>
  GRPO_INLINE void output(V* g, int64_t e, V v, Last) const {
    if constexpr (!kRows)
      g[e] = v;
    else
      std::memcpy(grad_row + e * W, &v, (Last::value ? tail_n : W) * sizeof(R));
  }
  // the output index of each lane of vector k
  GRPO_INLINE V output(int64_t k) const {
    if constexpr (kRows) return lane + R(k * W);
    return V{} + R(k);
  }
};

// One vector of groups (tiles: W queries; rows: one query): its loss terms, diagnostics' sums
// and gradient (into w.g). y: labels (class 0 for the uncounted), u: query weights (0 for the
// uncounted), counted: 1 / 0 per lane.
template <typename R, bool kRows, bool kOld, bool kDiagnostics>
GRPO_INLINE void group(const Problem& P, Scratch<R>& w, const Layout<R, kRows>& L,
                       typename Simd<R>::V yv, typename Simd<R>::V u,
                       typename Simd<R>::V counted, Sums& out, double sums[kStats]) {
  using V = typename Simd<R>::V;
  using M = typename Simd<R>::M;
  constexpr int W = Simd<R>::W;
  constexpr int kLanes = kRows ? 1 : W;  // distinct groups in a vector
  const int64_t C = P.C;
  constexpr bool old_given = kOld, diagnostics = kDiagnostics;
  const bool ref_given = P.ref != nullptr;
  const bool pi_old = P.weighting == kPiOld, dual = P.surrogate == kDualClip;
  const bool dense_reward = P.r_uni != 0 || P.r_conf != 0;
  const bool kl_grad = ref_given && P.beta > 0;
  const R inf = std::numeric_limits<R>::infinity();
  const R tiny = std::numeric_limits<R>::min();
  const R eps = std::numeric_limits<R>::epsilon();
  const V zero = V{}, one = V{} + R(1), ninf = zero - inf, pinf = zero + inf;
  const V* const xz = w.xz.data();
  const V* const xo = w.xo.data();
  const V* const xr = w.xr.data();
  auto in_z = [&](int64_t e, auto last) { return L.template input<0>(xz, e, last); };
  auto in_o = [&](int64_t e, auto last) { return L.template input<1>(xo, e, last); };
  auto in_r = [&](int64_t e, auto last) { return L.template input<2>(xr, e, last); };
  V* const ez = w.ez.data();
  V* const eo = old_given ? w.eo.data() : ez;  // pi_old's exponentials
  V* const r = w.r.data();
  V* const g = w.g.data();
  V* const gkl = w.gkl.data();

  // maxima, and the finite test (x * 0 is NaN for a NaN or infinite x)
  V mz = ninf, mo = ninf, mr = ninf, chk = zero;
  V dmax = ninf, dmin = pinf, nz = pinf, no = pinf;  // extremes of z - z_old, z and z_old
  L.each([&](int64_t e, int64_t, auto last) {
    const V x = in_z(e, last);
    chk += x * R(0);
    mz = vmax(mz, L.masked(x, ninf, last));
    if (old_given) {
      const V xk = in_o(e, last);
      chk += xk * R(0);
      mo = vmax(mo, L.masked(xk, ninf, last));
      const V d = x - xk;
      dmax = vmax(dmax, L.masked(d, ninf, last));
      dmin = vmin(dmin, L.masked(d, pinf, last));
      nz = vmin(nz, L.masked(x, pinf, last));
      no = vmin(no, L.masked(xk, pinf, last));
    }
    if (ref_given) {
      const V xk = in_r(e, last);
      chk += xk * R(0);
      mr = vmax(mr, L.masked(xk, ninf, last));
    }
  });
  chk = L.sum(chk);
  for (int i = 0; i < kLanes; ++i) out.nonfinite |= chk[i] != R(0);
  mz = L.max(mz);
  mo = old_given ? L.max(mo) : mz;
  mr = L.max(mr);

  // exponentials, the softmax sums and the wrong-class mass of pi_old (the rewards')
  V tz = zero, to = zero, tr = zero, mass = zero;
  L.each([&](int64_t e, int64_t k, auto last) {
    const V ezk = L.masked(vexp(in_z(e, last) - mz), zero, last);
    ez[e] = ezk;
    tz += ezk;
    V eok = ezk;
    if (old_given) {
      eok = L.masked(vexp(in_o(e, last) - mo), zero, last);
      eo[e] = eok;
      to += eok;
    }
    if (ref_given) tr += L.masked(vexp(in_r(e, last) - mr), zero, last);
    if (dense_reward) mass += L.output(k) == yv ? zero : eok;
  });
  tz = L.sum(tz);
  to = old_given ? L.sum(to) : tz;
  tr = L.sum(tr);
  // log p = (x - max) - log(sum), p = e / sum (by the reciprocal), per lane
  V lz, inv_z, lo, inv_o, lr;
  for (int i = 0; i < W; ++i) {
    lz[i] = std::log(tz[i]);
    lo[i] = old_given ? std::log(to[i]) : lz[i];
    lr[i] = ref_given ? std::log(tr[i]) : R(0);
  }
  inv_z = one / tz;
  inv_o = old_given ? one / to : inv_z;
  // whether every ratio of the vector's groups can be taken from the probabilities: each
  // log ratio (z_i - z_old_i) - c, c = (max z - max z_old) + (log sum_z - log sum_old), inside
  // the log-ratio clamp, and both probabilities normal (log p_i above log of the smallest
  // normal), each with a margin for the rounding of the two ways of computing them
  bool from_probs = true;
  if (old_given) {
    const V c = (mz - mo) + (lz - lo);
    const V lr_in = V{} + R(kLogRatioClamp - kRatioMargin);
    const V lp_min = V{} + R(std::log(std::numeric_limits<R>::min()) + kRatioMargin);
    const M in = (L.max(dmax) - c <= lr_in) & (L.min(dmin) - c >= -lr_in) &
                 ((L.min(nz) - mz) - lz >= lp_min) & ((L.min(no) - mo) - lo >= lp_min);
    for (int i = 0; i < W; ++i) from_probs &= in[i] != 0;
  }

  // rewards from pi_old (into r), their extremes and their mean under the group weights.
  // The uniformity reward divides by the wrong-class mass (not by its reciprocal) so that
  // p / mass is exactly 1 where the reference's is (C = 2: a flat group).
  V base_uni = zero, den = one;
  if (dense_reward) {
    mass = L.sum(mass) * inv_o;
    base_uni = mass > 0 ? V{} + R(1) / R(C - 1) : zero;
    den = vmax(mass, V{} + tiny);
  }
  const R cu = R(P.r_uni), cc = R(P.r_conf), ca = R(P.r_acc);
  V rmax = ninf, rmin = pinf, total = zero, wsum = zero, high = ninf, low = pinf, rq = zero;
  L.each([&](int64_t e, int64_t k, auto last) {
    const V o = eo[e] * inv_o;
    const M is_y = L.output(k) == yv;
    V rk = zero;
    if (dense_reward) rk = is_y ? zero : (base_uni - o / den) * cu - o * cc;
    rk = is_y ? rk + ca : rk;
    r[e] = rk;
    rmax = vmax(rmax, L.masked(rk, ninf, last));
    rmin = vmin(rmin, L.masked(rk, pinf, last));
    rq += o * rk;
    if (pi_old) {
      // the flat test over the outputs with weight only (those past C have none)
      total += o;
      high = (o > 0) & (rk > high) ? rk : high;
      low = (o > 0) & (rk < low) ? rk : low;
    } else {
      wsum += L.masked(rk, zero, last);
    }
  });
  rmax = L.max(rmax);
  rmin = L.min(rmin);
  rq = L.sum(rq);
  V mean;
  M flat;
  if (pi_old) {
    total = L.sum(total);
    const M empty = total <= 0;
    total = empty ? one : total;
    mean = rq / total;
    flat = empty | (L.max(high) <= L.min(low));
  } else {
    mean = L.sum(wsum) * R(1.0 / double(C));
    flat = rmax <= rmin;
  }
  // advantages in units of their scale: (r - mean) / max|r - mean| (adv_scale 'none': r - mean)
  V mag = vmax(rmax - mean, mean - rmin);
  mag = mag > 0 ? mag : one;
  const V unit_mul = P.adv_scale_none ? one : one / mag;

  // the surrogate s_i and g_i = kappa u w_i d s_i / d log p_i in units of the scale (the KL's
  // gradient separately), the variance and the per-group sums. Where every group of the
  // vector has its ratios inside the log-ratio clamp (which then passes the gradient
  // everywhere) and its probabilities normal (from_probs), the ratio comes from the
  // probabilities: p_i / p_old_i, a division instead of an exponential, and under the pi_old
  // weights not even that (w_i ratio_i = p_i); otherwise the pass takes
  // exp(clamp(log p_i - log p_old_i)), as the reference computes it. A flat group's advantages
  // are 0: every output is unclipped.
  const V kq = u * R(P.kappa);
  const V wt_uniform = V{} + R(1.0 / double(C));
  const V clip_lo = V{} + (R(1) - R(P.eps_low)), clip_hi = V{} + (R(1) + R(P.eps_high));
  const V lr_lo = V{} - R(kLogRatioClamp), lr_hi = V{} + R(kLogRatioClamp);
  const R dual_c = R(P.dual_c), beta = R(P.beta);
  struct Pass {
    V var, sumw2, per_query, g_sum, gkl_sum, active_sum, adv_abs, kl, kl_old, ent, top, top_k;
  };
  auto surrogate = [&](auto from_probs) GRPO_INLINE_LAMBDA -> Pass {
    constexpr bool kFromProbs = decltype(from_probs)::value;
    V var = zero, sumw2 = zero, per_query = zero, g_sum = zero, gkl_sum = zero,
      active_sum = zero, adv_abs = zero, kl = zero, kl_old = zero, ent = zero, top = ninf,
      top_k = zero;
    L.each([&](int64_t e, int64_t k, auto last) {
      const V unit = (r[e] - mean) * unit_mul;
      const V p = ez[e] * inv_z;
      const V o = eo[e] * inv_o;
      const V wt = L.masked(pi_old ? o : wt_uniform, zero, last);
      if (pi_old) {
        var += unit * unit * o;
        sumw2 += o * o;
      } else {
        var += L.masked(unit * unit, zero, last);
      }
      V gk, sw;  // sw: the weighted surrogate w_i s_i
      if (!old_given) {
        // ratio 1: nothing is clipped, s = A and d s / d log p = A
        sw = wt * unit;
        gk = sw * kq;
      } else {
        // x = scale ratio_i: under the pi_old weights, with the ratio from the probabilities,
        // the weighted ratio w_i ratio_i = p_i (scale p_old_i, no division); otherwise the
        // ratio itself (scale 1), weighted afterwards
        const bool weighted = kFromProbs && pi_old;
        V x, scale = one;
        M passes = ~M{};
        if (weighted) {
          x = p;
          scale = o;
        } else if constexpr (kFromProbs) {
          x = L.masked(p / o, one, last);  // 0 / 0 past C
        } else {
          const V lratio = ((in_z(e, last) - mz) - lz) - ((in_o(e, last) - mo) - lo);
          const V cl = vmin(vmax(lratio, lr_lo), lr_hi);
          x = vexp(cl);
          passes = cl == lratio;  // the log ratio passes the gradient only inside its clamp
        }
        const V unclipped = x * unit;
        const V in_clip = vmin(vmax(x, scale * clip_lo), scale * clip_hi);
        V s = vmin(unclipped, in_clip * unit);
        // the unclipped branch is active iff (x - clip(x)) A <= 0
        M active = ((x - in_clip) * unit <= 0) | flat;
        if (dual) {
          // the floor scale c A where A < 0: below it, no gradient and s = scale c A
          const V floor = scale * unit * dual_c;
          const M below = (unit < 0) & (floor > s) & ~flat;
          active = active & ~below;
          s = below ? floor : s;
        }
        active = L.masked(active, last);
        active_sum += active ? one : zero;
        gk = active & passes ? (weighted ? unclipped : unclipped * wt) * kq : zero;
        sw = weighted ? s : wt * s;
      }
      per_query += sw;
      g[e] = gk;
      g_sum += gk;
      if (ref_given || diagnostics) {
        const V lp = (in_z(e, last) - mz) - lz;
        if (ref_given) {
          const V pd = (lp - ((in_r(e, last) - mr) - lr)) * p;
          kl += pd;
          if (kl_grad) {
            const V gkk = (pd + p) * kq * (-beta);
            gkl[e] = gkk;
            gkl_sum += gkk;
          }
        }
        if (diagnostics) {
          adv_abs += L.masked(vabs(unit), zero, last);
          ent -= p * lp;
          // the first output of the largest log-probability (torch.argmax's choice)
          const V lpk = L.masked(lp, ninf, last);
          const M better = lpk > top;
          top = better ? lpk : top;
          top_k = better ? L.output(k) : top_k;
          if (old_given) kl_old += (lp - ((in_o(e, last) - mo) - lo)) * p;
        }
      }
    });
    return Pass{var, sumw2, per_query, g_sum, gkl_sum, active_sum, adv_abs, kl, kl_old, ent,
                top, top_k};
  };
  // the exact pass out of line: it is rare, and inlined it would cost the common one registers
  auto exact = [&]() __attribute__((noinline)) { return surrogate(std::false_type{}); };
  const Pass acc = from_probs ? surrogate(std::true_type{}) : exact();

  // the scale of the advantages: 1 / (std + eps / mag) under the group weights
  const V var = L.sum(acc.var), sumw2 = L.sum(acc.sumw2);
  V scale = zero;
  for (int i = 0; i < W; ++i) {
    R v;
    if (pi_old) {
      v = var[i] / total[i];
      if (P.adv_unbiased) {
        const R ess = R(1) / sumw2[i];  // Kish's effective sample size
        v = v * ess / std::max(ess - R(1), eps);
      }
    } else {
      v = var[i] * R(1.0 / double(C));
      if (P.adv_unbiased) v = v * (R(C) / std::max(R(C - 1), eps));
    }
    scale[i] = flat[i] != 0 ? R(0)
               : P.adv_scale_none ? R(1)
                                  : R(1) / (std::sqrt(v) + R(P.adv_eps) / mag[i]);
  }

  // through the log-softmax: dz_k = g_k - p_k sum_i g_i
  const V gsum = L.sum(acc.g_sum) * scale + L.sum(acc.gkl_sum);
  L.each([&](int64_t e, int64_t, auto last) {
    V d = g[e] * scale;
    if (kl_grad) d += gkl[e];
    L.output(g, e, d - ez[e] * inv_z * gsum, last);
  });

  const V kl = L.sum(acc.kl);
  V lq = -(L.sum(acc.per_query) * scale);
  if (kl_grad) lq += kl * beta;
  lq *= u;
  V arg_k = acc.top_k, adv_abs = zero, active_sum = zero, kl_old = zero, ent = zero;
  if (diagnostics) {
    adv_abs = L.sum(acc.adv_abs) * scale;
    active_sum = L.sum(acc.active_sum);
    kl_old = L.sum(acc.kl_old);
    ent = L.sum(acc.ent);
    if constexpr (kRows) {
      const V best = L.max(acc.top);
      arg_k = L.min(acc.top == best ? acc.top_k : pinf);
    }
  }
  for (int i = 0; i < kLanes; ++i) {
    sums[0] += double(lq[i]);
    if (counted[i] == 0) continue;
    sums[4] += double(kl[i]);
    if (!diagnostics) continue;
    sums[1] += double(rq[i]);
    sums[2] += double(adv_abs[i]);
    sums[3] += old_given ? double(R(C) - active_sum[i]) : 0.0;
    sums[5] += double(kl_old[i]);
    sums[6] += double(ent[i]);
    sums[7] += arg_k[i] == yv[i] ? 1.0 : 0.0;
  }
}

// body(old_given, diagnostics) with the call's flags as std::bool_constant: group() is
// compiled for each combination (the common calls, first updates with diagnostics and inner
// steps without, then have no branch on them in their loops).
template <typename F>
GRPO_INLINE void with_flags(const Problem& P, F&& body) {
  const bool old_given = P.old != nullptr;
  if (old_given && P.diagnostics)
    body(std::true_type{}, std::true_type{});
  else if (old_given)
    body(std::true_type{}, std::false_type{});
  else if (P.diagnostics)
    body(std::false_type{}, std::true_type{});
  else
    body(std::false_type{}, std::false_type{});
}

// Vectors per output of a tile: about 4096 elements per (C, T) array, at least one and at
// most 256 / W vectors.
template <typename R>
int64_t tile_vectors(int64_t C) {
  constexpr int W = Simd<R>::W;
  int64_t j = 4096 / (std::max<int64_t>(C, 1) * W);
  return std::max<int64_t>(1, std::min<int64_t>(256 / W, j));
}

// x (C, J) <- the tile's n queries of src, element (t, k) at src[t * ts + k * ks]; the lanes
// past n are 0 (finite arithmetic, never counted).
template <typename R>
GRPO_INLINE void load_tile(const R* __restrict src, typename Simd<R>::V* __restrict x,
                           int64_t n, int64_t J, int64_t C, int64_t ts, int64_t ks) {
  constexpr int W = Simd<R>::W;
  R* dst = reinterpret_cast<R*>(x);
  const int64_t T = J * W;
  if (ts == 1) {
    for (int64_t k = 0; k < C; ++k) {
      std::memcpy(dst + k * T, src + k * ks, n * sizeof(R));
      std::memset(dst + k * T + n, 0, (T - n) * sizeof(R));
    }
  } else {
    if (n < T) std::memset(dst, 0, C * T * sizeof(R));
    for (int64_t t = 0; t < n; ++t)
      for (int64_t k = 0; k < C; ++k) dst[k * T + t] = src[t * ts + k];
  }
}

// The problem's arrays, typed.
template <typename R>
struct Arrays {
  const R* z;
  const R* old;
  const R* ref;
  const R* weight;
  R* grad;
  explicit Arrays(const Problem& P)
      : z(static_cast<const R*>(P.z)), old(static_cast<const R*>(P.old)),
        ref(static_cast<const R*>(P.ref)), weight(static_cast<const R*>(P.weight)),
        grad(static_cast<R*>(P.grad)) {}
};

// Whether query q is counted (valid, not ignored, its label in [0, C): a counted label outside
// it is flagged), and its weight u (1 without query weights; a counted query's non-finite
// weight is flagged).
template <typename R>
GRPO_INLINE bool counted_query(const Problem& P, const Arrays<R>& a, int64_t q, Sums& out,
                               R& u) {
  const int64_t y = P.y[q];
  bool counted = (P.valid == nullptr || P.valid[q] != 0) &&
                 !(P.has_ignore && y == P.ignore_index);
  const bool in_range = y >= 0 && y < P.C;
  out.bad_label |= counted && !in_range;
  counted = counted && in_range;
  u = 1;
  if (counted && a.weight != nullptr) {
    u = a.weight[q];
    out.nonfinite |= u * R(0) != R(0);
  }
  return counted;
}

// Queries [q0, q1) in tiles.
template <typename R>
void run_tiles(const Problem& P, int64_t q0, int64_t q1, Sums& out) {
  using V = typename Simd<R>::V;
  constexpr int W = Simd<R>::W;
  const int64_t C = P.C, S = P.S, J = tile_vectors<R>(C), T = J * W;
  Scratch<R> w(C * J);
  const Arrays<R> a(P);
  double sums[kStats] = {0, 0, 0, 0, 0, 0, 0, 0};
  V m[256 / W], ys[256 / W], u[256 / W];
  for (int64_t q = q0; q < q1;) {
    // the tile: n queries from q, element (t, k) at base + t * ts + k * ks
    int64_t n, base, ts, ks;
    if (S == 1) {
      n = std::min(T, q1 - q);
      base = q * C;
      ts = C;
      ks = 1;
    } else {
      const int64_t b = q / S, s = q % S;
      n = std::min({T, q1 - q, S - s});
      base = b * C * S + s;
      ts = 1;
      ks = S;
    }
    // per query: counted (m), label (class 0 for the uncounted), weight u (0 for them)
    R* mm = reinterpret_cast<R*>(m);
    R* yy = reinterpret_cast<R*>(ys);
    R* uu = reinterpret_cast<R*>(u);
    for (int64_t t = 0; t < T; ++t) {
      R weight = 0;
      const bool c = t < n && counted_query(P, a, q + t, out, weight);
      mm[t] = c ? R(1) : R(0);
      yy[t] = c ? R(P.y[q + t]) : R(0);
      uu[t] = c ? weight : R(0);
    }

    load_tile(a.z + base, w.xz.data(), n, J, C, ts, ks);
    if (a.old != nullptr) load_tile(a.old + base, w.xo.data(), n, J, C, ts, ks);
    if (a.ref != nullptr) load_tile(a.ref + base, w.xr.data(), n, J, C, ts, ks);
    for (int64_t j = 0; j < J; ++j)
      with_flags(P, [&](auto old_given, auto diagnostics) {
        group<R, false, old_given, diagnostics>(P, w, Layout<R, false>{C, J, j}, ys[j], u[j],
                                                 m[j], out, sums);
      });

    // the gradient's n queries
    const R* src = reinterpret_cast<const R*>(w.g.data());
    R* dst = a.grad + base;
    if (ts == 1) {
      for (int64_t k = 0; k < C; ++k) std::memcpy(dst + k * ks, src + k * T, n * sizeof(R));
    } else {
      for (int64_t t = 0; t < n; ++t)
        for (int64_t k = 0; k < C; ++k) dst[t * ts + k] = src[k * T + t];
    }
    q += n;
  }
  for (int i = 0; i < kStats; ++i) out.stats[i] += sums[i];
}

// whether a row of C values is finite (the rows of uncounted queries are only checked)
template <typename R>
GRPO_INLINE bool finite_row(const R* __restrict src, int64_t C) {
  R chk = 0;
  for (int64_t k = 0; k < C; ++k) chk += src[k] * R(0);
  return chk == R(0);
}

// Queries [q0, q1) one at a time (S == 1).
template <typename R>
void run_rows(const Problem& P, int64_t q0, int64_t q1, Sums& out) {
  using V = typename Simd<R>::V;
  constexpr int W = Simd<R>::W;
  const int64_t C = P.C, CV = (C + W - 1) / W;
  Scratch<R> w(CV);  // the inputs are read from their rows (xz, xo, xr unused)
  Layout<R, true> L{CV, 1, 0};
  for (int i = 0; i < W; ++i) L.lane[i] = R(i);
  L.tail_n = C - (CV - 1) * W;
  L.tail = L.lane < R(L.tail_n);
  const Arrays<R> a(P);
  double sums[kStats] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t base = q * C;
    R u;
    if (!counted_query(P, a, q, out, u)) {
      out.nonfinite |= !finite_row(a.z + base, C) ||
                       (a.old != nullptr && !finite_row(a.old + base, C)) ||
                       (a.ref != nullptr && !finite_row(a.ref + base, C));
      std::memset(a.grad + base, 0, C * sizeof(R));
      continue;
    }
    const R* rows[3] = {a.z + base, a.old == nullptr ? nullptr : a.old + base,
                        a.ref == nullptr ? nullptr : a.ref + base};
    for (int i = 0; i < 3; ++i) {
      L.in_row[i] = rows[i];
      L.in_last[i] = V{};
      if (rows[i] != nullptr)
        std::memcpy(&L.in_last[i], rows[i] + (CV - 1) * W, L.tail_n * sizeof(R));
    }
    L.grad_row = a.grad + base;
    with_flags(P, [&](auto old_given, auto diagnostics) {
      group<R, true, old_given, diagnostics>(P, w, L, V{} + R(P.y[q]), V{} + u, V{} + R(1),
                                             out, sums);
    });
  }
  for (int i = 0; i < kStats; ++i) out.stats[i] += sums[i];
}

void run_range_f32(const Problem& P, int64_t q0, int64_t q1, Sums& out) {
  if (P.rows)
    run_rows<float>(P, q0, q1, out);
  else
    run_tiles<float>(P, q0, q1, out);
}

void run_range_f64(const Problem& P, int64_t q0, int64_t q1, Sums& out) {
  if (P.rows)
    run_rows<double>(P, q0, q1, out);
  else
    run_tiles<double>(P, q0, q1, out);
}

// objective(double, z, old, ref, y, valid, weight, grad, C, S, rows, q0, q1, has_ignore,
//           ignore_index, weighting, surrogate, eps_low, eps_high, dual_c, beta,
//           adv_unbiased, adv_scale_none, adv_eps, r_acc, r_uni, r_conf, kappa, diagnostics)
// -> (bad_label, nonfinite, (8 sums)); pointers are integers (0: absent).
PyObject* objective(PyObject*, PyObject* args) {
  Problem P{};
  int is_double = 0;
  unsigned long long z, old, ref, y, valid, weight, grad;
  long long C, S, q0, q1, ignore_index;
  if (!PyArg_ParseTuple(args, "pKKKKKKKLLpLLiLiiddddiidddddp", &is_double, &z, &old, &ref, &y,
                        &valid, &weight, &grad, &C, &S, &P.rows, &q0, &q1, &P.has_ignore,
                        &ignore_index, &P.weighting, &P.surrogate, &P.eps_low, &P.eps_high,
                        &P.dual_c, &P.beta, &P.adv_unbiased, &P.adv_scale_none, &P.adv_eps,
                        &P.r_acc, &P.r_uni, &P.r_conf, &P.kappa, &P.diagnostics))
    return nullptr;
  P.z = reinterpret_cast<const void*>(z);
  P.old = reinterpret_cast<const void*>(old);
  P.ref = reinterpret_cast<const void*>(ref);
  P.y = reinterpret_cast<const int64_t*>(y);
  P.valid = reinterpret_cast<const uint8_t*>(valid);
  P.weight = reinterpret_cast<const void*>(weight);
  P.grad = reinterpret_cast<void*>(grad);
  P.C = C;
  P.S = S;
  P.ignore_index = ignore_index;
  Sums out;
  Py_BEGIN_ALLOW_THREADS
  if (is_double)
    run_range_f64(P, q0, q1, out);
  else
    run_range_f32(P, q0, q1, out);
  Py_END_ALLOW_THREADS
  PyObject* stats = PyTuple_New(kStats);
  if (stats == nullptr) return nullptr;
  for (int i = 0; i < kStats; ++i) PyTuple_SET_ITEM(stats, i, PyFloat_FromDouble(out.stats[i]));
  return Py_BuildValue("iiN", out.bad_label, out.nonfinite, stats);
}

// count(y, valid, n, has_ignore, ignore_index) -> queries that are valid and not ignored
PyObject* count(PyObject*, PyObject* args) {
  unsigned long long y, valid;
  long long n, ignore_index;
  int has_ignore;
  if (!PyArg_ParseTuple(args, "KKLiL", &y, &valid, &n, &has_ignore, &ignore_index))
    return nullptr;
  const int64_t* labels = reinterpret_cast<const int64_t*>(y);
  const uint8_t* mask = reinterpret_cast<const uint8_t*>(valid);
  long long total = 0;
  Py_BEGIN_ALLOW_THREADS
  for (long long q = 0; q < n; ++q)
    total += (mask == nullptr || mask[q] != 0) && !(has_ignore && labels[q] == ignore_index);
  Py_END_ALLOW_THREADS
  return PyLong_FromLongLong(total);
}

// cpu_has_avx2_fma() -> whether this CPU runs the AVX2 + FMA build of the kernel
PyObject* cpu_has_avx2_fma(PyObject*, PyObject*) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  return PyBool_FromLong(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"));
#else
  Py_RETURN_FALSE;
#endif
}

// cpu_has_avx512() -> whether this CPU runs the AVX-512 build (F, DQ, BW, VL) of the kernel
PyObject* cpu_has_avx512(PyObject*, PyObject*) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  return PyBool_FromLong(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("fma"));
#else
  Py_RETURN_FALSE;
#endif
}

// vector_bytes() -> the width of this build's vectors in bytes
PyObject* vector_bytes(PyObject*, PyObject*) { return PyLong_FromLong(GRPO_VECTOR_BYTES); }

PyMethodDef kMethods[] = {
    {"cpu_has_avx2_fma", cpu_has_avx2_fma, METH_NOARGS,
     "Whether this CPU runs the AVX2 + FMA build of the kernel."},
    {"cpu_has_avx512", cpu_has_avx512, METH_NOARGS,
     "Whether this CPU runs the AVX-512 build of the kernel."},
    {"vector_bytes", vector_bytes, METH_NOARGS, "The width of this build's vectors in bytes."},
    {"objective", objective, METH_VARARGS,
     "Loss terms, diagnostics' sums and gradient of a range of queries (unchecked)."},
    {"count", count, METH_VARARGS, "Valid, not ignored queries (unchecked)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, GRPO_STR(GRPO_MODULE),
                       "The fused GRPO-RM objective's CPU kernel (see grpo_rm_mm.core.native).",
                       -1, kMethods, nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC GRPO_CAT(PyInit_, GRPO_MODULE)(void) { return PyModule_Create(&kModule); }
