// The invariant checker that tests run after every operation.
#include <unordered_map>
#include <vector>

#include "pagedkv/engine.h"
#include "pagedkv/errors.h"

namespace pagedkv {

void Engine::check_invariants() const {
  // Reference counts equal the number of page-table entries naming each block.
  std::unordered_map<BlockId, int32_t> refs;
  for (const auto& [seq, t] : tables_) {
    PKV_CHECK(int32_t(t.lens.size()) == cfg_.num_layers, InternalError, "sequence ", seq,
              " has lengths for ", t.lens.size(), " layers");
    PKV_CHECK(int32_t(t.blocks.size()) == blocks_for(t.max_len(), cfg_.block_size), InternalError,
              "sequence ", seq, " holds ", t.blocks.size(), " blocks for ", t.max_len(), " tokens");
    for (size_t b = 0; b < t.blocks.size(); ++b) {
      const BlockId id = t.blocks[b];
      if (id == kNoBlock) {
        PKV_CHECK(cfg_.windowed() && !cfg_.retain && int32_t(b) < t.drop_cursor, InternalError,
                  "sequence ", seq, " has logical block ", b, " dropped outside a window's reach");
        continue;
      }
      PKV_CHECK(directory_.is_live(id), InternalError, "sequence ", seq, " block ", b,
                " names dead block id ", id);
      ++refs[id];
    }
  }
  PKV_CHECK(int64_t(refs.size()) == directory_.num_live(), InternalError, "directory holds ",
            directory_.num_live(), " live blocks but page tables name ", refs.size());
  // Every live block owns exactly one taken slot, and every taken slot belongs to one block.
  std::vector<BlockId> owner(size_t(device_pool_.capacity()), kNoBlock);
  for (const auto& [id, count] : refs) {
    PKV_CHECK(directory_.refcount(id) == count, InternalError, "block ", id, " has refcount ",
              directory_.refcount(id), " but ", count, " page-table references");
    const BlockLoc& loc = directory_.loc(id);
    PKV_CHECK(loc.tier == Tier::device, InternalError, "block ", id, " lives in tier ",
              tier_name(loc.tier), " which this version does not have");
    PKV_CHECK(loc.slot >= 0 && loc.slot < device_pool_.capacity() && device_pool_.is_taken(loc.slot),
              InternalError, "block ", id, " points at slot ", loc.slot, " which is not taken");
    PKV_CHECK(owner[size_t(loc.slot)] == kNoBlock, InternalError, "slot ", loc.slot,
              " is owned by blocks ", owner[size_t(loc.slot)], " and ", id);
    owner[size_t(loc.slot)] = id;
  }
  for (int32_t slot : device_pool_.free_slots())
    PKV_CHECK(!device_pool_.is_taken(slot) && owner[size_t(slot)] == kNoBlock, InternalError,
              "free slot ", slot, " is also in use");
  PKV_CHECK(device_pool_.num_used() == int64_t(refs.size()), InternalError, "the pool has ",
            device_pool_.num_used(), " slots taken for ", refs.size(), " live blocks");
}

}  // namespace pagedkv
