// Per-row selection and sampling logic of the fused sampler, shared by the CUDA kernel
// (sampling.cu, one thread block per row) and the host-side test (sampling_host_test.cpp).
//
// The row algorithm `sample_row<Exec>` is written once; an `Exec` supplies the passes over the
// row's logits (a block-parallel one on the GPU, a sequential one on the host). Everything that
// decides something -- element weights and keys, radix-bin picks, thresholds, the Philox draw,
// the inverse-CDF target and the log-prob -- is a __host__ __device__ function in this file.
//
// Math (semantics: kernels/sampling.py):
//   xs_i = x_i * (1/T),  m = max_i xs_i,  e_i = exp(xs_i - m) in (0, 1]     (fp32, p_i = e_i / sum e)
//   key_i = bits(e_i)     -- non-negative floats order like their bit patterns
//   q_i = round(e_i * 2^s) -- fixed-point mass (s = 46 for V = 128256): sums are exact, order-free,
//                             deterministic, and the same on host and device
//   top-k:  floor = the k-th largest key (ties at the boundary kept)        radix select on counts
//   top-p:  floor = the largest key t with sum_{key >= t} q >= ceil(top_p * Z_k)   radix on mass
//   Z = sum_{key >= floor} q;  token = first i (vocab order) with key_i >= floor and
//          sum_{j <= i, key_j >= floor} q_j > u * Z   (exact integer compare, u = (x0 + 0.5) / 2^32)
//   logp = (xs_token - m) - log(Z * 2^-s)
// Radix select: 4 passes of 8-bit digits, most significant first, each a histogram of counts and
// masses over the keys that match the digits chosen so far; it stops early once the chosen bin is
// known to be kept whole. No sort, no global workspace.
//
// Deviation from the float64 reference, documented and tested: a weight below 2^-(s+1) (for
// V = 128256 a scaled logit more than ~32.6 below the maximum) has zero mass, so it is never drawn;
// together such tokens hold at most V * 2^-(s+1) of the mass (the arg-max alone has 1): ~1e-9 for
// V = 128256, ~6e-8 for V = 2^20.
#ifndef STRL_SAMPLING_ROW_H_
#define STRL_SAMPLING_ROW_H_

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define STRL_HD __host__ __device__ __forceinline__
#else
#define STRL_HD inline
#endif

namespace strl {

constexpr int kRadixBits = 8;
constexpr int kRadixBins = 1 << kRadixBits;  // 256

// Mass fixed point: q = round(e * 2^s) with s = min(52, 63 - bit_length(V)), so that the row's total
// (at most V * 2^s) fits in 63 bits and e * 2^s + 0.5 is exact in double. s = 46 for V = 128256.
STRL_HD int mass_shift_for_vocab(int64_t vocab) {
  int bits = 0;
  for (uint64_t v = static_cast<uint64_t>(vocab); v != 0; v >>= 1) ++bits;
  return 63 - bits < 52 ? 63 - bits : 52;
}

// bf16 logits as raw bits: the conversion to fp32 is exact (a 16-bit shift), the same on both sides.
struct Bf16 {
  uint16_t bits;
};

STRL_HD float bits_to_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

STRL_HD uint32_t float_to_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

STRL_HD float to_float(float x) { return x; }
STRL_HD float to_float(Bf16 x) { return bits_to_float(static_cast<uint32_t>(x.bits) << 16); }

// Each pass recomputes the weights, so every pass must produce the same bits for the same logit:
// the _rn intrinsics are never contracted into an FMA, whatever the call site.
STRL_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

STRL_HD float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

// Weight of one logit: e = exp(x / T - m), in [0, 1], and its fixed-point mass. NaN (from NaN
// logits or an all -inf row) becomes weight 0, so it is never drawn.
struct WeightFn {
  float inv_temperature;  // 1 / T in fp32, as torch scales by a scalar divisor on CUDA
  float m;                // max scaled logit
  double mass_scale;  // 2^s, s = mass_shift_for_vocab(V)

