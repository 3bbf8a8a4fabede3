// The victim order each policy promises.
#include <gtest/gtest.h>

#include "pagedkv/errors.h"
#include "pagedkv/policy.h"

using namespace pagedkv;

namespace {
const auto keep_none = [](BlockId) { return false; };
BlockUse use(uint64_t step, SeqId seq = 0, int32_t logical = 0, int32_t seq_blocks = 1) {
  return BlockUse{seq, logical, seq_blocks, step};
}
}  // namespace

TEST(Policy, LruEvictsLeastRecentlyUsedFirst) {
  auto p = make_policy("lru", {});
  for (BlockId id = 0; id < 5; ++id) p->on_arrive(id, use(id));
  p->on_use(0, use(10));
  p->on_use(2, use(11));
  EXPECT_EQ(p->victims(3, keep_none), (std::vector<BlockId>{1, 3, 4}));
  p->on_leave(1);
  EXPECT_EQ(p->victims(10, keep_none), (std::vector<BlockId>{3, 4, 0, 2}));
  auto keep3 = [](BlockId id) { return id == 3; };
  EXPECT_EQ(p->victims(2, keep3), (std::vector<BlockId>{4, 0}));
  EXPECT_EQ(p->size(), 4);
  p->on_leave(42);  // unknown ids are ignored
  EXPECT_EQ(p->victims(0, keep_none).size(), 0u);  // evicting nothing is always safe
}

TEST(Policy, WindowKeepsRecentAndSinkBlocksHot) {
  auto p = make_policy("window", {{"recent_blocks", 2}, {"sink_blocks", 1}});
  // One sequence growing to 6 blocks: 0 is a sink, 4 and 5 are recent, 1..3 cold.
  for (int32_t b = 0; b < 6; ++b) p->on_arrive(b, use(b, 7, b, b + 1));
  auto v = p->victims(6, keep_none);
  ASSERT_EQ(v.size(), 6u);
  EXPECT_EQ(std::vector<BlockId>(v.begin(), v.begin() + 3), (std::vector<BlockId>{1, 2, 3}));
  // Hot blocks come last, least recently used first.
  EXPECT_EQ(std::vector<BlockId>(v.begin() + 3, v.end()), (std::vector<BlockId>{0, 4, 5}));
  // A cold block used again stays cold (its sequence still has 6 blocks), but moves back in LRU order.
  p->on_use(1, use(20, 7, 1, 6));
  EXPECT_EQ(p->victims(3, keep_none), (std::vector<BlockId>{2, 3, 1}));
}

TEST(Policy, HybridProtectsFrequentlyUsedBlocks) {
  auto p = make_policy("hybrid", {{"recency_weight", 1.0}, {"frequency_weight", 8.0}});
  p->on_arrive(0, use(0));
  for (uint64_t s = 1; s <= 15; ++s) p->on_use(0, use(s));  // 16 uses: +32 from frequency
  for (BlockId id = 1; id <= 4; ++id) p->on_arrive(id, use(20 + id));  // one-off, newer
  // LRU would evict 0 first; hybrid's score for 0 is 15 + 8*log2(17) ≈ 47.7 > 21, 22 + 8.
  // Blocks 3 and 4 were used in the last two steps (23, 24): guarded, they go last.
  auto v = p->victims(5, keep_none);
  EXPECT_EQ(v, (std::vector<BlockId>{1, 2, 0, 3, 4}));
  auto lru = make_policy("lru", {});
  lru->on_arrive(0, use(0));
  for (uint64_t s = 1; s <= 15; ++s) lru->on_use(0, use(s));
  for (BlockId id = 1; id <= 4; ++id) lru->on_arrive(id, use(20 + id));
  EXPECT_EQ(lru->victims(1, keep_none), (std::vector<BlockId>{0}));
}

TEST(Policy, HybridEvictsBlocksOfTheRunningStepLast) {
  auto p = make_policy("hybrid", {});
  p->on_arrive(0, use(0));
  for (uint64_t s = 1; s <= 40; ++s) p->on_use(0, use(s));  // old, popular
  p->on_arrive(1, use(100));                                // just written by the running batch
  p->on_arrive(2, use(41));                                 // one-off, long ago
  EXPECT_EQ(p->victims(3, keep_none), (std::vector<BlockId>{2, 0, 1}));
  auto q = make_policy("hybrid", {{"frequency_weight", 40.0}});  // frequency outweighs recency
  q->on_arrive(0, use(0));
  for (uint64_t s = 1; s <= 40; ++s) q->on_use(0, use(s));
  q->on_arrive(1, use(100));
  EXPECT_EQ(q->victims(2, keep_none), (std::vector<BlockId>{0, 1}));  // 1 is guarded: used now
}

TEST(Policy, RegistryRejectsUnknownNamesAndParameters) {
  EXPECT_THROW(make_policy("fifo", {}), ArgumentError);
  EXPECT_THROW(make_policy("lru", {{"recent_blocks", 2}}), ArgumentError);
  EXPECT_THROW(make_policy("window", {{"recent_blocks", -1}}), ArgumentError);
  EXPECT_STREQ(make_policy("hybrid", {})->name(), "hybrid");
}
