#include "host_memory.h"

#include <sys/mman.h>

#include <cstdlib>
#include <cstring>

#include "pagedkv/errors.h"

namespace pagedkv {

void* host_memory_allocate(size_t bytes) {
  // 2 MiB alignment and transparent huge pages: appends scatter rows over the whole pool, and
  // with 4 KiB pages nearly every row write would miss the TLB.
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t rounded = (bytes + kHuge - 1) & ~(kHuge - 1);
  void* p = std::aligned_alloc(kHuge, rounded);
  PKV_CHECK(p != nullptr, OutOfBlocks, "could not allocate ", bytes, " bytes of host memory");
#ifdef MADV_HUGEPAGE
  madvise(p, rounded, MADV_HUGEPAGE);  // advice only: failure leaves ordinary pages
#endif
  // Touch every page now: first-touch faults would otherwise land on appends, mid-decode.
  std::memset(p, 0, bytes);
  return p;
}

void host_memory_free(void* p) noexcept { std::free(p); }

}  // namespace pagedkv
