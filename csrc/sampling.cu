// Fused token sampler: temperature, top-k / top-p truncation, a Philox inverse-CDF draw and the
// drawn token's log-prob, for logits[B, V] (fp32 or bf16), one thread block per row, no sort.
//
// Torch-free: bindings.cpp reaches it through the C ABI in sampling.h. The row algorithm and every
// decision it makes live in sampling_row.h (shared with the host-side test); this file supplies
// `BlockExec`, the block-parallel passes over a row:
//   max_logit / first_index_of    block reductions
//   histogram + pick_bin          256-bin radix histogram of counts and fixed-point masses in shared
//                                 memory (warp-merged integer atomics: deterministic), then a
//                                 warp-parallel top-down walk over the bins
//   kept_mass                     block sum of the kept fixed-point mass
//   first_crossing                the inverse-CDF scan in vocab order: tiles of kThreads * kVec
//                                 logits, a block exclusive scan per tile, stops at the tile that crosses
// Every pass re-reads the row (typically from L2 after the first): 3 passes without truncation,
// up to 2 + 4 (top-k) + 4 (top-p) with both, fewer when a radix bin resolves early. Passes that only
// look at keys above a floor skip the exp for logits below it (scaled_lower_bound, one compare).
// Performance is unmeasured (no GPU yet): the recomputed exp per pass, not HBM, likely bounds it.
// References: FlashInfer's sampling kernels (threshold-based truncation without a sort), Philox
// (Salmon et al., SC'11), radix select (Alabi et al., 2012).
#include <cuda_runtime.h>
#include <limits.h>
#include <stdint.h>

#include "sampling.h"
#include "sampling_row.h"

namespace strl {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr uint32_t kNoBin = 0xFFFFFFFFu;  // a lane with no element in the current radix pass

struct SharedStorage {
  unsigned int count[kRadixBins];
  unsigned long long mass[kRadixBins];
  unsigned long long warp_u64[kWarps];
  float warp_f32[kWarps];
  long long warp_i64[kWarps];
  BinPick pick;
  unsigned long long histogram_total;
  unsigned long long bcast_u64;
  float bcast_f32;
  long long bcast_i64;
};

// Logits per 16-byte load.
template <typename T>
struct VecWidth;
template <>
struct VecWidth<float> {
  static constexpr int value = 4;
};
template <>
struct VecWidth<Bf16> {
  static constexpr int value = 8;
};

__device__ __forceinline__ void unpack(const uint4& raw, float (&x)[4]) {
  x[0] = __uint_as_float(raw.x);
  x[1] = __uint_as_float(raw.y);
  x[2] = __uint_as_float(raw.z);
  x[3] = __uint_as_float(raw.w);
}

__device__ __forceinline__ void unpack(const uint4& raw, float (&x)[8]) {
  // Little endian: the low half of each 32-bit word is the earlier bf16.
  const unsigned w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    x[2 * j] = __uint_as_float(w[j] << 16);
    x[2 * j + 1] = __uint_as_float(w[j] & 0xFFFF0000u);
  }
}

// Loads logits [i0, i0 + kVec) of a row; returns how many exist (the rest of x is unset).
// 16-byte vector loads when the row is 16-byte aligned, scalar loads otherwise (odd V).
template <typename T, int kVec>
__device__ __forceinline__ int load_chunk(const T* row, int64_t V, bool aligned, int64_t i0, float (&x)[kVec]) {
  if (i0 >= V) return 0;
  if (aligned && i0 + kVec <= V) {
    unpack(*reinterpret_cast<const uint4*>(row + i0), x);
    return kVec;
  }
  const int n = V - i0 < kVec ? static_cast<int>(V - i0) : kVec;
#pragma unroll
  for (int j = 0; j < kVec; ++j)
    if (j < n) x[j] = to_float(row[i0 + j]);
  return n;
}

template <typename V, class Op>
__device__ __forceinline__ V warp_reduce(V v, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// All threads get op over the block. Two barriers: the second one orders this broadcast read
// before the next reduction's broadcast write.
template <typename V, class Op>
__device__ __forceinline__ V block_reduce(V v, Op op, V identity, V* warp_buf, V* bcast) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_reduce(v, op);
  if (lane == 0) warp_buf[warp] = v;
  __syncthreads();
  if (warp == 0) {
    V w = lane < kWarps ? warp_buf[lane] : identity;
    w = warp_reduce(w, op);
    if (lane == 0) *bcast = w;
  }
  __syncthreads();
  return *bcast;
}

struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct MinOp {
  __device__ long long operator()(long long a, long long b) const { return a < b ? a : b; }
};
struct SumOp {
  __device__ unsigned long long operator()(unsigned long long a, unsigned long long b) const { return a + b; }
};

template <typename T>
struct BlockExec {
  static constexpr int kVec = VecWidth<T>::value;
  const T* row;
  int64_t V;
  bool aligned;
  SharedStorage& sm;

  __device__ int64_t vocab() const { return V; }
  __device__ float logit(int64_t i) const { return to_float(row[i]); }

  // f(x, i) for this thread's logits; chunks of kVec consecutive logits, strided by the block.
  template <class F>
  __device__ __forceinline__ void for_each(F&& f) const {
    const int64_t n_chunks = (V + kVec - 1) / kVec;
    for (int64_t c = threadIdx.x; c < n_chunks; c += kThreads) {
      float x[kVec];
      const int n = load_chunk<T, kVec>(row, V, aligned, c * kVec, x);
#pragma unroll
      for (int j = 0; j < kVec; ++j)
        if (j < n) f(x[j], c * kVec + j);
    }
  }

  __device__ float max_logit() const {
    float m = -INFINITY;
    for_each([&](float x, int64_t) { m = fmaxf(m, x); });
    return block_reduce(m, MaxOp{}, -INFINITY, sm.warp_f32, &sm.bcast_f32);
  }

  __device__ int64_t first_index_of(float v) const {
    long long first = LLONG_MAX;
    for_each([&](float x, int64_t i) {
      if (x == v && i < first) first = i;
    });
    first = block_reduce(first, MinOp{}, LLONG_MAX, sm.warp_i64, &sm.bcast_i64);
    return first == LLONG_MAX ? 0 : first;
  }

