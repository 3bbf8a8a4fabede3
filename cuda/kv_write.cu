// Scatter new K/V rows of one layer into their pool slots (DESIGN.md §3 layout).
#include <algorithm>
#include <cstdint>

#include "pagedkv/kernels.h"

namespace pagedkv::cuda {
namespace {

// Index map: item i = ((row * 2 + kv) * num_kv_heads + head) * vecs_per_row + vec reads vector
// `vec` of k[row, head] (kv 0) or v[row, head] (kv 1) and writes it to the pool tile of
// (slot, layer, kv, head) at token `offset`, slot/offset from slot_mapping[row]. Consecutive
// threads take consecutive vectors of one row, so reads and writes are both coalesced.
template <typename Vec>
__global__ void kv_write_kernel(const KVWriteParams p, int vecs_per_row, int64_t total) {
  const Vec* k = static_cast<const Vec*>(p.k);
  const Vec* v = static_cast<const Vec*>(p.v);
  Vec* pool = static_cast<Vec*>(p.pool);
  const int64_t tile = int64_t(p.block_size) * vecs_per_row;  // one [block_size][head_dim] tile
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int vec = int(i % vecs_per_row);
    int64_t rest = i / vecs_per_row;
    const int head = int(rest % p.num_kv_heads);
    rest /= p.num_kv_heads;
    const int kv = int(rest % 2);
    const int64_t row = rest / 2;
    const int32_t sm = p.slot_mapping[row];
    if (sm < 0) continue;  // padding row: nothing to store
    const int64_t slot = sm / p.block_size, offset = sm % p.block_size;
    const int64_t dst = (((slot * p.num_layers + p.layer) * 2 + kv) * p.num_kv_heads + head) * tile +
                        offset * vecs_per_row + vec;
    const int64_t src = (row * p.num_kv_heads + head) * vecs_per_row + vec;
    pool[dst] = kv == 0 ? k[src] : v[src];
  }
}

template <typename Vec>
cudaError_t launch(const KVWriteParams& p, int64_t row_bytes, cudaStream_t stream) {
  const int vecs_per_row = int(row_bytes / sizeof(Vec));
  const int64_t total = int64_t(p.num_rows) * 2 * p.num_kv_heads * vecs_per_row;
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, 65536);
  kv_write_kernel<Vec><<<unsigned(blocks), kThreads, 0, stream>>>(p, vecs_per_row, total);
  return cudaGetLastError();
}

bool aligned(const void* ptr, size_t n) { return reinterpret_cast<uintptr_t>(ptr) % n == 0; }

}  // namespace

cudaError_t kv_write(const KVWriteParams& p, cudaStream_t stream) {
  if (p.num_rows == 0) return cudaSuccess;
  if (p.num_rows < 0 || p.num_kv_heads <= 0 || p.head_dim <= 0 || p.block_size <= 0 ||
      p.layer < 0 || p.layer >= p.num_layers)
    return cudaErrorInvalidValue;
  const int64_t row_bytes = int64_t(p.head_dim) * dtype_size(p.dtype);
  // The widest vector that divides a row and every base pointer: 16 B for any head_dim that is
  // a multiple of 8 (2-byte dtypes), narrower otherwise. Byte copies, so any dtype works.
  auto fits = [&](size_t n) {
    return row_bytes % int64_t(n) == 0 && aligned(p.k, n) && aligned(p.v, n) && aligned(p.pool, n);
  };
  if (fits(16)) return launch<uint4>(p, row_bytes, stream);
  if (fits(8)) return launch<uint2>(p, row_bytes, stream);
  if (fits(4)) return launch<uint32_t>(p, row_bytes, stream);
  if (fits(2)) return launch<uint16_t>(p, row_bytes, stream);
  return launch<uint8_t>(p, row_bytes, stream);
}

}  // namespace pagedkv::cuda
