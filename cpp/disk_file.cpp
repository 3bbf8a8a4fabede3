#include "pagedkv/disk_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "pagedkv/errors.h"

namespace pagedkv {
namespace {

// Throws IoError (OSError in Python) carrying `err`.
template <typename... Args>
[[noreturn]] void fail(int err, const Args&... args) {
  throw IoError(detail::concat(args...), err);
}

bool aligned(const void* p, size_t n) {
  return reinterpret_cast<uintptr_t>(p) % 4096 == 0 && n % 4096 == 0;
}

}  // namespace

DiskFile::DiskFile(const std::string& dir, int64_t num_slots, size_t block_bytes)
    : block_bytes_(block_bytes) {
  PKV_CHECK(!dir.empty(), ArgumentError, "disk_path: the disk tier needs a directory (disk_blocks > 0)");
  std::string templ = dir + "/pagedkv-XXXXXX.kv";
  fd_ = mkstemps(templ.data(), 3);
  if (fd_ < 0) {
    const int err = errno;
    fail(err, "disk_path: cannot create a file in '", dir, "': ", std::strerror(err));
  }
  path_ = templ;
  unlink(path_.c_str());  // the file lives exactly as long as the cache
  const off_t size = off_t(num_slots) * off_t(block_bytes);
  int err = posix_fallocate(fd_, 0, size);
  if (err != 0 && err != EOPNOTSUPP && err != EINVAL) {
    close(fd_);
    fd_ = -1;
    fail(err, "disk_path: cannot reserve ", size, " bytes in '", dir, "': ", std::strerror(err));
  }
  if (err != 0 && ftruncate(fd_, size) != 0) {
    err = errno;
    close(fd_);
    fd_ = -1;
    fail(err, "disk_path: cannot size the file in '", dir, "': ", std::strerror(err));
  }
  if (block_bytes % 4096 == 0) {
    direct_fd_ = open(("/proc/self/fd/" + std::to_string(fd_)).c_str(), O_RDWR | O_DIRECT);
    direct_ = direct_fd_ >= 0;
  }
}

DiskFile::~DiskFile() {
  if (direct_fd_ >= 0) close(direct_fd_);
  if (fd_ >= 0) close(fd_);
}

DiskFile::DiskFile(DiskFile&& o) noexcept { *this = std::move(o); }

DiskFile& DiskFile::operator=(DiskFile&& o) noexcept {
  if (this != &o) {
    if (direct_fd_ >= 0) close(direct_fd_);
    if (fd_ >= 0) close(fd_);
    fd_ = std::exchange(o.fd_, -1);
    direct_fd_ = std::exchange(o.direct_fd_, -1);
    direct_ = o.direct_;
    block_bytes_ = o.block_bytes_;
    path_ = std::move(o.path_);
  }
  return *this;
}

// Bytes [offset, offset + len) of one block through `io` (pread or pwrite), retrying partial
// transfers and EINTR. A read that ends early (the file was cut short under us) is a corrupt
// block, not an I/O error: the bytes the caller would get are not the block's.
template <typename Io>
void DiskFile::transfer(int32_t slot, char* p, size_t offset, size_t len, Io io, bool reading) const {
  const char* what = reading ? "reading" : "writing";
  int fd = direct_ && offset % 4096 == 0 && aligned(p, len) ? direct_fd_ : fd_;
  const off_t base = off_t(slot) * off_t(block_bytes_) + off_t(offset);
  size_t done = 0;
  while (done < len) {
    ssize_t n = io(fd, p + done, len - done, base + off_t(done));
    if (n < 0 && errno == EINTR) continue;
    // O_DIRECT refuses what is not aligned: a transfer the kernel cut short (a file size limit)
    // leaves the rest unaligned. The buffered descriptor finishes it, or reports the real error.
    if (n < 0 && errno == EINVAL && fd == direct_fd_) {
      fd = fd_;
      continue;
    }
    if (n < 0) {
      const int err = errno;
      fail(err, "disk tier: ", what, " block slot ", slot, " of ", path_, " failed: ", std::strerror(err));
    }
    if (n == 0 && reading) {
      std::string why = detail::concat("slot ", slot, " of ", path_, " is cut short (read ", offset + done, " of ",
                                       block_bytes_, " bytes: file truncated?)");
      throw CorruptBlock("disk tier: " + why, EIO, why);
    }
    if (n == 0) fail(EIO, "disk tier: ", what, " block slot ", slot, " of ", path_, " failed: no progress");
    done += size_t(n);
  }
}

void DiskFile::write(int32_t slot, const void* src) {
  transfer(slot, const_cast<char*>(static_cast<const char*>(src)), 0, block_bytes_,
           [](int fd, char* p, size_t n, off_t off) { return pwrite(fd, p, n, off); }, /*reading=*/false);
}

void DiskFile::read(int32_t slot, void* dst, size_t offset, size_t len) const {
  transfer(slot, static_cast<char*>(dst), offset, len,
           [](int fd, char* p, size_t n, off_t off) { return pread(fd, p, n, off); }, /*reading=*/true);
}

}  // namespace pagedkv
