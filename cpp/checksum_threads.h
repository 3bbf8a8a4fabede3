// Threads that checksum a disk block while the I/O thread that asked moves the bytes: a block's
// CRC-32C overlaps its own write (the CRC only reads the buffer the write reads), and a read's
// checksum of the pieces already landed overlaps the read of the next. A job no thread has taken
// by the time its value is wanted is computed by the caller itself, so a checksum thread slow to
// wake (a busy host, a virtual CPU) never costs more than doing the CRC inline. Private to cpp/.
#pragma once
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "pagedkv/crc32c.h"

namespace pagedkv {

class ChecksumThreads {
  struct Job;

 public:
  // The CRC-32C of one buffer, being computed. The buffer must stay unchanged until value()
  // returns or the Pending is destroyed; both wait for the checksum to finish (value() computes it
  // on the calling thread if no checksum thread has started it).
  class Pending {
   public:
    Pending(ChecksumThreads* owner, std::shared_ptr<Job> job) : owner_(owner), job_(std::move(job)) {}
    Pending(Pending&&) = default;
    Pending& operator=(Pending&&) = delete;
    ~Pending();
    uint32_t value();

   private:
    ChecksumThreads* owner_;
    std::shared_ptr<Job> job_;
  };

  // `path`: the CRC path jobs run on (crc32c_on: at most it, as this CPU has it).
  ChecksumThreads(int threads, Crc32cPath path);
  ~ChecksumThreads();
  ChecksumThreads(const ChecksumThreads&) = delete;
  ChecksumThreads& operator=(const ChecksumThreads&) = delete;

  // Starts crc32c(data, len, crc) on one of the threads (crc: the CRC of the bytes before these).
  Pending start(const void* data, size_t len, uint32_t crc = 0);

 private:
  struct Job {
    const void* data;
    size_t len;
    uint32_t crc = 0;  // the CRC before the bytes, then after them
    bool taken = false;  // by a checksum thread or by the caller of value()
    bool done = false;
  };
  void work();
  Crc32cPath path_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  std::deque<std::shared_ptr<Job>> jobs_;
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace pagedkv
