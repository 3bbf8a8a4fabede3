// Allocator and block directory: free lists, reference counts, id recycling.
#include <gtest/gtest.h>

#include <set>

#include "pagedkv/block_directory.h"
#include "pagedkv/block_pool.h"
#include "pagedkv/device_backend.h"
#include "pagedkv/tier_memory.h"
#include "pagedkv/errors.h"
#include "../../cpp/fence_state.h"

using namespace pagedkv;

TEST(BlockPool, AllocatesEverySlotOnceThenThrows) {
  BlockPool pool(5);
  std::set<int32_t> seen;
  for (int i = 0; i < 5; ++i) seen.insert(pool.allocate());
  EXPECT_EQ(seen, (std::set<int32_t>{0, 1, 2, 3, 4}));
  EXPECT_EQ(pool.num_free(), 0);
  EXPECT_THROW(pool.allocate(), OutOfBlocks);
  EXPECT_EQ(pool.num_used(), 5);
}

TEST(BlockPool, ReleaseReturnsSlotAndRejectsDoubleRelease) {
  BlockPool pool(3);
  int32_t a = pool.allocate();
  int32_t b = pool.allocate();
  pool.release(a);
  EXPECT_FALSE(pool.is_taken(a));
  EXPECT_TRUE(pool.is_taken(b));
  EXPECT_THROW(pool.release(a), InternalError);
  EXPECT_THROW(pool.release(7), InternalError);
  EXPECT_EQ(pool.allocate(), a);  // last released is reused first
  EXPECT_EQ(pool.num_free(), 1);
}

// Slots given back behind fences (evictions still reading them) come back in the order they were
// given: blocks that went down together return to one run of slots, and their copies merge.
TEST(BlockPool, FencedSlotsComeBackInReleaseOrder) {
  BlockPool pool(6);
  std::vector<int32_t> slots;
  for (int i = 0; i < 6; ++i) slots.push_back(pool.allocate());
  auto passed = std::make_shared<CpuFence>();
  passed->signal();
  for (int i = 1; i < 5; ++i) pool.release_after(slots[size_t(i)], passed);
  std::vector<int32_t> again;
  for (int i = 1; i < 5; ++i) again.push_back(pool.allocate());
  EXPECT_EQ(again, std::vector<int32_t>(slots.begin() + 1, slots.begin() + 5));
  EXPECT_EQ(pool.num_free(), 0);
}

TEST(BlockPool, MemoryIsAlignedAndSized) {
  auto backend = make_cpu_backend(CacheConfig{});
  TierMemory memory(*backend, MemoryKind::host, 4 * 1000);
  ASSERT_NE(memory.data(), nullptr);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(memory.data()) % 256, 0u);
}

TEST(BlockDirectory, RefcountsAndRecycling) {
  BlockDirectory dir;
  BlockId a = dir.create({Tier::device, 3});
  BlockId b = dir.create({Tier::device, 4});
  EXPECT_NE(a, b);
  dir.retain(a);
  EXPECT_EQ(dir.refcount(a), 2);
  EXPECT_FALSE(dir.release(a));
  EXPECT_TRUE(dir.is_live(a));
  EXPECT_TRUE(dir.release(a));
  EXPECT_FALSE(dir.is_live(a));
  EXPECT_THROW(dir.release(a), InternalError);
  EXPECT_THROW(dir.retain(a), InternalError);
  EXPECT_EQ(dir.num_live(), 1);
  BlockId c = dir.create({Tier::device, 9});
  EXPECT_EQ(c, a);  // ids are recycled
  EXPECT_EQ(dir.loc(c).slot, 9);
  EXPECT_EQ(dir.loc(b).slot, 4);
}
