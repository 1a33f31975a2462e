// The fused GRPO-RM objective on the CPU: for a range of queries, the loss terms, the
// diagnostics' sums and the closed-form gradient with respect to the logits, in one pass over
// the inputs. The formulas are those of grpo_rm_mm/core/fused.py (its module docstring), for
// the 'uniform' and 'pi_old' group weightings, the 'clip' and 'dual_clip' surrogates, the
// registered accuracy, uniformity and confidence-penalty rewards, query weights, a valid mask,
// an ignore index, pi_ref with a KL coefficient and both advantage conventions.
//
// Layout: logits, pi_old and pi_ref logits and the gradient are contiguous (B, C, S) arrays;
// labels (int64), the valid mask (uint8) and query weights are contiguous (B, S). Queries are
// (b, s) in that order. A query's C outputs are S elements apart (S == 1: adjacent).
//
// Queries are processed in tiles of T: a tile is copied into (C, T) scratch arrays so that
// every per-output step is a loop over the tile's queries at unit stride, which the compiler
// vectorises (the exponential is a branch-free polynomial for that reason). Nothing is
// checked here: the Python caller validates the arguments once (grpo_rm_mm/core/native.py).
// What the data can make wrong is reported, not raised: a counted label outside [0, C) and a
// non-finite input value set flags, and the caller then hands the call to the reference
// implementation, which raises the error.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <limits>


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

