// Engine invariants: append across block boundaries, per-layer lengths, fork and copy-on-write,
// free, windows without retention, and "a failed call changes nothing".
#include <gtest/gtest.h>

#include "engine_fixture.h"
#include "pagedkv/errors.h"

using namespace pagedkv;
using namespace pagedkv::testing;

TEST(Engine, AppendAcrossBlockBoundariesIsBitExact) {
  std::mt19937 rng(1);
  Engine e(small_config(4));
  SeqId s = e.add_sequence();
  std::vector<float> all_k, all_v;
  for (int32_t n : {1, 3, 5, 8, 1, 0, 9}) {
    auto [k, v] = append_random(e, s, 0, n, rng);
    all_k.insert(all_k.end(), k.begin(), k.end());
    all_v.insert(all_v.end(), v.begin(), v.end());
    e.check_invariants();
  }
  EXPECT_EQ(e.seq_len(s, 0), 27);
  EXPECT_EQ(e.block_table(s).size(), 7u);
  auto [k, v] = gather_all(e, s, 0);
  EXPECT_EQ(k, all_k);
  EXPECT_EQ(v, all_v);
}

TEST(Engine, LayersHaveTheirOwnLengthsAndShareBlocks) {
  std::mt19937 rng(2);
  Engine e(small_config(4));
  SeqId s = e.add_sequence();
  auto [k0, v0] = append_random(e, s, 0, 6, rng);
  EXPECT_EQ(e.seq_len(s, 0), 6);
  EXPECT_EQ(e.seq_len(s, 1), 0);
  EXPECT_EQ(e.stats().device_blocks_used, 2);
  auto [k1, v1] = append_random(e, s, 1, 5, rng);
  EXPECT_EQ(e.stats().device_blocks_used, 2);  // layer 1 writes into the blocks layer 0 made
  EXPECT_EQ(gather_all(e, s, 0).first, k0);
  EXPECT_EQ(gather_all(e, s, 1).second, v1);
  e.check_invariants();
}

TEST(Engine, ForkSharesBlocksAndCopiesOnWrite) {
  std::mt19937 rng(3);
  Engine e(small_config(4));
  SeqId a = e.add_sequence();
  auto [k, v] = append_random(e, a, 0, 6, rng);  // block 1 is partial
  SeqId b = e.fork(a);
  EXPECT_EQ(e.block_table(a), e.block_table(b));
  EXPECT_EQ(e.stats().device_blocks_used, 2);
  e.check_invariants();

  auto [kb, vb] = append_random(e, b, 0, 1, rng);
  auto ta = e.block_table(a), tb = e.block_table(b);
  EXPECT_EQ(ta[0], tb[0]);    // full block still shared
  EXPECT_NE(ta[1].slot, tb[1].slot);  // partial block copied for the writer
  EXPECT_EQ(e.stats().counters.cow_copies, 1);
  EXPECT_EQ(e.seq_len(a, 0), 6);
  EXPECT_EQ(gather_all(e, a, 0).first, k);
  auto gb = gather_all(e, b, 0).first;
  std::vector<float> want(k);
  want.insert(want.end(), kb.begin(), kb.end());
  EXPECT_EQ(gb, want);
  e.check_invariants();

  // The parent now holds the last reference to its partial block: no copy on its write.
  append_random(e, a, 0, 1, rng);
  EXPECT_EQ(e.stats().counters.cow_copies, 1);
  e.check_invariants();
}

TEST(Engine, ForkedSiblingsWritingInOneBatchCopyOnce) {
  std::mt19937 rng(4);
  Engine e(small_config(4, 3));
  SeqId a = e.add_sequence();
  append_random(e, a, 0, 6, rng);
  SeqId b = e.fork(a);
  // One free block: a copies the shared partial block, then b holds the last reference.
  auto k = random_rows(2, e.config(), rng);
  e.append({a, b}, 0, {1, 1}, k.data(), k.data(), nullptr);
  EXPECT_EQ(e.stats().device_blocks_free, 0);
  e.check_invariants();
}

