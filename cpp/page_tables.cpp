// The page tables: sequences, lengths, scope, copy-on-write, truncate, fork, drops.
#include "pagedkv/page_tables.h"

#include <algorithm>

#include "pagedkv/attention_params.h"
#include "pagedkv/block_store.h"
#include "pagedkv/errors.h"

namespace pagedkv {

SeqId PageTables::add() {
  SeqId id = next_seq_++;
  SequenceTable t;
  t.lens.assign(size_t(cfg_.num_layers), 0);
  t.scope_start.assign(size_t(cfg_.num_layers), 0);
  tables_.emplace(id, std::move(t));  // (no block list changed: plans of other batches hold)
  return id;
}

SeqId PageTables::fork(SeqId parent, BlockStore& store) {
  SequenceTable copy = get(parent, "fork()");
  for (BlockId id : copy.blocks)
    if (id != kNoBlock) store.retain(id);
  SeqId id = next_seq_++;
  tables_.emplace(id, std::move(copy));
  ++version_;
  return id;
}

void PageTables::free(SeqId seq, BlockStore& store) {
  SequenceTable& t = get(seq, "free()");
  for (BlockId id : t.blocks)
    if (id != kNoBlock) store.release(id);
  tables_.erase(seq);
  ++version_;
}

void PageTables::truncate(SeqId seq, int32_t tokens, BlockStore& store) {
  SequenceTable& t = get(seq, "truncate()");
  PKV_CHECK(tokens >= 0, ArgumentError, "truncate(): tokens must be >= 0, got ", tokens);
  check_truncate_reach(seq, t, tokens);
  for (int32_t& n : t.lens) n = std::min(n, tokens);
  for (int32_t& s : t.scope_start) s = std::min(s, tokens);
  const size_t keep = size_t(blocks_for(t.max_len(), cfg_.block_size));
  for (size_t b = keep; b < t.blocks.size(); ++b)
    if (t.blocks[b] != kNoBlock) store.release(t.blocks[b]);
  if (t.blocks.size() > keep) {
    t.blocks.resize(keep);
    ++version_;
  }
  t.drop_cursor = std::min(t.drop_cursor, int32_t(keep));
}

void PageTables::cut_layer(SeqId seq, int32_t layer, int32_t len, int32_t scope_start, BlockStore& store) {
  SequenceTable& t = at(seq);
  t.lens[size_t(layer)] = len;
  t.scope_start[size_t(layer)] = scope_start;
  const size_t keep = size_t(blocks_for(t.max_len(), cfg_.block_size));
  for (size_t b = keep; b < t.blocks.size(); ++b)
    if (t.blocks[b] != kNoBlock) store.release(t.blocks[b]);
  if (t.blocks.size() > keep) t.blocks.resize(keep);
  ++version_;  // (copies of shared blocks made meanwhile stay: they hold the same keys)
}

// A window without retention drops keys for good: a cut that leaves the next row (at `tokens`)
// reading or writing a dropped block would leave a sequence no append or attend could serve, so
// it is refused before anything changes.
void PageTables::check_truncate_reach(SeqId seq, const SequenceTable& t, int32_t tokens) const {
  if (!cfg_.windowed() || cfg_.retain || tokens >= t.max_len()) return;
  const int32_t bs = cfg_.block_size, first = window_start(tokens, cfg_.window) / bs;
  for (int32_t b = first; b < std::min(blocks_for(tokens, bs), int32_t(t.blocks.size())); ++b)
    PKV_CHECK(!dropped(t, b), ArgumentError, "truncate(): keeping ", tokens,
              " tokens of sequence ", seq, " would end in keys the window already dropped (window=",
              cfg_.window, ", retain=False: keys ", int64_t(b) * bs, "..", int64_t(b + 1) * bs - 1,
              " are gone): the next row could neither be appended nor attend");
}

const SequenceTable& PageTables::get(SeqId seq, const char* what) const {
  auto it = tables_.find(seq);
  PKV_CHECK(it != tables_.end(), UnknownSequence, what, ": unknown sequence id ", seq);
  return it->second;
}

SequenceTable& PageTables::get(SeqId seq, const char* what) {
  return const_cast<SequenceTable&>(static_cast<const PageTables*>(this)->get(seq, what));
}

std::vector<SeqId> PageTables::ids() const {
  std::vector<SeqId> out;
  out.reserve(tables_.size());
  for (const auto& kv : tables_) out.push_back(kv.first);
  std::sort(out.begin(), out.end());
  return out;
}

ScopeBlocks PageTables::scope(int32_t len, int32_t n, int32_t window) const {
  const int32_t bs = cfg_.block_size, first = window_start(len - n, window) / bs;
  return {window > 0 ? std::min(blocks_for(cfg_.sink_tokens, bs), first) : 0, first, blocks_for(len, bs)};
}

int64_t PageTables::check_in_scope(SeqId seq, const SequenceTable& t, int32_t layer, int32_t n, int32_t window,
                                   size_t index) const {
  const int32_t len = t.lens[size_t(layer)];
  PKV_CHECK(n <= len, ArgumentError, "attend(): lengths[", index, "] = ", n, " but layer ", layer,
            " of sequence ", seq, " has seen only ", len, " tokens");
  if (n == 0) return 0;
  const ScopeBlocks sc = scope(len, n, window);
  for (int32_t b = sc.first; b < std::min(t.drop_cursor, sc.last); ++b)
    PKV_CHECK(!dropped(t, b), ArgumentError,
              "attend(): lengths[", index, "] = ", n, " reaches keys of sequence ", seq,
              " that the window already dropped (retain=False)");
  return owned_in(0, sc.sinks) + owned_in(sc.first, sc.last);
}

int64_t PageTables::owned_in(int64_t begin, int64_t end) const {
  if (end <= begin) return 0;
  if (!cfg_.striped()) return end - begin;
  const int64_t w = cfg_.stripe_world, r = cfg_.stripe_rank;
  auto below = [&](int64_t x) { return x / w + (x % w > r ? 1 : 0); };  // owned blocks < x
  return below(end) - below(begin);
}

bool PageTables::dropped(const SequenceTable& t, int32_t b) const {
  return b < t.drop_cursor && int64_t(b) * cfg_.block_size >= cfg_.sink_tokens;
}

void PageTables::blocks_in_scope(const SequenceTable& t, int32_t layer, int32_t n, int32_t window,
                                 std::vector<BlockId>& out) const {
  for_each_in_scope(t, t.lens[size_t(layer)], n, window, [&](int32_t b) {
    if (t.blocks[size_t(b)] != kNoBlock) out.push_back(t.blocks[size_t(b)]);  // (another rank's)
  });
}

int64_t PageTables::blocks_to_take(const SequenceTable& t, int64_t old_len, int64_t new_len, const BlockStore& store,
                                   std::unordered_map<BlockId, int32_t>& copied, std::vector<BlockId>* written,
                                   const char* what) const {
  const int32_t bs = cfg_.block_size;
  const int64_t have = int64_t(t.blocks.size()), need = blocks_for(new_len, bs);
  int64_t fresh = owned_in(have, need);
  for (int64_t b = old_len / bs; b < std::min(need, have); ++b) {
    if (!cfg_.owns(b)) continue;  // another rank's block: that rank writes it
    const BlockId id = t.blocks[size_t(b)];
    PKV_CHECK(id != kNoBlock, InternalError, what, " writes into a dropped block");
    if (written) written->push_back(id);
    const int32_t refs = store.refcount(id);
    if (refs > 1 && refs - copied[id] > 1) {
      ++fresh;
      ++copied[id];
    }
  }
  return fresh;
}

void PageTables::reserve_rows(SeqId seq, SequenceTable& t, int32_t old_len, int32_t new_len, BlockStore& store,
                              std::vector<Fence>& waits, std::vector<int32_t>& slot_mapping, void* stream) {
  const int32_t bs = cfg_.block_size;
  const int32_t have = int32_t(t.blocks.size()), need = blocks_for(new_len, bs);
  for (int32_t b = old_len / bs; b < std::min(need, have); ++b) {
    BlockId& id = t.blocks[size_t(b)];
    if (!cfg_.owns(b)) continue;
    store.drop_clean_copy(id);  // about to differ from its host copy
    if (store.refcount(id) > 1) {
      id = store.clone(id, BlockUse{seq, b, need, store.clock()}, waits, stream);
      ++version_;
    }
  }
  while (int32_t(t.blocks.size()) < need) {
    const int32_t b = int32_t(t.blocks.size());
    t.blocks.push_back(cfg_.owns(b) ? store.new_block(BlockUse{seq, b, need, store.clock()}, waits) : kNoBlock);
    ++version_;
  }
  for (int32_t pos = old_len; pos < new_len; ++pos) {  // (-1: another rank's row, not written here)
    const BlockId id = t.blocks[size_t(pos / bs)];
    slot_mapping.push_back(id == kNoBlock ? -1 : store.loc(id).slot * bs + pos % bs);
  }
}

// Keys below min_scope_start - window + 1 are invisible to every query still to come (each layer's
// next rows start at or after its latest append), so whole blocks below that line go, sinks kept.
void PageTables::drop_out_of_scope(SequenceTable& t, BlockStore& store) {
  const int64_t limit = int64_t(t.min_scope_start()) - cfg_.window + 1;
  const int32_t bs = cfg_.block_size;
  for (; int64_t(t.drop_cursor + 1) * bs <= limit; ++t.drop_cursor) {
    BlockId& id = t.blocks[size_t(t.drop_cursor)];
    if (int64_t(t.drop_cursor) * bs < cfg_.sink_tokens || id == kNoBlock) continue;
    store.release(id);
    id = kNoBlock;
    ++store.counters().drops;
    ++version_;
  }
}

void PageTables::check_invariants(std::unordered_map<BlockId, int32_t>& refs, const BlockStore& store) const {
  (void)store;
  for (const auto& [seq, t] : tables_) {
    PKV_CHECK(int32_t(t.lens.size()) == cfg_.num_layers, InternalError, "sequence ", seq,
              " has lengths for ", t.lens.size(), " layers");
    PKV_CHECK(int32_t(t.blocks.size()) == blocks_for(t.max_len(), cfg_.block_size), InternalError,
              "sequence ", seq, " holds ", t.blocks.size(), " blocks for ", t.max_len(), " tokens");
    for (size_t b = 0; b < t.blocks.size(); ++b) {
      const BlockId id = t.blocks[b];
      const bool held = cfg_.owns(int64_t(b)) && !dropped(t, int32_t(b));
      PKV_CHECK((id != kNoBlock) == held, InternalError, "sequence ", seq, " logical block ", b,
                id == kNoBlock ? " is missing" : " is held", " (", cfg_.owns(int64_t(b)) ? "this" : "another",
                " rank's block", dropped(t, int32_t(b)) ? ", dropped by the window)" : ")");
      if (id == kNoBlock) {
        PKV_CHECK(!dropped(t, int32_t(b)) || (cfg_.windowed() && !cfg_.retain), InternalError, "sequence ", seq,
                  " has logical block ", b, " dropped outside a window's reach");
        continue;
      }
      ++refs[id];
    }
  }
}

}  // namespace pagedkv
