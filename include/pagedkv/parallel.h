// A minimal parallel loop for the CPU paths: items [0, n) shared out to worker threads.
#pragma once
#include <atomic>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

namespace pagedkv {

template <typename Fn>
void parallel_for(int64_t n, int num_threads, Fn&& fn) {
  if (num_threads <= 0) num_threads = int(std::thread::hardware_concurrency());
  if (num_threads <= 1 || n <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  const int workers = int(n < num_threads ? n : num_threads);
  std::atomic<int64_t> next{0};
  std::exception_ptr error;
  std::atomic<bool> failed{false};
  auto work = [&] {
    try {
      for (int64_t i = next++; i < n && !failed; i = next++) fn(i);
    } catch (...) {
      if (!failed.exchange(true)) error = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  for (int w = 1; w < workers; ++w) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace pagedkv
