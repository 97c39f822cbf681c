// Host-side check of the sampler's per-row logic (sampling_row.h), compiled with g++ (no CUDA).
//
// `HostExec` runs the passes of `strl::sample_row` sequentially; everything that decides (weights,
// keys, radix picks, thresholds, the Philox draw, the integer inverse-CDF target, the log-prob) is the
// same __host__ __device__ code the CUDA kernel runs. tests/csrc/test_csrc.py feeds rows on stdin and
// compares the printed tokens and log-probs with kernels.sampling.sample_tokens_reference.
//
// stdin:  "units" then unit lines (see run_units), or <num_cases>, then per case
//           <dtype: 0 fp32 | 1 bf16> <rows> <vocab> <temperature> <top_p> <top_k> <seed> <offset>
//           rows * vocab logits as raw bit patterns (uint32 for fp32, uint16 for bf16), decimal
// stdout: per row "<case> <row> <token> <logprob %.9e> <floor_key> <kept_mass>"
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

#include "sampling_row.h"

namespace {

using strl::BinPick;
using strl::WeightFn;

template <typename T>
struct HostExec {
  const T* row;
  int64_t V;
  uint32_t count[strl::kRadixBins];
  uint64_t mass[strl::kRadixBins];
  // Last kept set seen by the scan, for the printout.
  uint32_t last_floor_key = 0;
  uint64_t last_target = 0;

  // The pre-filter of scaled_lower_bound, checked: a skipped logit must fail the exact test too.
  static bool skipped(const WeightFn& fn, float x, float bound, uint32_t lo_key) {
    if (!(fn.scaled(x) < bound)) return false;
    if (strl::weight_key(fn.weight(x)) >= lo_key) {
      fprintf(stderr, "scaled_lower_bound rejected a kept logit: x=%.9g bound=%.9g lo_key=%u\n",
              static_cast<double>(x), static_cast<double>(bound), lo_key);
      exit(3);
    }
    return true;
  }

  int64_t vocab() const { return V; }
  float logit(int64_t i) const { return strl::to_float(row[i]); }

  float max_logit() const {
    float m = -INFINITY;
    for (int64_t i = 0; i < V; ++i) m = fmaxf(m, logit(i));
    return m;
  }

  int64_t first_index_of(float v) const {
    for (int64_t i = 0; i < V; ++i)
      if (logit(i) == v) return i;
    return 0;
  }

  void histogram(const WeightFn& fn, int shift, uint32_t prefix, uint32_t floor_key) {
    for (int b = 0; b < strl::kRadixBins; ++b) count[b] = 0, mass[b] = 0;
    const uint32_t lo_key = prefix > floor_key ? prefix : floor_key;
    const float bound = strl::scaled_lower_bound(fn, lo_key);
    for (int64_t i = 0; i < V; ++i) {
      if (skipped(fn, logit(i), bound, lo_key)) continue;
      const float e = fn.weight(logit(i));
      const uint32_t key = strl::weight_key(e);
      if (!strl::in_radix_pass(key, shift, prefix, floor_key)) continue;
      const uint32_t d = strl::radix_digit(key, shift);
      count[d] += 1;
      mass[d] += fn.mass(e);
    }
  }

  uint64_t histogram_mass() const {
    uint64_t total = 0;
    for (int b = 0; b < strl::kRadixBins; ++b) total += mass[b];
    return total;
  }

  BinPick pick_bin(bool by_mass, uint64_t need) const {
    return strl::pick_bin_sequential(count, mass, by_mass, need);
  }

  uint64_t kept_mass(const WeightFn& fn, uint32_t floor_key) const {
    uint64_t total = 0;
    const float bound = strl::scaled_lower_bound(fn, floor_key);
    for (int64_t i = 0; i < V; ++i) {
      if (skipped(fn, logit(i), bound, floor_key)) continue;
      const float e = fn.weight(logit(i));
      if (strl::weight_key(e) >= floor_key) total += fn.mass(e);
    }
    return total;
  }

