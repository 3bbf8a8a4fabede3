// The slots of one tier: which are free, which are taken, and which wait for a copy still reading.
#pragma once
#include <cstdint>
#include <deque>
#include <utility>
#include <vector>

#include "pagedkv/fence.h"

namespace pagedkv {

class BlockPool {
 public:
  BlockPool() = default;
  explicit BlockPool(int64_t num_slots);

  // Takes a free slot. Throws OutOfBlocks when none is left (callers check num_free() first).
  // A slot still being read by an asynchronous copy comes with that copy's fence in `*wait`:
  // whoever writes the slot next must order itself after it.
  int32_t allocate(Fence* wait = nullptr);
  // Gives a slot back; throws InternalError on a slot that is not taken.
  void release(int32_t slot);
  // Gives a slot back that a copy may still be reading until `fence` passes.
  void release_after(int32_t slot, Fence fence);
  // Moves slots whose fences have passed to the plain free list (cheap, non-blocking).
  void reclaim();

  int64_t capacity() const { return int64_t(taken_.size()); }
  int64_t num_free() const { return int64_t(free_slots_.size() + fenced_.size()); }
  int64_t num_used() const { return capacity() - num_free(); }
  bool is_taken(int32_t slot) const { return taken_.at(size_t(slot)) != 0; }
  // Every free slot, fenced ones included.
  std::vector<int32_t> free_slots() const;

 private:
  std::vector<int32_t> free_slots_;  // stack; lowest slot on top so pools fill from 0
  std::deque<std::pair<int32_t, Fence>> fenced_;  // free once their fence passes, oldest first
  std::vector<uint8_t> taken_;       // [capacity] 1 while a block occupies the slot
};

}  // namespace pagedkv
