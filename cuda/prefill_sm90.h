// The Hopper tensor-core prefill path of paged_attention (prefill_sm90.cu).
#pragma once
#include <cuda_runtime_api.h>

#include "pagedkv/attention_params.h"

namespace pagedkv::cuda::detail {

template <typename T>
struct TypeTag {
  using type = T;
};

// Whether this device and build can run the call through prefill_sm90: an sm_90 GPU with the
// sm_90a kernels in the binary, fp16/bf16, head_dim 64/128/256, no sink rotation.
bool prefill_sm90_supports(const PagedAttentionParams& p, int variant = 0);

// Launches it on `stream` (no workspace: every CTA owns its rows' whole key range).
cudaError_t prefill_sm90(const PagedAttentionParams& p, int variant, cudaStream_t stream);

}  // namespace pagedkv::cuda::detail
