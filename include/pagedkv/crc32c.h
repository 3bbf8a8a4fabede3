// CRC-32C (Castagnoli, the iSCSI / ext4 / RocksDB checksum): the disk tier's per-block checksum
// (docs/DESIGN.md, disk integrity). SSE4.2's crc32 instruction on three interleaved streams when
// the CPU has it (checked once at run time), slicing-by-8 tables otherwise; both give the same
// value. crc32c("123456789") == 0xE3069283.
#pragma once
#include <cstddef>
#include <cstdint>

namespace pagedkv {

// The CRC-32C of `len` bytes at `data`, continuing from `crc` (the value of the bytes before them;
// 0 to start).
uint32_t crc32c(const void* data, size_t len, uint32_t crc = 0);
// The portable path alone (tests compare the two).
uint32_t crc32c_portable(const void* data, size_t len, uint32_t crc = 0);
// Whether crc32c() runs on the CPU's crc32 instruction.
bool crc32c_hardware();

}  // namespace pagedkv
