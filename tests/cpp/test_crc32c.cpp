// The disk tier's checksum: known CRC-32C values (RFC 3720 B.4), and the hardware path equal to
// the portable one over lengths and alignments that cross every chunk boundary of both.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "pagedkv/crc32c.h"

namespace pagedkv {
namespace {

TEST(Crc32c, KnownValues) {
  const char* digits = "123456789";
  EXPECT_EQ(crc32c(digits, 9), 0xE3069283u);
  EXPECT_EQ(crc32c_portable(digits, 9), 0xE3069283u);
  std::vector<unsigned char> buf(32, 0);
  EXPECT_EQ(crc32c(buf.data(), 32), 0x8A9136AAu);
  std::memset(buf.data(), 0xff, 32);
  EXPECT_EQ(crc32c(buf.data(), 32), 0x62A8AB43u);
  for (int i = 0; i < 32; ++i) buf[size_t(i)] = (unsigned char)i;
  EXPECT_EQ(crc32c(buf.data(), 32), 0x46DD794Eu);
  EXPECT_EQ(crc32c(nullptr, 0), 0u);
}

TEST(Crc32c, HardwareMatchesPortableAtEveryLengthAndOffset) {
  std::mt19937 rng(7);
  std::vector<unsigned char> buf(3 * 8192 * 2 + 3 * 256 + 64);
  for (auto& b : buf) b = (unsigned char)rng();
  std::vector<size_t> lengths = {0, 1, 7, 8, 9, 255, 256, 767, 768, 769, 3 * 8192 - 1, 3 * 8192, 3 * 8192 + 1,
                                 3 * 8192 + 3 * 256 + 13, 6 * 8192 + 3 * 256};
  for (int i = 0; i < 50; ++i) lengths.push_back(rng() % (buf.size() - 8));
  for (size_t len : lengths)
    for (size_t off = 0; off < 8; ++off) {
      ASSERT_EQ(crc32c(buf.data() + off, len), crc32c_portable(buf.data() + off, len))
          << "len " << len << " offset " << off;
    }
}

TEST(Crc32c, ContinuesAcrossPieces) {
  std::vector<unsigned char> buf(40000);
  std::mt19937 rng(3);
  for (auto& b : buf) b = (unsigned char)rng();
  const uint32_t whole = crc32c(buf.data(), buf.size());
  EXPECT_EQ(crc32c(buf.data() + 12345, buf.size() - 12345, crc32c(buf.data(), 12345)), whole);
  buf[20000] ^= 1;  // any single bit flipped changes it
  EXPECT_NE(crc32c(buf.data(), buf.size()), whole);
}

// Every path this CPU has against the tables, over lengths around the folding path's 256-byte
// steps and the crc32 path's chunks, at every alignment, continuing from a nonzero CRC.
TEST(Crc32c, EveryPathMatchesPortable) {
  std::mt19937 rng(13);
  std::vector<unsigned char> buf(70000);
  for (auto& b : buf) b = (unsigned char)rng();
  std::vector<size_t> lengths = {0, 1, 15, 16, 255, 256, 257, 511, 512, 1023, 1024, 1025, 4096 + 31, 3 * 8192 + 1};
  for (int i = 0; i < 40; ++i) lengths.push_back(rng() % (buf.size() - 64));
  for (Crc32cPath path : {Crc32cPath::fold, Crc32cPath::crc32, Crc32cPath::portable}) {
    if (path > crc32c_best()) continue;  // (the CPU lacks it)
    for (size_t len : lengths)
      for (size_t off : {0, 1, 3, 8, 63}) {
        const uint32_t seed = uint32_t(rng());
        ASSERT_EQ(crc32c_on(path, buf.data() + off, len, seed), crc32c_portable(buf.data() + off, len, seed))
            << crc32c_path_name(path) << " len " << len << " offset " << off;
      }
  }
  std::printf("crc32c paths on this CPU: best is %s\n", crc32c_path_name(crc32c_best()));
}

}  // namespace
}  // namespace pagedkv
