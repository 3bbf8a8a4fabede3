// CRC-32C (Castagnoli, the iSCSI / ext4 / RocksDB checksum): the disk tier's per-block checksum
// (docs/DESIGN.md, disk integrity). Carry-less-multiply folding (AVX-512 VPCLMULQDQ) or SSE4.2's
// crc32 instruction on three interleaved streams when the CPU has them (checked once at run time),
// slicing-by-8 tables otherwise; all give the same value. crc32c("123456789") == 0xE3069283.
#pragma once
#include <cstddef>
#include <cstdint>

namespace pagedkv {

// The CRC-32C of `len` bytes at `data`, continuing from `crc` (the value of the bytes before them;
// 0 to start).
uint32_t crc32c(const void* data, size_t len, uint32_t crc = 0);
// The portable path alone (tests compare the two).
uint32_t crc32c_portable(const void* data, size_t len, uint32_t crc = 0);
// Whether crc32c() runs on CPU instructions made for it (folding or crc32), not on the tables.
bool crc32c_hardware();

// The ways crc32c() can run; it takes the fastest this CPU has (checked once); the disk tier runs
// at most CacheConfig::disk_crc's (crc32 by default). All give the same value. fold: carry-less
// multiplies on 512-bit registers (AVX-512 + VPCLMULQDQ), about twice the crc32 instruction's rate
// on long blocks on one thread; crc32: SSE4.2's crc32 on three streams; portable: slicing-by-8
// tables.
enum class Crc32cPath { portable, crc32, fold };
Crc32cPath crc32c_best();
const char* crc32c_path_name(Crc32cPath path);
// crc32c() on `path`, or on the best path below it that this CPU has (tests, benches).
uint32_t crc32c_on(Crc32cPath path, const void* data, size_t len, uint32_t crc = 0);

}  // namespace pagedkv
