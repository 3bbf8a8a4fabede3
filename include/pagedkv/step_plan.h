// The block table of one batch of sequences, built once per step and reused by every layer's call
// until a block table changes.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "pagedkv/fence.h"
#include "pagedkv/types.h"

namespace pagedkv {

struct StepPlan {
  std::vector<SeqId> seqs;            // [num_seqs] the batch this plan was built for
  uint64_t version = ~uint64_t(0);    // engine version it was built at
  int32_t max_blocks = 0;             // row stride of block_table
  std::vector<int32_t> block_table;   // [num_seqs, max_blocks] device slot, -1 when not on device
  const int32_t* device_block_table = nullptr;  // the same on the GPU (CUDA builds)
  // The batch's blocks were ordered after every prefetch up to this epoch on this stream.
  uint64_t awaited_epoch = ~uint64_t(0);
  void* awaited_stream = nullptr;
  std::vector<int32_t> resident_head;  // [num_seqs] leading blocks all on the device
  std::vector<int32_t> resident_tail;  // [num_seqs] blocks from here on all on the device (or dropped)

  bool matches(const std::vector<SeqId>& s, uint64_t v) const { return version == v && seqs == s; }
};

// attend() over a scope larger than the device tier: which host blocks have this layer's slices
// staged, and the block table that names them. Every layer of a decode step reads the same
// blocks, so the plan is built at the first and reused by the rest.
struct StagedPlan {
  std::vector<SeqId> seqs;
  uint64_t version = ~uint64_t(0);
  std::vector<int32_t> kv_lens, lengths;  // the scope it was built for
  int32_t window = -1;
  std::vector<BlockId> order;             // staged blocks, slice i = order[i]
  std::vector<int32_t> host_slots;        // [order.size()] their host slots
  std::vector<int32_t> tables;            // [seqs, max_blocks] device slot, staged_entry(i), or -1
  std::vector<Fence> waits;               // evictions still writing those host slots at build time
  std::shared_ptr<Fence> last_read;       // the latest staging of these slots (host_read_by_ shares it)

  bool matches(const std::vector<SeqId>& s, uint64_t v, const std::vector<int32_t>& lens,
               const std::vector<int32_t>& rows, int32_t w) const {
    return version == v && window == w && seqs == s && kv_lens == lens && lengths == rows;
  }
};

}  // namespace pagedkv
