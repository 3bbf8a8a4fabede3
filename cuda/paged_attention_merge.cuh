// Second pass of split-K: combine the per-split normalised outputs with their log-sum-exps.
//   lse = log2 sum_s 2^lse_s,   out = sum_s 2^(lse_s - lse) * o_s
#pragma once
#include "mma_ptx.cuh"

namespace pagedkv::cuda::detail {

constexpr int kMergeThreads = 256;

// One CTA per (row, query head). Thread t = split lane t / kGroups, float4 column t % kGroups:
// it sums splits sl, sl + kLanes, ... of that column, so a long split list is read by several
// independent load streams at once rather than one thread walking it.
template <typename T, int HD>
__global__ void __launch_bounds__(kMergeThreads)
    merge_splits_kernel(const float* __restrict__ part_o,    // [num_splits, rows_heads, HD]
                        const float* __restrict__ part_lse,  // [num_splits, rows_heads] log2
                        int num_splits, int64_t rows_heads,  // rows_heads = num_rows * num_q_heads
                        T* __restrict__ out,                 // [rows_heads, HD]
                        float* __restrict__ lse)             // [rows_heads] natural log, or null
{
  constexpr int kGroups = HD / 4;
  constexpr int kLanes = kMergeThreads / kGroups;
  __shared__ float s_total;
  __shared__ float4 s_acc[kLanes][kGroups];
  const int64_t rh = blockIdx.x;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");  // partials complete and visible
#endif

  if (threadIdx.x < 32) {  // warp 0: total log2-sum-exp over the splits
    float mx = -INFINITY;
    for (int s = threadIdx.x; s < num_splits; s += 32) mx = fmaxf(mx, part_lse[s * rows_heads + rh]);
    for (int d = 16; d > 0; d /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, d));
    float sum = 0.f;
    if (mx != -INFINITY)
      for (int s = threadIdx.x; s < num_splits; s += 32) sum += ex2(part_lse[s * rows_heads + rh] - mx);
    for (int d = 16; d > 0; d /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, d);
    if (threadIdx.x == 0) s_total = sum > 0.f ? mx + __log2f(sum) : -INFINITY;
  }
  __syncthreads();
  const float total = s_total;
  const int col = threadIdx.x % kGroups, sl = threadIdx.x / kGroups;
  if (sl < kLanes) {
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    if (total != -INFINITY) {
#pragma unroll 4
      for (int s = sl; s < num_splits; s += kLanes) {
        const float ls = part_lse[s * rows_heads + rh];
        const float w = ls == -INFINITY ? 0.f : ex2(ls - total);  // empty split: no keys
        const float4 v = reinterpret_cast<const float4*>(part_o + (s * rows_heads + rh) * HD)[col];
        acc.x += w * v.x, acc.y += w * v.y, acc.z += w * v.z, acc.w += w * v.w;
      }
    }
    s_acc[sl][col] = acc;
  }
  __syncthreads();
  if (threadIdx.x < kGroups) {
    float4 a = s_acc[0][threadIdx.x];
#pragma unroll
    for (int l = 1; l < kLanes; ++l) {
      const float4 b = s_acc[l][threadIdx.x];
      a.x += b.x, a.y += b.y, a.z += b.z, a.w += b.w;
    }
    uint2 vec = make_uint2(Pack<T>::two(a.x, a.y), Pack<T>::two(a.z, a.w));
    reinterpret_cast<uint2*>(out + rh * HD)[threadIdx.x] = vec;
  }
  if (threadIdx.x == 0 && lse != nullptr) lse[rh] = total * 0.6931471805599453f;
}

}  // namespace pagedkv::cuda::detail
