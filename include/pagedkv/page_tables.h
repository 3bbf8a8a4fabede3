// The page tables: every sequence's logical blocks (-> block ids of the store), its per-layer
// lengths, and the rules over them: copy-on-write when a write reaches a shared block, truncate,
// fork, the sink + window scope a query reads, and dropping what no query can see any more. It
// changes block ids only through the store (new, clone, release) and never moves a block.
#pragma once
#include <cstdint>
#include <unordered_map>
#include <vector>

#include "pagedkv/config.h"
#include "pagedkv/fence.h"
#include "pagedkv/page_table.h"
#include "pagedkv/types.h"

namespace pagedkv {

class BlockStore;

// The logical blocks rows [len - n, len) of a layer read: [0, sinks) and [first, last).
struct ScopeBlocks {
  int32_t sinks, first, last;
};

class PageTables {
 public:
  explicit PageTables(const CacheConfig& cfg) : cfg_(cfg) {}

  SeqId add();
  SeqId fork(SeqId parent, BlockStore& store);
  void free(SeqId seq, BlockStore& store);
  // Keeps the first `tokens` tokens of every layer; blocks past the new end go back.
  // With a window and retain=False, a cut whose next row would read or write a dropped block
  // throws ArgumentError and changes nothing.
  void truncate(SeqId seq, int32_t tokens, BlockStore& store);

  // Takes back an append to one layer that failed half way: its length and scope start as they
  // were, blocks no layer reaches any more released.
  void cut_layer(SeqId seq, int32_t layer, int32_t len, int32_t scope_start, BlockStore& store);

  // Throws UnknownSequence naming `what` (the public call).
  const SequenceTable& get(SeqId seq, const char* what) const;
  SequenceTable& get(SeqId seq, const char* what);
  // For ids a check already found.
  const SequenceTable& at(SeqId seq) const { return tables_.at(seq); }
  SequenceTable& at(SeqId seq) { return tables_.at(seq); }
  std::vector<SeqId> ids() const;  // sorted
  int64_t size() const { return int64_t(tables_.size()); }
  // Bumps whenever a sequence's block list changes (a block added, copied, dropped or cut off, a
  // sequence forked or freed): with the store's version, what plans are checked by.
  uint64_t version() const { return version_; }

  // -- scope: the one place the sink + window rule is walked --
  ScopeBlocks scope(int32_t len, int32_t n, int32_t window) const;
  // Calls f(b) for every logical block b < t.blocks.size() that rows [len - n, len) read with
  // `window` (sinks first). Dropped blocks (kNoBlock) are the caller's to skip.
  template <typename F>
  void for_each_in_scope(const SequenceTable& t, int32_t len, int32_t n, int32_t window, F&& f) const {
    if (n == 0) return;
    const ScopeBlocks sc = scope(len, n, window);
    const int32_t have = int32_t(t.blocks.size());
    for (int32_t b = 0; b < std::min(sc.sinks, have); ++b) f(b);
    for (int32_t b = sc.first; b < std::min(sc.last, have); ++b) f(b);
  }
  // Whether a window without retention dropped logical block b of `t` (the same on every rank of
  // a striped cache: dropping follows lengths, not which rank holds the block).
  bool dropped(const SequenceTable& t, int32_t b) const;
  // This rank's logical blocks in [begin, end) (all of them unless striped).
  int64_t owned_in(int64_t begin, int64_t end) const;
  // This rank's blocks in scope of rows [len - n, len) of `layer`; throws ArgumentError when a
  // window without retention already dropped one of them (lengths[index] of `seq` in an attend()).
  int64_t check_in_scope(SeqId seq, const SequenceTable& t, int32_t layer, int32_t n, int32_t window,
                         size_t index) const;
  // Appends the blocks rows [len - n, len) of `layer` read that this rank holds, sinks first.
  void blocks_in_scope(const SequenceTable& t, int32_t layer, int32_t n, int32_t window,
                       std::vector<BlockId>& out) const;

  // -- writes: the one copy-on-write rule --
  // New device blocks that rows [old_len, new_len) of `t` take: blocks past its end, and a copy of
  // each shared block they write. A block shared by two sequences of one batch is copied for the
  // first writer only (then the second holds the last reference): `copied` carries that across
  // the batch. The existing blocks written go onto `written` (when given). Changes nothing.
  int64_t blocks_to_take(const SequenceTable& t, int64_t old_len, int64_t new_len, const BlockStore& store,
                         std::unordered_map<BlockId, int32_t>& copied, std::vector<BlockId>* written,
                         const char* what) const;
  // Takes them (the caller made room): shared blocks written are copied first, new ones come from
  // the device tier, and each row's slot * block_size + offset goes onto `slot_mapping`. Slots
  // still read by eviction copies add their fences to `waits`.
  void reserve_rows(SeqId seq, SequenceTable& t, int32_t old_len, int32_t new_len, BlockStore& store,
                    std::vector<Fence>& waits, std::vector<int32_t>& slot_mapping, void* stream);
  // With a window and retain=False: releases whole blocks no query still to come can see.
  void drop_out_of_scope(SequenceTable& t, BlockStore& store);

  // Throws InternalError on a broken page table (lengths per layer, blocks per length, drops only
  // where a window reached); counts every block id referenced into `refs`.
  void check_invariants(std::unordered_map<BlockId, int32_t>& refs, const BlockStore& store) const;

 private:
  void check_truncate_reach(SeqId seq, const SequenceTable& t, int32_t tokens) const;
  const CacheConfig& cfg_;
  std::unordered_map<SeqId, SequenceTable> tables_;
  SeqId next_seq_ = 0;
  uint64_t version_ = 0;
};

}  // namespace pagedkv
