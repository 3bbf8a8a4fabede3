// The disk tier: one preallocated file of block-sized slots under `disk_path`, written a whole
// block and read whole or in pieces (O_DIRECT when the file system and the sizes allow it). The
// positional calls are safe from several threads at once: the engine runs a batch on its I/O
// threads (cpp/io_pool.h).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace pagedkv {

class DiskFile {
 public:
  DiskFile() = default;
  // Creates and sizes the file; throws IoError (with errno) naming disk_path when that fails.
  DiskFile(const std::string& dir, int64_t num_slots, size_t block_bytes);
  ~DiskFile();
  DiskFile(const DiskFile&) = delete;
  DiskFile& operator=(const DiskFile&) = delete;
  DiskFile(DiskFile&& o) noexcept;
  DiskFile& operator=(DiskFile&& o) noexcept;

  // A whole block written; bytes [offset, offset + len) of a block read into dst (the disk tier
  // reads a block in pieces, to check each while the next is read). A failed transfer throws
  // IoError (with errno), a read cut short by the end of the file CorruptBlock, and leaves the
  // caller's state to it: callers change block locations only after these return.
  void write(int32_t slot, const void* src);
  void read(int32_t slot, void* dst, size_t offset, size_t len) const;

  const std::string& path() const { return path_; }

 private:
  template <typename Io>
  void transfer(int32_t slot, char* p, size_t offset, size_t len, Io io, bool reading) const;
  int fd_ = -1;
  int direct_fd_ = -1;  // the same file opened with O_DIRECT, or -1
  bool direct_ = false;
  size_t block_bytes_ = 0;
  std::string path_;
};

}  // namespace pagedkv
