// A new kind of tier is one file plus registration: this test defines a toy "compressed host"
// tier (blocks run-length encoded into buffers of their own), registers it as the cold tier, and
// runs a random walk of every operation over a cache whose device and host tiers are tiny, so
// blocks keep moving device -> host -> toy tier and back. After each step: the invariant checker;
// gather bit-exact against a model of what was appended; attend bit-exact against an engine
// without tiers that saw the same operations.
#include <gtest/gtest.h>

#include <map>
#include <mutex>

#include "engine_fixture.h"
#include "pagedkv/errors.h"
#include "pagedkv/tier.h"

using namespace pagedkv;
using namespace pagedkv::testing;

namespace {

class CompressedHostTier final : public TierStorage {
 public:
  explicit CompressedHostTier(const TierSpec& s) : TierStorage(s.num_slots, s.block_bytes), runs_(size_t(s.num_slots)) {}
  const char* kind() const override { return "compressed_host"; }
  // (byte, count) pairs; slots are independent, so writes of different slots may run at once.
  void write_block(int32_t slot, const void* src) override {
    const auto* p = static_cast<const uint8_t*>(src);
    std::vector<uint8_t>& out = runs_[size_t(slot)];
    out.clear();
    for (size_t i = 0; i < bytes_per_block();) {
      size_t n = 1;
      while (i + n < bytes_per_block() && p[i + n] == p[i] && n < 255) ++n;
      out.push_back(p[i]);
      out.push_back(uint8_t(n));
      i += n;
    }
    ++writes;
  }
  void read_block(int32_t slot, void* dst) const override {
    auto* p = static_cast<uint8_t*>(dst);
    size_t at = 0;
    const std::vector<uint8_t>& in = runs_[size_t(slot)];
    for (size_t i = 0; i + 1 < in.size(); i += 2) {
      std::fill(p + at, p + at + in[i + 1], in[i]);
      at += in[i + 1];
    }
    ASSERT_EQ(at, bytes_per_block());
  }
  static inline std::atomic<int64_t> writes{0};

 private:
  std::vector<std::vector<uint8_t>> runs_;
};

// The registration: one call, before a cache names the tier.
const bool registered = [] {
  register_tier("compressed_host", [](const TierSpec& s) { return std::make_unique<CompressedHostTier>(s); });
  return true;
}();

using Rows = std::vector<float>;  // [tokens, heads, dim] of one layer, K or V

struct Model {
  std::map<SeqId, std::vector<std::pair<Rows, Rows>>> seqs;  // per layer (k, v)
};

CacheConfig toy_config() {
  CacheConfig c = small_config(4, 8);  // 3 layers, 2 kv heads, head_dim 8, float32
  c.host_blocks = 6;
  c.disk_blocks = 128;
  c.cold_tier = "compressed_host";
  return c;
}

std::vector<float> attend_one(Engine& e, SeqId s, int32_t layer, const std::vector<float>& q, int32_t hq) {
  std::vector<float> out(q.size(), -1.f), lse(size_t(hq), -1.f);
  AttendArgs a;
  a.q = q.data();
  a.out = out.data();
  a.lse = lse.data();
  a.num_q_heads = hq;
  e.attend({s}, layer, {1}, a);
  out.insert(out.end(), lse.begin(), lse.end());
  return out;
}

}  // namespace

TEST(ToyTier, IsRegisteredAndUnknownNamesAreRefused) {
  ASSERT_TRUE(registered);
  CacheConfig c = toy_config();
  c.cold_tier = "no_such_tier";
  try {
    Engine e(c);
    FAIL() << "an unknown tier name was accepted";
  } catch (const ArgumentError& err) {
    EXPECT_NE(std::string(err.what()).find("cold_tier"), std::string::npos);
  }
}

TEST(ToyTier, SlicesAndBlocksRoundTripThroughTheInterface) {
  CacheConfig c = toy_config();
  auto backend = make_cpu_backend(c);
  const TierSpec spec{c, *backend, 4, size_t(c.block_bytes())};
  for (const char* name : {"compressed_host", "host", "device"}) {
    auto tier = make_tier(name, spec, "test");
    std::vector<uint8_t> block(tier->bytes_per_block()), back(block.size()), slice(block.size() / 3);
    for (size_t i = 0; i < block.size(); ++i) block[i] = uint8_t((i / 7) * 13);
    const int32_t slot = tier->alloc_slot();
    tier->write_block(slot, block.data());
    tier->read_block(slot, back.data());
    EXPECT_EQ(back, block) << name;
    tier->read_slice(slot, slice.size(), slice.size(), slice.data());  // layer 1 of 3
    EXPECT_TRUE(std::equal(slice.begin(), slice.end(), block.begin() + long(slice.size()))) << name;
    tier->free_slot(slot);
    EXPECT_EQ(tier->slots().num_free(), 4) << name;
  }
}

