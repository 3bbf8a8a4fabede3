// CRC-32C of whole device blocks on the GPU, for the disk tier: a block evicted from the device
// gets its checksum here, beside its device-to-host copy, so the disk write later takes it as
// given instead of reading the block once more on the CPU just before the write (measured on an
// H100 host: any CPU pass over a buffer before or during its O_DIRECT write made the write ~40%
// slower; docs/LAB_NOTES.md).
//
// One CTA per block. Thread t takes the contiguous bytes [t R, (t + 1) R) of it (R: the block over
// the CTA's threads, a multiple of 16), runs them through the register from 0 with slicing-by-8
// tables in shared memory, and turns the result into its term of the block's CRC by one multiply
// by x^(8 * bytes after its range) (include/pagedkv/crc32c_gf2.h); the terms XOR together, in any
// order. The CRC goes straight to pinned host memory (a 4-byte store over the link).
#include <cstdint>

#include "pagedkv/crc32c_gf2.h"
#include "pagedkv/kernels.h"

namespace pagedkv::cuda {
namespace {

namespace gf2 = crc32c_gf2;

constexpr int kThreads = 1024;
constexpr int kJobsPerLaunch = 256;  // jobs travel in the launch's parameters (4 KiB of them)

struct Launch {
  BlockCrcJob job[kJobsPerLaunch];
  uint32_t squares[64];  // x^(8 * 2^k) mod P
  uint32_t start;        // ~0 * x^(8 * block_bytes) mod P
  uint64_t block_bytes;
};

// update(state, 8 bytes): lo, hi are the bytes as two little-endian words.
__device__ __forceinline__ uint32_t update8(const uint32_t (*table)[256], uint32_t state, uint32_t lo, uint32_t hi) {
  state ^= lo;
  return table[7][state & 0xff] ^ table[6][(state >> 8) & 0xff] ^ table[5][(state >> 16) & 0xff] ^
         table[4][state >> 24] ^ table[3][hi & 0xff] ^ table[2][(hi >> 8) & 0xff] ^ table[1][(hi >> 16) & 0xff] ^
         table[0][hi >> 24];
}

__global__ void __launch_bounds__(kThreads) block_crc_kernel(const __grid_constant__ Launch l) {
  __shared__ uint32_t table[8][256];  // table[k][b]: byte b, then k zero bytes, through the register
  __shared__ uint32_t warp_terms[kThreads / 32];
  for (int b = threadIdx.x; b < 256; b += kThreads) table[0][b] = gf2::update_byte(0, uint8_t(b));
  __syncthreads();
  for (int k = 1; k < 8; ++k) {
    for (int b = threadIdx.x; b < 256; b += kThreads) {
      const uint32_t prev = table[k - 1][b];
      table[k][b] = (prev >> 8) ^ table[0][prev & 0xff];
    }
    __syncthreads();
  }
  const BlockCrcJob job = l.job[blockIdx.x];
  const unsigned char* src = static_cast<const unsigned char*>(job.src);
  const uint64_t n = l.block_bytes;
  const bool vec = ((reinterpret_cast<uintptr_t>(src) | n) % 16) == 0;
  // This thread's range: 16-byte aligned pieces when the block allows, bytes otherwise.
  const uint64_t per = ((n + kThreads - 1) / kThreads + 15) / 16 * 16;
  const uint64_t begin = per * threadIdx.x < n ? per * threadIdx.x : n;
  const uint64_t end = begin + per < n ? begin + per : n;
  uint32_t raw = 0;
  if (vec) {
    const uint4* p = reinterpret_cast<const uint4*>(src + begin);
    for (uint64_t i = 0; i < (end - begin) / 16; ++i) {
      const uint4 w = __ldg(p + i);
      raw = update8(table, raw, w.x, w.y);
      raw = update8(table, raw, w.z, w.w);
    }
  } else {
    for (uint64_t i = begin; i < end; ++i) raw = table[0][(raw ^ src[i]) & 0xff] ^ (raw >> 8);
  }
  uint32_t term = begin < end ? gf2::chunk_term(raw, n - end, l.squares) : 0;
  for (int o = 16; o > 0; o >>= 1) term ^= __shfl_xor_sync(0xffffffffu, term, o);
  if (threadIdx.x % 32 == 0) warp_terms[threadIdx.x / 32] = term;
  __syncthreads();
  if (threadIdx.x < 32) {
    term = warp_terms[threadIdx.x];
    for (int o = 16; o > 0; o >>= 1) term ^= __shfl_xor_sync(0xffffffffu, term, o);
    if (threadIdx.x == 0) *job.crc = gf2::finish(l.start, term);
  }
}

}  // namespace

cudaError_t crc32c_blocks(const BlockCrcJob* jobs, int64_t count, size_t block_bytes, cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  static const Launch proto = [] {  // the squares, computed once
    Launch p{};
    gf2::zeros_squares(p.squares);
    return p;
  }();
  Launch l = proto;
  l.start = gf2::start_term(block_bytes, l.squares);
  l.block_bytes = block_bytes;
  for (int64_t at = 0; at < count; at += kJobsPerLaunch) {
    const int64_t n = count - at < kJobsPerLaunch ? count - at : kJobsPerLaunch;
    for (int64_t i = 0; i < n; ++i) l.job[i] = jobs[at + i];
    block_crc_kernel<<<unsigned(n), kThreads, 0, stream>>>(l);
    if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace pagedkv::cuda
