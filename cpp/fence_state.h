// What a Fence holds; private to cpp/. Each backend has its kind: a CPU fence is set by the copy
// worker thread when its job is done (cpu_copy_worker.h); a CUDA fence is an event on a stream
// (backend_cuda.cpp).
#pragma once
#include <atomic>
#include <condition_variable>
#include <mutex>

#include "pagedkv/fence.h"

namespace pagedkv {

struct FenceState {
  virtual ~FenceState() = default;
  virtual bool done() = 0;  // non-blocking
  virtual void wait() = 0;  // blocks the calling thread until done
};

struct CpuFence final : FenceState {
  std::atomic<bool> finished{false};
  std::mutex mutex;
  std::condition_variable cv;
  void signal() {
    {
      std::lock_guard<std::mutex> lock(mutex);
      finished = true;
    }
    cv.notify_all();
  }
  bool done() override { return finished.load(); }
  void wait() override {
    std::unique_lock<std::mutex> lock(mutex);
    cv.wait(lock, [&] { return finished.load(); });
  }
};

}  // namespace pagedkv
