// The attention planner alone, over page tables and a store it reads: the step plan's block table,
// its reuse while nothing changes, and partial attention over disjoint page sets merging by
// log-sum-exp into attention over all of them.
#include <gtest/gtest.h>

#include <cmath>

#include "engine_fixture.h"
#include "pagedkv/attention_planner.h"
#include "pagedkv/block_store.h"
#include "pagedkv/page_tables.h"

using namespace pagedkv;
using namespace pagedkv::testing;

namespace {

struct PlannerFixture {
  CacheConfig cfg = small_config(4, 32);
  std::unique_ptr<DeviceBackend> backend = make_cpu_backend(cfg);
  BlockStore store{cfg, *backend};
  PageTables tables{cfg};
  AttentionPlanner planner{cfg, *backend, tables, store};
  std::mt19937 rng{11};

  SeqId sequence(int32_t tokens) {
    const SeqId s = tables.add();
    SequenceTable& t = tables.at(s);
    std::vector<Fence> waits;
    std::vector<int32_t> mapping;
    tables.reserve_rows(s, t, 0, tokens, store, waits, mapping, nullptr);
    for (int32_t l = 0; l < cfg.num_layers; ++l) {
      auto k = random_rows(tokens, cfg, rng), v = random_rows(tokens, cfg, rng);
      RowWrite w;
      w.k = k.data();
      w.v = v.data();
      w.pool = store.device_pool();
      w.slot_mapping = mapping.data();
      w.rows = tokens;
      w.layer = l;
      backend->write_rows(cfg, w, nullptr);
      t.lens[size_t(l)] = tokens;
    }
    return s;
  }
};

}  // namespace

TEST(AttentionPlanner, StepPlanNamesDeviceSlotsAndIsReusedUntilSomethingChanges) {
  PlannerFixture f;
  const SeqId a = f.sequence(9), b = f.sequence(4);
  const StepPlan& plan = f.planner.plan_for({a, b}, nullptr);
  ASSERT_EQ(plan.max_blocks, 3);
  for (int32_t i = 0; i < 3; ++i)
    EXPECT_EQ(plan.block_table[size_t(i)], f.store.loc(f.tables.at(a).blocks[size_t(i)]).slot);
  EXPECT_EQ(plan.block_table[3], f.store.loc(f.tables.at(b).blocks[0]).slot);
  EXPECT_EQ(plan.block_table[4], -1);
  EXPECT_TRUE(f.planner.plan_current({a, b}));
  EXPECT_FALSE(f.planner.plan_current({b, a}));
  f.sequence(1);  // another sequence's new block: the directory changed
  EXPECT_FALSE(f.planner.plan_current({a, b}));
}

TEST(AttentionPlanner, PartialsOverDisjointPagesMergeIntoTheWhole) {
  PlannerFixture f;
  const SeqId s = f.sequence(23);
  const int32_t hq = 4, D = f.cfg.head_dim, pos = 22;
  std::vector<float> q = random_rows(2, f.cfg, f.rng);  // one row of 4 query heads
  auto run = [&](int32_t k0, int32_t k1, std::vector<float>& out, std::vector<float>& lse) {
    out.assign(size_t(hq * D), NAN);
    lse.assign(size_t(hq), NAN);
    AttendArgs args;
    args.q = q.data();
    args.out = out.data();
    args.lse = lse.data();
    args.num_q_heads = hq;
    PagedAttentionParams p = f.planner.base_params(args, 1);
    p.window = k1 - k0;
    std::vector<int32_t> table(6, -1);
    for (int32_t b = k0 / 4; b < (k1 + 3) / 4; ++b) table[size_t(b)] = f.store.loc(f.tables.at(s).blocks[size_t(b)]).slot;
    f.planner.run_single_rows(p, table, {k1}, nullptr);
  };
  std::vector<float> whole, whole_lse, o1, l1, o2, l2;
  run(0, pos + 1, whole, whole_lse);
  run(0, 10, o1, l1);   // keys 0..9
  run(10, pos + 1, o2, l2);  // keys 10..22
  std::vector<float> outs(o1), lses(l1), merged(static_cast<size_t>(hq * D)), merged_lse(static_cast<size_t>(hq));
  outs.insert(outs.end(), o2.begin(), o2.end());
  lses.insert(lses.end(), l2.begin(), l2.end());
  f.planner.merge_partials(outs.data(), lses.data(), 2, hq, merged.data(), merged_lse.data(), nullptr);
  for (size_t i = 0; i < merged.size(); ++i) EXPECT_NEAR(merged[i], whole[i], 1e-5) << i;
  for (size_t i = 0; i < merged_lse.size(); ++i) EXPECT_NEAR(merged_lse[i], whole_lse[i], 1e-5) << i;
}
