#include "pagedkv/block_directory.h"

#include "pagedkv/errors.h"

namespace pagedkv {

BlockId BlockDirectory::create(BlockLoc loc) {
  BlockId id;
  if (!free_ids_.empty()) {
    id = free_ids_.back();
    free_ids_.pop_back();
  } else {
    id = BlockId(entries_.size());
    entries_.emplace_back();
  }
  entries_[size_t(id)] = Entry{loc, 1};
  ++version_;
  return id;
}

void BlockDirectory::retain(BlockId id) {
  PKV_CHECK(is_live(id), InternalError, "retaining dead block ", id);
  ++entries_[size_t(id)].refcount;
}

bool BlockDirectory::release(BlockId id) {
  PKV_CHECK(is_live(id), InternalError, "releasing dead block ", id);
  Entry& e = entries_[size_t(id)];
  if (--e.refcount > 0) return false;
  e.loc = BlockLoc{};
  free_ids_.push_back(id);
  ++version_;
  return true;
}

}  // namespace pagedkv
