// Counters the engine keeps; exposed to Python as the flat dict of DESIGN.md §4.
#pragma once
#include <cstdint>

namespace pagedkv {

struct TransferCounters {
  int64_t blocks_to_host = 0, blocks_from_host = 0, blocks_to_disk = 0, blocks_from_disk = 0;
  int64_t bytes_to_host = 0, bytes_from_host = 0, bytes_to_disk = 0, bytes_from_disk = 0;
  int64_t evictions = 0, drops = 0, device_hits = 0, device_misses = 0;
  int64_t cow_copies = 0;
  // Blocks written to the disk tier with the CRC-32C they carried (computed on the GPU on their
  // way down, or checked by the read that brought them up): not read again to checksum them.
  int64_t disk_crcs_carried = 0;
  // Host blocks read in place of a device copy: one layer's slices staged per attend call.
  int64_t slices_staged = 0, bytes_staged = 0;
  double transfer_wait_s = 0.0;
};

struct Stats {
  int64_t device_blocks_used = 0, device_blocks_free = 0;
  int64_t host_blocks_used = 0, host_blocks_free = 0;
  int64_t disk_blocks_used = 0, disk_blocks_free = 0;
  int64_t num_sequences = 0;
  int64_t device_scratch_bytes = 0;  // device memory beside the pool: tables, split-K, staging
  TransferCounters counters;
};

}  // namespace pagedkv