  // Counts and fixed-point masses of the radix digit at `shift` over the keys in this pass. Every lane
  // of a warp runs the same iterations (chunks past the row load nothing) so that the warp can merge
  // equal digits before touching shared memory: in the first pass most of a 128k vocabulary lands in
  // a handful of bins, and per-lane atomics on one address would serialize 32-fold.
  __device__ void histogram(const WeightFn& fn, int shift, uint32_t prefix, uint32_t floor_key) const {
    for (int b = threadIdx.x; b < kRadixBins; b += kThreads) sm.count[b] = 0, sm.mass[b] = 0;
    __syncthreads();
    const int lane = threadIdx.x & 31;
    const int64_t n_chunks = (V + kVec - 1) / kVec;
    const float bound = scaled_lower_bound(fn, prefix > floor_key ? prefix : floor_key);  // skips the exp
    for (int64_t c0 = threadIdx.x - lane; c0 < n_chunks; c0 += kThreads) {  // c0: warp-uniform
      const int64_t i0 = (c0 + lane) * kVec;
      float x[kVec];
      const int n = load_chunk<T, kVec>(row, V, aligned, i0, x);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        uint32_t bin = kNoBin;
        unsigned long long q = 0;
        if (j < n && !(fn.scaled(x[j]) < bound)) {
          const float e = fn.weight(x[j]);
          const uint32_t key = weight_key(e);
          if (in_radix_pass(key, shift, prefix, floor_key)) bin = radix_digit(key, shift), q = fn.mass(e);
        }
        add_to_histogram(bin, q);
      }
    }
    __syncthreads();
  }

  // Warp-collective (all 32 lanes): add (1, q) to bin `bin` of every lane with bin != kNoBin.
  __device__ __forceinline__ void add_to_histogram(uint32_t bin, unsigned long long q) const {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if (!__any_sync(kFullMask, bin != kNoBin)) return;  // later passes: most lanes are out
    const unsigned peers = __match_any_sync(kFullMask, bin);  // lanes with the same bin
    // redux.sync adds 32-bit values: q < 2^53 goes in three 18-bit parts, whose sums over <= 32 lanes
    // stay below 2^23, so the recombined total is exact.
    const unsigned long long s0 = __reduce_add_sync(peers, static_cast<unsigned>(q & 0x3FFFFull));
    const unsigned long long s1 = __reduce_add_sync(peers, static_cast<unsigned>((q >> 18) & 0x3FFFFull));
    const unsigned long long s2 = __reduce_add_sync(peers, static_cast<unsigned>(q >> 36));
    if (bin != kNoBin && __ffs(peers) - 1 == static_cast<int>(threadIdx.x & 31)) {  // the group's leader
      atomicAdd(&sm.count[bin], static_cast<unsigned>(__popc(peers)));
      const unsigned long long mass = s0 + (s1 << 18) + (s2 << 36);
      if (mass != 0) atomicAdd(&sm.mass[bin], mass);
    }
#else
    if (bin == kNoBin) return;
    atomicAdd(&sm.count[bin], 1u);
    if (q != 0) atomicAdd(&sm.mass[bin], q);
#endif
  }

  __device__ uint64_t histogram_mass() const {
    if (threadIdx.x < 32) {
      unsigned long long s = 0;
      for (int b = threadIdx.x; b < kRadixBins; b += 32) s += sm.mass[b];
      s = warp_reduce(s, SumOp{});
      if (threadIdx.x == 0) sm.histogram_total = s;
    }
    __syncthreads();
    return sm.histogram_total;
  }

  // Warp 0 walks the bins top-down: lane l owns bins [8l, 8l + 8), learns the totals of the lanes
  // above it by a suffix scan, then runs radix_walk_step over its own bins; the integer sums make
  // this identical to pick_bin_sequential.
  __device__ BinPick pick_bin(bool by_mass, uint64_t need) const {
    constexpr int kPerLane = kRadixBins / 32;
    if (threadIdx.x < 32) {
      const int lane = threadIdx.x;
      if (lane == 0) sm.pick = BinPick{0, 0, 0, 0, 0, false};
      __syncwarp();
      unsigned long long count_own = 0, mass_own = 0;
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) count_own += sm.count[lane * kPerLane + j], mass_own += sm.mass[lane * kPerLane + j];
      unsigned long long count_suffix = count_own, mass_suffix = mass_own;  // lanes >= this one
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const unsigned long long c = __shfl_down_sync(kFullMask, count_suffix, o);
        const unsigned long long m = __shfl_down_sync(kFullMask, mass_suffix, o);
        if (lane + o < 32) count_suffix += c, mass_suffix += m;
      }
      uint64_t count_acc = count_suffix - count_own, mass_acc = mass_suffix - mass_own;
      BinPick mine{0, 0, 0, 0, 0, false};
      for (int j = kPerLane - 1; j >= 0; --j) {
        const int b = lane * kPerLane + j;
        if (radix_walk_step(count_acc, mass_acc, sm.count[b], sm.mass[b], by_mass, need, &mine, b)) {
          sm.pick = mine;  // exactly one lane crosses
          break;
        }
      }
    }
    __syncthreads();
    return sm.pick;
  }

  __device__ uint64_t kept_mass(const WeightFn& fn, uint32_t floor_key) const {
    unsigned long long s = 0;
    const float bound = scaled_lower_bound(fn, floor_key);
    for_each([&](float x, int64_t) {
      if (fn.scaled(x) < bound) return;
      const float e = fn.weight(x);
      if (weight_key(e) >= floor_key) s += fn.mass(e);
    });
    return block_reduce(s, SumOp{}, 0ull, sm.warp_u64, &sm.bcast_u64);
  }

  // Exclusive prefix sum over the block (thread order) and the block total.
  __device__ unsigned long long exclusive_scan(unsigned long long v, unsigned long long* total) const {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    unsigned long long incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const unsigned long long t = __shfl_up_sync(kFullMask, incl, o);
      if (lane >= o) incl += t;
    }
    if (lane == 31) sm.warp_u64[warp] = incl;
    __syncthreads();
    if (warp == 0) {
      const unsigned long long w = lane < kWarps ? sm.warp_u64[lane] : 0ull;
      unsigned long long w_incl = w;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const unsigned long long t = __shfl_up_sync(kFullMask, w_incl, o);
        if (lane >= o) w_incl += t;
      }
      __syncwarp();
      if (lane < kWarps) sm.warp_u64[lane] = w_incl - w;
      if (lane == kWarps - 1) sm.bcast_u64 = w_incl;
    }
    __syncthreads();
    *total = sm.bcast_u64;
    return sm.warp_u64[warp] + incl - v;
  }

  // First index in vocab order whose cumulative kept mass exceeds `target` (< total kept mass).
  __device__ int64_t first_crossing(const WeightFn& fn, uint32_t floor_key, uint64_t target) const {
    unsigned long long base = 0;  // kept mass before this tile
    const float bound = scaled_lower_bound(fn, floor_key);
    for (int64_t tile = 0; tile < V; tile += static_cast<int64_t>(kThreads) * kVec) {
      const int64_t i0 = tile + static_cast<int64_t>(threadIdx.x) * kVec;
      float x[kVec];
      const int n = load_chunk<T, kVec>(row, V, aligned, i0, x);
      unsigned long long q[kVec];
      unsigned long long own = 0;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        q[j] = 0;
        if (j < n && !(fn.scaled(x[j]) < bound)) {
          const float e = fn.weight(x[j]);
          if (weight_key(e) >= floor_key) q[j] = fn.mass(e);
        }
        own += q[j];
      }
      unsigned long long tile_total;
      const unsigned long long before = base + exclusive_scan(own, &tile_total);
      if (base + tile_total > target) {  // block-uniform: the crossing is in this tile
        if (before <= target && before + own > target) {
          unsigned long long cum = before;
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            cum += q[j];
            if (cum > target) {
              sm.bcast_i64 = i0 + j;
              break;
            }
          }
        }
        __syncthreads();
        return sm.bcast_i64;
      }
      base += tile_total;
      __syncthreads();  // the next tile's scan rewrites sm.warp_u64
    }
    return V - 1;  // unreachable: target < total kept mass
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    sample_tokens_kernel(const T* __restrict__ logits, int64_t V, RowParams prm, int64_t* __restrict__ tokens,
                         float* __restrict__ logprobs) {
  __shared__ SharedStorage sm;
  const int64_t row = blockIdx.x;
  const T* row_ptr = logits + row * V;
  const bool aligned = (reinterpret_cast<uintptr_t>(row_ptr) & 15) == 0;
  BlockExec<T> ex{row_ptr, V, aligned, sm};
  const RowResult res = sample_row(ex, prm, static_cast<uint64_t>(row));
  if (threadIdx.x == 0) {
    tokens[row] = res.token;
    logprobs[row] = res.logprob;
  }
}

}  // namespace
}  // namespace strl

