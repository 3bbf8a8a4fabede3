// The block store alone (no page tables, no planner): blocks made on the device, moved down and
// back, bytes intact, room checks, pins, and its half of the invariant checker.
#include <gtest/gtest.h>

#include <cstring>
#include <unordered_map>

#include "engine_fixture.h"
#include "pagedkv/block_store.h"
#include "pagedkv/errors.h"

using namespace pagedkv;
using namespace pagedkv::testing;

namespace {

struct StoreFixture {
  CacheConfig cfg;
  std::unique_ptr<DeviceBackend> backend;
  std::unique_ptr<BlockStore> store;
  std::unordered_map<BlockId, int32_t> refs;  // what page tables would hold

  explicit StoreFixture(int64_t device, int64_t host) : cfg(small_config(4, device)) {
    cfg.host_blocks = host;
    backend = make_cpu_backend(cfg);
    store = std::make_unique<BlockStore>(cfg, *backend);
  }
  BlockId make(uint8_t fill) {
    std::vector<Fence> waits;
    const BlockId id = store->new_block(BlockUse{}, waits);
    for (const Fence& f : waits) backend->order_after(f, nullptr);
    std::memset(store->slot_ptr(store->loc(id)), fill, size_t(cfg.block_bytes()));
    refs[id] = 1;
    return id;
  }
  bool holds(BlockId id, uint8_t fill) {
    std::vector<uint8_t> got(size_t(cfg.block_bytes()));
    const BlockLoc l = store->loc(id);
    if (l.tier == Tier::host) fence_wait_host(store->host_landing(id) ? *store->host_landing(id) : Fence{});
    store->tier(l.tier).read_block(l.slot, got.data());
    return std::all_of(got.begin(), got.end(), [&](uint8_t b) { return b == fill; });
  }
};

}  // namespace

TEST(BlockStore, EvictionAndFetchKeepBytesAndIdentity) {
  StoreFixture f(3, 4);
  std::vector<BlockId> ids;
  for (uint8_t i = 0; i < 3; ++i) ids.push_back(f.make(uint8_t(10 + i)));
  f.store->check_invariants(f.refs);
  EXPECT_EQ(f.store->tier(Tier::device).slots().num_free(), 0);
  f.store->make_device_room(2, KeepSet{ids[2]}, nullptr);  // two go down, the kept one stays
  EXPECT_EQ(f.store->loc(ids[2]).tier, Tier::device);
  EXPECT_EQ(f.store->loc(ids[0]).tier, Tier::host);
  EXPECT_EQ(f.store->loc(ids[1]).tier, Tier::host);
  f.store->check_invariants(f.refs);
  for (uint8_t i = 0; i < 3; ++i) EXPECT_TRUE(f.holds(ids[i], uint8_t(10 + i)));
  f.store->make_resident({ids[0], ids[1]}, KeepSet{ids[0], ids[1]}, nullptr);
  EXPECT_EQ(f.store->loc(ids[0]).tier, Tier::device);
  f.store->check_invariants(f.refs);
  for (uint8_t i = 0; i < 3; ++i) EXPECT_TRUE(f.holds(ids[i], uint8_t(10 + i)));
  EXPECT_EQ(f.store->counters().blocks_to_host, 2);
  EXPECT_EQ(f.store->counters().blocks_from_host, 2);
}

TEST(BlockStore, RoomCheckCountsPinsAndThrowsBeforeMoving) {
  StoreFixture f(2, 1);
  const BlockId a = f.make(1), b = f.make(2);
  f.store->pin(a);
  f.store->pin(b);
  EXPECT_THROW(f.store->check_room(1, KeepSet{}, "test"), OutOfBlocks);
  f.store->unpin_all();
  f.store->check_room(1, KeepSet{}, "test");  // one can go down to the host now
  EXPECT_EQ(f.store->loc(a).tier, Tier::device);
  f.store->check_invariants(f.refs);
}

TEST(BlockStore, VersionCountsCreationMovesAndRelease) {
  StoreFixture f(2, 2);
  const uint64_t v0 = f.store->version();
  const BlockId a = f.make(3);
  EXPECT_GT(f.store->version(), v0);
  const uint64_t v1 = f.store->version();
  f.store->offload({a}, nullptr);
  EXPECT_GT(f.store->version(), v1);
  const uint64_t v2 = f.store->version();
  f.store->retain(a);
  f.store->release(a);  // not the last reference: nothing a table shows changed
  EXPECT_EQ(f.store->version(), v2);
  f.store->release(a);
  f.refs.clear();
  EXPECT_GT(f.store->version(), v2);
  f.store->check_invariants(f.refs);
}

TEST(BlockStore, InvariantCheckerSeesAReferenceTheStoreDoesNotKnow) {
  StoreFixture f(2, 0);
  const BlockId a = f.make(4);
  f.refs[a] = 2;
  EXPECT_THROW(f.store->check_invariants(f.refs), InternalError);
}
