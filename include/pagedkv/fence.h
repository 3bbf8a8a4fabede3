// A fence: the point on a stream after which some memory may be read or reused. Empty (nullptr)
// means "already done". The device backend makes them: CPU fences are set by its copy worker
// thread, CUDA fences are events (cpp/fence_state.h).
#pragma once
#include <memory>

namespace pagedkv {

struct FenceState;  // cpp/fence_state.h
using Fence = std::shared_ptr<FenceState>;

// Non-blocking: whether the work before the fence has finished.
bool fence_done(const Fence& f);
// Blocks the calling thread until the fence has passed.
void fence_wait_host(const Fence& f);

}  // namespace pagedkv
