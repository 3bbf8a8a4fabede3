// CRC-32C, reflected polynomial 0x82F63B78. The hardware path follows Mark Adler's crc32c.c
// (zlib license): the crc32 instruction has a latency of three cycles and a throughput of one,
// so three independent streams over adjacent chunks keep it busy, and the chunks' CRCs are joined
// by "shift by n zero bytes" tables (multiplying by x^(8n) mod P, linear in the CRC).
#include "pagedkv/crc32c.h"

#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <nmmintrin.h>
#define PAGEDKV_CRC32C_X86 1
#endif

namespace pagedkv {
namespace {

constexpr uint32_t kPoly = 0x82F63B78u;

uint64_t load64(const unsigned char* p) {  // (unaligned, without undefined behaviour)
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

struct SliceTables {
  uint32_t t[8][256];
  SliceTables() {
    for (uint32_t n = 0; n < 256; ++n) {
      uint32_t c = n;
      for (int k = 0; k < 8; ++k) c = c & 1 ? (c >> 1) ^ kPoly : c >> 1;
      t[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; ++n)
      for (int k = 1; k < 8; ++k) t[k][n] = (t[k - 1][n] >> 8) ^ t[0][t[k - 1][n] & 0xff];
  }
};

const SliceTables& slice_tables() {
  static const SliceTables tables;
  return tables;
}

// -- GF(2) 32x32 matrices: the operator that feeds n zero bytes through a CRC --
uint32_t times(const uint32_t* mat, uint32_t vec) {
  uint32_t sum = 0;
  for (; vec; vec >>= 1, ++mat)
    if (vec & 1) sum ^= *mat;
  return sum;
}

void square(uint32_t* out, const uint32_t* mat) {
  for (int n = 0; n < 32; ++n) out[n] = times(mat, mat[n]);
}

// Byte-wise tables applying the operator for `len` zero bytes (len a power of two).
struct ShiftTable {
  uint32_t t[4][256];
  explicit ShiftTable(size_t len) {
    uint32_t op[32], sq[32];
    op[0] = kPoly;  // one zero bit
    for (int n = 1; n < 32; ++n) op[n] = 1u << (n - 1);
    for (size_t bits = 1; bits < len * 8; bits <<= 1) {  // square up to len * 8 zero bits
      square(sq, op);
      std::memcpy(op, sq, sizeof op);
    }
    for (uint32_t n = 0; n < 256; ++n)
      for (int k = 0; k < 4; ++k) t[k][n] = times(op, n << (8 * k));
  }
  uint32_t shift(uint32_t crc) const {
    return t[0][crc & 0xff] ^ t[1][(crc >> 8) & 0xff] ^ t[2][(crc >> 16) & 0xff] ^ t[3][crc >> 24];
  }
};

#ifdef PAGEDKV_CRC32C_X86
constexpr size_t kLong = 8192, kShort = 256;  // the three streams' chunk sizes (powers of two)

struct HwTables {
  ShiftTable long_shift{kLong}, short_shift{kShort};
};

const HwTables& hw_tables() {
  static const HwTables tables;
  return tables;
}

// Three streams of `chunk` bytes each, joined: returns the running (inverted) CRC.
__attribute__((target("sse4.2"))) uint64_t three_way(uint64_t crc0, const unsigned char*& p, size_t& len,
                                                       size_t chunk, const ShiftTable& shift) {
  while (len >= 3 * chunk) {
    uint64_t crc1 = 0, crc2 = 0;
    for (const unsigned char* end = p + chunk; p < end; p += 8) {
      crc0 = _mm_crc32_u64(crc0, load64(p));
      crc1 = _mm_crc32_u64(crc1, load64(p + chunk));
      crc2 = _mm_crc32_u64(crc2, load64(p + 2 * chunk));
    }
    crc0 = shift.shift(uint32_t(crc0)) ^ crc1;
    crc0 = shift.shift(uint32_t(crc0)) ^ crc2;
    p += 2 * chunk;
    len -= 3 * chunk;
  }
  return crc0;
}

__attribute__((target("sse4.2"))) uint32_t crc32c_sse42(const void* data, size_t len, uint32_t crc) {
  const HwTables& tables = hw_tables();
  const unsigned char* p = static_cast<const unsigned char*>(data);
  uint64_t c = ~crc;
  for (; len && (reinterpret_cast<uintptr_t>(p) & 7) != 0; ++p, --len) c = _mm_crc32_u8(uint32_t(c), *p);
  c = three_way(c, p, len, kLong, tables.long_shift);
  c = three_way(c, p, len, kShort, tables.short_shift);
  for (; len >= 8; p += 8, len -= 8) c = _mm_crc32_u64(c, load64(p));
  for (; len; ++p, --len) c = _mm_crc32_u8(uint32_t(c), *p);
  return ~uint32_t(c);
}

bool cpu_has_sse42() {
  static const bool has = __builtin_cpu_supports("sse4.2");
  return has;
}
#endif

}  // namespace

uint32_t crc32c_portable(const void* data, size_t len, uint32_t crc) {
  const auto& t = slice_tables().t;
  const unsigned char* p = static_cast<const unsigned char*>(data);
  uint32_t c = ~crc;
  for (; len && (reinterpret_cast<uintptr_t>(p) & 7) != 0; ++p, --len) c = (c >> 8) ^ t[0][(c ^ *p) & 0xff];
  for (; len >= 8; p += 8, len -= 8) {  // slicing-by-8 (little-endian words)
    const uint64_t w = load64(p) ^ c;
    c = t[7][w & 0xff] ^ t[6][(w >> 8) & 0xff] ^ t[5][(w >> 16) & 0xff] ^ t[4][(w >> 24) & 0xff] ^
        t[3][(w >> 32) & 0xff] ^ t[2][(w >> 40) & 0xff] ^ t[1][(w >> 48) & 0xff] ^ t[0][w >> 56];
  }
  for (; len; ++p, --len) c = (c >> 8) ^ t[0][(c ^ *p) & 0xff];
  return ~c;
}

bool crc32c_hardware() {
#ifdef PAGEDKV_CRC32C_X86
  return cpu_has_sse42();
#else
  return false;
#endif
}

uint32_t crc32c(const void* data, size_t len, uint32_t crc) {
#ifdef PAGEDKV_CRC32C_X86
  if (cpu_has_sse42()) return crc32c_sse42(data, len, crc);
#endif
  return crc32c_portable(data, len, crc);
}

}  // namespace pagedkv
