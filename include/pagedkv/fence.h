// A fence: the point on a CUDA stream after which some memory may be read or reused. Empty
// (nullptr) means "already done", which is all CPU builds and the CPU tiers ever see.
#pragma once
#include <memory>

namespace pagedkv {

struct FenceState;  // copy_engine.cpp: owns a cudaEvent_t
using Fence = std::shared_ptr<FenceState>;

// Non-blocking: whether the work before the fence has finished.
bool fence_done(const Fence& f);
// Blocks the calling thread until the fence has passed.
void fence_wait_host(const Fence& f);

}  // namespace pagedkv
