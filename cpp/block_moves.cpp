// Residency, the block store's half that decides tiers: which blocks sit on the device, and moving
// them. Evictions go device -> host through the backend (CUDA: its D2H stream); a full host tier
// spills its oldest blocks to the cold tier (disk) on the I/O threads; misses come back
// cold -> host -> device. Every check that can fail runs in check_room() before anything moves.
#include <algorithm>
#include <chrono>
#include <exception>

#include "io_pool.h"
#include "pagedkv/block_store.h"
#include "pagedkv/errors.h"

namespace pagedkv {

Fence take_fence(std::unordered_map<BlockId, Fence>& fences, BlockId id);  // block_store.cpp

namespace {

struct WaitClock {  // adds the wall time of a scope to a counter
  explicit WaitClock(double& sink) : sink_(sink), t0_(std::chrono::steady_clock::now()) {}
  ~WaitClock() {
    sink_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
  }
  double& sink_;
  std::chrono::steady_clock::time_point t0_;
};

}  // namespace

void BlockStore::check_room(int64_t fresh, const KeepSet& keep, const char* what) const {
  const BlockPool& dev = tier(Tier::device).slots();
  int64_t kept_host = 0, kept_disk = 0;
  for (BlockId id : keep) {
    const Tier t = loc(id).tier;
    kept_host += t == Tier::host;
    kept_disk += t == Tier::disk;
  }
  int64_t at_once = int64_t(keep.size()) + fresh;
  for (BlockId id : pinned_) at_once += keep.count(id) == 0;  // an open step's blocks stay too
  PKV_CHECK(at_once <= dev.capacity(), OutOfBlocks, what, ": needs ", at_once,
            " blocks on the device at once but the device tier holds ", dev.capacity());
  const int64_t deficit = std::max<int64_t>(0, fresh + kept_host + kept_disk - dev.num_free());
  if (deficit == 0 && kept_disk == 0) return;
  // Blocks only move between tiers, so the new ones need free slots somewhere, and the moves
  // need one free host slot to rotate through: evict one, bring one up, repeat. A full host tier
  // makes that slot by spilling a block nobody needs now to a free disk slot.
  const BlockPool& host = tier(Tier::host).slots();
  const BlockPool& disk = tier(Tier::disk).slots();
  const int64_t clean = int64_t(clean_copy_.size());  // host slots that can be given up at once
  PKV_CHECK(dev.num_free() + host.num_free() + clean + disk.num_free() >= fresh, OutOfBlocks, what, ": needs ",
            fresh, " new blocks but every tier is full (device ", dev.capacity(), ", host ",
            host.capacity(), ", disk ", disk.capacity(), ")");
  // (Kept host blocks going up first leave clean copies, which give their slots up.)
  // (A host tier holding only kept blocks lets one of them step aside to the disk tier and come
  // back through the slot it left, which takes a second free disk slot: make_resident.)
  PKV_CHECK(host.num_free() + clean > 0 || (disk.num_free() > 0 && host_resident() > kept_host) ||
                (kept_host > 0 && dev.num_free() > 0) || (kept_host > 0 && disk.num_free() > 1), OutOfBlocks,
            what, ": needs ", deficit, " device blocks freed but the host tier is full",
            disk.capacity() ? " and so is the disk tier" : " and there is no disk tier",
            " (device ", dev.capacity(), ", host ", host.capacity(), ", disk ", disk.capacity(), ")");
}

// How many device blocks can go down right now: free host slots, plus host blocks outside
// `keep` that can spill to free disk slots.
int64_t BlockStore::eviction_room(const KeepSet& keep) const {
  const BlockPool& host = tier(Tier::host).slots();
  int64_t kept_host = 0;
  for (BlockId id : keep) kept_host += loc(id).tier == Tier::host;
  return host.num_free() + int64_t(clean_copy_.size()) +
         std::min(tier(Tier::disk).slots().num_free(), host_resident() - kept_host);
}

void BlockStore::make_device_room(int64_t n, const KeepSet& keep, void* stream) {
  BlockPool& dev = tier(Tier::device).slots();
  while (dev.num_free() < n) {
    const int64_t need = std::min(n - dev.num_free(), eviction_room(keep));
    PKV_CHECK(need > 0, InternalError, "no room below the device for ", n - dev.num_free(), " blocks");
    // Shared blocks serve several sequences: they go only when nothing else can.
    // (Blocks an open decode step reads or writes stay, like `keep`.)
    std::vector<BlockId> victims = policy_->victims(need, [&](BlockId id) {
      return keep.count(id) != 0 || pinned(id) || refcount(id) > 1;
    });
    if (int64_t(victims.size()) < need) {
      KeepSet chosen(victims.begin(), victims.end());
      for (BlockId id : policy_->victims(need - int64_t(victims.size()), [&](BlockId id) {
             return keep.count(id) != 0 || pinned(id) || chosen.count(id) != 0;
           }))
        victims.push_back(id);
    }
    PKV_CHECK(int64_t(victims.size()) == need, InternalError, "the policy offered ", victims.size(),
              " victims for ", need, " blocks");
    evict_to_host(victims, keep, stream);
  }
}

// Block `id` now lives in host slot `host_slot`: its device slot is free once `device_free` has
// passed, and the host bytes are complete once `host_ready` has.
void BlockStore::land_on_host(BlockId id, int32_t host_slot, Fence device_free, const Fence& host_ready) {
  tier(Tier::device).free_slot(loc(id).slot, std::move(device_free));
  directory_.set_loc(id, {Tier::host, host_slot});
  if (host_ready) host_ready_[id] = host_ready;
  policy_->on_leave(id);
  host_order_->on_arrive(id, BlockUse{-1, 0, 0, clock_});
}

void BlockStore::evict_to_host(const std::vector<BlockId>& victims, const KeepSet& keep, void* stream) {
  if (victims.empty()) return;
  TierStorage& host = tier(Tier::host);
  std::vector<BlockId> dirty;
  for (BlockId id : victims) {  // unchanged since fetched: the host copy is already there
    auto clean = clean_copy_.find(id);
    if (clean == clean_copy_.end()) {
      dirty.push_back(id);
      continue;
    }
    land_on_host(id, clean->second.host_slot, take_fence(device_ready_, id), clean->second.read_by);
    clean_copy_.erase(clean);
    clean_order_->on_leave(id);
    ++counters_.evictions;
  }
  if (dirty.empty()) return;
  make_host_room(int64_t(dirty.size()), keep);
  std::vector<BlockCopy> copies;
  std::vector<Fence> waits;
  std::vector<int32_t> host_slots;
  for (BlockId id : dirty) {
    Fence w;
    const int32_t slot = host.alloc_slot(&w);
    if (w) waits.push_back(std::move(w));
    if (Fence landing = take_fence(device_ready_, id)) waits.push_back(std::move(landing));  // a prefetch
    host_slots.push_back(slot);
    // (With a CRC table the backend checksums every block it brings down.)
    uint32_t* crc = host_crc_device_ ? host_crc_device_ + slot : nullptr;
    if (crc) host_crc_known_[size_t(slot)] = 1;
    copies.push_back({slot_ptr({Tier::host, slot}), slot_ptr(loc(id)), crc});
  }
  Fence landed;
  {
    WaitClock clock(counters_.transfer_wait_s);  // CPU copies are synchronous; CUDA ones return at once
    landed = backend_.to_host(copies, waits, stream);
  }
  const int64_t bytes = cfg_.block_bytes();
  for (size_t i = 0; i < dirty.size(); ++i) {
    land_on_host(dirty[i], host_slots[i], landed, landed);
  }
  counters_.evictions += int64_t(dirty.size());
  counters_.blocks_to_host += int64_t(dirty.size());
  counters_.bytes_to_host += int64_t(dirty.size()) * bytes;
}

void BlockStore::make_host_room(int64_t want_free, const KeepSet& keep) {
  const BlockPool& host = tier(Tier::host).slots();
  if (host.num_free() >= want_free) return;
  for (BlockId id : clean_order_->victims(want_free - host.num_free(), [](BlockId) { return false; }))
    drop_clean_copy(id);
  if (host.num_free() < want_free) spill_host_to_cold(want_free - host.num_free(), keep);
}

// The victims' writes run on the I/O threads together. A block whose write fails stays on the
// host, whole; the others are committed, and then the first failure is rethrown.
void BlockStore::spill_host_to_cold(int64_t n, const KeepSet& keep) {
  std::vector<BlockId> victims = host_order_->victims(n, [&](BlockId id) { return keep.count(id) != 0; });
  PKV_CHECK(int64_t(victims.size()) == n, OutOfBlocks, "the host tier is full and the disk tier cannot take ",
            n, " more blocks");
  write_to_cold(victims);
}

void BlockStore::write_to_cold(const std::vector<BlockId>& victims) {
  const int64_t n = int64_t(victims.size());
  PKV_CHECK(tier(Tier::disk).slots().num_free() >= n, OutOfBlocks,
            "the host tier is full and the disk tier cannot take ", n, " more blocks");
  std::vector<int32_t> slots;
  std::vector<const char*> from;
  std::vector<const uint32_t*> crcs;  // (read once the block's eviction has landed)
  for (BlockId id : victims) {
    slots.push_back(tier(Tier::disk).alloc_slot());
    from.push_back(slot_ptr(loc(id)));
    crcs.push_back(host_crc(loc(id).slot));
    auto ready = host_ready_.find(id);
    WaitClock clock(counters_.transfer_wait_s);
    if (ready != host_ready_.end()) fence_wait_host(ready->second);  // its eviction has landed
  }
  std::vector<std::exception_ptr> errors;
  {
    WaitClock clock(counters_.transfer_wait_s);
    TierStorage& cold = tier(Tier::disk);
    errors = io_->run(victims.size(), [&](size_t i) {
      if (crcs[i]) cold.write_block_with_crc(slots[i], from[i], *crcs[i]);
      else cold.write_block(slots[i], from[i]);
    });
  }
  std::exception_ptr first;
  for (size_t i = 0; i < victims.size(); ++i) {
    const BlockId id = victims[i];
    if (errors[i]) {
      tier(Tier::disk).free_slot(slots[i]);  // the block stays on the host, intact
      if (!first) first = errors[i];
      continue;
    }
    tier(Tier::host).free_slot(loc(id).slot, host_slot_fence(id));
    host_order_->on_leave(id);
    directory_.set_loc(id, {Tier::disk, slots[i]});
    ++counters_.blocks_to_disk;
    counters_.disk_crcs_carried += crcs[i] != nullptr;
    counters_.bytes_to_disk += cfg_.block_bytes();
  }
  if (first) std::rethrow_exception(first);
}

void BlockStore::make_resident(const std::vector<BlockId>& ids, const KeepSet& keep, void* stream, bool prefetch) {
  std::vector<BlockId> misses;
  for (BlockId id : ids)
    if (loc(id).tier != Tier::device) misses.push_back(id);
  std::sort(misses.begin(), misses.end());
  misses.erase(std::unique(misses.begin(), misses.end()), misses.end());
  // Host-resident misses first: bringing them up frees host slots for the rest to rotate through.
  std::stable_partition(misses.begin(), misses.end(),
                        [&](BlockId id) { return loc(id).tier == Tier::host; });
  size_t done = 0;
  while (done < misses.size()) {
    const int64_t left = int64_t(misses.size() - done);
    if (tier(Tier::device).slots().num_free() == 0) {
      if (eviction_room(keep) == 0) step_aside(misses, done);
      // A block coming up from disk needs a host slot of the same room the evictions take:
      // leave it half.
      const int64_t room = eviction_room(keep);
      const bool cold_next = loc(misses[done]).tier == Tier::disk;
      make_device_room(std::min(left, cold_next ? std::max<int64_t>(room / 2, 1) : room), keep, stream);
    }
    // A batch's disk blocks pass through host slots: no more at once than the host tier holds,
    // nor than it can free right now (a host tier almost full passes them one by one). Host
    // blocks go up in batches of their own first: the clean copies they leave are host room.
    const size_t most = size_t(std::min({left, tier(Tier::device).slots().num_free(), std::max<int64_t>(tier(Tier::host).capacity(), 1)}));
    const int64_t host_room = std::max<int64_t>(eviction_room(keep), 1);
    const bool host_batch = loc(misses[done]).tier == Tier::host;
    size_t take = 0;
    for (int64_t cold = 0; take < most; ++take) {
      const bool on_disk = loc(misses[done + take]).tier == Tier::disk;
      if (on_disk && (host_batch || cold == host_room)) break;
      cold += on_disk;
    }
    std::vector<BlockId> batch(misses.begin() + long(done), misses.begin() + long(done + take));
    cold_to_host(batch, keep);
    host_to_device(batch, stream, prefetch);
    done += take;
  }
}

// The device is full, and so is the host tier, with blocks this very move brings up: the last
// host-resident one of misses[done..] steps aside to the disk tier, so that a device block can go
// down into its slot; it comes back up later in the same move, like any block on disk.
void BlockStore::step_aside(const std::vector<BlockId>& misses, size_t done) {
  for (size_t i = misses.size(); i-- > done;)
    if (loc(misses[i]).tier == Tier::host) return write_to_cold({misses[i]});
  PKV_FAIL(OutOfBlocks, "every host and disk slot is taken: there is no room to move blocks through (device ",
           tier(Tier::device).capacity(), ", host ", tier(Tier::host).capacity(), ", disk ",
           tier(Tier::disk).capacity(), ")");
}

// Reads the blocks of `ids` that are on disk into host slots, on the I/O threads together. A
// block whose read fails stays on disk; the others are committed, then the failure is rethrown.
void BlockStore::cold_to_host(const std::vector<BlockId>& ids, const KeepSet& keep) {
  std::vector<BlockId> want;
  KeepSet seen;
  for (BlockId id : ids)
    if (loc(id).tier == Tier::disk && seen.insert(id).second) want.push_back(id);
  if (want.empty()) return;
  TierStorage& host = tier(Tier::host);
  make_host_room(int64_t(want.size()), keep);
  std::vector<int32_t> slots, disk_slots;
  std::vector<char*> to;
  for (size_t i = 0; i < want.size(); ++i) {
    Fence w;
    slots.push_back(host.alloc_slot(&w));
    disk_slots.push_back(loc(want[i]).slot);
    to.push_back(slot_ptr({Tier::host, slots.back()}));
    WaitClock clock(counters_.transfer_wait_s);
    fence_wait_host(w);  // a copy may still read a slot given back with a fence
  }
  std::vector<std::exception_ptr> errors;
  {
    WaitClock clock(counters_.transfer_wait_s);
    const TierStorage& cold = tier(Tier::disk);
    errors = io_->run(want.size(), [&](size_t i) { cold.read_block(disk_slots[i], to[i]); });
  }
  std::exception_ptr first;
  for (size_t i = 0; i < want.size(); ++i) {
    if (errors[i]) {
      host.free_slot(slots[i]);  // the block stays on disk
      if (!first) first = name_block(errors[i], want[i]);
      continue;
    }
    if (!host_crc_known_.empty()) {  // the read checked it: it comes along
      static_cast<uint32_t*>(host_crc_memory_->data())[slots[i]] = tier(Tier::disk).block_crc(disk_slots[i]);
      host_crc_known_[size_t(slots[i])] = 1;
    }
    tier(Tier::disk).free_slot(disk_slots[i]);
    directory_.set_loc(want[i], {Tier::host, slots[i]});
    host_order_->on_arrive(want[i], BlockUse{-1, 0, 0, clock_});
    ++counters_.blocks_from_disk;
    counters_.bytes_from_disk += cfg_.block_bytes();
  }
  if (first) std::rethrow_exception(first);
}

void BlockStore::host_to_device(const std::vector<BlockId>& ids, void* stream, bool prefetch) {
  std::vector<BlockCopy> copies;
  std::vector<Fence> waits;
  std::vector<int32_t> device_slots;
  for (BlockId id : ids) {
    Fence w;
    const int32_t slot = tier(Tier::device).alloc_slot(&w);
    if (w) waits.push_back(std::move(w));
    auto ready = host_ready_.find(id);
    if (ready != host_ready_.end()) waits.push_back(ready->second);
    device_slots.push_back(slot);
    copies.push_back({slot_ptr({Tier::device, slot}), slot_ptr(loc(id))});
  }
  Fence landed;
  {
    WaitClock clock(counters_.transfer_wait_s);
    landed = backend_.to_device(copies, waits, stream, !prefetch);
  }
  if (prefetch && landed && !ids.empty()) ++landing_epoch_;
  for (size_t i = 0; i < ids.size(); ++i) {
    const BlockId id = ids[i];
    if (prefetch && landed) device_ready_[id] = landed;
    clean_copy_[id] = CleanCopy{loc(id).slot, landed};  // the host bytes stay valid
    clean_order_->on_arrive(id, BlockUse{-1, 0, 0, clock_});
    host_ready_.erase(id);
    host_read_by_.erase(id);  // the fetch reads the slot after any staging copy (same stream)
    host_order_->on_leave(id);
    directory_.set_loc(id, {Tier::device, device_slots[i]});
    policy_->on_arrive(id, BlockUse{-1, 0, 1, clock_});
  }
  counters_.device_misses += int64_t(ids.size());
  counters_.blocks_from_host += int64_t(ids.size());
  counters_.bytes_from_host += int64_t(ids.size()) * cfg_.block_bytes();
}

// Keeps free device blocks above the low watermark: when they fall below it, the policy's
// victims go down until the high watermark is free. The copies are asynchronous, so by the time
// an append needs the slots their evictions have long landed.
void BlockStore::offload_to_watermark(void* stream) {
  if (!tiered() || cfg_.low_watermark <= 0) return;
  BlockPool& dev = tier(Tier::device).slots();
  const int64_t cap = dev.capacity();
  if (dev.num_free() >= int64_t(cfg_.low_watermark * double(cap))) return;
  int64_t n = int64_t(cfg_.high_watermark * double(cap)) - dev.num_free();
  n = std::min(n, eviction_room(KeepSet{}));
  n = std::min(n, dev.num_used() - int64_t(pinned_.size()));  // an open step's blocks stay
  if (n <= 0) return;
  make_device_room(dev.num_free() + n, KeepSet{}, stream);
}

// Blocks of one prefetch share its fence: each distinct fence is waited for once.
void BlockStore::await(const std::vector<BlockId>& ids, void* stream) {
  const void* last = nullptr;
  for (BlockId id : ids) {
    if (device_ready_.empty()) return;
    auto it = device_ready_.find(id);
    if (it == device_ready_.end()) continue;
    if (it->second.get() != last) {
      last = it->second.get();
      backend_.order_after(it->second, stream);
    }
    device_ready_.erase(it);
  }
}

}  // namespace pagedkv
