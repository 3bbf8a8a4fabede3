// The disk tier's checksum threads: every Pending gives the CRC-32C of its bytes (continuing the
// CRC it was started from), whichever thread computed it, in any order of asking; a job no thread
// has taken is computed by the caller of value().
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <thread>
#include <vector>

#include "../../cpp/checksum_threads.h"
#include "pagedkv/crc32c.h"

namespace pagedkv {
namespace {

std::vector<unsigned char> random_bytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<unsigned char> b(n);
  for (auto& c : b) c = static_cast<unsigned char>(rng());
  return b;
}

TEST(ChecksumThreads, ValuesMatchTheCrcWhoeverComputesThem) {
  const auto bytes = random_bytes(3 << 20, 1);
  for (int threads : {0, 1, 4}) {  // 0: every job falls to value()'s caller
    ChecksumThreads pool(threads, crc32c_best());
    std::vector<ChecksumThreads::Pending> pending;
    std::vector<uint32_t> want;
    std::mt19937_64 rng(uint64_t(threads) + 7);
    for (int i = 0; i < 200; ++i) {
      const size_t at = rng() % bytes.size(), len = rng() % (bytes.size() - at + 1);
      const uint32_t seed_crc = uint32_t(rng());
      pending.push_back(pool.start(bytes.data() + at, len, seed_crc));
      want.push_back(crc32c(bytes.data() + at, len, seed_crc));
    }
    std::vector<size_t> order(pending.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::shuffle(order.begin(), order.end(), rng);
    for (size_t i : order) EXPECT_EQ(pending[i].value(), want[i]) << "job " << i << ", threads " << threads;
    for (size_t i : order) EXPECT_EQ(pending[i].value(), want[i]) << "asked twice: job " << i;
  }
}

TEST(ChecksumThreads, ChainedPiecesGiveTheWholeBuffersCrc) {
  const auto bytes = random_bytes((2 << 20) + 12345, 2);
  ChecksumThreads pool(4, crc32c_best());
  std::vector<std::thread> readers;
  std::vector<uint32_t> got(8);
  for (int r = 0; r < 8; ++r)  // several callers at once, as the I/O threads are
    readers.emplace_back([&, r] {
      const size_t piece = size_t(4096) << r;
      uint32_t crc = 0;
      for (size_t at = 0; at < bytes.size(); at += piece) {
        ChecksumThreads::Pending p = pool.start(bytes.data() + at, std::min(piece, bytes.size() - at), crc);
        crc = p.value();
      }
      got[size_t(r)] = crc;
    });
  for (auto& t : readers) t.join();
  const uint32_t whole = crc32c(bytes.data(), bytes.size());
  for (int r = 0; r < 8; ++r) EXPECT_EQ(got[size_t(r)], whole) << "pieces of " << (4096 << r) << " bytes";
}

TEST(ChecksumThreads, PendingsDroppedUnaskedAndThePoolStops) {
  const auto bytes = random_bytes(1 << 20, 3);
  ChecksumThreads pool(2, Crc32cPath::portable);
  for (int i = 0; i < 50; ++i) {
    ChecksumThreads::Pending p = pool.start(bytes.data(), bytes.size());
    (void)p;  // its destructor waits for it (or computes it)
  }
  EXPECT_EQ(pool.start(bytes.data(), 9).value(), crc32c(bytes.data(), 9));
}

}  // namespace
}  // namespace pagedkv
