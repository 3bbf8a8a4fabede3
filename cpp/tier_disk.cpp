// The disk tier: one preallocated file of block slots under disk_path (disk_file.h), whole blocks
// by pread/pwrite on the store's I/O threads.
#include "pagedkv/disk_file.h"
#include "pagedkv/tier.h"

namespace pagedkv {
namespace {

class DiskTier final : public TierStorage {
 public:
  explicit DiskTier(const TierSpec& s) : TierStorage(s.num_slots, s.block_bytes) {
    if (s.num_slots > 0) file_ = DiskFile(s.cfg.disk_path, s.num_slots, s.block_bytes);
  }
  const char* kind() const override { return "disk"; }
  void write_block(int32_t slot, const void* src) override { file_.write(slot, src); }
  void read_block(int32_t slot, void* dst) const override { file_.read(slot, dst); }

 private:
  DiskFile file_;
};

}  // namespace

std::unique_ptr<TierStorage> make_disk_tier(const TierSpec& spec) { return std::make_unique<DiskTier>(spec); }

}  // namespace pagedkv
