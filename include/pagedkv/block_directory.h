// Block identities: where each block lives now and how many page-table entries point at it.
// A block keeps its id while it moves between tiers, so page tables never need rewriting.
#pragma once
#include <cstdint>
#include <vector>

#include "pagedkv/types.h"

namespace pagedkv {

class BlockDirectory {
 public:
  // A new block at `loc` with one reference.
  BlockId create(BlockLoc loc);
  void retain(BlockId id);
  // Drops one reference; returns true when that was the last one (the id is then recycled).
  bool release(BlockId id);

  const BlockLoc& loc(BlockId id) const { return entries_.at(size_t(id)).loc; }
  void set_loc(BlockId id, BlockLoc loc) {
    entries_.at(size_t(id)).loc = loc;
    ++version_;
  }
  int32_t refcount(BlockId id) const { return entries_.at(size_t(id)).refcount; }
  bool is_live(BlockId id) const {
    return id >= 0 && size_t(id) < entries_.size() && entries_[size_t(id)].refcount > 0;
  }
  int64_t num_live() const { return int64_t(entries_.size() - free_ids_.size()); }
  // Counts every change a block table built from this directory could see: a block created,
  // gone, or moved. Plans built at one value hold while it stays.
  uint64_t version() const { return version_; }

 private:
  struct Entry {
    BlockLoc loc;
    int32_t refcount = 0;
  };
  std::vector<Entry> entries_;      // [ids ever handed out]
  std::vector<BlockId> free_ids_;   // recycled ids
  uint64_t version_ = 0;
};

}  // namespace pagedkv
