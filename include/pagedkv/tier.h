// A tier: slots of one block each, and the bytes behind them. The block store moves blocks between
// three levels (device, host, cold; Tier in types.h) and reaches each through this interface, so a
// new kind of tier (a peer GPU's pool, a remote node, a compressed tier) is one new file that
// implements it plus one register_tier() call. Built in: "device" (cpp/tier_device.cpp), "host"
// (cpp/tier_host.cpp), "disk" (cpp/tier_disk.cpp); CacheConfig::cold_tier names the coldest level's.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>

#include "pagedkv/block_pool.h"
#include "pagedkv/config.h"
#include "pagedkv/fence.h"

namespace pagedkv {

class DeviceBackend;

class TierStorage {
 public:
  TierStorage(int64_t num_slots, size_t block_bytes) : slots_(num_slots), block_bytes_(block_bytes) {}
  virtual ~TierStorage() = default;
  TierStorage(const TierStorage&) = delete;
  TierStorage& operator=(const TierStorage&) = delete;

  virtual const char* kind() const = 0;

  // -- slots (a slot a copy still reads comes with that copy's fence: block_pool.h) --
  int32_t alloc_slot(Fence* wait = nullptr) { return slots_.allocate(wait); }
  void free_slot(int32_t slot, Fence after = nullptr) { slots_.release_after(slot, std::move(after)); }
  const BlockPool& slots() const { return slots_; }
  BlockPool& slots() { return slots_; }
  int64_t capacity() const { return slots_.capacity(); }
  size_t bytes_per_block() const { return block_bytes_; }

  // -- bytes --
  // Memory tiers: their blocks back to back, [capacity][bytes_per_block], which the backend copies
  // and kernels address directly. Other tiers: nullptr; their bytes move through read/write_block.
  virtual void* data() const { return nullptr; }
  char* block(int32_t slot) const {
    return static_cast<char*>(data()) + size_t(slot) * block_bytes_;
  }
  // Whole-block I/O to and from host memory, synchronous. Safe from several threads at once for
  // different slots (the store runs a batch on its I/O threads). A failure throws Error and leaves
  // the slot's old bytes to the caller, who changes no location before these return.
  virtual void write_block(int32_t slot, const void* src) = 0;
  virtual void read_block(int32_t slot, void* dst) const = 0;
  // Tiers that checksum their blocks (the disk tier with CacheConfig::disk_checksum): a block's
  // CRC-32C (crc32c.h) comes back checked by read_block; write_block_with_crc() takes it from the
  // caller instead of reading the bytes again (a CRC computed on the device before the block left
  // it also covers its stay in host memory); block_crc() gives the one kept for a slot, which
  // read_block() just checked. Tiers that do not checksum ignore the CRC and have none to give.
  virtual bool keeps_crc() const { return false; }
  virtual void write_block_with_crc(int32_t slot, const void* src, uint32_t crc) {
    (void)crc;
    write_block(slot, src);
  }
  virtual uint32_t block_crc(int32_t slot) const {
    (void)slot;
    return 0;
  }
  // `bytes` of a block from `offset` (one layer's slice: layer * bytes_per_block / num_layers) to
  // host memory. Memory tiers read it in place; others read the block and cut the slice out, or
  // override this with something cheaper.
  virtual void read_slice(int32_t slot, size_t offset, size_t bytes, void* dst) const;

 private:
  BlockPool slots_;
  size_t block_bytes_;
};

// What a tier factory gets: the cache's config, its backend, and the tier's size.
struct TierSpec {
  const CacheConfig& cfg;
  DeviceBackend& backend;
  int64_t num_slots;
  size_t block_bytes;
};
using TierFactory = std::function<std::unique_ptr<TierStorage>(const TierSpec&)>;

// The registration point: a name -> factory table, with the built-in tiers already in it.
// Registering a name again replaces its factory.
void register_tier(const std::string& name, TierFactory factory);
// Throws ArgumentError naming `what` (the config field) when no tier of that name is registered.
std::unique_ptr<TierStorage> make_tier(const std::string& name, const TierSpec& spec, const char* what);

// The built-in tiers' factories (registered by tier_registry.cpp).
std::unique_ptr<TierStorage> make_device_tier(const TierSpec& spec);
std::unique_ptr<TierStorage> make_host_tier(const TierSpec& spec);
std::unique_ptr<TierStorage> make_disk_tier(const TierSpec& spec);

}  // namespace pagedkv