namespace {

enum Weighting { kUniform = 0, kPiOld = 1 };
enum Surrogate { kClip = 0, kDualClip = 1 };
constexpr double kLogRatioClamp = 20.0;  // LOG_RATIO_CLAMP of objective.py
constexpr int kStats = 8;  // loss, reward, |A|, clipped, kl, kl_old, entropy, correct

struct Problem {
  const void* z;
  const void* old;     // nullptr: pi_old is the current policy (ratio 1)
  const void* ref;     // nullptr: no pi_ref
  const int64_t* y;
  const uint8_t* valid;  // nullptr: every query
  const void* weight;    // nullptr: u = 1
  void* grad;
  int64_t B, C, S;
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
  int64_t counted = 0;
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

// exp(x) per lane. float: Cephes' expf (range reduction by ln 2 in two parts, degree-6
// polynomial, about 1 ulp), branch-free, with 2^n applied as two factors so that results down
// to the subnormal range (x >= -103.9) are kept; double: the C library's exp.
GRPO_INLINE Simd<float>::V vexp(Simd<float>::V x) {
  using V = Simd<float>::V;
  using M = Simd<float>::M;
  const V lo = V{} - 104.0f, hi = V{} + 88.0f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
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

// Scratch arrays of one tile of T = J * W queries: (C, J) vectors per output.
template <typename R>
struct Tile {
  using V = typename Simd<R>::V;
  int64_t C, J;
  Aligned<V> x, lp, p, olp, op, rlp, r, a, g;
  Tile(int64_t c, int64_t j)
      : C(c), J(j), x(c * j), lp(c * j), p(c * j), olp(c * j), op(c * j), rlp(c * j),
        r(c * j), a(c * j), g(c * j) {}
};

// Vectors per query row of a tile: about 4096 elements per (C, T) array (the tile's dozen
// arrays stay in L2), at least one and at most 256 / W vectors.
template <typename R>
int64_t tile_vectors(int64_t C) {
  constexpr int W = Simd<R>::W;
  int64_t j = 4096 / (std::max<int64_t>(C, 1) * W);
  return std::max<int64_t>(1, std::min<int64_t>(256 / W, j));
}

// x (C, J) <- the tile's n queries of src, element (t, k) at src[t * ts + k * ks]; the lanes
// past n are 0 (finite arithmetic, never counted).
template <typename R>
GRPO_INLINE void load(const R* __restrict src, typename Simd<R>::V* __restrict x, int64_t n,
                      int64_t J, int64_t C, int64_t ts, int64_t ks) {
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

// softmax along the outputs of x (C, J): lp = log p, p; returns whether x was finite.
template <typename R>
GRPO_INLINE bool softmax(const typename Simd<R>::V* __restrict x,
                         typename Simd<R>::V* __restrict lp, typename Simd<R>::V* __restrict p,
                         int64_t J, int64_t C) {
  using V = typename Simd<R>::V;
  constexpr int W = Simd<R>::W;
  bool finite = true;
  for (int64_t j = 0; j < J; ++j) {
    V mx = x[j], chk = V{};
    for (int64_t k = 0; k < C; ++k) {
      mx = vmax(mx, x[k * J + j]);
      chk += x[k * J + j] * R(0);  // NaN for a NaN or infinite value
    }
    V total = V{};
    for (int64_t k = 0; k < C; ++k) {
      const V d = x[k * J + j] - mx;
      const V e = vexp(d);
      lp[k * J + j] = d;
      p[k * J + j] = e;
      total += e;
    }
    V lse;
    for (int i = 0; i < W; ++i) {
      finite &= chk[i] == R(0);
      lse[i] = std::log(total[i]);
    }
    const V inv_total = R(1) / total;
    for (int64_t k = 0; k < C; ++k) {
      lp[k * J + j] -= lse;
      p[k * J + j] *= inv_total;
    }
  }
  return finite;
}

template <typename R>
GRPO_INLINE void run_tile(const Problem& P, Tile<R>& w, Sums& out, int64_t base, int64_t qbase,
                          int64_t n, int64_t ts, int64_t ks) {
  using V = typename Simd<R>::V;
  constexpr int W = Simd<R>::W;
  const int64_t C = P.C, J = w.J;
  const R* z = static_cast<const R*>(P.z);
  const R* old = static_cast<const R*>(P.old);
  const R* ref = static_cast<const R*>(P.ref);
  const R* uw = static_cast<const R*>(P.weight);
  R* grad = static_cast<R*>(P.grad);
  V* const lp = w.lp.data();
  V* const p = w.p.data();
  V* const r = w.r.data();
  V* const a = w.a.data();
  V* const g = w.g.data();
  const bool pi_old = P.weighting == kPiOld;
  const V zero = V{}, one = V{} + R(1);
  const V inf = V{} + std::numeric_limits<R>::infinity();

  // per query: counted (m), label (class 0 for the uncounted), weight u
  V m[256 / W], ys[256 / W], u[256 / W];
  {
    R* mm = reinterpret_cast<R*>(m);
    R* yy = reinterpret_cast<R*>(ys);
    R* uu = reinterpret_cast<R*>(u);
    R chk = 0;
    for (int64_t t = 0; t < J * W; ++t) {
      bool c = false;
      int64_t y = 0;
      R weight = 0;
      if (t < n) {
        const int64_t q = qbase + t;
        y = P.y[q];
        c = P.valid == nullptr || P.valid[q] != 0;
        if (P.has_ignore && y == P.ignore_index) c = false;
        const bool in_range = y >= 0 && y < C;
        out.bad_label |= c && !in_range;
        c = c && in_range;
        if (c && uw != nullptr) {
          weight = uw[q];
          chk += weight * R(0);
        } else {
          weight = 1;
        }
      }
      mm[t] = c ? R(1) : R(0);
      yy[t] = c ? R(y) : R(0);
      uu[t] = c ? weight : R(0);
      out.counted += c;
    }
    out.nonfinite |= chk != R(0);
  }

  load(z + base, w.x.data(), n, J, C, ts, ks);
  out.nonfinite |= !softmax<R>(w.x.data(), lp, p, J, C);
  V* olp = lp;
  V* op = p;
  if (old != nullptr) {
    olp = w.olp.data();
    op = w.op.data();
    load(old + base, w.x.data(), n, J, C, ts, ks);
    out.nonfinite |= !softmax<R>(w.x.data(), olp, op, J, C);
  }
  V* rlp = nullptr;
  if (ref != nullptr) {
    rlp = w.rlp.data();
    load(ref + base, w.x.data(), n, J, C, ts, ks);
    // pi_ref's probabilities are not needed: g, written later, takes them
    out.nonfinite |= !softmax<R>(w.x.data(), rlp, g, J, C);
  }

  const R inv_c = R(1) / R(C);
  const R tiny = std::numeric_limits<R>::min();
  const R eps = std::numeric_limits<R>::epsilon();
  const bool dense_reward = P.r_uni != 0 || P.r_conf != 0;
  const R cu = R(P.r_uni), cc = R(P.r_conf), ca = R(P.r_acc);
  const bool old_given = old != nullptr;
  const bool dual = P.surrogate == kDualClip;
  const V clip_lo = V{} + (R(1) - R(P.eps_low)), clip_hi = V{} + (R(1) + R(P.eps_high));
  const V lr_lo = V{} - R(kLogRatioClamp), lr_hi = V{} + R(kLogRatioClamp);
  const R dual_c = R(P.dual_c), beta = R(P.beta);
  double sums[kStats] = {0, 0, 0, 0, 0, 0, 0, 0};

  for (int64_t j = 0; j < J; ++j) {
    const V y = ys[j];
    // rewards from pi_old, and their statistics under the group weights
    // den: the wrong-class mass; divided by, not multiplied by its reciprocal, so that
    // p / mass is exactly 1 where the reference's is (C = 2: a flat group)
    V base_uni = zero, den = one;
    if (dense_reward) {
      V mass = zero;
      for (int64_t k = 0; k < C; ++k) mass += y == R(k) ? zero : op[k * J + j];
      base_uni = mass > 0 ? V{} + R(1) / R(C - 1) : zero;
      den = vmax(mass, V{} + tiny);
    }
    V rmax = -inf, rmin = inf, total = zero, wsum = zero, high = -inf, low = inf, rq = zero;
    for (int64_t k = 0; k < C; ++k) {
      const V o = op[k * J + j];
      V rk = zero;
      if (dense_reward) rk = y == R(k) ? zero : (base_uni - o / den) * cu - o * cc;
      rk = y == R(k) ? rk + ca : rk;
      r[k * J + j] = rk;
      rmax = vmax(rmax, rk);
      rmin = vmin(rmin, rk);
      if (pi_old) {
        total += o;
        wsum += o * rk;
        // the flat test over the outputs with weight only
        high = (o > 0) & (rk > high) ? rk : high;
        low = (o > 0) & (rk < low) ? rk : low;
      } else {
        wsum += rk;
        rq += o * rk;
      }
    }
    V mean, flat;
    if (pi_old) {
      const auto empty = total <= 0;
      total = empty ? one : total;
      mean = wsum / total;
      flat = empty | (high <= low) ? one : zero;
      rq = wsum;
    } else {
      mean = wsum * inv_c;
      flat = rmax <= rmin ? one : zero;
    }
    // advantages a (C, J): centred / max|centred| (in [-1, 1]) over std + eps / mag
    V scale = zero;
    if (P.adv_scale_none) {
      scale = flat != 0 ? zero : one;
      for (int64_t k = 0; k < C; ++k) a[k * J + j] = r[k * J + j] - mean;
    } else {
      V mag = vmax(rmax - mean, mean - rmin);
      mag = mag > 0 ? mag : one;
      const V inv_mag = R(1) / mag;
      V var = zero, sumw2 = zero;
      for (int64_t k = 0; k < C; ++k) {
        const V unit = (r[k * J + j] - mean) * inv_mag;
        a[k * J + j] = unit;
        if (pi_old) {
          const V o = op[k * J + j];
          var += unit * unit * o;
          sumw2 += o * o;
        } else {
          var += unit * unit;
        }
      }
      for (int i = 0; i < W; ++i) {
        R v;
        if (pi_old) {
          v = var[i] / total[i];
          if (P.adv_unbiased) {
            const R ess = R(1) / sumw2[i];  // Kish's effective sample size
            v = v * ess / std::max(ess - R(1), eps);
          }
        } else {
          v = var[i] * inv_c;
          if (P.adv_unbiased) v = v * (R(C) / std::max(R(C - 1), eps));
        }
        scale[i] = flat[i] != 0 ? R(0) : R(1) / (std::sqrt(v) + R(P.adv_eps) / mag[i]);
      }
    }

    // surrogate s_i and g_i = kappa u w_i d s_i / d log p_i (+ the KL's), per-query sums
    const V kq = u[j] * R(P.kappa);
    V per_query = zero, active_sum = zero, adv_abs = zero, kl = zero, kl_old = zero,
      ent = zero, top = -inf;
    for (int64_t k = 0; k < C; ++k) {
      const int64_t e = k * J + j;
      const V adv = a[e] * scale;
      const V wt = pi_old ? op[e] : V{} + inv_c;
      V gk, s;
      if (!old_given) {
        // ratio 1: nothing is clipped, s = A and d s / d log p = A
        s = adv;
        gk = adv * wt * kq;
      } else {
        const V lr = lp[e] - olp[e];
        const V cl = vmin(vmax(lr, lr_lo), lr_hi);
        const V ratio = vexp(cl);
        const V unclipped = ratio * adv;
        const V in_clip = vmin(vmax(ratio, clip_lo), clip_hi);
        const V clipped_term = in_clip * adv;
        s = vmin(unclipped, clipped_term);
        // the unclipped branch is active iff (ratio - clip(ratio)) A <= 0
        auto active = (ratio - in_clip) * adv <= 0;
        if (dual) {
          // the floor c A where A < 0: below it, no gradient and s = c A
          const V floor = adv * dual_c;
          const auto below = (adv < 0) & (floor > s);
          active = active & ~below;
          s = below ? floor : s;
        }
        active_sum += active ? one : zero;
        // the log ratio passes the gradient only inside its clamp
        gk = active & (cl == lr) ? unclipped * wt * kq : zero;
      }
      per_query += wt * s;
      if (ref != nullptr) {
        const V pd = (lp[e] - rlp[e]) * p[e];
        kl += pd;
        if (beta > 0) gk += (pd + p[e]) * kq * (-beta);
      }
      g[e] = gk;
      if (P.diagnostics) {
        adv_abs += vabs(adv);
        ent -= p[e] * lp[e];
        top = vmax(top, lp[e]);
        if (old_given) kl_old += (lp[e] - olp[e]) * p[e];
      }
    }

    // through the log-softmax: dz_k = g_k - p_k sum_i g_i
    V gsum = zero;
    for (int64_t k = 0; k < C; ++k) gsum += g[k * J + j];
    for (int64_t k = 0; k < C; ++k) g[k * J + j] -= p[k * J + j] * gsum;

    V lq = -per_query;
    if (ref != nullptr && P.beta > 0) lq += kl * beta;
    lq *= u[j];
    V argk = V{} + R(C);
    if (P.diagnostics) {
      for (int64_t k = 0; k < C; ++k)
        argk = (argk == R(C)) & (lp[k * J + j] >= top) ? V{} + R(k) : argk;
    }
    const V mj = m[j];
    for (int i = 0; i < W; ++i) {
      sums[0] += double(lq[i]);
      if (mj[i] == 0) continue;
      sums[4] += double(kl[i]);
      if (!P.diagnostics) continue;
      sums[1] += double(rq[i]);
      sums[2] += double(adv_abs[i]);
      sums[3] += old_given ? double(R(C) - active_sum[i]) : 0.0;
      sums[5] += double(kl_old[i]);
      sums[6] += double(ent[i]);
      sums[7] += argk[i] == y[i] ? 1.0 : 0.0;
    }
  }
  for (int i = 0; i < kStats; ++i) out.stats[i] += sums[i];

  // the gradient's n queries
  const R* src = reinterpret_cast<const R*>(g);
  R* dst = grad + base;
  const int64_t T = J * W;
  if (ts == 1) {
    for (int64_t k = 0; k < C; ++k) std::memcpy(dst + k * ks, src + k * T, n * sizeof(R));
  } else {
    for (int64_t t = 0; t < n; ++t)
      for (int64_t k = 0; k < C; ++k) dst[t * ts + k] = src[k * T + t];
  }
}

template <typename R>
GRPO_INLINE void run_range_impl(const Problem& P, int64_t q0, int64_t q1, Sums& out) {
  const int64_t C = P.C, S = P.S;
  Tile<R> w(C, tile_vectors<R>(C));
  const int64_t T = w.J * Simd<R>::W;
  int64_t q = q0;
  while (q < q1) {
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
    run_tile<R>(P, w, out, base, q, n, ts, ks);
    q += n;
  }
}

void run_range_f32(const Problem& P, int64_t q0, int64_t q1, Sums& out) {
  run_range_impl<float>(P, q0, q1, out);
}

void run_range_f64(const Problem& P, int64_t q0, int64_t q1, Sums& out) {
  run_range_impl<double>(P, q0, q1, out);
}

// objective(double, z, old, ref, y, valid, weight, grad, B, C, S, q0, q1, has_ignore,
//           ignore_index, weighting, surrogate, eps_low, eps_high, dual_c, beta,
//           adv_unbiased, adv_scale_none, adv_eps, r_acc, r_uni, r_conf, kappa, diagnostics)
// -> (counted, bad_label, nonfinite, (8 sums)); pointers are integers (0: absent).
PyObject* objective(PyObject*, PyObject* args) {
  Problem P{};
  int is_double = 0;
  unsigned long long z, old, ref, y, valid, weight, grad;
  long long B, C, S, q0, q1, ignore_index;
  if (!PyArg_ParseTuple(args, "pKKKKKKKLLLLLiLiiddddiidddddp", &is_double, &z, &old, &ref, &y,
                        &valid, &weight, &grad, &B, &C, &S, &q0, &q1, &P.has_ignore,
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
  P.B = B;
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
  return Py_BuildValue("LiiN", static_cast<long long>(out.counted), out.bad_label,
                       out.nonfinite, stats);
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

PyMethodDef kMethods[] = {
    {"cpu_has_avx2_fma", cpu_has_avx2_fma, METH_NOARGS,
     "Whether this CPU runs the AVX2 + FMA build of the kernel."},
    {"objective", objective, METH_VARARGS,
     "Loss terms, diagnostics' sums and gradient of a range of queries (unchecked)."},
    {"count", count, METH_VARARGS, "Valid, not ignored queries (unchecked)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, GRPO_STR(GRPO_MODULE),
                       "The fused GRPO-RM objective's CPU kernel (see grpo_rm_mm.core.native).",
                       -1, kMethods, nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC GRPO_CAT(PyInit_, GRPO_MODULE)(void) { return PyModule_Create(&kModule); }
