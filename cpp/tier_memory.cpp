#include "pagedkv/tier_memory.h"

#include <cstdlib>
#include <cstring>

#include <sys/mman.h>
#include <new>
#include <utility>

#include "pagedkv/errors.h"
#ifdef PAGEDKV_WITH_CUDA
#include "pagedkv/cuda_context.h"
#endif

namespace pagedkv {

TierMemory::TierMemory(MemoryKind kind, size_t bytes, int cuda_device)
    : kind_(kind), bytes_(bytes), cuda_device_(cuda_device) {
  if (bytes == 0) return;
  if (kind == MemoryKind::host) {
    // 2 MiB alignment and transparent huge pages: appends scatter rows over the whole pool, and
    // with 4 KiB pages nearly every row write would miss the TLB.
    constexpr size_t kHuge = size_t(2) << 20;
    const size_t rounded = (bytes + kHuge - 1) & ~(kHuge - 1);
    data_ = std::aligned_alloc(kHuge, rounded);
    PKV_CHECK(data_ != nullptr, OutOfBlocks, "could not allocate ", bytes, " bytes of host memory");
#ifdef MADV_HUGEPAGE
    madvise(data_, rounded, MADV_HUGEPAGE);  // advice only: failure leaves ordinary pages
#endif
    // Touch every page now: first-touch faults would otherwise land on appends, mid-decode.
    std::memset(data_, 0, bytes);
    return;
  }
#ifdef PAGEDKV_WITH_CUDA
  DeviceGuard guard(cuda_device);
  cudaError_t err = kind == MemoryKind::cuda_device ? cudaMalloc(&data_, bytes)
                                                    : cudaHostAlloc(&data_, bytes, cudaHostAllocMapped);
  if (err == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    data_ = nullptr;
    PKV_FAIL(OutOfBlocks, "could not allocate ", bytes, " bytes of ",
             kind == MemoryKind::cuda_device ? "GPU" : "pinned host", " memory");
  }
  PKV_CUDA(err);
#else
  PKV_FAIL(ArgumentError, "device: this build of pagedkv has no CUDA support");
#endif
}

TierMemory::~TierMemory() { release(); }

TierMemory::TierMemory(TierMemory&& o) noexcept { *this = std::move(o); }

TierMemory& TierMemory::operator=(TierMemory&& o) noexcept {
  if (this != &o) {
    release();
    kind_ = o.kind_;
    data_ = std::exchange(o.data_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
    cuda_device_ = o.cuda_device_;
  }
  return *this;
}

void TierMemory::release() noexcept {
  if (!data_) return;
  if (kind_ == MemoryKind::host) {
    std::free(data_);
  } else {
#ifdef PAGEDKV_WITH_CUDA
    int prev = 0;
    cudaGetDevice(&prev);
    cudaSetDevice(cuda_device_);
    if (kind_ == MemoryKind::cuda_device) cudaFree(data_); else cudaFreeHost(data_);
    cudaSetDevice(prev);
#endif
  }
  data_ = nullptr;
  bytes_ = 0;
}

}  // namespace pagedkv
