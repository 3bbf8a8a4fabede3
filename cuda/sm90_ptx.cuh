// Hopper (sm_90a) PTX the tensor-core prefill kernel uses: shared-memory mbarriers, the
// generic->async proxy fence, TMA tile loads, warpgroup MMA fences and waits, register
// reallocation, and the wgmma shared-memory matrix descriptor. Compiled only where
// __CUDA_ARCH_FEAT_SM90_ALL is set.
#pragma once
#include <cstdint>

#include "mma_ptx.cuh"
#include "wgmma_ops.cuh"

namespace pagedkv::cuda::detail {

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)

__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
// Blocks until the phase of parity `parity` has completed (a fresh barrier counts parity 1 as done).
__device__ __forceinline__ void mbar_wait(uint64_t* bar, int parity) {
  asm volatile(
      "{\n.reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n}\n" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory");
}

// Arrives on `bar` when every cp.async this thread issued before has completed (the barrier's
// expected count includes this thread; nothing is added to it).
__device__ __forceinline__ void cp_async_arrive_noinc(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}

// Arrives on `bar` and adds `bytes` to the transfers its phase waits for (TMA copies that signal
// `bar` count their bytes off as they land).
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}

// TMA: the box at (c0, c1) of the 2-D tensor map at generic address `map` (a __grid_constant__
// kernel parameter) into shared memory at `dst`, its bytes counted off `bar` when they land.
__device__ __forceinline__ void tma_load_2d(void* dst, const void* map, int c0, int c1, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(smem_u32(bar))
      : "memory");
}

// Ordinary (and cp.async) shared-memory writes of this thread become visible to the async proxy
// (wgmma operand reads) of whoever synchronises with this thread afterwards.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving reads of wgmma accumulators above the wait that completes them.
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

template <int N, int M>
__device__ __forceinline__ void fence_regs_u32(uint32_t (&r)[N][M]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < M; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
}

template <int REGS>
__device__ __forceinline__ void regs_dealloc() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGS));
}
template <int REGS>
__device__ __forceinline__ void regs_alloc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGS));
}

__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

#endif

// wgmma shared-memory descriptor for a 128-byte-swizzled operand (PTX ISA "Matrix Descriptor"):
// start address, leading and stride byte offsets in 16-byte units, swizzle mode 1 (128 B).
// Tiles are stored as 64-element (128-byte) column blocks of `rows` rows; within a block, 16-byte
// chunk c of row r sits at chunk c ^ (r % 8), every 8-row atom 1024 bytes, 1024-byte aligned.
//   K-major (the contraction dim contiguous: Q and K): SBO = 1024 (next 8 rows), LBO unused.
//   MN-major (V as the B of P.V, N = head_dim contiguous): SBO = 1024 (next 8 keys), LBO = the
//   column-block stride (next 64 head dims).
__host__ __device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t((lbo_bytes >> 4) & 0x3FFF) << 16) |
         (uint64_t((sbo_bytes >> 4) & 0x3FFF) << 32) | (uint64_t(1) << 62);
}

// Byte offset of 16-byte chunk `cv` (of head_dim / 8) of row `r` in such a tile of `rows` rows.
__host__ __device__ __forceinline__ uint32_t swz_offset(int r, int cv, int rows) {
  return uint32_t((cv >> 3) * rows * 128 + r * 128 + (((cv & 7) ^ (r & 7)) << 4));
}

}  // namespace pagedkv::cuda::detail
