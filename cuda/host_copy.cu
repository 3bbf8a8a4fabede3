// Small host -> device copies done by a kernel reading mapped pinned memory, instead of by the
// copy engines. Block tables and lengths go this way: a cudaMemcpyAsync of a few kilobytes on
// the compute stream queues behind bulk swaps on the same host-to-device engine (measured on
// an H200: a decode step took 2.4x as long while 1 GiB of swaps was in flight); loads issued by
// the SMs do not wait for the engine, only share the link.
#include <cstdint>

#include "pagedkv/kernels.h"

namespace pagedkv::cuda {
namespace {

__global__ void copy_mapped_kernel(uint4* __restrict__ dst, const uint4* __restrict__ src, size_t n16,
                                   unsigned char* __restrict__ dst_tail,
                                   const unsigned char* __restrict__ src_tail, int tail) {
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n16; i += stride) dst[i] = src[i];
  if (blockIdx.x == 0 && int(threadIdx.x) < tail) dst_tail[threadIdx.x] = src_tail[threadIdx.x];
}

}  // namespace

cudaError_t copy_from_mapped_host(void* dst, const void* src, size_t bytes, cudaStream_t stream) {
  if (bytes == 0) return cudaSuccess;
  if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) % 16 != 0)
    return cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream);
  const size_t n16 = bytes / 16;
  const int tail = int(bytes % 16);
  constexpr int kThreads = 256;
  const size_t want = (n16 + kThreads - 1) / kThreads;
  const unsigned blocks = unsigned(want < 1 ? 1 : (want > 264 ? 264 : want));
  copy_mapped_kernel<<<blocks, kThreads, 0, stream>>>(
      static_cast<uint4*>(dst), static_cast<const uint4*>(src), n16,
      static_cast<unsigned char*>(dst) + n16 * 16, static_cast<const unsigned char*>(src) + n16 * 16, tail);
  return cudaGetLastError();
}

}  // namespace pagedkv::cuda

namespace pagedkv::cuda {
namespace {

// Vector v of the output is 16-byte piece v % per_slice of slice v / per_slice, which is read from
// host_base + slots[slice] * block_bytes + offset. Each thread keeps UNROLL loads in flight: a
// read over the link takes microseconds, so the link fills only with many outstanding.
template <int UNROLL>
__global__ void gather_mapped_kernel(uint4* __restrict__ dst, const char* __restrict__ host_base,
                                     const int32_t* __restrict__ slots, int64_t total, int64_t per_slice,
                                     int64_t block_bytes, int64_t offset) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t v0 = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; v0 < total; v0 += stride * UNROLL) {
    uint4 r[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t v = v0 + u * stride;
      if (v < total) {
        const int64_t s = v / per_slice;
        r[u] = reinterpret_cast<const uint4*>(host_base + int64_t(slots[s]) * block_bytes + offset)[v - s * per_slice];
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
      if (v0 + u * stride < total) dst[v0 + u * stride] = r[u];
  }
}

template <int UNROLL>
void launch_gather(const GatherShape& g, uint4* dst, const char* host_base, const int32_t* slots, int64_t total,
                   int64_t per_slice, int64_t block_bytes, int64_t offset, int num_sms, cudaStream_t stream) {
  const int64_t per_cta = int64_t(g.threads) * UNROLL;
  const int64_t want = (total + per_cta - 1) / per_cta;
  const int64_t most = int64_t(num_sms) * g.ctas_per_sm;
  const unsigned blocks = unsigned(want < 1 ? 1 : (want > most ? most : want));
  gather_mapped_kernel<UNROLL><<<blocks, g.threads, 0, stream>>>(dst, host_base, slots, total, per_slice,
                                                                  block_bytes, offset);
}

}  // namespace

cudaError_t gather_from_mapped_host(void* dst, const void* host_base, const int32_t* slots, int64_t count,
                                    int64_t slice_bytes, int64_t block_bytes, int64_t offset, int num_sms,
                                    cudaStream_t stream, const GatherShape& shape) {
  if (count == 0) return cudaSuccess;
  if (slice_bytes % 16 || block_bytes % 16 || offset % 16 ||
      (reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(host_base)) % 16)
    return cudaErrorInvalidValue;
  if (shape.threads < 32 || shape.threads > 1024 || shape.threads % 32 || shape.ctas_per_sm < 1)
    return cudaErrorInvalidValue;
  const int64_t total = count * (slice_bytes / 16);
  auto* d = static_cast<uint4*>(dst);
  auto* h = static_cast<const char*>(host_base);
  const int64_t per = slice_bytes / 16;
  switch (shape.unroll) {
    case 2: launch_gather<2>(shape, d, h, slots, total, per, block_bytes, offset, num_sms, stream); break;
    case 4: launch_gather<4>(shape, d, h, slots, total, per, block_bytes, offset, num_sms, stream); break;
    case 8: launch_gather<8>(shape, d, h, slots, total, per, block_bytes, offset, num_sms, stream); break;
    case 16: launch_gather<16>(shape, d, h, slots, total, per, block_bytes, offset, num_sms, stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace pagedkv::cuda
