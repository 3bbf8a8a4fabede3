// The block store: where every block lives and how it moves. It owns the three tiers (tier.h),
// the block directory (id -> {tier, slot}, reference counts), the fences of copies still in
// flight, the clean host copies of device blocks, the eviction and spill orders, the blocks an
// open decode step pins, and the transfer counters. Whether a block sits on the device, the host
// or the cold tier is decided here and nowhere else (make_device_room, evict_to_host,
// make_host_room, make_resident). It knows nothing of sequences: callers hand it block ids.
//
// Every call that can fail checks first (check_room) so that a throw leaves it as it was.
#pragma once
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "pagedkv/block_directory.h"
#include "pagedkv/config.h"
#include "pagedkv/device_backend.h"
#include "pagedkv/fence.h"
#include "pagedkv/policy.h"
#include "pagedkv/stats.h"
#include "pagedkv/tier.h"
#include "pagedkv/tier_memory.h"

namespace pagedkv {

class IoPool;  // cpp/io_pool.h: the cold tier's I/O threads

using KeepSet = std::unordered_set<BlockId>;

class BlockStore {
 public:
  BlockStore(const CacheConfig& cfg, DeviceBackend& backend);
  ~BlockStore();
  BlockStore(const BlockStore&) = delete;
  BlockStore& operator=(const BlockStore&) = delete;

  // -- identity --
  BlockLoc loc(BlockId id) const { return directory_.loc(id); }
  int32_t refcount(BlockId id) const { return directory_.refcount(id); }
  void retain(BlockId id) { directory_.retain(id); }
  // Bumps whenever a block is created, goes, or moves: the mutation counter plans are checked by.
  uint64_t version() const { return directory_.version(); }
  bool tiered() const { return cfg_.host_blocks > 0; }

  // -- lifecycle on the device tier --
  // A new block in a free device slot (the caller made room). A slot still read by an eviction
  // copy adds its fence to `waits`: the compute stream orders itself after it before writing.
  BlockId new_block(const BlockUse& use, std::vector<Fence>& waits);
  // Copy-on-write: a fresh device block holding `id`'s bytes; `id` loses one reference.
  BlockId clone(BlockId id, const BlockUse& use, std::vector<Fence>& waits, void* stream);
  // Drops one reference; the last frees the block's slot (after copies still using it).
  void release(BlockId id);
  // The block is about to be written: its clean host copy (if any) no longer matches.
  void drop_clean_copy(BlockId id);

  // -- residency: every check that can fail runs in check_room() before anything moves --
  // Throws OutOfBlocks unless `fresh` new device blocks plus every block in `keep` (and the open
  // step's pins) fit on the device together, evicting others to lower tiers as needed.
  void check_room(int64_t fresh, const KeepSet& keep, const char* what) const;
  // Frees device slots until `n` are free, moving policy victims outside `keep` down a tier.
  void make_device_room(int64_t n, const KeepSet& keep, void* stream);
  // Brings every block of `ids` that is not on the device up, evicting outside `keep`. prefetch:
  // nobody reads yet (readers await the landing later).
  void make_resident(const std::vector<BlockId>& ids, const KeepSet& keep, void* stream, bool prefetch = false);
  // Orders `stream` after prefetch copies still landing in any of `ids` (no-op when none are).
  void await(const std::vector<BlockId>& ids, void* stream);
  bool landing() const { return !device_ready_.empty(); }
  uint64_t landing_epoch() const { return landing_epoch_; }
  // Starts bringing `ids` (distinct, live) to the device, as many as fit without evicting each
  // other; a hint: without room it does nothing.
  void prefetch(const std::vector<BlockId>& ids, void* stream);
  // Moves these device blocks to the host tier now, in batches the host tier can take.
  void offload(const std::vector<BlockId>& victims, void* stream);
  // Host slots that can be made free without moving a block of `keep`: free ones, clean copies,
  // and host blocks outside `keep` that can spill to free cold slots.
  int64_t eviction_room(const KeepSet& keep) const;
  // Host and cold slots free for offload(), clean copies counted.
  int64_t room_below_device() const;
  // Keeps free device blocks above the low watermark (proactive offload).
  void offload_to_watermark(void* stream);
  // The blocks of `ids` on the cold tier come up to host slots.
  void cold_to_host(const std::vector<BlockId>& ids, const KeepSet& keep);
  // The policies' clock and their use reports.
  void tick() { ++clock_; }
  uint64_t clock() const { return clock_; }
  void note_use(BlockId id, const BlockUse& use);

  // -- pins: the open decode step's blocks stay on the device until unpin_all() --
  void set_pins(KeepSet&& ids) { pinned_ = std::move(ids); }
  KeepSet take_pins() { return std::move(pinned_); }
  void pin(BlockId id) { pinned_.insert(id); }
  void unpin_all() { pinned_.clear(); }
  bool pinned(BlockId id) const { return !pinned_.empty() && pinned_.count(id) != 0; }
  const KeepSet& pins() const { return pinned_; }

