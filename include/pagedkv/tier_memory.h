// One tier's backing memory: a single allocation holding `num_blocks` blocks back to back.
#pragma once
#include <cstddef>
#include <cstdint>

namespace pagedkv {

enum class MemoryKind { host, pinned_host, cuda_device };

class TierMemory {
 public:
  TierMemory() = default;
  TierMemory(MemoryKind kind, size_t bytes, int cuda_device);
  ~TierMemory();
  TierMemory(const TierMemory&) = delete;
  TierMemory& operator=(const TierMemory&) = delete;
  TierMemory(TierMemory&& o) noexcept;
  TierMemory& operator=(TierMemory&& o) noexcept;

  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  MemoryKind kind() const { return kind_; }

 private:
  void release() noexcept;
  MemoryKind kind_ = MemoryKind::host;
  void* data_ = nullptr;
  size_t bytes_ = 0;
  int cuda_device_ = 0;
};

}  // namespace pagedkv