  int64_t first_crossing(const WeightFn& fn, uint32_t floor_key, uint64_t target) {
    last_floor_key = floor_key;
    last_target = target;
    uint64_t cum = 0;
    const float bound = strl::scaled_lower_bound(fn, floor_key);
    for (int64_t i = 0; i < V; ++i) {
      if (skipped(fn, logit(i), bound, floor_key)) continue;
      const float e = fn.weight(logit(i));
      if (strl::weight_key(e) < floor_key) continue;
      cum += fn.mass(e);
      if (cum > target) return i;
    }
    return V - 1;  // unreachable: target < total kept mass
  }
};

template <typename T>
int run_case(int case_id, int64_t rows, int64_t V, const strl::RowParams& prm) {
  std::vector<T> logits(static_cast<size_t>(rows * V));
  for (auto& x : logits) {
    unsigned long long bits;
    if (scanf("%llu", &bits) != 1) return 1;
    if constexpr (sizeof(T) == 4) {
      x = strl::bits_to_float(static_cast<uint32_t>(bits));
    } else {
      x = T{static_cast<uint16_t>(bits)};
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    HostExec<T> ex{logits.data() + r * V, V, {}, {}};
    const strl::RowResult res = strl::sample_row(ex, prm, static_cast<uint64_t>(r));
    printf("%d %lld %lld %.9e %u %llu\n", case_id, static_cast<long long>(r), static_cast<long long>(res.token),
           static_cast<double>(res.logprob), ex.last_floor_key, static_cast<unsigned long long>(ex.last_target));
  }
  return 0;
}

}  // namespace

// Unit mode: one pure function per line, "draw <x0> <z>" | "need <top_p> <total>" | "shift <V>" |
// "philox <seed> <offset> <row>"; prints one decimal result per line.
int run_units() {
  char op[16];
  while (scanf("%15s", op) == 1) {
    unsigned long long a = 0, b = 0, c = 0;
    double p = 0.0;
    if (strcmp(op, "draw") == 0 && scanf("%llu %llu", &a, &b) == 2) {
      printf("%llu\n", static_cast<unsigned long long>(strl::draw_target(static_cast<uint32_t>(a), b)));
    } else if (strcmp(op, "need") == 0 && scanf("%lf %llu", &p, &b) == 2) {
      printf("%llu\n", static_cast<unsigned long long>(strl::top_p_need(p, b)));
    } else if (strcmp(op, "shift") == 0 && scanf("%llu", &a) == 1) {
      printf("%d\n", strl::mass_shift_for_vocab(static_cast<int64_t>(a)));
    } else if (strcmp(op, "philox") == 0 && scanf("%llu %llu %llu", &a, &b, &c) == 3) {
      printf("%u\n", strl::philox_word0(a, b, c));
    } else {
      return 1;
    }
  }
  return 0;
}

int main() {
  char first[32];
  if (scanf("%31s", first) != 1) return 1;
  if (strcmp(first, "units") == 0) return run_units();
  const int num_cases = atoi(first);
  for (int c = 0; c < num_cases; ++c) {
    int dtype = 0;
    long long rows = 0, vocab = 0, top_k = 0;
    double temperature = 0.0, top_p = 1.0;
    unsigned long long seed = 0, offset = 0;
    if (scanf("%d %lld %lld %lf %lf %lld %llu %llu", &dtype, &rows, &vocab, &temperature, &top_p, &top_k, &seed,
              &offset) != 8)
      return 1;
    // The reference divides fp32 logits by the Python float temperature cast to fp32.
    const strl::RowParams prm{static_cast<float>(temperature), top_p, top_k, seed, offset};
    const int rc = dtype == 0 ? run_case<float>(c, rows, vocab, prm) : run_case<strl::Bf16>(c, rows, vocab, prm);
    if (rc != 0) return rc;
  }
  return 0;
}
