// CRC-32C arithmetic shared by the host and the GPU (cuda/block_crc.cu): the CRC register as a
// polynomial over GF(2), bit-reflected (x^0 is bit 31) like the CRC itself, modulo P (0x82F63B78).
//
// Feeding bytes D through the register is affine in its state s: update(s, D) = update(0, D) ^
// s * x^(8|D|) mod P. So a buffer cut into chunks C_i, each ending e_i bytes before the buffer's
// end, has
//   crc32c(buffer) = ~(~0 * x^(8 len) ^ XOR_i update(0, C_i) * x^(8 e_i))     (mod P)
// and the chunks can be done in any order, by any thread: the GPU checksums a block that way.
#pragma once
#include <cstdint>

#ifndef PKV_HOST_DEVICE
#if defined(__CUDACC__)
#define PKV_HOST_DEVICE __host__ __device__
#else
#define PKV_HOST_DEVICE
#endif
#endif

namespace pagedkv::crc32c_gf2 {

constexpr uint32_t kPoly = 0x82F63B78u;  // P, bit-reflected
constexpr uint32_t kOne = 0x80000000u;   // the polynomial 1

// a * b mod P.
PKV_HOST_DEVICE inline uint32_t multiply(uint32_t a, uint32_t b) {
  uint32_t product = 0;
  for (int i = 0; i < 32; ++i) {
    if (a & (kOne >> i)) product ^= b;  // the x^i term of a
    b = (b & 1u) ? (b >> 1) ^ kPoly : b >> 1;  // b * x
  }
  return product;
}

// x^n mod P: n zero bits fed through the register, by squaring (the host's constants: the crc32
// path's shift tables, the folding's multipliers).
PKV_HOST_DEVICE inline uint32_t x_to_the(uint64_t n) {
  uint32_t result = kOne, power = kOne >> 1;  // x^0, x^1
  for (; n != 0; n >>= 1) {
    if (n & 1u) result = multiply(result, power);
    power = multiply(power, power);
  }
  return result;
}

// x^(8 n) mod P: n zero bytes fed through the register. squares[k] = x^(8 * 2^k) mod P.
PKV_HOST_DEVICE inline uint32_t zeros_operator(uint64_t n, const uint32_t* squares) {
  uint32_t op = kOne;
  for (int k = 0; n != 0; ++k, n >>= 1)
    if (n & 1u) op = multiply(op, squares[k]);
  return op;
}

// squares[k] = x^(8 * 2^k) mod P for k < 64 (zeros_operator's table).
PKV_HOST_DEVICE inline void zeros_squares(uint32_t* squares) {
  uint32_t x8 = kOne >> 8;  // x^8
  for (int k = 0; k < 64; ++k) {
    squares[k] = x8;
    x8 = multiply(x8, x8);
  }
}

// One byte through the register, no table (the tables are built from this).
PKV_HOST_DEVICE inline uint32_t update_byte(uint32_t state, uint8_t byte) {
  state ^= byte;
  for (int bit = 0; bit < 8; ++bit) state = (state & 1u) ? (state >> 1) ^ kPoly : state >> 1;
  return state;
}

// A chunk's term in the sum above: raw = update(0, chunk), the chunk ending `bytes_after` bytes
// before the buffer's end.
PKV_HOST_DEVICE inline uint32_t chunk_term(uint32_t raw, uint64_t bytes_after, const uint32_t* squares) {
  return multiply(raw, zeros_operator(bytes_after, squares));
}

// The initial register's term for a buffer of `len` bytes: ~0 * x^(8 len).
PKV_HOST_DEVICE inline uint32_t start_term(uint64_t len, const uint32_t* squares) {
  return multiply(~0u, zeros_operator(len, squares));
}

// The CRC-32C from the start term and every chunk's term XORed together.
PKV_HOST_DEVICE inline uint32_t finish(uint32_t start, uint32_t terms) { return ~(start ^ terms); }

}  // namespace pagedkv::crc32c_gf2
