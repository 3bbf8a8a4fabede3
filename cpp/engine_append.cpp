// append(): reserve slots (blocks written must be on the device; new blocks; copy-on-write of
// shared ones), write the rows, then let a window without retention drop what no query can see.
#include <unordered_map>

#include "pagedkv/engine.h"
#include "pagedkv/errors.h"

namespace pagedkv {

void Engine::append(const std::vector<SeqId>& seqs, int32_t layer,
                    const std::vector<int32_t>& lengths, const void* k, const void* v,
                    void* stream) {
  const Entry entry(*this, "append()");
  check_layer(layer, "append()");
  check_batch(seqs, lengths, "append()");
  if (is_step_batch(seqs, "append()")) return step_append(layer, lengths, k, v, stream);
  if (layer == 0) ++step_;
  append_checked(seqs, layer, lengths, k, v, stream, true);
}

void Engine::append_checked(const std::vector<SeqId>& seqs, int32_t layer,
                            const std::vector<int32_t>& lengths, const void* k, const void* v,
                            void* stream, bool drop) {
  const int32_t bs = cfg_.block_size;

  // Count every slot the call will take before touching anything, so running out throws with the
  // engine unchanged. A block shared by two sequences of this batch is copied for the first
  // writer only: after that the second holds the last reference.
  int64_t fresh = 0;
  std::vector<BlockId> written;  // existing blocks that receive rows: they must be on the device
  std::unordered_map<BlockId, int32_t> released;
  for (size_t i = 0; i < seqs.size(); ++i) {
    if (lengths[i] == 0) continue;
    const SequenceTable& t = tables_.at(seqs[i]);
    const int64_t old_len = t.lens[size_t(layer)];
    const int64_t new_len = old_len + lengths[i];
    PKV_CHECK(new_len < (int64_t(1) << 31), ArgumentError, "append(): lengths[", i,
              "] takes sequence ", seqs[i], " past 2^31 tokens");
    const int64_t have = int64_t(t.blocks.size());
    fresh += std::max<int64_t>(0, blocks_for(new_len, bs) - have);
    for (int64_t b = old_len / bs; b < std::min<int64_t>(blocks_for(new_len, bs), have); ++b) {
      const BlockId id = t.blocks[size_t(b)];
      PKV_CHECK(id != kNoBlock, InternalError, "append() writes into a dropped block");
      written.push_back(id);
      if (directory_.refcount(id) > 1 && directory_.refcount(id) - released[id] > 1) {
        ++fresh;
        ++released[id];
      }
    }
  }
  if (!tiered()) {
    PKV_CHECK(fresh <= pool(Tier::device).num_free(), OutOfBlocks, "append(): needs ", fresh,
              " free blocks but the device tier has ", pool(Tier::device).num_free(), " of ",
              pool(Tier::device).capacity());
  } else if (const KeepSet keep(written.begin(), written.end());
             int64_t(keep.size()) + fresh > pool(Tier::device).capacity()) {
    append_in_pieces(seqs, layer, lengths, k, v, fresh, stream);
    return;
  } else {
    check_room(fresh, keep, "append()");
    make_resident(written, keep, stream);
    await_blocks(written, stream);
    for (BlockId id : written) drop_clean_copy(id);  // about to differ from the host copy
    make_device_room(fresh, keep, stream);
  }

  std::vector<Fence> waits;  // device slots still being read by eviction copies
  std::vector<int32_t> slot_mapping;  // [sum(lengths)] slot * block_size + offset of each row
  for (size_t i = 0; i < seqs.size(); ++i) {
    if (lengths[i] == 0) continue;
    SequenceTable& t = tables_.at(seqs[i]);
    const int32_t old_len = t.lens[size_t(layer)];
    const int32_t new_len = old_len + lengths[i];
    reserve_rows(seqs[i], t, old_len, new_len, waits, slot_mapping, stream);
    t.lens[size_t(layer)] = new_len;
    t.scope_start[size_t(layer)] = old_len;
  }
  for (const Fence& f : waits) copies_->order_after(f, stream);
  if (!slot_mapping.empty()) write_rows(slot_mapping.data(), int32_t(slot_mapping.size()), layer, k, v, stream);
  if (drop && cfg_.windowed() && !cfg_.retain)
    for (SeqId s : seqs) drop_out_of_scope(tables_.at(s));
  offload_to_watermark(stream);
}

// More rows than the device tier holds at once (a long prefill into a small device tier): the
// rows go in pieces of at most half the device tier each, earlier pieces moving down as later
// ones arrive. Checked as a whole first, so the pieces cannot run out of room half way.
void Engine::append_in_pieces(const std::vector<SeqId>& seqs, int32_t layer,
                              const std::vector<int32_t>& lengths, const void* k, const void* v,
                              int64_t fresh, void* stream) {
  const BlockPool& dev = pool(Tier::device);
  const BlockPool& host = pool(Tier::host);
  const BlockPool& disk = pool(Tier::disk);
  PKV_CHECK(fresh <= dev.num_free() + host.num_free() + disk.num_free(), OutOfBlocks, "append(): needs ",
            fresh, " new blocks but every tier is full (device ", dev.capacity(), ", host ",
            host.capacity(), ", disk ", disk.capacity(), ")");
  PKV_CHECK(dev.capacity() >= 2 && (host.num_free() > 0 || (disk.num_free() > 0 && host.num_used() > 0)),
            OutOfBlocks, "append(): the rows need more blocks than the device tier holds, and there is no "
            "free slot below it to move blocks through");
  const int32_t bs = cfg_.block_size;
  const int64_t piece_blocks = dev.capacity() / 2;  // room for a copy-on-write source beside its copy
  const size_t row_bytes = size_t(cfg_.num_kv_heads) * size_t(cfg_.head_dim) * dtype_size(cfg_.dtype);
  size_t row = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    SequenceTable& t = tables_.at(seqs[i]);
    const int32_t first_row = t.lens[size_t(layer)];
    for (int32_t done = 0; done < lengths[i];) {
      const int32_t off = t.lens[size_t(layer)] % bs;
      const int32_t m = int32_t(std::min<int64_t>(lengths[i] - done, piece_blocks * bs - off));
      const size_t at = (row + size_t(done)) * row_bytes;
      append_checked({seqs[i]}, layer, {m}, static_cast<const char*>(k) + at,
                     static_cast<const char*>(v) + at, stream, false);
      done += m;
    }
    if (lengths[i] > 0) t.scope_start[size_t(layer)] = first_row;  // every row keeps its own window
    row += size_t(lengths[i]);
  }
  if (cfg_.windowed() && !cfg_.retain)
    for (SeqId s : seqs) drop_out_of_scope(tables_.at(s));
}

}  // namespace pagedkv
