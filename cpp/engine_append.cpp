// append(): reserve slots (blocks written must be on the device; new blocks; copy-on-write of
// shared ones), write the rows, then let a window without retention drop what no query can see.
#include <algorithm>
#include <array>
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
  if (planner_.is_step_batch(seqs, "append()")) return step_append(layer, lengths, k, v, stream);
  if (layer == 0) store_.tick();
  append_checked(seqs, layer, lengths, k, v, stream, true);
}

void Engine::check_append(const std::vector<SeqId>& seqs, int32_t layer, const std::vector<int32_t>& lengths) {
  const Entry entry(*this, "append()");
  check_layer(layer, "append()");
  check_batch(seqs, lengths, "append()");
  if (planner_.is_step_batch(seqs, "append()")) return check_step_rows(lengths, "append()");
  std::vector<BlockId> written;
  const int64_t fresh = append_needs(seqs, layer, lengths, written);
  const BlockPool& dev = store_.tier(Tier::device).slots();
  if (!store_.tiered()) {
    PKV_CHECK(fresh <= dev.num_free(), OutOfBlocks, "append(): needs ", fresh,
              " free blocks but the device tier has ", dev.num_free(), " of ", dev.capacity());
  } else if (const KeepSet keep(written.begin(), written.end()); int64_t(keep.size()) + fresh > dev.capacity()) {
    check_pieces_room(fresh);
  } else {
    store_.check_room(fresh, keep, "append()");
  }
}

// Counts every slot an append will take (new blocks, copies of shared ones) and lists the existing
// blocks it writes, before touching anything, so running out throws with the engine unchanged.
int64_t Engine::append_needs(const std::vector<SeqId>& seqs, int32_t layer, const std::vector<int32_t>& lengths,
                             std::vector<BlockId>& written) const {
  int64_t fresh = 0;
  std::unordered_map<BlockId, int32_t> copied;
  for (size_t i = 0; i < seqs.size(); ++i) {
    if (lengths[i] == 0) continue;
    const SequenceTable& t = tables_.at(seqs[i]);
    const int64_t old_len = t.lens[size_t(layer)];
    const int64_t new_len = old_len + lengths[i];
    PKV_CHECK(new_len < (int64_t(1) << 31), ArgumentError, "append(): lengths[", i,
              "] takes sequence ", seqs[i], " past 2^31 tokens");
    fresh += tables_.blocks_to_take(t, old_len, new_len, store_, copied, &written, "append()");
  }
  return fresh;
}

void Engine::append_checked(const std::vector<SeqId>& seqs, int32_t layer,
                            const std::vector<int32_t>& lengths, const void* k, const void* v,
                            void* stream, bool drop) {
  std::vector<BlockId> written;  // existing blocks that receive rows: they must be on the device
  const int64_t fresh = append_needs(seqs, layer, lengths, written);
  const BlockPool& dev = store_.tier(Tier::device).slots();
  if (!store_.tiered()) {
    PKV_CHECK(fresh <= dev.num_free(), OutOfBlocks, "append(): needs ", fresh,
              " free blocks but the device tier has ", dev.num_free(), " of ", dev.capacity());
  } else if (const KeepSet keep(written.begin(), written.end()); int64_t(keep.size()) + fresh > dev.capacity()) {
    append_in_pieces(seqs, layer, lengths, k, v, fresh, stream);
    return;
  } else {
    store_.check_room(fresh, keep, "append()");
    store_.make_resident(written, keep, stream);
    store_.await(written, stream);
    for (BlockId id : written) store_.drop_clean_copy(id);  // about to differ from the host copy
    store_.make_device_room(fresh, keep, stream);
  }

  std::vector<Fence> waits;  // device slots still being read by eviction copies
  std::vector<int32_t> slot_mapping;  // [sum(lengths)] slot * block_size + offset of each row
  for (size_t i = 0; i < seqs.size(); ++i) {
    if (lengths[i] == 0) continue;
    SequenceTable& t = tables_.at(seqs[i]);
    const int32_t old_len = t.lens[size_t(layer)];
    const int32_t new_len = old_len + lengths[i];
    tables_.reserve_rows(seqs[i], t, old_len, new_len, store_, waits, slot_mapping, stream);
    t.lens[size_t(layer)] = new_len;
    t.scope_start[size_t(layer)] = old_len;
  }
  for (const Fence& f : waits) backend_->order_after(f, stream);
  if (!slot_mapping.empty()) write_rows(slot_mapping.data(), int32_t(slot_mapping.size()), layer, k, v, stream);
  if (drop && cfg_.windowed() && !cfg_.retain)
    for (SeqId s : seqs) tables_.drop_out_of_scope(tables_.at(s), store_);
  store_.offload_to_watermark(stream);
}

