#include "checksum_threads.h"

#include "pagedkv/crc32c.h"

namespace pagedkv {

ChecksumThreads::ChecksumThreads(int threads, Crc32cPath path) : path_(path) {
  for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { work(); });
}

ChecksumThreads::~ChecksumThreads() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  for (std::thread& t : threads_) t.join();
}

void ChecksumThreads::work() {
  for (;;) {
    std::shared_ptr<Job> job;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [this] { return stopping_ || !jobs_.empty(); });
      if (jobs_.empty()) return;  // stopping, nothing left
      job = std::move(jobs_.front());
      jobs_.pop_front();
      if (job->taken) continue;  // its caller computed it already
      job->taken = true;
    }
    const uint32_t crc = crc32c_on(path_, job->data, job->len, job->crc);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job->crc = crc;
      job->done = true;
    }
    done_.notify_all();
  }
}

ChecksumThreads::Pending ChecksumThreads::start(const void* data, size_t len, uint32_t crc) {
  auto job = std::make_shared<Job>();
  job->data = data;
  job->len = len;
  job->crc = crc;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    jobs_.push_back(job);
  }
  wake_.notify_one();
  return Pending(this, std::move(job));
}

uint32_t ChecksumThreads::Pending::value() {
  std::unique_lock<std::mutex> lock(owner_->mutex_);
  if (!job_->taken) {  // no checksum thread has started it: cheaper to do it here than to wait
    job_->taken = true;
    lock.unlock();
    const uint32_t crc = crc32c_on(owner_->path_, job_->data, job_->len, job_->crc);
    lock.lock();
    job_->crc = crc;
    job_->done = true;  // (the queue's entry is skipped by the thread that pops it)
    return crc;
  }
  owner_->done_.wait(lock, [this] { return job_->done; });
  return job_->crc;
}

ChecksumThreads::Pending::~Pending() {
  if (job_) value();  // (a moved-from Pending has no job)
}

}  // namespace pagedkv
