/* The C ABI of the fused CUDA sampler (csrc/sampling.cu), torch-free.

   bindings.cpp calls these launchers; it is compiled by the host compiler against torch's
   device-generic headers only, so the same binding also links against a CPU-only torch (CI).
   Semantics: kernels/sampling.py (the PyTorch reference). The per-row logic shared with the
   host-side test lives in sampling_row.h.
*/
#ifndef STRL_SAMPLING_H_
#define STRL_SAMPLING_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Element type of the logits. */
enum strl_dtype { STRL_FLOAT32 = 0, STRL_BFLOAT16 = 1 };

/* Status codes: 0 is success, STRL_INVALID_ARGUMENT a bad argument, any other value a
   cudaError_t from the launch (strl_error_string names it). */
enum { STRL_OK = 0, STRL_INVALID_ARGUMENT = -1 };

/* Sample one token per row of logits[rows, vocab] (row-major, contiguous) on `stream`
   (a cudaStream_t; NULL = the legacy default stream). Writes tokens[rows] and logprobs[rows],
   device pointers. temperature >= 0 (0 = greedy), 0 < top_p <= 1, top_k >= 0 (0 = off).
   The draw uses Philox4x32-10 with key = seed, counter = (offset_lo, offset_hi, row, 0).
   Asynchronous: returns after the launch. */
int strl_sample_tokens(const void* logits, int dtype, int64_t rows, int64_t vocab, float temperature,
                       double top_p, int64_t top_k, uint64_t seed, uint64_t offset, int64_t* tokens,
                       float* logprobs, void* stream);

/* A static, human-readable string for a status code returned above. */
const char* strl_error_string(int status);

#ifdef __cplusplus
}
#endif

#endif /* STRL_SAMPLING_H_ */
