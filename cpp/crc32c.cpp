// CRC-32C, reflected polynomial 0x82F63B78. Three paths, the fastest the CPU has picked once:
// carry-less-multiply folding on 512-bit registers (below), the crc32 instruction, tables.
// The crc32 path follows Mark Adler's crc32c.c
// (zlib license): the crc32 instruction has a latency of three cycles and a throughput of one,
// so three independent streams over adjacent chunks keep it busy, and the chunks' CRCs are joined
// by "shift by n zero bytes" tables (multiplying by x^(8n) mod P, linear in the CRC).
#include "pagedkv/crc32c.h"
#include "pagedkv/crc32c_gf2.h"

#include <algorithm>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define PAGEDKV_CRC32C_X86 1
#endif

namespace pagedkv {
namespace {

namespace gf2 = crc32c_gf2;

uint64_t load64(const unsigned char* p) {  // (unaligned, without undefined behaviour)
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

struct SliceTables {
  uint32_t t[8][256];
  SliceTables() {
    for (uint32_t n = 0; n < 256; ++n) t[0][n] = gf2::update_byte(0, uint8_t(n));
    for (uint32_t n = 0; n < 256; ++n)
      for (int k = 1; k < 8; ++k) t[k][n] = (t[k - 1][n] >> 8) ^ t[0][t[k - 1][n] & 0xff];
  }
};

const SliceTables& slice_tables() {
  static const SliceTables tables;
  return tables;
}

// Byte-wise tables applying the operator for `len` zero bytes: multiplying by x^(8 len) mod P,
// which is linear in the CRC, byte by byte.
struct ShiftTable {
  uint32_t t[4][256];
  explicit ShiftTable(size_t len) {
    const uint32_t op = gf2::x_to_the(8 * uint64_t(len));
    for (uint32_t n = 0; n < 256; ++n)
      for (int k = 0; k < 4; ++k) t[k][n] = gf2::multiply(n << (8 * k), op);
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

// -- Folding with carry-less multiplies (VPCLMULQDQ on 512-bit registers), after Peter Cawley's
// fast-crc32 (MIT): 256 bytes per step in four registers of four 128-bit lanes. A lane folds
// forward by d bytes as clmul(low half, x^(8d + 64 - 33)) ^ clmul(high half, x^(8d - 33)) (mod P,
// bit-reflected; the 33 accounts for the reflected product's extra bit and the 32-bit remainder
// the crc32 instruction takes at the end), XORed into the lane d bytes on. --

struct FoldConstants {
  uint64_t lo[4], hi[4];  // [d / 16 - 1 for d = 16, 32, 48, 64], and [4] below for d = 256
  uint64_t lo256, hi256;
  FoldConstants() {
    for (int i = 0; i < 4; ++i) {
      const uint64_t d = 16 * uint64_t(i + 1);
      lo[i] = gf2::x_to_the(8 * d + 64 - 33);
      hi[i] = gf2::x_to_the(8 * d - 33);
    }
    lo256 = gf2::x_to_the(8 * 256 + 64 - 33);
    hi256 = gf2::x_to_the(8 * 256 - 33);
  }
};

const FoldConstants& fold_constants() {
  static const FoldConstants k;
  return k;
}

#define PKV_FOLD_TARGET __attribute__((target("avx512f,avx512vl,vpclmulqdq,pclmul,sse4.2")))

PKV_FOLD_TARGET inline __m512i fold512(__m512i x, __m512i k, __m512i next) {
  return _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(x, k, 0x00), _mm512_clmulepi64_epi128(x, k, 0x11),
                                   next, 0x96);  // a ^ b ^ c
}

PKV_FOLD_TARGET inline __m128i fold128(__m128i x, uint64_t lo, uint64_t hi, __m128i next) {
  const __m128i k = _mm_set_epi64x(int64_t(hi), int64_t(lo));
  return _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00), _mm_clmulepi64_si128(x, k, 0x11)), next);
}

// len >= 256. The running (inverted) CRC goes into the first four bytes; every 256 bytes fold
// into the four registers; then the registers fold into one lane, and its 16 bytes go through
// the crc32 instruction from 0; the last len % 256 bytes follow on the crc32 path.
PKV_FOLD_TARGET uint32_t crc32c_fold(const void* data, size_t len, uint32_t crc) {
  const FoldConstants& kc = fold_constants();
  const unsigned char* p = static_cast<const unsigned char*>(data);
  __m512i x0 = _mm512_loadu_si512(p), x1 = _mm512_loadu_si512(p + 64), x2 = _mm512_loadu_si512(p + 128),
          x3 = _mm512_loadu_si512(p + 192);
  x0 = _mm512_xor_si512(x0, _mm512_inserti32x4(_mm512_setzero_si512(), _mm_cvtsi32_si128(int(~crc)), 0));
  p += 256;
  len -= 256;
  const __m512i k256 = _mm512_broadcast_i32x4(_mm_set_epi64x(int64_t(kc.hi256), int64_t(kc.lo256)));
  for (; len >= 256; p += 256, len -= 256) {
    x0 = fold512(x0, k256, _mm512_loadu_si512(p));
    x1 = fold512(x1, k256, _mm512_loadu_si512(p + 64));
    x2 = fold512(x2, k256, _mm512_loadu_si512(p + 128));
    x3 = fold512(x3, k256, _mm512_loadu_si512(p + 192));
  }
  const __m512i k64 = _mm512_broadcast_i32x4(_mm_set_epi64x(int64_t(kc.hi[3]), int64_t(kc.lo[3])));
  x1 = fold512(x0, k64, x1);
  x2 = fold512(x1, k64, x2);
  x3 = fold512(x2, k64, x3);
  __m128i x = _mm512_extracti32x4_epi32(x3, 3);  // the last 16 bytes; the lanes before fold into it
  x = fold128(_mm512_extracti32x4_epi32(x3, 0), kc.lo[2], kc.hi[2], x);
  x = fold128(_mm512_extracti32x4_epi32(x3, 1), kc.lo[1], kc.hi[1], x);
  x = fold128(_mm512_extracti32x4_epi32(x3, 2), kc.lo[0], kc.hi[0], x);
  uint64_t c = _mm_crc32_u64(0, uint64_t(_mm_cvtsi128_si64(x)));
  c = _mm_crc32_u64(c, uint64_t(_mm_extract_epi64(x, 1)));
  return crc32c_sse42(p, len, ~uint32_t(c));
}

bool cpu_has_fold() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("vpclmulqdq") && __builtin_cpu_supports("pclmul") &&
                          cpu_has_sse42();
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

bool crc32c_hardware() { return crc32c_best() != Crc32cPath::portable; }

namespace {
Crc32cPath cpu_best() {
#ifdef PAGEDKV_CRC32C_X86
  if (cpu_has_fold()) return Crc32cPath::fold;
  if (cpu_has_sse42()) return Crc32cPath::crc32;
#endif
  return Crc32cPath::portable;
}
}  // namespace

Crc32cPath crc32c_best() {
  static const Crc32cPath best = cpu_best();
  return best;
}

const char* crc32c_path_name(Crc32cPath path) {
  switch (path) {
    case Crc32cPath::fold: return "vpclmulqdq folding";
    case Crc32cPath::crc32: return "crc32 instruction";
    default: return "portable tables";
  }
}

uint32_t crc32c_on(Crc32cPath path, const void* data, size_t len, uint32_t crc) {
#ifdef PAGEDKV_CRC32C_X86
  if (path == Crc32cPath::fold && cpu_has_fold()) return len >= 256 ? crc32c_fold(data, len, crc) : crc32c_sse42(data, len, crc);
  if (path != Crc32cPath::portable && cpu_has_sse42()) return crc32c_sse42(data, len, crc);
#endif
  (void)path;
  return crc32c_portable(data, len, crc);
}

uint32_t crc32c(const void* data, size_t len, uint32_t crc) {
  return crc32c_on(crc32c_best(), data, len, crc);  // (crc32c_best() decides once)
}

}  // namespace pagedkv
