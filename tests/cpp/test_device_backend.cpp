// The CPU device backend alone: block copies behind fences, 2-D row copies, metadata read in
// place, row writes landing where the pool layout says, and the log-sum-exp merge of partials.
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>

#include "engine_fixture.h"
#include "pagedkv/device_backend.h"

using namespace pagedkv;
using namespace pagedkv::testing;

TEST(CpuBackend, BlockCopiesLandBehindTheirFences) {
  CacheConfig c = small_config(4, 4);
  auto b = make_cpu_backend(c);
  const size_t block = size_t(c.block_bytes());
  std::vector<char> dev(3 * block), host(3 * block, 0);
  std::iota(dev.begin(), dev.end(), char(1));
  // Adjacent blocks merge into one copy; the fence passes once they are all there.
  Fence down = b->to_host({{host.data(), dev.data()}, {host.data() + block, dev.data() + block}}, {}, nullptr);
  fence_wait_host(down);
  EXPECT_TRUE(fence_done(down));
  EXPECT_TRUE(std::equal(host.begin(), host.begin() + long(2 * block), dev.begin()));
  std::vector<char> back(block, 0);
  Fence up = b->to_device({{back.data(), host.data() + block}}, {down}, nullptr, /*compute_waits=*/true);
  EXPECT_TRUE(fence_done(up));  // the compute "stream" (this thread) waited
  EXPECT_TRUE(std::equal(back.begin(), back.end(), dev.begin() + long(block)));
  b->drain();
}

TEST(CpuBackend, RowsAndMetadata) {
  CacheConfig c = small_config(4, 4);
  auto b = make_cpu_backend(c);
  std::vector<int32_t> meta = {3, 1, 4};
  EXPECT_EQ(b->send(Meta::table, meta, nullptr), meta.data());  // read in place
  std::vector<int32_t> src = {1, 2, 3, 4, 5, 6}, dst(6, 0);
  b->copy_rows(dst.data(), 2 * sizeof(int32_t), src.data(), 3 * sizeof(int32_t), sizeof(int32_t), 2, false, nullptr);
  EXPECT_EQ(dst[0], 1);
  EXPECT_EQ(dst[2], 4);
  // A row written to slot 2, offset 1 of layer 1 lands at the pool layout's address.
  std::mt19937 rng(3);
  std::vector<float> pool(size_t(c.block_elems()) * 4, 0.f);
  auto k = random_rows(1, c, rng), v = random_rows(1, c, rng);
  const int32_t mapping = 2 * c.block_size + 1;
  RowWrite w;
  w.k = k.data();
  w.v = v.data();
  w.pool = pool.data();
  w.slot_mapping = &mapping;
  w.rows = 1;
  w.layer = 1;
  b->write_rows(c, w, nullptr);
  const int64_t tile = c.tile_elems(), H = c.num_kv_heads, D = c.head_dim;
  for (int64_t h = 0; h < H; ++h)
    for (int64_t d = 0; d < D; ++d) {
      const int64_t kat = (((2 * c.num_layers + 1) * 2 + 0) * H + h) * tile + 1 * D + d;
      EXPECT_EQ(pool[size_t(kat)], k[size_t(h * D + d)]);
      EXPECT_EQ(pool[size_t(kat + H * tile)], v[size_t(h * D + d)]);
    }
}

TEST(CpuBackend, MergeWeighsPartsByTheirLogSumExp) {
  CacheConfig c = small_config(4, 4);
  c.head_dim = 2;
  auto b = make_cpu_backend(c);
  // Two parts of one (row, head): out 1 with lse log 1, out 3 with lse log 3 -> (1*1 + 3*3) / 4.
  std::vector<float> outs = {1.f, 1.f, 3.f, 3.f}, lses = {0.f, std::log(3.f)}, out(2), lse(1);
  b->merge_partials(outs.data(), lses.data(), 2, 1, 2, DType::f32, out.data(), lse.data(), nullptr);
  EXPECT_FLOAT_EQ(out[0], 2.5f);
  EXPECT_FLOAT_EQ(lse[0], std::log(4.f));
  // A part that saw nothing (lse -inf) weighs nothing.
  lses = {-INFINITY, 0.f};
  b->merge_partials(outs.data(), lses.data(), 2, 1, 2, DType::f32, out.data(), lse.data(), nullptr);
  EXPECT_FLOAT_EQ(out[1], 3.f);
  EXPECT_FLOAT_EQ(lse[0], 0.f);
}
