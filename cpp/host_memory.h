// Plain host memory for the CPU tiers, shared by both backends. Private to cpp/.
#pragma once
#include <cstddef>

namespace pagedkv {

// 2 MiB aligned, transparent huge pages advised, every page touched; throws OutOfBlocks.
void* host_memory_allocate(size_t bytes);
void host_memory_free(void* p) noexcept;

}  // namespace pagedkv
