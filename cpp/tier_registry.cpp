// The tier registration point (name -> factory, the built-in tiers registered on first use), and
// what every tier shares.
#include <map>
#include <mutex>
#include <vector>

#include "pagedkv/errors.h"
#include "pagedkv/tier.h"

namespace pagedkv {
namespace {

struct Registry {
  std::mutex mutex;
  std::map<std::string, TierFactory> factories{
      {"device", make_device_tier}, {"host", make_host_tier}, {"disk", make_disk_tier}};
};

Registry& registry() {
  static Registry r;
  return r;
}

}  // namespace

void TierStorage::read_slice(int32_t slot, size_t offset, size_t bytes, void* dst) const {
  PKV_CHECK(offset + bytes <= block_bytes_, ArgumentError, "read_slice(): bytes [", offset, ", ", offset + bytes,
            ") lie outside a block of ", block_bytes_);
  if (data() != nullptr) {
    std::memcpy(dst, block(slot) + offset, bytes);
    return;
  }
  std::vector<char> whole(block_bytes_);
  read_block(slot, whole.data());
  std::memcpy(dst, whole.data() + offset, bytes);
}

void register_tier(const std::string& name, TierFactory factory) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  r.factories[name] = std::move(factory);
}

std::unique_ptr<TierStorage> make_tier(const std::string& name, const TierSpec& spec, const char* what) {
  TierFactory factory;
  {
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.mutex);
    auto it = r.factories.find(name);
    PKV_CHECK(it != r.factories.end(), ArgumentError, what, ": no tier named '", name, "' is registered");
    factory = it->second;
  }
  return factory(spec);
}

}  // namespace pagedkv