extern "C" int strl_sample_tokens(const void* logits, int dtype, int64_t rows, int64_t vocab, float temperature,
                                  double top_p, int64_t top_k, uint64_t seed, uint64_t offset, int64_t* tokens,
                                  float* logprobs, void* stream) {
  // Grid x holds at most 2^31 - 1 rows; radix counts are 32-bit.
  if (rows < 0 || rows > INT_MAX || vocab <= 0 || vocab > INT_MAX) return STRL_INVALID_ARGUMENT;
  if (!(temperature >= 0.0f) || !(top_p > 0.0 && top_p <= 1.0) || top_k < 0) return STRL_INVALID_ARGUMENT;
  if (rows == 0) return STRL_OK;
  if (logits == nullptr || tokens == nullptr || logprobs == nullptr) return STRL_INVALID_ARGUMENT;
  const strl::RowParams prm{temperature, top_p, top_k, seed, offset};
  const dim3 grid(static_cast<unsigned>(rows));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (dtype == STRL_FLOAT32) {
    strl::sample_tokens_kernel<float>
        <<<grid, strl::kThreads, 0, s>>>(static_cast<const float*>(logits), vocab, prm, tokens, logprobs);
  } else if (dtype == STRL_BFLOAT16) {
    strl::sample_tokens_kernel<strl::Bf16>
        <<<grid, strl::kThreads, 0, s>>>(static_cast<const strl::Bf16*>(logits), vocab, prm, tokens, logprobs);
  } else {
    return STRL_INVALID_ARGUMENT;
  }
  return static_cast<int>(cudaGetLastError());
}

extern "C" const char* strl_error_string(int status) {
  if (status == STRL_INVALID_ARGUMENT) return "invalid argument to strl_sample_tokens";
  return cudaGetErrorString(static_cast<cudaError_t>(status));
}
