// The CPU tiers' copy engine: one worker thread running memcpy jobs in order, so host "device"
// and host tiers move blocks asynchronously like the GPU's copy streams, and CI exercises every
// fence the engine waits on. Private to cpp/.
#pragma once
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>

#include "fence_state.h"

namespace pagedkv {

class CpuCopyWorker {
 public:
  CpuCopyWorker();
  ~CpuCopyWorker();  // finishes every queued job first
  CpuCopyWorker(const CpuCopyWorker&) = delete;
  CpuCopyWorker& operator=(const CpuCopyWorker&) = delete;

  // Runs `job` after every job queued before it; the fence passes when it has run.
  Fence submit(std::function<void()> job);

 private:
  void run();
  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::pair<std::function<void()>, std::shared_ptr<CpuFence>>> jobs_;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace pagedkv
