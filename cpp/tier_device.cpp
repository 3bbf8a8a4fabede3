// The device tier: the pool kernels read, in GPU memory (or host memory when the cache runs on the
// CPU). Its bytes move by the backend's copies; read/write_block are for tests and tools.
#include "pagedkv/device_backend.h"
#include "pagedkv/tier.h"
#include "pagedkv/tier_memory.h"

namespace pagedkv {
namespace {

class DeviceTier final : public TierStorage {
 public:
  explicit DeviceTier(const TierSpec& s)
      : TierStorage(s.num_slots, s.block_bytes),
        backend_(s.backend),
        memory_(s.backend, s.backend.on_cuda() ? MemoryKind::cuda_device : MemoryKind::host,
                size_t(s.num_slots) * s.block_bytes) {}
  const char* kind() const override { return "device"; }
  void* data() const override { return memory_.data(); }
  void write_block(int32_t slot, const void* src) override { backend_.copy_now(block(slot), src, bytes_per_block()); }
  void read_block(int32_t slot, void* dst) const override { backend_.copy_now(dst, block(slot), bytes_per_block()); }

 private:
  DeviceBackend& backend_;
  TierMemory memory_;
};

}  // namespace

std::unique_ptr<TierStorage> make_device_tier(const TierSpec& spec) { return std::make_unique<DeviceTier>(spec); }

}  // namespace pagedkv
