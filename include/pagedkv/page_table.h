// Per-sequence page table: logical block -> block id, and the tokens each layer has seen.
#pragma once
#include <cstdint>
#include <vector>

#include "pagedkv/types.h"

namespace pagedkv {

struct SequenceTable {
  std::vector<BlockId> blocks;      // [num_logical_blocks] kNoBlock once dropped by a window
  std::vector<int32_t> lens;        // [num_layers] tokens seen per layer
  std::vector<int32_t> scope_start; // [num_layers] position of the first row of the latest append
  int32_t drop_cursor = 0;          // logical blocks below it are dropped unless they hold sinks
  uint64_t touched_step = ~uint64_t(0);  // the engine step its blocks last reported use in

  int32_t max_len() const;
  int32_t min_scope_start() const;
};

// Logical blocks needed to hold `tokens` tokens.
inline int32_t blocks_for(int64_t tokens, int32_t block_size) {
  return int32_t((tokens + block_size - 1) / block_size);
}

}  // namespace pagedkv
