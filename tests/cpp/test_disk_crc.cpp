// The disk tier's checksum when it comes from elsewhere: the GPU's chunked CRC-32C arithmetic
// (include/pagedkv/crc32c_gf2.h, which cuda/block_crc.cu runs; the kernel itself is checked
// against crc32c() in tests/cuda/block_crc_check.cu) and the disk tier keeping a CRC it is given
// instead of computing its own (so a wrong one shows on the next read, not silently).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "pagedkv/crc32c.h"
#include "pagedkv/crc32c_gf2.h"
#include "pagedkv/device_backend.h"
#include "pagedkv/errors.h"
#include "pagedkv/tier.h"

namespace pagedkv {
namespace {

namespace gf2 = crc32c_gf2;

// update(0, bytes): the register fed from 0, no inversions (crc32c() inverts on the way in and out).
uint32_t raw(const unsigned char* p, size_t n) { return ~crc32c(p, n, ~0u); }

// A buffer cut into ranges as the kernel cuts a block (ranges of `per` bytes, the last ones
// short or empty), their terms XORed in a shuffled order, gives crc32c() of the whole buffer.
TEST(DiskCrc, ChunkTermsInAnyOrderGiveTheWholeCrc) {
  std::mt19937_64 rng(11);
  uint32_t squares[64];
  gf2::zeros_squares(squares);
  std::vector<unsigned char> buf((3 << 20) + 7);
  for (auto& b : buf) b = (unsigned char)rng();
  for (size_t n : {size_t(0), size_t(1), size_t(16), size_t(1000), size_t(4096), size_t(2 << 20), buf.size()})
    for (size_t per : {size_t(16), size_t(48), size_t(2048), size_t(1 << 20)}) {
      std::vector<size_t> starts;
      for (size_t at = 0; at < n; at += per) starts.push_back(at);
      std::shuffle(starts.begin(), starts.end(), rng);
      uint32_t terms = 0;
      for (size_t at : starts) {
        const size_t end = std::min(n, at + per);
        terms ^= gf2::chunk_term(raw(buf.data() + at, end - at), n - end, squares);
      }
      EXPECT_EQ(gf2::finish(gf2::start_term(n, squares), terms), crc32c(buf.data(), n)) << n << " " << per;
    }
}

TEST(DiskCrc, MultiplyAndZerosOperatorAgreeWithFeedingZeros) {
  uint32_t squares[64];
  gf2::zeros_squares(squares);
  std::mt19937 rng(2);
  for (uint64_t n : {uint64_t(0), uint64_t(1), uint64_t(3), uint64_t(255), uint64_t(4097)}) {
    const uint32_t s = rng();
    uint32_t fed = s;
    for (uint64_t i = 0; i < n; ++i) fed = gf2::update_byte(fed, 0);
    EXPECT_EQ(gf2::multiply(s, gf2::zeros_operator(n, squares)), fed) << n;
  }
  EXPECT_EQ(gf2::multiply(gf2::kOne, 0x12345678u), 0x12345678u);
}

std::string temp_dir() {
  char templ[] = "/tmp/pagedkv-crc-XXXXXX";
  const char* d = mkdtemp(templ);
  EXPECT_NE(d, nullptr);
  return d ? d : "/tmp";
}

CacheConfig disk_config(bool checksum) {
  CacheConfig c;
  c.num_layers = 2;
  c.num_kv_heads = 2;
  c.head_dim = 64;
  c.block_size = 4;
  c.dtype = DType::f32;
  c.device_blocks = 2;
  c.disk_path = temp_dir();
  c.disk_checksum = checksum;
  return c;
}

TEST(DiskCrc, TheDiskTierKeepsTheCrcItIsGiven) {
  const CacheConfig c = disk_config(true);
  auto backend = make_cpu_backend(c);
  auto disk = make_tier("disk", TierSpec{c, *backend, 4, size_t(c.block_bytes())}, "test");
  ASSERT_TRUE(disk->keeps_crc());
  std::vector<unsigned char> block(disk->bytes_per_block()), back(block.size());
  std::mt19937 rng(9);
  for (auto& b : block) b = (unsigned char)rng();
  const uint32_t right = crc32c(block.data(), block.size());
  const int32_t a = disk->alloc_slot(), b = disk->alloc_slot();
  disk->write_block_with_crc(a, block.data(), right);
  EXPECT_EQ(disk->block_crc(a), right);
  disk->read_block(a, back.data());
  EXPECT_EQ(back, block);
  // A CRC that does not match the bytes is what a read checks against: the block is reported.
  disk->write_block_with_crc(b, block.data(), right ^ 1u);
  EXPECT_THROW(disk->read_block(b, back.data()), CorruptBlock);
  disk->write_block(b, block.data());  // computed by the tier itself
  EXPECT_EQ(disk->block_crc(b), right);
  disk->read_block(b, back.data());
  EXPECT_EQ(back, block);
}

TEST(DiskCrc, WithoutTheChecksumAGivenCrcIsIgnored) {
  const CacheConfig c = disk_config(false);
  auto backend = make_cpu_backend(c);
  auto disk = make_tier("disk", TierSpec{c, *backend, 2, size_t(c.block_bytes())}, "test");
  EXPECT_FALSE(disk->keeps_crc());
  std::vector<unsigned char> block(disk->bytes_per_block(), 7), back(block.size());
  const int32_t a = disk->alloc_slot();
  disk->write_block_with_crc(a, block.data(), 12345u);
  disk->read_block(a, back.data());
  EXPECT_EQ(back, block);
}

TEST(DiskCrc, TheCpuBackendLeavesChecksumsToTheDiskTier) {
  const CacheConfig c = disk_config(true);
  EXPECT_FALSE(make_cpu_backend(c)->checksums_blocks());
}

}  // namespace
}  // namespace pagedkv
