// Torch binding of the fused CUDA sampler: the `singleturn_rl::sample_tokens` schema, its CUDA
// implementation (a thin wrapper over the C ABI in sampling.h) and a CPU implementation that only
// says there is no CPU kernel.
//
// Device-generic torch headers only (no ATen/cuda, no c10/cuda): the CPU wheel lacks those, and CI
// compiles and links this file against it. The CUDA stream and device come from c10's virtual
// device-guard interface, which the CUDA build of torch backs at run time.
// Python side: kernels/_csrc.py (lazy build and load, register_fake), kernels/sampling.py (dispatch).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include <tuple>

#include "sampling.h"

namespace {

void check_args(const at::Tensor& logits, double temperature, double top_p, int64_t top_k) {
  TORCH_CHECK(logits.dim() == 2, "sample_tokens: logits must be [B, V], got shape ", logits.sizes());
  TORCH_CHECK(logits.size(1) > 0, "sample_tokens: the vocabulary is empty");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16,
              "sample_tokens: logits must be float32 or bfloat16, got ", logits.scalar_type());
  TORCH_CHECK(temperature >= 0.0, "sample_tokens: temperature must be >= 0, got ", temperature);
  TORCH_CHECK(top_p > 0.0 && top_p <= 1.0, "sample_tokens: top_p must be in (0, 1], got ", top_p);
  TORCH_CHECK(top_k >= 0, "sample_tokens: top_k must be >= 0, got ", top_k);
}

std::tuple<at::Tensor, at::Tensor> sample_tokens_cuda(const at::Tensor& logits, double temperature, double top_p,
                                                      int64_t top_k, int64_t seed, int64_t offset) {
  check_args(logits, temperature, top_p, top_k);
  const c10::DeviceGuard guard(logits.device());
  const at::Tensor logits_c = logits.contiguous();  // (B, V) row-major
  const int64_t B = logits_c.size(0), V = logits_c.size(1);
  at::Tensor tokens = at::empty({B}, logits_c.options().dtype(at::kLong));        // (B,)
  at::Tensor logprobs = at::empty({B}, logits_c.options().dtype(at::kFloat));     // (B,)
  // The current CUDA stream of the logits' device, as an opaque cudaStream_t.
  const c10::Stream stream = c10::impl::VirtualGuardImpl(c10::DeviceType::CUDA).getStream(logits_c.device());
  const int status = strl_sample_tokens(
      logits_c.const_data_ptr(), logits_c.scalar_type() == at::kFloat ? STRL_FLOAT32 : STRL_BFLOAT16, B, V,
      static_cast<float>(temperature), top_p, top_k, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset),
      tokens.mutable_data_ptr<int64_t>(), logprobs.mutable_data_ptr<float>(), stream.native_handle());
  TORCH_CHECK(status == STRL_OK, "sample_tokens: CUDA launch failed: ", strl_error_string(status));
  return {tokens, logprobs};
}

std::tuple<at::Tensor, at::Tensor> sample_tokens_cpu(const at::Tensor& logits, double, double, int64_t, int64_t,
                                                     int64_t) {
  TORCH_CHECK(false, "singleturn_rl::sample_tokens has no CPU kernel (got a ", logits.device(),
              " tensor); use kernels.sampling.sample_tokens, which runs the PyTorch reference on CPU");
}

}  // namespace

TORCH_LIBRARY(singleturn_rl, m) {
  m.def(
      "sample_tokens(Tensor logits, float temperature, float top_p, int top_k, int seed, int offset) "
      "-> (Tensor tokens, Tensor logprobs)");
}

TORCH_LIBRARY_IMPL(singleturn_rl, CUDA, m) { m.impl("sample_tokens", &sample_tokens_cuda); }

TORCH_LIBRARY_IMPL(singleturn_rl, CPU, m) { m.impl("sample_tokens", &sample_tokens_cpu); }
