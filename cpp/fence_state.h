// What a Fence holds; private to cpp/. A CUDA fence is an event on a copy stream; a CPU fence is
// set by the copy worker thread when its job is done.
#pragma once
#include <atomic>
#include <condition_variable>
#include <mutex>

#include "pagedkv/fence.h"
#ifdef PAGEDKV_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace pagedkv {

struct FenceState {
#ifdef PAGEDKV_WITH_CUDA
  cudaEvent_t event = nullptr;
  ~FenceState() {
    if (event) cudaEventDestroy(event);
  }
#endif
  // CPU fences
  std::atomic<bool> done{false};
  std::mutex mutex;
  std::condition_variable cv;
  void signal() {
    {
      std::lock_guard<std::mutex> lock(mutex);
      done = true;
    }
    cv.notify_all();
  }
  void wait() {
    std::unique_lock<std::mutex> lock(mutex);
    cv.wait(lock, [&] { return done.load(); });
  }
};

}  // namespace pagedkv
