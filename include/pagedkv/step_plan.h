// The block table of one batch of sequences, built once per step and reused by every layer's call
// until a block table changes.
#pragma once
#include <cstdint>
#include <vector>

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

}  // namespace pagedkv