// More rows than the device tier holds at once (a long prefill into a small device tier): the
// rows go in pieces of at most half the device tier each, earlier pieces moving down as later
// ones arrive. Checked as a whole first, so the pieces cannot run out of room half way.
void Engine::append_in_pieces(const std::vector<SeqId>& seqs, int32_t layer,
                              const std::vector<int32_t>& lengths, const void* k, const void* v,
                              int64_t fresh, void* stream) {
  check_pieces_room(fresh);
  const BlockPool& dev = store_.tier(Tier::device).slots();
  const int32_t bs = cfg_.block_size;
  const int64_t piece_blocks = dev.capacity() / 2;  // room for a copy-on-write source beside its copy
  const size_t row_bytes = size_t(cfg_.num_kv_heads) * size_t(cfg_.head_dim) * dtype_size(cfg_.dtype);
  // The room check above is conservative, not exact: a piece that still runs out takes back
  // every row this call appended (blocks may have changed tier), so the call changes nothing.
  std::vector<std::array<int32_t, 2>> undo;  // [len, scope_start] of layer `layer` of seqs[i]
  size_t row = 0;
  try {
    for (size_t i = 0; i < seqs.size(); ++i) {
      SequenceTable& t = tables_.at(seqs[i]);
      const int32_t first_row = t.lens[size_t(layer)];
      undo.push_back({first_row, t.scope_start[size_t(layer)]});
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
  } catch (...) {
    for (size_t i = 0; i < undo.size(); ++i) tables_.cut_layer(seqs[i], layer, undo[i][0], undo[i][1], store_);
    throw;
  }
  if (cfg_.windowed() && !cfg_.retain)
    for (SeqId s : seqs) tables_.drop_out_of_scope(tables_.at(s), store_);
}

void Engine::check_pieces_room(int64_t fresh) const {
  const BlockPool& dev = store_.tier(Tier::device).slots();
  const BlockPool& host = store_.tier(Tier::host).slots();
  const BlockPool& disk = store_.tier(Tier::disk).slots();
  // (A clean copy's host slot counts: the device block it mirrors can go down without it.)
  PKV_CHECK(fresh <= dev.num_free() + store_.room_below_device(), OutOfBlocks, "append(): needs ",
            fresh, " new blocks but every tier is full (device ", dev.capacity(), ", host ",
            host.capacity(), ", disk ", disk.capacity(), ")");
  PKV_CHECK(dev.capacity() >= 2 && (host.num_free() > 0 || (disk.num_free() > 0 && host.num_used() > 0)),
            OutOfBlocks, "append(): the rows need more blocks than the device tier holds, and there is no "
            "free slot below it to move blocks through");
}

void Engine::write_rows(const int32_t* slot_mapping, int32_t rows, int32_t layer, const void* k, const void* v,
                        void* stream, const int32_t* on_device) {
  RowWrite w;
  w.k = k;
  w.v = v;
  w.pool = store_.device_pool();
  w.slot_mapping = slot_mapping;
  w.on_device = on_device;
  w.rows = rows;
  w.layer = layer;
  backend_->write_rows(cfg_, w, stream);
}

}  // namespace pagedkv