TEST(Engine, FreeReturnsBlocksOnlyWhenLastReferenceGoes) {
  std::mt19937 rng(5);
  Engine e(small_config(4));
  SeqId a = e.add_sequence();
  append_random(e, a, 0, 9, rng);
  SeqId b = e.fork(a);
  e.free(a);
  EXPECT_EQ(e.stats().device_blocks_used, 3);
  e.check_invariants();
  e.free(b);
  EXPECT_EQ(e.stats().device_blocks_used, 0);
  EXPECT_THROW(e.free(b), UnknownSequence);
  e.check_invariants();
}

TEST(Engine, FailedAppendChangesNothing) {
  std::mt19937 rng(6);
  Engine e(small_config(4, 3));
  SeqId a = e.add_sequence();
  append_random(e, a, 0, 10, rng);  // 3 blocks: the pool is full
  const auto before = e.block_table(a);
  auto k = random_rows(3, e.config(), rng);
  EXPECT_THROW(e.append({a}, 0, {3}, k.data(), k.data(), nullptr), OutOfBlocks);
  EXPECT_THROW(e.append({a}, 7, {3}, k.data(), k.data(), nullptr), LayerOutOfRange);
  EXPECT_THROW(e.append({a, 42}, 0, {1, 2}, k.data(), k.data(), nullptr), UnknownSequence);
  EXPECT_THROW(e.append({a, a}, 0, {1, 2}, k.data(), k.data(), nullptr), ArgumentError);
  EXPECT_EQ(e.block_table(a), before);
  EXPECT_EQ(e.seq_len(a, 0), 10);
  e.check_invariants();
  e.append({a}, 0, {2}, k.data(), k.data(), nullptr);  // still fits in the last block
  EXPECT_EQ(e.seq_len(a, 0), 12);
}

TEST(Engine, WindowWithoutRetentionDropsOldBlocksKeepsSinks) {
  std::mt19937 rng(7);
  CacheConfig c = small_config(4, 8);
  c.num_layers = 1;
  c.window = 8;
  c.sink_tokens = 2;
  c.retain = false;
  Engine e(c);
  SeqId s = e.add_sequence();
  for (int step = 0; step < 200; ++step) {
    append_random(e, s, 0, 1, rng);
    e.check_invariants();
    // sink block + blocks covering the window + the partial block being written
    ASSERT_LE(e.stats().device_blocks_used, 1 + (8 + 3) / 4 + 1) << "step " << step;
  }
  auto table = e.block_table(s);
  EXPECT_EQ(table[0].tier, Tier::device);  // the sink block
  EXPECT_EQ(table[5].tier, Tier::dropped);
  EXPECT_GT(e.stats().counters.drops, 40);
  std::vector<float> buf(1000);
  EXPECT_THROW(e.gather(s, 0, buf.data(), buf.data(), nullptr), ArgumentError);
}

TEST(Engine, InvariantCheckerRejectsConfigsWithoutCapacity) {
  CacheConfig c = small_config();
  c.device_blocks = 0;
  EXPECT_THROW(Engine e(c), ArgumentError);
  c = small_config();
  c.sink_tokens = 4;  // sinks without a window
  EXPECT_THROW(Engine e(c), ArgumentError);
}

TEST(Engine, TruncateReleasesBlocksAndKeepsThePrefix) {
  std::mt19937 rng(8);
  Engine e(small_config(4));
  SeqId a = e.add_sequence();
  auto [k0, v0] = append_random(e, a, 0, 10, rng);
  append_random(e, a, 1, 7, rng);
  SeqId b = e.fork(a);
  e.truncate(a, 5);  // layer 0: 10 -> 5, layer 1: 7 -> 5; blocks 2 goes (still held by b)
  EXPECT_EQ(e.seq_len(a, 0), 5);
  EXPECT_EQ(e.seq_len(a, 1), 5);
  EXPECT_EQ(e.block_table(a).size(), 2u);
  EXPECT_EQ(e.stats().device_blocks_used, 3);
  auto [k, v] = gather_all(e, a, 0);
  EXPECT_EQ(k, std::vector<float>(k0.begin(), k0.begin() + long(k.size())));
  e.check_invariants();
  // The next write lands in the shared partial block 1: copy-on-write keeps b intact.
  append_random(e, a, 0, 2, rng);
  EXPECT_EQ(gather_all(e, b, 0).first, k0);
  e.free(b);
  e.truncate(a, 0);
  EXPECT_EQ(e.stats().device_blocks_used, 0);
  EXPECT_THROW(e.truncate(a, -1), ArgumentError);
  e.check_invariants();
}