  STRL_HD float scaled(float x) const { return mul_rn(x, inv_temperature); }
  STRL_HD float weight(float x) const {
    const float e = expf(sub_rn(scaled(x), m));
    return e > 0.0f ? e : 0.0f;
  }
  // e * 2^s is exact in double and < 2^53, so + 0.5 then truncation rounds half up, exactly.
  STRL_HD uint64_t mass(float e) const { return static_cast<uint64_t>(static_cast<double>(e) * mass_scale + 0.5); }
};

STRL_HD uint32_t weight_key(float e) { return float_to_bits(e); }

// A cheap pre-filter for passes that only look at keys >= lo_key: a logit whose scaled value
// x * (1/T) is below the returned bound has weight < bits_to_float(lo_key), so it can be skipped
// without the exp. The bound sits below log(lo) + m by a margin (1e-3 + 1e-5 * magnitude) far larger
// than the rounding of x * (1/T) - m (<= 6e-8 relative) and of expf (<= 2 ulp), so it never
// rejects a logit the exact test would keep. -inf (no filtering) when lo is 0 or denormal.
STRL_HD float scaled_lower_bound(const WeightFn& fn, uint32_t lo_key) {
  const float lo = bits_to_float(lo_key);
  // Below the normal range expf rounds to a coarse denormal grid (relative error up to 1/2): no filter.
  if (!(lo >= 0x1p-125f)) return -INFINITY;
  const double log_lo = log(static_cast<double>(lo));
  const double m = static_cast<double>(fn.m);
  const double margin = 1e-3 + 1e-5 * (fabs(m) + fabs(log_lo) + 1.0);
  return static_cast<float>(m + log_lo - margin);
}

// Does `key` take part in the radix pass at digit `shift` (24, 16, 8, 0)? It must be kept so far
// (key >= floor) and match the digits chosen by earlier passes (`prefix`: bits above shift + 8).
STRL_HD bool in_radix_pass(uint32_t key, int shift, uint32_t prefix, uint32_t floor_key) {
  const uint32_t high_mask =
      static_cast<uint32_t>((0xFFFFFFFFull << (shift + kRadixBits)) & 0xFFFFFFFFull);
  return key >= floor_key && (key & high_mask) == prefix;
}

STRL_HD uint32_t radix_digit(uint32_t key, int shift) {
  return (key >> shift) & static_cast<uint32_t>(kRadixBins - 1);
}

// The bin a radix pass keeps: walking bins from the top, the one whose cumulative count (top-k)
// or mass (top-p) first reaches `need` (need >= 1, relative to this pass).
struct BinPick {
  uint32_t bin;
  uint32_t count_bin;     // elements in the picked bin
  uint32_t count_above;   // elements in this pass's bins above it
  uint64_t mass_bin;
  uint64_t mass_above;
  bool found;
};

// One step of the top-down walk: add bin `b` to the running totals; true when it is the pick.
// Used verbatim by the sequential walk below and by each lane of the GPU's warp-parallel walk.
STRL_HD bool radix_walk_step(uint64_t& count_acc, uint64_t& mass_acc, uint32_t count_b, uint64_t mass_b,
                             bool by_mass, uint64_t need, BinPick* pick, uint32_t b) {
  const uint64_t before = by_mass ? mass_acc : count_acc;
  count_acc += count_b;
  mass_acc += mass_b;
  const uint64_t after = by_mass ? mass_acc : count_acc;
  if (before < need && need <= after) {
    pick->bin = b;
    pick->count_bin = count_b;
    pick->count_above = static_cast<uint32_t>(count_acc - count_b);
    pick->mass_bin = mass_b;
    pick->mass_above = mass_acc - mass_b;
    pick->found = true;
    return true;
  }
  return false;
}

STRL_HD BinPick pick_bin_sequential(const uint32_t* count, const uint64_t* mass, bool by_mass, uint64_t need) {
  BinPick pick{0, 0, 0, 0, 0, false};
  uint64_t count_acc = 0, mass_acc = 0;
  for (int b = kRadixBins - 1; b >= 0; --b) {
    if (radix_walk_step(count_acc, mass_acc, count[b], mass[b], by_mass, need, &pick, static_cast<uint32_t>(b)))
      break;
  }
  return pick;
}

// ceil(top_p * total) in [1, total]: the top-p mass a kept set must reach.
STRL_HD uint64_t top_p_need(double top_p, uint64_t total) {
  const double t = ceil(top_p * static_cast<double>(total));
  uint64_t need = t < 1.0 ? 1 : static_cast<uint64_t>(t);
  return need > total ? total : need;
}

// Philox4x32-10, key = seed, counter = (offset_lo, offset_hi, row_lo, 0); returns output word 0.
STRL_HD uint32_t philox_word0(uint64_t seed, uint64_t offset, uint64_t row) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32);
  uint32_t c2 = static_cast<uint32_t>(row), c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// floor(u * z) for u = (x0 + 0.5) / 2^32 = (2 x0 + 1) / 2^33, exactly (the product needs 96 bits).
