// The CUDA backend's merge of partial attention results by log-sum-exp (device_backend.h):
// one thread per (row, head) pair and dim, float accumulation. Compiled only with CUDA.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "pagedkv/types.h"

namespace pagedkv {
namespace {

template <typename T>
__device__ float to_float(T x);
template <>
__device__ float to_float(__half x) { return __half2float(x); }
template <>
__device__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ float to_float(float x) { return x; }
template <typename T>
__device__ T from_float(float x);
template <>
__device__ __half from_float(float x) { return __float2half_rn(x); }
template <>
__device__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ float from_float(float x) { return x; }

// Block b handles pair b (row, head); threads stride over head_dim.
template <typename T>
__global__ void merge_kernel(const T* outs, const float* lses, int32_t parts, int64_t rows_heads, int32_t head_dim,
                             T* out, float* lse) {
  const int64_t rh = blockIdx.x;
  float m = -INFINITY;
  for (int32_t i = 0; i < parts; ++i) m = fmaxf(m, lses[int64_t(i) * rows_heads + rh]);
  float total = 0.f;
  if (m != -INFINITY)
    for (int32_t i = 0; i < parts; ++i) total += expf(lses[int64_t(i) * rows_heads + rh] - m);
  for (int32_t d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float acc = 0.f;
    if (total > 0.f)
      for (int32_t i = 0; i < parts; ++i)
        acc += expf(lses[int64_t(i) * rows_heads + rh] - m) *
               to_float(outs[(int64_t(i) * rows_heads + rh) * head_dim + d]);
    out[rh * head_dim + d] = from_float<T>(total > 0.f ? acc / total : 0.f);
  }
  if (lse && threadIdx.x == 0) lse[rh] = total > 0.f ? m + logf(total) : -INFINITY;
}

template <typename T>
cudaError_t launch(const void* outs, const float* lses, int32_t parts, int64_t rows_heads, int32_t head_dim,
                   void* out, float* lse, cudaStream_t stream) {
  if (rows_heads == 0) return cudaSuccess;
  merge_kernel<T><<<unsigned(rows_heads), 128, 0, stream>>>(static_cast<const T*>(outs), lses, parts, rows_heads,
                                                            head_dim, static_cast<T*>(out), lse);
  return cudaGetLastError();
}

}  // namespace

cudaError_t merge_partials_cuda(const void* outs, const float* lses, int32_t parts, int64_t rows_heads,
                                int32_t head_dim, DType dtype, void* out, float* lse, cudaStream_t stream) {
  switch (dtype) {
    case DType::f16: return launch<__half>(outs, lses, parts, rows_heads, head_dim, out, lse, stream);
    case DType::bf16: return launch<__nv_bfloat16>(outs, lses, parts, rows_heads, head_dim, out, lse, stream);
    default: return launch<float>(outs, lses, parts, rows_heads, head_dim, out, lse, stream);
  }
}

}  // namespace pagedkv
