#include "pagedkv/block_pool.h"

#include <utility>

#include "pagedkv/errors.h"

namespace pagedkv {

BlockPool::BlockPool(int64_t num_slots, TierMemory memory)
    : taken_(size_t(num_slots), 0), memory_(std::move(memory)) {
  free_slots_.reserve(size_t(num_slots));
  for (int64_t s = num_slots - 1; s >= 0; --s) free_slots_.push_back(int32_t(s));
}

int32_t BlockPool::allocate() {
  PKV_CHECK(!free_slots_.empty(), OutOfBlocks, "no free block left in the pool of ", capacity());
  int32_t slot = free_slots_.back();
  free_slots_.pop_back();
  taken_[size_t(slot)] = 1;
  return slot;
}

void BlockPool::release(int32_t slot) {
  PKV_CHECK(slot >= 0 && slot < capacity() && taken_[size_t(slot)], InternalError,
            "releasing slot ", slot, " which is not taken");
  taken_[size_t(slot)] = 0;
  free_slots_.push_back(slot);
}

}  // namespace pagedkv
