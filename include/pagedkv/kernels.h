// CUDA entry points. Raw pointers, sizes and a stream in; a cudaError_t out. They know nothing
// of Python or torch; the engine validates every argument before calling them.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "pagedkv/attention_params.h"
#include "pagedkv/gather_shape.h"

namespace pagedkv::cuda {

// Scatter new K/V rows into their pool slots for one layer.
struct KVWriteParams {
  const void* k = nullptr;                 // [num_rows, num_kv_heads, head_dim] contiguous
  const void* v = nullptr;                 // [num_rows, num_kv_heads, head_dim] contiguous
  void* pool = nullptr;                    // [num_slots, num_layers, 2, num_kv_heads, block_size, head_dim]
  const int32_t* slot_mapping = nullptr;   // [num_rows] slot * block_size + offset of each row
  int32_t num_rows = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t block_size = 0;
  int32_t num_layers = 0;
  int32_t layer = 0;
  DType dtype = DType::f16;
};
cudaError_t kv_write(const KVWriteParams& p, cudaStream_t stream);

// Choices paged_attention makes by itself; tests and benches pin them (the defaults are what
// every engine call uses).
struct AttentionTuning {
  enum Path : int32_t {
    kAuto = 0,        // tensor-core prefill when supported and rows per sequence reach the threshold
    kSplitK = 1,      // the split-K mma.sync kernel (decode and short multi-token steps)
    kTensorCore = 2,  // the sm_90a tensor-core prefill kernel wherever it supports the call
  };
  int32_t path = kAuto;
  int32_t force_splits = 0;  // split-K kernel: > 0 forces that many splits
  int32_t variant = 0;       // split-K kernel: 1 forces the 3-stage configuration (head_dim <= 128), -1 the base one
  int32_t aim_ctas = 2;      // split-K kernel: resident CTAs per SM that split-K aims at below a full wave
  int32_t prefill_variant = 0;  // tensor-core kernel variant, for benches (cuda/prefill_sm90.cu, by_type_hd)
};

// Packed query rows per sequence (max_q_len x GQA group) from which kAuto takes the tensor-core
// prefill kernel on Hopper: on an H200, 32 x 8192 with 8 rows (32 packed) ran 281 us against 497 us
// split-K, 64 x 4096 with 4 rows (16 packed) 281 against 259 (tests/cuda --prefill-bench).
constexpr int32_t kTensorCoreMinRows = 32;

// Scratch bytes paged_attention needs for these params (split-K partials); `num_sms` of the device.
size_t paged_attention_workspace_bytes(const PagedAttentionParams& p, int num_sms,
                                       const AttentionTuning& tuning = {});

// Attention over the block table: decode (one row per sequence) and multi-token causal queries.
// `workspace` holds at least paged_attention_workspace_bytes(p, num_sms) bytes of device memory.
cudaError_t paged_attention(const PagedAttentionParams& p, void* workspace, size_t workspace_bytes,
                            int num_sms, cudaStream_t stream, const AttentionTuning& tuning = {});

// Copies `bytes` from mapped pinned host memory (`src`, its device address) to device memory with
// a kernel, so the copy never queues behind bulk transfers on the copy engines.
cudaError_t copy_from_mapped_host(void* dst, const void* src, size_t bytes, cudaStream_t stream);

// Copies `count` slices of `slice_bytes` into `dst`, back to back: slice i from mapped pinned host
// memory at host_base + slots[i] * block_bytes + offset (`slots` in device memory). SM loads over
// the link, on `stream`: no copy engine, no event, and no queueing behind other transfers.
cudaError_t gather_from_mapped_host(void* dst, const void* host_base, const int32_t* slots, int64_t count,
                                    int64_t slice_bytes, int64_t block_bytes, int64_t offset, int num_sms,
                                    cudaStream_t stream, const GatherShape& shape = GatherShape{});

// One block to checksum: its bytes in device memory, and where its CRC-32C goes (device memory,
// or pinned host memory by its device address).
struct BlockCrcJob {
  const void* src;  // [block_bytes] device memory
  uint32_t* crc;    // one value, written when the kernel ends
};
// The CRC-32C of each job's `block_bytes` (crc32c.h's value: the host checks it), on `stream`
// (cuda/block_crc.cu).
cudaError_t crc32c_blocks(const BlockCrcJob* jobs, int64_t count, size_t block_bytes, cudaStream_t stream);

}  // namespace pagedkv::cuda
