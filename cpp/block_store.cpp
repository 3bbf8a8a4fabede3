// The block store's lifecycle and bytes: construction of the tiers, new blocks, copy-on-write,
// release, and reading a layer back from whichever tier a block is in. Moves between tiers are in
// block_moves.cpp.
#include "pagedkv/block_store.h"

#include <algorithm>

#include "io_pool.h"
#include "pagedkv/errors.h"
#include "pagedkv/page_table.h"

namespace pagedkv {

constexpr int kColdThreads = 4;  // whole-block reads or writes in flight at once

// Removes and returns id's fence from `fences` (empty when it has none).
Fence take_fence(std::unordered_map<BlockId, Fence>& fences, BlockId id) {
  auto it = fences.find(id);
  if (it == fences.end()) return nullptr;
  Fence f = std::move(it->second);
  fences.erase(it);
  return f;
}

BlockStore::BlockStore(const CacheConfig& cfg, DeviceBackend& backend) : cfg_(cfg), backend_(backend) {
  const size_t block = size_t(cfg_.block_bytes());
  policy_ = make_policy(cfg_.policy, cfg_.policy_params);
  host_order_ = make_policy("lru", {});
  clean_order_ = make_policy("lru", {});
  tiers_[int(Tier::device)] = make_tier("device", {cfg_, backend_, cfg_.device_blocks, block}, "device");
  tiers_[int(Tier::host)] = make_tier("host", {cfg_, backend_, cfg_.host_blocks, block}, "host_blocks");
  tiers_[int(Tier::disk)] = make_tier(cfg_.cold_tier, {cfg_, backend_, cfg_.disk_blocks, block}, "cold_tier");
  if (backend_.on_cuda() && tiered()) host_mapped_ = backend_.device_address(tier(Tier::host).data());
  if (cfg_.disk_blocks > 0) io_ = std::make_unique<IoPool>(kColdThreads);
  if (cfg_.disk_blocks > 0 && tiered() && backend_.checksums_blocks() && tier(Tier::disk).keeps_crc()) {
    host_crc_memory_ = std::make_unique<TierMemory>(backend_, MemoryKind::pinned_host,
                                                    size_t(cfg_.host_blocks) * sizeof(uint32_t));
    host_crc_device_ = static_cast<uint32_t*>(backend_.device_address(host_crc_memory_->data()));
    host_crc_known_.assign(size_t(cfg_.host_blocks), 0);
  }
}

const uint32_t* BlockStore::host_crc(int32_t host_slot) const {
  if (host_crc_known_.empty() || !host_crc_known_[size_t(host_slot)]) return nullptr;
  return static_cast<const uint32_t*>(host_crc_memory_->data()) + host_slot;
}

// Copies still in flight read or write the tiers' memory: they finish before it goes.
BlockStore::~BlockStore() { backend_.drain(); }

BlockId BlockStore::new_block(const BlockUse& use, std::vector<Fence>& waits) {
  Fence wait;
  const int32_t slot = tier(Tier::device).alloc_slot(&wait);
  if (wait) waits.push_back(std::move(wait));
  const BlockId id = directory_.create({Tier::device, slot});
  if (tiered()) policy_->on_arrive(id, use);
  return id;
}

BlockId BlockStore::clone(BlockId id, const BlockUse& use, std::vector<Fence>& waits, void* stream) {
  const size_t before = waits.size();
  const BlockId fresh = new_block(use, waits);
  for (size_t i = before; i < waits.size(); ++i) backend_.order_after(waits[i], stream);  // its slot
  backend_.copy_block(slot_ptr(loc(fresh)), slot_ptr(loc(id)), size_t(cfg_.block_bytes()), stream);
  directory_.release(id);  // the other holders keep it alive
  ++counters_.cow_copies;
  return fresh;
}

// A staging copy that read the slot waited for the eviction that wrote it, so it passes last.
Fence BlockStore::host_slot_fence(BlockId id) {
  Fence written = take_fence(host_ready_, id);
  Fence read;
  auto it = host_read_by_.find(id);
  if (it != host_read_by_.end()) {
    read = *it->second;
    host_read_by_.erase(it);
  }
  return read ? read : written;
}

void BlockStore::release(BlockId id) {
  const BlockLoc where = loc(id);
  if (!directory_.release(id)) return;
  switch (where.tier) {
    case Tier::device:  // a prefetch may still be writing the slot
      policy_->on_leave(id);
      drop_clean_copy(id);
      tier(Tier::device).free_slot(where.slot, take_fence(device_ready_, id));
      break;
    case Tier::host:  // an eviction may still be writing the slot, a staging copy reading it
      host_order_->on_leave(id);
      tier(Tier::host).free_slot(where.slot, host_slot_fence(id));
      break;
    case Tier::disk:
      tier(Tier::disk).free_slot(where.slot);
      break;
    default:
      PKV_FAIL(InternalError, "releasing block ", id, " in no tier");
  }
}

void BlockStore::drop_clean_copy(BlockId id) {
  if (clean_copy_.empty()) return;
  auto it = clean_copy_.find(id);
  if (it == clean_copy_.end()) return;
  tier(Tier::host).free_slot(it->second.host_slot, std::move(it->second.read_by));
  clean_copy_.erase(it);
  clean_order_->on_leave(id);
}

void BlockStore::note_use(BlockId id, const BlockUse& use) {
  if (id != kNoBlock && loc(id).tier == Tier::device) policy_->on_use(id, use);
}

const Fence* BlockStore::host_landing(BlockId id) const {
  auto it = host_ready_.find(id);
  return it == host_ready_.end() ? nullptr : &it->second;
}

void BlockStore::note_host_readers(const std::vector<BlockId>& ids, const std::shared_ptr<Fence>& cell) {
  for (BlockId id : ids) host_read_by_[id] = cell;
}

std::exception_ptr BlockStore::name_block(std::exception_ptr error, BlockId id) const {
  try {
    std::rethrow_exception(error);
  } catch (const CorruptBlock& e) {
    const std::string who = block_namer_ ? block_namer_(id) : std::string();
    return std::make_exception_ptr(CorruptBlock(
        detail::concat("disk tier: block ", id, who.empty() ? "" : " (", who, who.empty() ? "" : ")",
                       " is corrupt: ", e.detail),
        e.err, e.detail));
  } catch (...) {
    return error;
  }
}

void BlockStore::read_layer(const std::vector<BlockId>& ids, int32_t len, int32_t layer, void* k_out, void* v_out,
                            void* stream) {
  const int32_t bs = cfg_.block_size, H = cfg_.num_kv_heads, D = cfg_.head_dim;
  const size_t es = dtype_size(cfg_.dtype), row_bytes = size_t(D) * es;
  const int64_t tile = cfg_.tile_elems();
  std::vector<char> from_cold;  // a block read back from the cold tier
  for (int32_t b = 0; b < blocks_for(len, bs); ++b) {
    const BlockId id = ids[size_t(b)];
    if (id == kNoBlock) continue;  // another rank's block (striped): its rows stay as they are
    const BlockLoc where = loc(id);
    const char* block = nullptr;
    if (where.tier == Tier::disk) {
      from_cold.resize(size_t(cfg_.block_bytes()));
      try {
        tier(Tier::disk).read_block(where.slot, from_cold.data());
      } catch (const CorruptBlock&) {
        std::rethrow_exception(name_block(std::current_exception(), id));
      }
      block = from_cold.data();
    } else {
      block = slot_ptr(where);
    }
    if (where.tier == Tier::device) await({id}, stream);  // a prefetch may be landing
    if (where.tier == Tier::host)                        // an eviction may still be writing it
      if (const Fence* ready = host_landing(id)) backend_.order_after(*ready, stream);
    const int32_t n = std::min(bs, len - b * bs);
    for (int32_t kv = 0; kv < 2; ++kv) {
      char* dst = static_cast<char*>(kv == 0 ? k_out : v_out);
      for (int32_t h = 0; h < H; ++h) {
        const char* src = block + (((int64_t(layer) * 2 + kv) * H + h) * tile) * int64_t(es);
        char* d0 = dst + (int64_t(b) * bs * H + h) * int64_t(row_bytes);
        backend_.copy_rows(d0, size_t(H) * row_bytes, src, row_bytes, row_bytes, size_t(n),
                           where.tier == Tier::device, stream);
      }
    }
    // A host buffer about to be reused: the copies out of it must be done first.
    if (where.tier == Tier::disk) backend_.synchronize(stream);
  }
}

}  // namespace pagedkv
