// append(): reserve slots (new blocks, copy-on-write of shared ones), write the rows, then let a
// window without retention drop what no query can see any more.
#include <cstring>
#include <unordered_map>

#include "pagedkv/engine.h"
#include "pagedkv/errors.h"
#ifdef PAGEDKV_WITH_CUDA
#include "pagedkv/cuda_context.h"
#include "pagedkv/kernels.h"
#endif

namespace pagedkv {

void Engine::append(const std::vector<SeqId>& seqs, int32_t layer,
                    const std::vector<int32_t>& lengths, const void* k, const void* v,
                    void* stream) {
  check_layer(layer, "append()");
  check_batch(seqs, lengths, "append()");
  const int32_t bs = cfg_.block_size;

  // Count every slot the call will take before touching anything, so running out throws with the
  // engine unchanged. A block shared by two sequences of this batch is copied for the first
  // writer only: after that the second holds the last reference.
  int64_t needed = 0;
  std::unordered_map<BlockId, int32_t> released;
  for (size_t i = 0; i < seqs.size(); ++i) {
    if (lengths[i] == 0) continue;
    const SequenceTable& t = tables_.at(seqs[i]);
    const int64_t old_len = t.lens[size_t(layer)];
    const int64_t new_len = old_len + lengths[i];
    PKV_CHECK(new_len < (int64_t(1) << 31), ArgumentError, "append(): lengths[", i,
              "] takes sequence ", seqs[i], " past 2^31 tokens");
    const int64_t have = int64_t(t.blocks.size());
    needed += std::max<int64_t>(0, blocks_for(new_len, bs) - have);
    const int64_t last = std::min<int64_t>(blocks_for(new_len, bs), have);
    for (int64_t b = old_len / bs; b < last; ++b) {
      BlockId id = t.blocks[size_t(b)];
      PKV_CHECK(id != kNoBlock, InternalError, "append() writes into a dropped block");
      if (directory_.refcount(id) == 1) continue;
      if (directory_.refcount(id) - released[id] > 1) {
        ++needed;
        ++released[id];
      }
    }
  }
  PKV_CHECK(needed <= device_pool_.num_free(), OutOfBlocks, "append(): needs ", needed,
            " free blocks but the device tier has ", device_pool_.num_free(), " of ",
            device_pool_.capacity());

  std::vector<int32_t> slot_mapping;  // [sum(lengths)] slot * block_size + offset of each row
  for (size_t i = 0; i < seqs.size(); ++i) {
    if (lengths[i] == 0) continue;
    SequenceTable& t = tables_.at(seqs[i]);
    const int32_t old_len = t.lens[size_t(layer)];
    const int32_t new_len = old_len + lengths[i];
    const int32_t have = int32_t(t.blocks.size());
    for (int32_t b = old_len / bs; b < std::min(blocks_for(new_len, bs), have); ++b)
      if (directory_.refcount(t.blocks[size_t(b)]) > 1) t.blocks[size_t(b)] = clone_block(t.blocks[size_t(b)], stream);
    while (int32_t(t.blocks.size()) < blocks_for(new_len, bs))
      t.blocks.push_back(directory_.create({Tier::device, device_pool_.allocate()}));
    for (int32_t pos = old_len; pos < new_len; ++pos) {
      const int32_t slot = directory_.loc(t.blocks[size_t(pos / bs)]).slot;
      slot_mapping.push_back(slot * bs + pos % bs);
    }
    t.lens[size_t(layer)] = new_len;
    t.scope_start[size_t(layer)] = old_len;
  }
  ++version_;
  if (!slot_mapping.empty()) write_rows(slot_mapping, layer, k, v, stream);
  if (cfg_.windowed() && !cfg_.retain)
    for (SeqId s : seqs) drop_out_of_scope(tables_.at(s));
}

BlockId Engine::clone_block(BlockId id, void* stream) {
  const int32_t src = directory_.loc(id).slot;
  const int32_t dst = device_pool_.allocate();
  copy_block(src, dst, stream);
  directory_.release(id);  // the other holders keep it alive
  ++counters_.cow_copies;
  return directory_.create({Tier::device, dst});
}

// Keys below min_scope_start - window + 1 are invisible to every query still to come (each layer's
// next rows start at or after its latest append), so whole blocks below that line go, sinks kept.
void Engine::drop_out_of_scope(SequenceTable& t) {
  const int64_t limit = int64_t(t.min_scope_start()) - cfg_.window + 1;
  const int32_t bs = cfg_.block_size;
  for (; int64_t(t.drop_cursor + 1) * bs <= limit; ++t.drop_cursor) {
    BlockId& id = t.blocks[size_t(t.drop_cursor)];
    if (int64_t(t.drop_cursor) * bs < cfg_.sink_tokens || id == kNoBlock) continue;
    const BlockLoc loc = directory_.loc(id);
    if (directory_.release(id)) device_pool_.release(loc.slot);
    id = kNoBlock;
    ++counters_.drops;
  }
}

void Engine::copy_block(int32_t src_slot, int32_t dst_slot, void* stream) {
  const size_t bytes = size_t(cfg_.block_bytes());
  char* base = static_cast<char*>(device_pool_.data());
  if (!cfg_.on_cuda) {
    std::memcpy(base + size_t(dst_slot) * bytes, base + size_t(src_slot) * bytes, bytes);
    return;
  }
#ifdef PAGEDKV_WITH_CUDA
  PKV_CUDA(cudaMemcpyAsync(base + size_t(dst_slot) * bytes, base + size_t(src_slot) * bytes, bytes,
                           cudaMemcpyDeviceToDevice, static_cast<cudaStream_t>(stream)));
#else
  (void)stream;
#endif
}

void Engine::write_rows(const std::vector<int32_t>& slot_mapping, int32_t layer, const void* k,
                        const void* v, void* stream) {
  const int32_t bs = cfg_.block_size, H = cfg_.num_kv_heads, D = cfg_.head_dim;
  const size_t es = dtype_size(cfg_.dtype);
  if (!cfg_.on_cuda) {
    char* pool = static_cast<char*>(device_pool_.data());
    const int64_t tile = cfg_.tile_elems();
    for (size_t r = 0; r < slot_mapping.size(); ++r) {
      const int64_t slot = slot_mapping[r] / bs, off = slot_mapping[r] % bs;
      for (int32_t h = 0; h < H; ++h) {
        const int64_t src = (int64_t(r) * H + h) * D;
        const int64_t kdst = (((slot * cfg_.num_layers + layer) * 2 + 0) * H + h) * tile + off * D;
        const int64_t vdst = kdst + int64_t(H) * tile;
        std::memcpy(pool + kdst * es, static_cast<const char*>(k) + src * es, size_t(D) * es);
        std::memcpy(pool + vdst * es, static_cast<const char*>(v) + src * es, size_t(D) * es);
      }
    }
    return;
  }
#ifdef PAGEDKV_WITH_CUDA
  auto st = static_cast<cudaStream_t>(stream);
  const size_t bytes = slot_mapping.size() * sizeof(int32_t);
  void* mapping = cuda_->meta.reserve(bytes);
  cuda_->upload(mapping, slot_mapping.data(), bytes, st);
  cuda::KVWriteParams p;
  p.k = k;
  p.v = v;
  p.pool = device_pool_.data();
  p.slot_mapping = static_cast<const int32_t*>(mapping);
  p.num_rows = int32_t(slot_mapping.size());
  p.num_kv_heads = H;
  p.head_dim = D;
  p.block_size = bs;
  p.num_layers = cfg_.num_layers;
  p.layer = layer;
  p.dtype = cfg_.dtype;
  PKV_CUDA(cuda::kv_write(p, st));
#else
  (void)stream;
#endif
}

}  // namespace pagedkv