TEST(ToyTier, RandomWalkMatchesModelAndUntieredEngine) {
  const CacheConfig c = toy_config();
  CacheConfig flat = small_config(4, 512);
  Engine e(c), ref(flat);
  Model model;
  std::map<SeqId, SeqId> twin;  // e's id -> ref's id
  std::mt19937 rng(1234);
  const int64_t writes_before = CompressedHostTier::writes;
  const int32_t H = c.num_kv_heads, D = c.head_dim, row = H * D;
  auto pick = [&]() {
    auto it = model.seqs.begin();
    std::advance(it, long(rng() % model.seqs.size()));
    return it->first;
  };
  for (int step = 0; step < 400; ++step) {
    const int op = model.seqs.empty() ? 0 : int(rng() % 9);
    const int32_t layer = int32_t(rng() % uint32_t(c.num_layers));
    if (op == 0 && model.seqs.size() < 4) {  // add
      const SeqId s = e.add_sequence();
      twin[s] = ref.add_sequence();
      model.seqs[s].assign(size_t(c.num_layers), {});
    } else if (op <= 2) {  // append
      const SeqId s = pick();
      auto& [mk, mv] = model.seqs[s][size_t(layer)];
      const int32_t n = int32_t(rng() % 6);
      if (int64_t(mk.size()) / row + n > 40) continue;
      auto k = random_rows(n, c, rng), v = random_rows(n, c, rng);
      try {
        e.append({s}, layer, {n}, k.data(), v.data(), nullptr);
      } catch (const OutOfBlocks&) {
        e.check_invariants();
        continue;
      }
      ref.append({twin[s]}, layer, {n}, k.data(), v.data(), nullptr);
      mk.insert(mk.end(), k.begin(), k.end());
      mv.insert(mv.end(), v.begin(), v.end());
    } else if (op == 3) {  // attend one row, bit-exact against the engine without tiers
      const SeqId s = pick();
      if (e.seq_len(s, layer) == 0) continue;
      std::vector<float> q = random_rows(2, c, rng);  // 2 rows' worth = 4 query heads (GQA 2)
      try {
        const auto got = attend_one(e, s, layer, q, 2 * H);
        EXPECT_EQ(got, attend_one(ref, twin[s], layer, q, 2 * H)) << "step " << step;
      } catch (const OutOfBlocks&) {  // a scope the device and host tiers cannot hold together
      }
    } else if (op == 4 && model.seqs.size() < 4) {  // fork
      const SeqId s = pick();
      const SeqId f = e.fork(s);
      twin[f] = ref.fork(twin[s]);
      model.seqs[f] = model.seqs[s];
    } else if (op == 5) {  // free
      const SeqId s = pick();
      e.free(s);
      ref.free(twin[s]);
      model.seqs.erase(s);
    } else if (op == 6) {  // truncate
      const SeqId s = pick();
      const int32_t n = int32_t(rng() % 30);
      e.truncate(s, n);
      ref.truncate(twin[s], n);
      for (auto& [mk, mv] : model.seqs[s]) {
        mk.resize(std::min(mk.size(), size_t(n) * size_t(row)));
        mv.resize(mk.size());
      }
    } else if (op == 7) {  // offload or prefetch
      const SeqId s = pick();
      try {
        if (rng() % 2) e.offload({s}, nullptr); else e.prefetch({s}, nullptr);
      } catch (const OutOfBlocks&) {
      }
    } else if (op == 8) {  // gather, bit-exact against the model
      const SeqId s = pick();
      auto [k, v] = gather_all(e, s, layer);
      EXPECT_EQ(k, model.seqs[s][size_t(layer)].first) << "step " << step;
      EXPECT_EQ(v, model.seqs[s][size_t(layer)].second) << "step " << step;
    }
    e.check_invariants();
    ref.check_invariants();
    if (::testing::Test::HasFailure()) break;
  }
  // Every sequence, every layer, once more, from wherever its blocks ended up.
  for (auto& [s, layers] : model.seqs)
    for (int32_t l = 0; l < c.num_layers; ++l) {
      auto [k, v] = gather_all(e, s, l);
      EXPECT_EQ(k, layers[size_t(l)].first);
      EXPECT_EQ(v, layers[size_t(l)].second);
    }
  const Stats st = e.stats();
  EXPECT_GT(CompressedHostTier::writes - writes_before, 0) << "no block reached the toy tier";
  EXPECT_GT(st.counters.blocks_from_disk, 0) << "no block came back from the toy tier";
  EXPECT_GT(st.counters.blocks_to_host, 0);
}
