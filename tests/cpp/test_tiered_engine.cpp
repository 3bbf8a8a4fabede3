// A tiered engine (device + host + disk, CPU backend): blocks move through every tier and come
// back bit-exact, whichever way they travel (eviction, spill, fetch, prefetch, offload, gather
// straight from disk).
#include <gtest/gtest.h>

#include <cstdlib>
#include <set>
#include <string>

#include "engine_fixture.h"
#include "pagedkv/errors.h"

using namespace pagedkv;
using namespace pagedkv::testing;

namespace {

std::string temp_dir() {
  char templ[] = "/tmp/pagedkv-test-XXXXXX";
  const char* d = mkdtemp(templ);
  EXPECT_NE(d, nullptr);
  return d ? d : "/tmp";
}

std::set<Tier> tiers_of(const Engine& e, SeqId s) {
  std::set<Tier> out;
  for (const BlockLoc& l : e.block_table(s)) out.insert(l.tier);
  return out;
}

}  // namespace

TEST(TieredEngine, BlocksMoveThroughEveryTierBitExact) {
  CacheConfig c = small_config(4, 4);
  c.host_blocks = 4;
  c.disk_blocks = 32;
  c.disk_path = temp_dir();
  Engine e(c);
  std::mt19937 rng(5);
  std::vector<SeqId> seqs;
  std::vector<std::vector<std::pair<std::vector<float>, std::vector<float>>>> want;
  for (int i = 0; i < 3; ++i) {  // 3 x 4 blocks: more than device and host hold together
    const SeqId s = e.add_sequence();
    seqs.push_back(s);
    want.emplace_back();
    for (int32_t l = 0; l < c.num_layers; ++l) want.back().push_back(append_random(e, s, l, 15, rng));
    e.check_invariants();
  }
  std::set<Tier> seen;
  for (SeqId s : seqs)
    for (Tier t : tiers_of(e, s)) seen.insert(t);
  EXPECT_EQ(seen, (std::set<Tier>{Tier::device, Tier::host, Tier::disk}));
  const Stats moved = e.stats();
  EXPECT_GT(moved.counters.blocks_to_host, 0);
  EXPECT_GT(moved.counters.blocks_to_disk, 0);

  // Gather reads each block where it is, the disk ones straight from the file.
  for (size_t i = 0; i < seqs.size(); ++i)
    for (int32_t l = 0; l < c.num_layers; ++l) {
      auto [k, v] = gather_all(e, seqs[i], l);
      EXPECT_EQ(k, want[i][size_t(l)].first);
      EXPECT_EQ(v, want[i][size_t(l)].second);
    }
  // The oldest sequence (on disk by now) comes up through the host to the device, the others go down.
  e.offload({seqs[1], seqs[2]}, nullptr);
  e.prefetch({seqs[0]}, nullptr);
  e.check_invariants();
  EXPECT_EQ(tiers_of(e, seqs[0]), std::set<Tier>{Tier::device});
  EXPECT_GT(e.stats().counters.blocks_from_disk, 0);
  EXPECT_GT(e.stats().counters.blocks_from_host, 0);
  // Writing into a block fetched back (a clean copy) and reading everything again.
  auto more = append_random(e, seqs[0], 0, 1, rng);
  want[0][0].first.insert(want[0][0].first.end(), more.first.begin(), more.first.end());
  want[0][0].second.insert(want[0][0].second.end(), more.second.begin(), more.second.end());
  for (SeqId s : {seqs[2], seqs[1], seqs[0]}) e.prefetch({s}, nullptr);
  e.check_invariants();
  for (size_t i = 0; i < seqs.size(); ++i)
    for (int32_t l = 0; l < c.num_layers; ++l) {
      auto [k, v] = gather_all(e, seqs[i], l);
      EXPECT_EQ(k, want[i][size_t(l)].first);
      EXPECT_EQ(v, want[i][size_t(l)].second);
    }
  for (SeqId s : seqs) e.free(s);
  e.check_invariants();
  const Stats end = e.stats();
  EXPECT_EQ(end.device_blocks_used + end.host_blocks_used + end.disk_blocks_used, 0);
}
