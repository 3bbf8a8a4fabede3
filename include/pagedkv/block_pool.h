// The slots of one tier: which are free, which are taken, and the memory behind them.
#pragma once
#include <cstdint>
#include <vector>

#include "pagedkv/tier_memory.h"

namespace pagedkv {

class BlockPool {
 public:
  BlockPool() = default;
  BlockPool(int64_t num_slots, TierMemory memory);

  // Takes a free slot. Throws OutOfBlocks when none is left (callers check num_free() first).
  int32_t allocate();
  // Gives a slot back; throws InternalError on a slot that is not taken.
  void release(int32_t slot);

  int64_t capacity() const { return int64_t(taken_.size()); }
  int64_t num_free() const { return int64_t(free_slots_.size()); }
  int64_t num_used() const { return capacity() - num_free(); }
  bool is_taken(int32_t slot) const { return taken_.at(size_t(slot)) != 0; }
  const std::vector<int32_t>& free_slots() const { return free_slots_; }

  void* data() const { return memory_.data(); }
  MemoryKind memory_kind() const { return memory_.kind(); }

 private:
  std::vector<int32_t> free_slots_;  // [num_free] stack; lowest slot on top so pools fill from 0
  std::vector<uint8_t> taken_;       // [capacity] 1 while a block occupies the slot
  TierMemory memory_;
};

}  // namespace pagedkv
