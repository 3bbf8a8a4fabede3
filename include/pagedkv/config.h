// The shape of a cache: fixed at construction, read by every part of the engine.
#pragma once
#include <cstdint>
#include <string>

#include "pagedkv/crc32c.h"
#include "pagedkv/gather_shape.h"
#include "pagedkv/policy.h"
#include "pagedkv/types.h"

namespace pagedkv {

// How attend() moves this layer's slices of off-device blocks into the staging buffer when a scope
// is larger than the device tier (CUDA): `kernel` = SM loads over the link from the mapped host
// tier, on the compute stream; `dma` = 2-D copies on the copy engine.
enum class Staging : int32_t { kernel = 0, dma = 1 };
// How a batch of block copies reaches the driver (CUDA 13+): `batch` = one cudaMemcpyBatchAsync,
// `overlap` = the same with cudaMemcpyFlagPreferOverlapWithCompute, `off` = a cudaMemcpyAsync each.
enum class CopyBatch : int32_t { batch = 0, overlap = 1, off = 2 };

struct CacheConfig {
  int32_t num_layers = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t block_size = 16;
  DType dtype = DType::f16;
  int64_t device_blocks = 0;  // hot tier capacity (GPU memory, or host memory when on_cuda is false)
  int64_t host_blocks = 0;    // pinned host tier (the tiers issue)
  int64_t disk_blocks = 0;    // disk tier (the tiers issue)
  std::string disk_path;
  int32_t window = 0;       // <= 0: full causal attention; else each query sees its last `window` keys
  int32_t sink_tokens = 0;  // with a window, the first `sink_tokens` keys stay visible
  bool retain = true;       // with a window: false frees out-of-scope blocks at once
  std::string policy = "lru";  // which device blocks go down first (policy.h)
  PolicyParams policy_params;
  // Proactive offload: when free device blocks fall below low_watermark * device_blocks, blocks go
  // down until high_watermark * device_blocks are free. Only with a host tier.
  double low_watermark = 0.0;
  double high_watermark = 0.0;
  bool on_cuda = false;     // the device tier is GPU memory
  int32_t cuda_device = 0;
  // Tuning choices benches compare; every default is the fast one. Python: PagedKV(staging=,
  // gather_shape=, copy_batch=). They change speed only, never results.
  Staging staging = Staging::kernel;
  GatherShape gather_shape;         // the staging kernel's shape (Staging::kernel)
  CopyBatch copy_batch = CopyBatch::batch;
  // A bench and test switch, not a tuning choice: false writes and reads disk-tier blocks without
  // their CRC-32C (no corruption is detected), so `bench offload` can time the checksum's cost as
  // the same swaps with it and without it. Default on; Python: PagedKV(disk_checksum=).
  bool disk_checksum = true;
  // The disk tier's reads and checksum, speed only (benches time the ways against each other):
  // blocks are read in pieces of disk_read_piece bytes, each piece's CRC running on a checksum
  // thread while the next is read (a multiple of 4096 of at least 256 KiB; 0: whole blocks, the
  // CRC after), and the CRC runs on the fastest path this CPU has, at most disk_crc. The crc32
  // instruction by default, not the AVX-512 folding though that is twice as fast on one thread:
  // inside the engine, beside four I/O threads, the folding cost more in every paired run on the
  // GPU machines' hosts (BENCHMARKS.md, the disk tier's checksum). Python: PagedKV(disk_read_piece=,
  // disk_crc=).
  int64_t disk_read_piece = int64_t(512) << 10;
  Crc32cPath disk_crc = Crc32cPath::crc32;
  // Which registered tier implementation holds the coldest level (tier.h): "disk" (a file of block
  // slots) unless a test or an extension registers another.
  std::string cold_tier = "disk";
  // Distributed context (docs/DISTRIBUTED.md): logical block b of every sequence lives on rank
  // b % stripe_world. This engine is rank stripe_rank: it keeps every sequence's whole page table
  // (lengths, positions, windows) but holds, writes and reads only its own blocks; attention
  // returns its partial (out, lse) over them. 1: not striped.
  int32_t stripe_world = 1;
  int32_t stripe_rank = 0;

  // Elements of one [block_size][head_dim] tile, and bytes of one whole block (all layers, K and V).
  int64_t tile_elems() const { return int64_t(block_size) * head_dim; }
  int64_t block_elems() const { return int64_t(num_layers) * 2 * num_kv_heads * tile_elems(); }
  int64_t block_bytes() const { return block_elems() * int64_t(dtype_size(dtype)); }
  bool windowed() const { return window > 0; }
  bool striped() const { return stripe_world > 1; }
  // Whether logical block b of a sequence is held by this rank.
  bool owns(int64_t b) const { return stripe_world <= 1 || b % stripe_world == stripe_rank; }
};

// Validates a configuration; throws ArgumentError naming the first bad field.
void validate_config(const CacheConfig& c);

}  // namespace pagedkv
