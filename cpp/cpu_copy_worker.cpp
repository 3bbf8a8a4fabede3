#include "cpu_copy_worker.h"

#include "fence_state.h"

namespace pagedkv {

CpuCopyWorker::CpuCopyWorker() : thread_([this] { run(); }) {}

CpuCopyWorker::~CpuCopyWorker() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  thread_.join();
}

Fence CpuCopyWorker::submit(std::function<void()> job) {
  auto fence = std::make_shared<CpuFence>();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    jobs_.emplace_back(std::move(job), fence);
  }
  wake_.notify_one();
  return fence;
}

void CpuCopyWorker::run() {
  for (;;) {
    std::pair<std::function<void()>, std::shared_ptr<CpuFence>> item;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return stopping_ || !jobs_.empty(); });
      if (jobs_.empty()) return;  // stopping, and everything queued has run
      item = std::move(jobs_.front());
      jobs_.pop_front();
    }
    item.first();  // memcpy between pools the engine owns: cannot throw
    item.second->signal();
  }
}

}  // namespace pagedkv