// The drawn token is the first kept index whose cumulative mass exceeds u * z; for an integer
// cumulative mass c, c > u * z <=> c > floor(u * z). The result is < z, so a crossing always exists.
STRL_HD uint64_t draw_target(uint32_t x0, uint64_t z) {
  // (2 x0 + 1) z = 2 x0 z + z, with x0 z = hi_mid * 2^32 + l0 split so that nothing overflows (z < 2^63).
  const uint64_t l = static_cast<uint64_t>(x0) * (z & 0xFFFFFFFFull);   // < 2^64
  const uint64_t hi_mid = static_cast<uint64_t>(x0) * (z >> 32) + (l >> 32);  // < 2^63 + 2^32
  const uint64_t l0 = l & 0xFFFFFFFFull;
  return hi_mid + ((2 * l0 + z) >> 33);  // floor((hi_mid * 2^33 + 2 l0 + z) / 2^33)
}

// log p(token) under the kept distribution: (xs_token - m) - log(z / 2^s), in double.
STRL_HD float token_logprob(float xs_token, float m, uint64_t z, double mass_scale) {
  const double log_z = log(static_cast<double>(z) / mass_scale);
  return static_cast<float>(static_cast<double>(xs_token) - static_cast<double>(m) - log_z);
}

struct RowParams {
  float temperature;
  double top_p;
  int64_t top_k;
  uint64_t seed;
  uint64_t offset;
};

struct RowResult {
  int64_t token;
  float logprob;
};

// The kept set {key >= floor_key} and its mass.
struct KeptSet {
  uint32_t floor_key;
  uint64_t mass;
};

// Radix select over the keys >= floor_key: the kept set of the k largest (by_mass = false,
// need_or_top_p = k) or of the top-p mass (by_mass = true; total = the mass above floor_key, or 0 to
// take it from the first histogram). Ties at the boundary are kept.
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <class Exec>
STRL_HD KeptSet radix_select(Exec& ex, const WeightFn& fn, uint32_t floor_key, bool by_mass, int64_t top_k,
                             double top_p, uint64_t total) {
  uint32_t prefix = 0;
  uint64_t count_above = 0, mass_above = 0;
  uint64_t need = static_cast<uint64_t>(top_k);
  for (int shift = 32 - kRadixBits; shift >= 0; shift -= kRadixBits) {
    ex.histogram(fn, shift, prefix, floor_key);
    if (by_mass && shift == 32 - kRadixBits) need = top_p_need(top_p, total ? total : ex.histogram_mass());
    const BinPick pick = ex.pick_bin(by_mass, need - (by_mass ? mass_above : count_above));
    // `need` never exceeds what the pass holds (k < V; the top-p need <= total), so a pick exists.
    prefix |= pick.bin << shift;
    count_above += pick.count_above;
    mass_above += pick.mass_above;
    // Resolved when the bin is kept whole: top-k takes all of its elements, or top-p's bin is a
    // single element; at shift 0 the bin is one key value (ties kept).
    const bool whole = by_mass ? pick.count_bin == 1 : count_above + pick.count_bin == need;
    if (whole || shift == 0) return KeptSet{prefix > floor_key ? prefix : floor_key, mass_above + pick.mass_bin};
  }
  return KeptSet{floor_key, 0};  // unreachable: shift == 0 returns
}

// One row: max pass, optional top-k and top-p radix selects, kept mass, inverse-CDF scan.
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <class Exec>
STRL_HD RowResult sample_row(Exec& ex, const RowParams& prm, uint64_t row) {
  const float xmax = ex.max_logit();
  if (prm.temperature == 0.0f) return RowResult{ex.first_index_of(xmax), 0.0f};  // greedy: first arg-max
  // max(x / T) = max(x) / T for T > 0: scaling by a positive number is monotone, also rounded.
  const float inv_t = 1.0f / prm.temperature;
  const WeightFn fn{inv_t, mul_rn(xmax, inv_t), ldexp(1.0, mass_shift_for_vocab(ex.vocab()))};

  KeptSet kept{0, 0};
  if (prm.top_k > 0 && prm.top_k < ex.vocab()) kept = radix_select(ex, fn, 0, false, prm.top_k, 0.0, 0);
  if (prm.top_p < 1.0) kept = radix_select(ex, fn, kept.floor_key, true, 0, prm.top_p, kept.mass);
  if (kept.mass == 0) kept.mass = ex.kept_mass(fn, kept.floor_key);  // no truncation: one more pass
  if (kept.mass == 0) return RowResult{ex.first_index_of(xmax), NAN};  // degenerate row (all -inf / inf)

  const uint64_t target = draw_target(philox_word0(prm.seed, prm.offset, row), kept.mass);
  const int64_t token = ex.first_crossing(fn, kept.floor_key, target);
  return RowResult{token, token_logprob(fn.scaled(ex.logit(token)), fn.m, kept.mass, fn.mass_scale)};
}

}  // namespace strl

#endif  // STRL_SAMPLING_ROW_H_
