// The disk tier's I/O threads: a batch runs concurrently, every job runs once, and a failing job
// reports its own exception without stopping the others.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "../../cpp/io_pool.h"

namespace pagedkv {
namespace {

TEST(IoPool, RunsEveryJobOnceAndConcurrently) {
  IoPool pool(4);
  std::atomic<int> running{0}, most{0};
  std::vector<std::atomic<int>> ran(16);
  auto errors = pool.run(ran.size(), [&](size_t i) {
    const int now = ++running;
    for (int seen = most.load(); now > seen && !most.compare_exchange_weak(seen, now);) {
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // a disk request in flight
    --running;
    ++ran[i];
  });
  for (size_t i = 0; i < ran.size(); ++i) {
    EXPECT_EQ(ran[i].load(), 1) << "job " << i;
    EXPECT_FALSE(errors[i]) << "job " << i;
  }
  EXPECT_GT(most.load(), 1) << "the jobs never overlapped";
  EXPECT_LE(most.load(), 4);
}

TEST(IoPool, EachFailureIsReportedWhereItHappened) {
  IoPool pool(3);
  auto errors = pool.run(7, [](size_t i) {
    if (i % 3 == 1) throw std::runtime_error("job " + std::to_string(i));
  });
  ASSERT_EQ(errors.size(), 7u);
  for (size_t i = 0; i < errors.size(); ++i) {
    if (i % 3 != 1) {
      EXPECT_FALSE(errors[i]);
      continue;
    }
    ASSERT_TRUE(errors[i]);
    try {
      std::rethrow_exception(errors[i]);
    } catch (const std::runtime_error& e) {
      EXPECT_EQ(std::string(e.what()), "job " + std::to_string(i));
    }
  }
  EXPECT_TRUE(pool.run(0, [](size_t) { FAIL(); }).empty());  // an empty batch returns at once
}

}  // namespace
}  // namespace pagedkv
