// Block lifecycle on the device tier: creation, copy-on-write, release, window drops, and the
// data paths that write rows and copy blocks (memcpy on the CPU, kernels and async copies on CUDA).
#include <cstring>
#include <unordered_map>

#include "pagedkv/engine.h"
#include "pagedkv/errors.h"
#ifdef PAGEDKV_WITH_CUDA
#include "pagedkv/cuda_context.h"
#include "pagedkv/kernels.h"
#endif

namespace pagedkv {

// Removes and returns id's fence from `fences` (empty when it has none).
Fence take_fence(std::unordered_map<BlockId, Fence>& fences, BlockId id) {
  auto it = fences.find(id);
  if (it == fences.end()) return nullptr;
  Fence f = std::move(it->second);
  fences.erase(it);
  return f;
}

// The caller made room. A slot still being read by an eviction copy adds its fence to `waits`:
// the compute stream must order itself after it before writing the slot.
BlockId Engine::new_device_block(const BlockUse& use, std::vector<Fence>& waits) {
  Fence wait;
  const int32_t slot = pool(Tier::device).allocate(&wait);
  if (wait) waits.push_back(std::move(wait));
  const BlockId id = directory_.create({Tier::device, slot});
  if (tiered()) policy_->on_arrive(id, use);
  return id;
}

BlockId Engine::clone_block(BlockId id, const BlockUse& use, std::vector<Fence>& waits, void* stream) {
  const size_t before = waits.size();
  const BlockId fresh = new_device_block(use, waits);
  for (size_t i = before; i < waits.size(); ++i) copies_->order_after(waits[i], stream);  // its slot
  copy_block(directory_.loc(id).slot, directory_.loc(fresh).slot, stream);
  directory_.release(id);  // the other holders keep it alive
  ++counters_.cow_copies;
  return fresh;
}

void Engine::reserve_rows(SeqId seq, SequenceTable& t, int32_t old_len, int32_t new_len,
                          std::vector<Fence>& waits, std::vector<int32_t>& slot_mapping, void* stream) {
  const int32_t bs = cfg_.block_size;
  const int32_t have = int32_t(t.blocks.size()), need = blocks_for(new_len, bs);
  for (int32_t b = old_len / bs; b < std::min(need, have); ++b) {
    BlockId& id = t.blocks[size_t(b)];
    drop_clean_copy(id);  // about to differ from its host copy
    if (directory_.refcount(id) > 1) {
      id = clone_block(id, BlockUse{seq, b, need, step_}, waits, stream);
      ++version_;
    }
  }
  while (int32_t(t.blocks.size()) < need) {
    const int32_t b = int32_t(t.blocks.size());
    t.blocks.push_back(new_device_block(BlockUse{seq, b, need, step_}, waits));
    ++version_;
  }
  for (int32_t pos = old_len; pos < new_len; ++pos)
    slot_mapping.push_back(directory_.loc(t.blocks[size_t(pos / bs)]).slot * bs + pos % bs);
}

// A staging copy that read the slot waited for the eviction that wrote it, so it passes last.
Fence Engine::host_slot_fence(BlockId id) {
  Fence written = take_fence(host_ready_, id);
  Fence read;
  auto it = host_read_by_.find(id);
  if (it != host_read_by_.end()) {
    read = *it->second;
    host_read_by_.erase(it);
  }
  return read ? read : written;
}

void Engine::release_block(BlockId id) {
  const BlockLoc loc = directory_.loc(id);
  if (!directory_.release(id)) return;
  switch (loc.tier) {
    case Tier::device:  // a prefetch may still be writing the slot
      policy_->on_leave(id);
      drop_clean_copy(id);
      pool(Tier::device).release_after(loc.slot, take_fence(device_ready_, id));
      break;
    case Tier::host:  // an eviction may still be writing the slot, a staging copy reading it
      host_order_->on_leave(id);
      pool(Tier::host).release_after(loc.slot, host_slot_fence(id));
      break;
    case Tier::disk:
      pool(Tier::disk).release(loc.slot);
      break;
    default:
      PKV_FAIL(InternalError, "releasing block ", id, " in no tier");
  }
}

// Keys below min_scope_start - window + 1 are invisible to every query still to come (each layer's
// next rows start at or after its latest append), so whole blocks below that line go, sinks kept.
void Engine::drop_out_of_scope(SequenceTable& t) {
  const int64_t limit = int64_t(t.min_scope_start()) - cfg_.window + 1;
  const int32_t bs = cfg_.block_size;
  for (; int64_t(t.drop_cursor + 1) * bs <= limit; ++t.drop_cursor) {
    BlockId& id = t.blocks[size_t(t.drop_cursor)];
    if (int64_t(t.drop_cursor) * bs < cfg_.sink_tokens || id == kNoBlock) continue;
    release_block(id);
    id = kNoBlock;
    ++counters_.drops;
    ++version_;
  }
}

void Engine::copy_block(int32_t src_slot, int32_t dst_slot, void* stream) {
  char* src = slot_ptr({Tier::device, src_slot});
  char* dst = slot_ptr({Tier::device, dst_slot});
  const size_t bytes = size_t(cfg_.block_bytes());
  if (!cfg_.on_cuda) {
    std::memcpy(dst, src, bytes);
    return;
  }
#ifdef PAGEDKV_WITH_CUDA
  PKV_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, static_cast<cudaStream_t>(stream)));
#else
  (void)stream;
#endif
}

void Engine::write_rows(const int32_t* slot_mapping, int32_t rows, int32_t layer, const void* k,
                        const void* v, void* stream, const int32_t* on_device) {
  const int32_t bs = cfg_.block_size, H = cfg_.num_kv_heads, D = cfg_.head_dim;
  const size_t es = dtype_size(cfg_.dtype);
  if (!cfg_.on_cuda) {
    char* base = static_cast<char*>(pool(Tier::device).data());
    const int64_t tile = cfg_.tile_elems();
    for (int32_t r = 0; r < rows; ++r) {
      const int64_t slot = slot_mapping[r] / bs, off = slot_mapping[r] % bs;
      for (int32_t h = 0; h < H; ++h) {
        const int64_t src = (int64_t(r) * H + h) * D;
        const int64_t kdst = (((slot * cfg_.num_layers + layer) * 2 + 0) * H + h) * tile + off * D;
        const int64_t vdst = kdst + int64_t(H) * tile;
        std::memcpy(base + kdst * es, static_cast<const char*>(k) + src * es, size_t(D) * es);
        std::memcpy(base + vdst * es, static_cast<const char*>(v) + src * es, size_t(D) * es);
      }
    }
    return;
  }
#ifdef PAGEDKV_WITH_CUDA
  auto st = static_cast<cudaStream_t>(stream);
  const int32_t* mapping = on_device ? on_device : cuda_->slot_map.send(*cuda_, slot_mapping, size_t(rows), st);
  cuda::KVWriteParams p;
  p.k = k;
  p.v = v;
  p.pool = pool(Tier::device).data();
  p.slot_mapping = mapping;
  p.num_rows = rows;
  p.num_kv_heads = H;
  p.head_dim = D;
  p.block_size = bs;
  p.num_layers = cfg_.num_layers;
  p.layer = layer;
  p.dtype = cfg_.dtype;
  PKV_CUDA(cuda::kv_write(p, st));
#else
  (void)stream;
  (void)on_device;
#endif
}

}  // namespace pagedkv
