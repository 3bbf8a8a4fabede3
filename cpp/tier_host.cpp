// The host tier: pinned, mapped host memory on CUDA (kernels may read it over the link: staged
// slices), plain host memory on the CPU. Evictions land here; the cold tier spills from here.
#include <cstring>

#include "pagedkv/device_backend.h"
#include "pagedkv/tier.h"
#include "pagedkv/tier_memory.h"

namespace pagedkv {
namespace {

class HostTier final : public TierStorage {
 public:
  explicit HostTier(const TierSpec& s)
      : TierStorage(s.num_slots, s.block_bytes),
        memory_(s.backend, s.backend.on_cuda() ? MemoryKind::pinned_host : MemoryKind::host,
                size_t(s.num_slots) * s.block_bytes) {}
  const char* kind() const override { return "host"; }
  void* data() const override { return memory_.data(); }
  void write_block(int32_t slot, const void* src) override { std::memcpy(block(slot), src, bytes_per_block()); }
  void read_block(int32_t slot, void* dst) const override { std::memcpy(dst, block(slot), bytes_per_block()); }

 private:
  TierMemory memory_;
};

}  // namespace

std::unique_ptr<TierStorage> make_host_tier(const TierSpec& spec) { return std::make_unique<HostTier>(spec); }

}  // namespace pagedkv
