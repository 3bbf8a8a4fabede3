// The invariant checker that tests run after every operation: the block store's half (the page
// tables' half is PageTables::check_invariants, the two joined by Engine::check_invariants).
#include <unordered_map>
#include <vector>

#include "pagedkv/block_store.h"
#include "pagedkv/errors.h"

namespace pagedkv {

void BlockStore::check_invariants(const std::unordered_map<BlockId, int32_t>& refs) const {
  for (const auto& [id, count] : refs)
    PKV_CHECK(directory_.is_live(id), InternalError, "a page table names dead block id ", id);
  PKV_CHECK(int64_t(refs.size()) == directory_.num_live(), InternalError, "directory holds ",
            directory_.num_live(), " live blocks but page tables name ", refs.size());
  // Every live block owns exactly one taken slot of its tier, and every taken slot one block.
  std::vector<std::vector<BlockId>> owner(kNumStorageTiers);
  for (int t = 0; t < kNumStorageTiers; ++t) owner[size_t(t)].assign(size_t(tiers_[t]->capacity()), kNoBlock);
  int64_t per_tier[kNumStorageTiers] = {0, 0, 0};
  for (const auto& [id, count] : refs) {
    PKV_CHECK(directory_.refcount(id) == count, InternalError, "block ", id, " has refcount ",
              directory_.refcount(id), " but ", count, " page-table references");
    const BlockLoc& where = directory_.loc(id);
    PKV_CHECK(int(where.tier) < kNumStorageTiers, InternalError, "live block ", id, " is in no tier");
    const BlockPool& p = tier(where.tier).slots();
    PKV_CHECK(where.slot >= 0 && where.slot < p.capacity() && p.is_taken(where.slot), InternalError, "block ",
              id, " points at ", tier_name(where.tier), " slot ", where.slot, " which is not taken");
    BlockId& o = owner[size_t(where.tier)][size_t(where.slot)];
    PKV_CHECK(o == kNoBlock, InternalError, tier_name(where.tier), " slot ", where.slot,
              " is owned by blocks ", o, " and ", id);
    o = id;
    ++per_tier[int(where.tier)];
  }
  // Clean copies: host slots holding the bytes of a device block, owned by nothing else.
  for (const auto& [id, copy] : clean_copy_) {
    PKV_CHECK(refs.count(id) && directory_.loc(id).tier == Tier::device, InternalError, "block ", id,
              " has a clean host copy but does not live on the device");
    BlockId& o = owner[int(Tier::host)][size_t(copy.host_slot)];
    PKV_CHECK(tier(Tier::host).slots().is_taken(copy.host_slot) && o == kNoBlock, InternalError,
              "clean copy of block ", id, " in host slot ", copy.host_slot, " which is free or owned by block ", o);
    o = id;
    ++per_tier[int(Tier::host)];
  }
  PKV_CHECK(clean_order_->size() == int64_t(clean_copy_.size()), InternalError, "the clean-copy order tracks ",
            clean_order_->size(), " blocks for ", clean_copy_.size(), " copies");
  for (int t = 0; t < kNumStorageTiers; ++t) {
    const BlockPool& p = tiers_[t]->slots();
    for (int32_t slot : p.free_slots())
      PKV_CHECK(!p.is_taken(slot) && owner[size_t(t)][size_t(slot)] == kNoBlock, InternalError,
                tier_name(Tier(t)), " free slot ", slot, " is also in use");
    PKV_CHECK(p.num_used() == per_tier[t], InternalError, "the ", tier_name(Tier(t)), " pool has ",
              p.num_used(), " slots taken for ", per_tier[t], " blocks living there");
  }
  for (BlockId id : pinned_)
    PKV_CHECK(refs.count(id) && directory_.loc(id).tier == Tier::device, InternalError, "block ", id,
              " of the open decode step is not on the device");
  if (tiered()) {
    PKV_CHECK(policy_->size() == per_tier[int(Tier::device)], InternalError, "the policy tracks ",
              policy_->size(), " blocks but ", per_tier[int(Tier::device)], " live on the device");
    PKV_CHECK(host_order_->size() == host_resident(), InternalError, "the spill order tracks ",
              host_order_->size(), " blocks but ", host_resident(), " live on the host");
  }
}

}  // namespace pagedkv
