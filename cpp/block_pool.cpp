#include "pagedkv/block_pool.h"

#include <utility>

#include "pagedkv/errors.h"

namespace pagedkv {

BlockPool::BlockPool(int64_t num_slots) : taken_(size_t(num_slots), 0) {
  free_slots_.reserve(size_t(num_slots));
  for (int64_t s = num_slots - 1; s >= 0; --s) free_slots_.push_back(int32_t(s));
}

int32_t BlockPool::allocate(Fence* wait) {
  PKV_CHECK(num_free() > 0, OutOfBlocks, "no free block left in the pool of ", capacity());
  if (free_slots_.empty()) reclaim();
  int32_t slot;
  if (!free_slots_.empty()) {
    slot = free_slots_.back();
    free_slots_.pop_back();
  } else {
    slot = fenced_.front().first;
    PKV_CHECK(wait != nullptr, InternalError, "a fenced slot was handed to a caller that cannot wait");
    *wait = std::move(fenced_.front().second);
    fenced_.pop_front();
  }
  taken_[size_t(slot)] = 1;
  return slot;
}

void BlockPool::release_after(int32_t slot, Fence fence) {
  if (!fence) return release(slot);
  PKV_CHECK(slot >= 0 && slot < capacity() && taken_[size_t(slot)], InternalError,
            "releasing slot ", slot, " which is not taken");
  taken_[size_t(slot)] = 0;
  fenced_.emplace_back(slot, std::move(fence));
}

// Pushed last first, so that allocations take the slots in the order they were released: blocks
// that went down together come back to the same run of slots, and their copies merge.
void BlockPool::reclaim() {
  size_t n = 0;
  while (n < fenced_.size() && fence_done(fenced_[n].second)) ++n;
  for (size_t i = n; i-- > 0;) free_slots_.push_back(fenced_[i].first);
  fenced_.erase(fenced_.begin(), fenced_.begin() + long(n));
}

std::vector<int32_t> BlockPool::free_slots() const {
  std::vector<int32_t> out(free_slots_);
  for (const auto& f : fenced_) out.push_back(f.first);
  return out;
}

void BlockPool::release(int32_t slot) {
  PKV_CHECK(slot >= 0 && slot < capacity() && taken_[size_t(slot)], InternalError,
            "releasing slot ", slot, " which is not taken");
  taken_[size_t(slot)] = 0;
  free_slots_.push_back(slot);
}

}  // namespace pagedkv
