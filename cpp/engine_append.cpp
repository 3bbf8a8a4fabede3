// append(): reserve slots (blocks written must be on the device; new blocks; copy-on-write of
// shared ones), write the rows, then let a window without retention drop what no query can see.
#include <unordered_map>

#include "pagedkv/engine.h"
#include "pagedkv/errors.h"

namespace pagedkv {

void Engine::append(const std::vector<SeqId>& seqs, int32_t layer,
                    const std::vector<int32_t>& lengths, const void* k, const void* v,
                    void* stream) {
  check_layer(layer, "append()");
  check_batch(seqs, lengths, "append()");
  const int32_t bs = cfg_.block_size;
  if (layer == 0) ++step_;

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
  const KeepSet keep(written.begin(), written.end());
  if (cfg_.host_blocks == 0) {
    PKV_CHECK(fresh <= pool(Tier::device).num_free(), OutOfBlocks, "append(): needs ", fresh,
              " free blocks but the device tier has ", pool(Tier::device).num_free(), " of ",
              pool(Tier::device).capacity());
  } else {
    check_room(fresh, keep, "append()");
    make_resident(written, keep, stream);
    make_device_room(fresh, keep, stream);
  }

  std::vector<Fence> waits;  // device slots still being read by eviction copies
  std::vector<int32_t> slot_mapping;  // [sum(lengths)] slot * block_size + offset of each row
  for (size_t i = 0; i < seqs.size(); ++i) {
    if (lengths[i] == 0) continue;
    SequenceTable& t = tables_.at(seqs[i]);
    const int32_t old_len = t.lens[size_t(layer)];
    const int32_t new_len = old_len + lengths[i];
    const int32_t have = int32_t(t.blocks.size());
    const int32_t need = blocks_for(new_len, bs);
    for (int32_t b = old_len / bs; b < std::min(need, have); ++b) {
      BlockId& id = t.blocks[size_t(b)];
      if (directory_.refcount(id) > 1) {
        id = clone_block(id, BlockUse{seqs[i], b, need, step_}, waits, stream);
        ++version_;
      }
    }
    while (int32_t(t.blocks.size()) < need) {
      const int32_t b = int32_t(t.blocks.size());
      t.blocks.push_back(new_device_block(BlockUse{seqs[i], b, need, step_}, waits));
      ++version_;
    }
    for (int32_t pos = old_len; pos < new_len; ++pos) {
      const int32_t slot = directory_.loc(t.blocks[size_t(pos / bs)]).slot;
      slot_mapping.push_back(slot * bs + pos % bs);
    }
    t.lens[size_t(layer)] = new_len;
    t.scope_start[size_t(layer)] = old_len;
  }
  for (const Fence& f : waits) copies_->order_after(f, stream);
  if (!slot_mapping.empty()) write_rows(slot_mapping, layer, k, v, stream);
  if (cfg_.windowed() && !cfg_.retain)
    for (SeqId s : seqs) drop_out_of_scope(tables_.at(s));
  offload_to_watermark(stream);
}

}  // namespace pagedkv
