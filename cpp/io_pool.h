// The disk tier's I/O threads: a batch of whole-block reads or writes runs on several threads at
// once, so the disk sees a queue of requests rather than one at a time. Private to cpp/.
#pragma once
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace pagedkv {

class IoPool {
 public:
  explicit IoPool(int threads);
  ~IoPool();
  IoPool(const IoPool&) = delete;
  IoPool& operator=(const IoPool&) = delete;

  // Runs job(0) .. job(n - 1) on the pool's threads and returns when every one has finished.
  // Entry i of the result holds the exception job(i) threw, or is null.
  std::vector<std::exception_ptr> run(size_t n, const std::function<void(size_t)>& job);

 private:
  void work();
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  std::deque<std::function<void()>> tasks_;
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace pagedkv
