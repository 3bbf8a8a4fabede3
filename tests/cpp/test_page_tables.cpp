// The page tables alone, over a store without tiers: copy-on-write counting, scope walks, fork,
// truncate and drops, and the mutation counter plans are checked by.
#include <gtest/gtest.h>

#include <unordered_map>

#include "engine_fixture.h"
#include "pagedkv/block_store.h"
#include "pagedkv/errors.h"
#include "pagedkv/page_tables.h"

using namespace pagedkv;
using namespace pagedkv::testing;

namespace {

struct TablesFixture {
  CacheConfig cfg;
  std::unique_ptr<DeviceBackend> backend;
  std::unique_ptr<BlockStore> store;
  PageTables tables;

  explicit TablesFixture(CacheConfig c)
      : cfg(c), backend(make_cpu_backend(cfg)), store(std::make_unique<BlockStore>(cfg, *backend)), tables(cfg) {}
  void grow(SeqId s, int32_t layer, int32_t n) {
    SequenceTable& t = tables.at(s);
    std::vector<Fence> waits;
    std::vector<int32_t> mapping;
    tables.reserve_rows(s, t, t.lens[size_t(layer)], t.lens[size_t(layer)] + n, *store, waits, mapping, nullptr);
    EXPECT_EQ(mapping.size(), size_t(n));
    t.lens[size_t(layer)] += n;
  }
  void check() {
    std::unordered_map<BlockId, int32_t> refs;
    tables.check_invariants(refs, *store);
    store->check_invariants(refs);
  }
};

}  // namespace

TEST(PageTables, CopyOnWriteIsCountedOncePerSharedBlockAcrossABatch) {
  TablesFixture f(small_config(4, 16));
  const SeqId a = f.tables.add();
  f.grow(a, 0, 6);  // blocks 0 (full) and 1 (partial)
  const SeqId b = f.tables.fork(a, *f.store);
  const SeqId c = f.tables.fork(a, *f.store);
  std::unordered_map<BlockId, int32_t> copied;
  std::vector<BlockId> written;
  // Each appends 1 row into the shared partial block: the first two writers copy it, the third
  // then holds the last reference.
  int64_t fresh = 0;
  for (SeqId s : {a, b, c}) fresh += f.tables.blocks_to_take(f.tables.at(s), 6, 7, *f.store, copied, &written, "t");
  EXPECT_EQ(fresh, 2);
  EXPECT_EQ(written.size(), 3u);
  // Past the end of the block: a new block for each, no copies.
  copied.clear();
  EXPECT_EQ(f.tables.blocks_to_take(f.tables.at(a), 6, 9, *f.store, copied, nullptr, "t"), 2);
  f.check();
}

TEST(PageTables, ScopeWalkVisitsSinksThenWindow) {
  CacheConfig c = small_config(4, 64);
  c.window = 8;
  c.sink_tokens = 4;
  TablesFixture f(c);
  const SeqId s = f.tables.add();
  f.grow(s, 0, 40);  // 10 blocks
  std::vector<int32_t> seen;
  f.tables.for_each_in_scope(f.tables.at(s), 40, 1, c.window, [&](int32_t b) { seen.push_back(b); });
  EXPECT_EQ(seen, (std::vector<int32_t>{0, 8, 9}));  // sink block, then keys 32..39
  seen.clear();
  f.tables.for_each_in_scope(f.tables.at(s), 40, 1, 0, [&](int32_t b) { seen.push_back(b); });
  EXPECT_EQ(seen.size(), 10u);  // full causal: every block
  seen.clear();
  f.tables.for_each_in_scope(f.tables.at(s), 40, 0, c.window, [&](int32_t b) { seen.push_back(b); });
  EXPECT_TRUE(seen.empty());
}

TEST(PageTables, VersionMovesWithBlockListsOnly) {
  TablesFixture f(small_config(4, 16));
  const SeqId s = f.tables.add();
  const uint64_t v0 = f.tables.version();
  f.grow(s, 0, 3);  // a new block
  EXPECT_GT(f.tables.version(), v0);
  const uint64_t v1 = f.tables.version();
  f.grow(s, 0, 1);  // the same block
  EXPECT_EQ(f.tables.version(), v1);
  f.tables.truncate(s, 2, *f.store);  // still one block
  EXPECT_EQ(f.tables.version(), v1);
  f.tables.truncate(s, 0, *f.store);
  EXPECT_GT(f.tables.version(), v1);
  f.check();
}

TEST(PageTables, UnknownIdsNameTheCall) {
  TablesFixture f(small_config(4, 16));
  const SeqId s = f.tables.add();
  EXPECT_THROW(f.tables.get(s + 1, "x()"), UnknownSequence);
  try {
    f.tables.get(s + 1, "attend()");
  } catch (const UnknownSequence& e) {
    EXPECT_EQ(std::string(e.what()).rfind("attend(): unknown sequence id", 0), 0u);
#ifdef NDEBUG  // release builds: no source location in what users read
    EXPECT_EQ(std::string(e.what()).find(".cpp:"), std::string::npos);
#endif
  }
}

// Issue 18: a cut whose next row would read or write a block the window dropped is refused, and
// nothing changes; a cut past the dropped keys' reach (or to 0) is fine.
TEST(PageTables, TruncateIntoDroppedBlocksIsRefused) {
  CacheConfig c = small_config(4, 16);
  c.window = 8;
  c.retain = false;
  TablesFixture f(c);
  const SeqId s = f.tables.add();
  for (int32_t layer = 0; layer < c.num_layers; ++layer) f.grow(s, layer, 20);
  for (int32_t layer = 0; layer < c.num_layers; ++layer) {
    f.tables.at(s).scope_start[size_t(layer)] = 20;
    f.grow(s, layer, 1);
  }
  f.tables.drop_out_of_scope(f.tables.at(s), *f.store);  // keys 0..11 go
  ASSERT_EQ(f.tables.at(s).blocks[0], kNoBlock);
  const std::vector<BlockId> before = f.tables.at(s).blocks;
  const uint64_t v = f.tables.version();
  EXPECT_THROW(f.tables.truncate(s, 2, *f.store), ArgumentError);
  EXPECT_THROW(f.tables.truncate(s, 13, *f.store), ArgumentError);  // row 13 sees keys 6..12
  EXPECT_EQ(f.tables.at(s).blocks, before);
  EXPECT_EQ(f.tables.at(s).lens[0], 21);
  EXPECT_EQ(f.tables.version(), v);
  f.tables.truncate(s, 19, *f.store);  // row 19 sees keys 12..18: all kept
  EXPECT_EQ(f.tables.at(s).lens[0], 19);
  f.check();
  f.tables.truncate(s, 0, *f.store);
  EXPECT_TRUE(f.tables.at(s).blocks.empty());
  f.check();
}
