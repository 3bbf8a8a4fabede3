// The invariant checker must notice each kind of corruption it promises to catch.
#include <gtest/gtest.h>

#include "engine_fixture.h"
#include "pagedkv/errors.h"

namespace pagedkv {

struct EngineTestAccess {
  static SequenceTable& table(Engine& e, SeqId s) { return e.tables_.at(s); }
  static BlockDirectory& directory(Engine& e) { return e.store_.directory_; }
  static BlockPool& pool(Engine& e) { return e.store_.tier(Tier::device).slots(); }
};

}  // namespace pagedkv

using namespace pagedkv;
using namespace pagedkv::testing;
using A = EngineTestAccess;

namespace {

struct Fixture {
  std::mt19937 rng{9};
  Engine e{small_config(4, 16)};
  SeqId a, b;
  Fixture() {
    a = e.add_sequence();
    append_random(e, a, 0, 9, rng);
    b = e.fork(a);
    e.check_invariants();
  }
};

}  // namespace

TEST(Invariants, RefcountMismatch) {
  Fixture f;
  A::directory(f.e).retain(A::table(f.e, f.a).blocks[0]);
  EXPECT_THROW(f.e.check_invariants(), InternalError);
}

TEST(Invariants, BlockCountNotMatchingLength) {
  Fixture f;
  A::table(f.e, f.a).lens[0] = 20;
  EXPECT_THROW(f.e.check_invariants(), InternalError);
}

TEST(Invariants, SlotOwnedTwice) {
  Fixture f;
  auto& dir = A::directory(f.e);
  BlockId id = A::table(f.e, f.a).blocks[2];
  // Give seq b a fresh block that points at seq a's slot.
  A::directory(f.e).release(A::table(f.e, f.b).blocks[2]);
  A::table(f.e, f.b).blocks[2] = dir.create(dir.loc(id));
  EXPECT_THROW(f.e.check_invariants(), InternalError);
}

TEST(Invariants, FreeSlotInUse) {
  Fixture f;
  BlockId id = A::table(f.e, f.a).blocks[1];
  A::pool(f.e).release(A::directory(f.e).loc(id).slot);
  EXPECT_THROW(f.e.check_invariants(), InternalError);
}

TEST(Invariants, DroppedBlockWithoutWindow) {
  Fixture f;
  A::directory(f.e).release(A::table(f.e, f.a).blocks[0]);
  A::table(f.e, f.a).blocks[0] = kNoBlock;
  EXPECT_THROW(f.e.check_invariants(), InternalError);
}
