// One memory tier's backing memory: a single allocation holding `num_blocks` blocks back to back,
// allocated and freed by the cache's device backend.
#pragma once
#include <cstddef>
#include <cstdint>

#include "pagedkv/device_backend.h"

namespace pagedkv {

class TierMemory {
 public:
  TierMemory(DeviceBackend& backend, MemoryKind kind, size_t bytes)
      : backend_(backend), kind_(kind), data_(bytes ? backend.allocate(kind, bytes) : nullptr), bytes_(bytes) {}
  ~TierMemory() {
    if (data_) backend_.deallocate(kind_, data_);
  }
  TierMemory(const TierMemory&) = delete;
  TierMemory& operator=(const TierMemory&) = delete;

  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  MemoryKind kind() const { return kind_; }

 private:
  DeviceBackend& backend_;
  MemoryKind kind_;
  void* data_;
  size_t bytes_;
};

}  // namespace pagedkv