  // -- bytes --
  TierStorage& tier(Tier t) { return *tiers_[int(t)]; }
  const TierStorage& tier(Tier t) const { return *tiers_[int(t)]; }
  char* slot_ptr(BlockLoc loc) const { return tiers_[int(loc.tier)]->block(loc.slot); }
  void* device_pool() const { return tiers_[int(Tier::device)]->data(); }
  // The host tier as kernels address it (CUDA, with a host tier), or nullptr.
  void* host_mapped() const { return host_mapped_; }
  // Copies one layer of `ids` (logical blocks 0.. of a sequence of `len` tokens) into k_out and
  // v_out ([len, num_kv_heads, head_dim]) from whichever tier each block is in; the rows of
  // kNoBlock entries (another rank's blocks, striped) are left as they are.
  void read_layer(const std::vector<BlockId>& ids, int32_t len, int32_t layer, void* k_out, void* v_out,
                  void* stream);
  // Staging of host blocks' slices (attention_staged.cpp): the fence of the eviction still
  // writing a host block (or null), and registering the cell that will hold the latest staging
  // copy reading these host slots.
  const Fence* host_landing(BlockId id) const;
  void note_host_readers(const std::vector<BlockId>& ids, const std::shared_ptr<Fence>& cell);

  // Who holds a block, for errors about it ("sequence 3 logical block 5"); set by the engine,
  // which owns the page tables. A corrupt block read from the cold tier is named with it.
  void set_block_namer(std::function<std::string(BlockId)> namer) { block_namer_ = std::move(namer); }

  TransferCounters& counters() { return counters_; }
  const TransferCounters& counters() const { return counters_; }

  // Throws InternalError naming the first broken invariant, given every block id the page tables
  // hold and how many times: reference counts, one taken slot per live block and one block per
  // taken slot, clean copies, free lists, pins on the device, the orders tracking their tiers.
  void check_invariants(const std::unordered_map<BlockId, int32_t>& refs) const;

 private:
  friend struct EngineTestAccess;  // tests/cpp: corrupts state to prove check_invariants() sees it
  void land_on_host(BlockId id, int32_t host_slot, Fence device_free, const Fence& host_ready);
  void evict_to_host(const std::vector<BlockId>& victims, const KeepSet& keep, void* stream);
  // Until `want_free` host slots are free: clean copies go first (no I/O), then host blocks
  // outside `keep` spill to the cold tier.
  void make_host_room(int64_t want_free, const KeepSet& keep);
  void spill_host_to_cold(int64_t n, const KeepSet& keep);
  // Writes these host blocks to free cold slots (a block whose write fails stays on the host).
  void write_to_cold(const std::vector<BlockId>& victims);
  void step_aside(const std::vector<BlockId>& misses, size_t done);
  void host_to_device(const std::vector<BlockId>& ids, void* stream, bool prefetch);
  int64_t host_resident() const {
    return tier(Tier::host).slots().num_used() - int64_t(clean_copy_.size());
  }
  // Releases a host slot, after any staging copy that still reads it.
  Fence host_slot_fence(BlockId id);
  // `error` (a failed cold-tier read of block `id`) with the block and its owners named when it
  // is a CorruptBlock; anything else unchanged.
  std::exception_ptr name_block(std::exception_ptr error, BlockId id) const;

  const CacheConfig& cfg_;
  DeviceBackend& backend_;
  std::unique_ptr<TierStorage> tiers_[kNumStorageTiers];  // device, host, cold
  std::unique_ptr<IoPool> io_;  // with a cold tier
  void* host_mapped_ = nullptr;
  BlockDirectory directory_;
  std::unique_ptr<EvictionPolicy> policy_;       // device blocks: which go down first
  std::unique_ptr<EvictionPolicy> host_order_;   // LRU over host-tier blocks: spill order
  // Device blocks fetched from the host and not written since: their host slot still holds the
  // same bytes, so evicting them again moves nothing. The fence is the fetch that reads the slot.
  struct CleanCopy {
    int32_t host_slot;
    Fence read_by;
  };
  std::unordered_map<BlockId, CleanCopy> clean_copy_;
  std::unique_ptr<EvictionPolicy> clean_order_;  // LRU over clean copies: the first to give up
  std::unordered_map<BlockId, Fence> host_ready_;    // host copies still landing
  std::unordered_map<BlockId, Fence> device_ready_;  // prefetched device copies still landing
  uint64_t landing_epoch_ = 0;  // bumps with every prefetch that leaves copies landing
  // The CRC-32C of each host slot's bytes where it is known without reading them: a block
  // checksummed on the device on its way down (DeviceBackend::checksums_blocks), or one read back
  // from the cold tier, which checked it. The cold tier's write takes it as given. Only with a
  // backend that checksums and a cold tier that checks: [host capacity] uint32 of pinned memory
  // (the device writes it), valid once the slot's host_ready_ fence has passed; and per slot
  // whether it holds its bytes' CRC.
  std::unique_ptr<TierMemory> host_crc_memory_;
  uint32_t* host_crc_device_ = nullptr;  // host_crc_memory_ as the device writes it
  std::vector<uint8_t> host_crc_known_;
  const uint32_t* host_crc(int32_t host_slot) const;  // nullptr where not known
  // Host blocks a staging copy may still read: the cell holds the latest such copy's fence.
  std::unordered_map<BlockId, std::shared_ptr<Fence>> host_read_by_;
  KeepSet pinned_;        // the open decode step's blocks
  uint64_t clock_ = 0;    // one per step: the policies' clock
  TransferCounters counters_;
  std::function<std::string(BlockId)> block_namer_;
};

}  // namespace pagedkv
