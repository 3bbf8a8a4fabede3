#include "pagedkv/disk_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "pagedkv/errors.h"

namespace pagedkv {
namespace {

std::string errno_text() { return std::strerror(errno); }

bool aligned(const void* p, size_t n) {
  return reinterpret_cast<uintptr_t>(p) % 4096 == 0 && n % 4096 == 0;
}

}  // namespace

DiskFile::DiskFile(const std::string& dir, int64_t num_slots, size_t block_bytes)
    : block_bytes_(block_bytes) {
  PKV_CHECK(!dir.empty(), ArgumentError, "disk_path: the disk tier needs a directory (disk_blocks > 0)");
  std::string templ = dir + "/pagedkv-XXXXXX.kv";
  fd_ = mkstemps(templ.data(), 3);
  PKV_CHECK(fd_ >= 0, ArgumentError, "disk_path: cannot create a file in '", dir, "': ", errno_text());
  path_ = templ;
  unlink(path_.c_str());  // the file lives exactly as long as the cache
  const off_t size = off_t(num_slots) * off_t(block_bytes);
  int err = posix_fallocate(fd_, 0, size);
  if (err != 0 && err != EOPNOTSUPP && err != EINVAL) {
    close(fd_);
    fd_ = -1;
    PKV_FAIL(ArgumentError, "disk_path: cannot reserve ", size, " bytes in '", dir, "': ", std::strerror(err));
  }
  if (err != 0 && ftruncate(fd_, size) != 0) {
    const std::string why = errno_text();
    close(fd_);
    fd_ = -1;
    PKV_FAIL(ArgumentError, "disk_path: cannot size the file in '", dir, "': ", why);
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

// One whole block through `io` (pread or pwrite), retrying partial transfers and EINTR.
template <typename Io>
void DiskFile::whole_block(int32_t slot, char* p, Io io, const char* what, const char* at_eof) const {
  const int fd = direct_ && aligned(p, block_bytes_) ? direct_fd_ : fd_;
  size_t done = 0;
  while (done < block_bytes_) {
    ssize_t n = io(fd, p + done, block_bytes_ - done, off_t(slot) * off_t(block_bytes_) + off_t(done));
    if (n < 0 && errno == EINTR) continue;
    PKV_CHECK(n > 0, Error, "disk tier: ", what, " block slot ", slot, " of ", path_, " failed: ",
              n == 0 ? at_eof : errno_text());
    done += size_t(n);
  }
}

void DiskFile::write(int32_t slot, const void* src) {
  whole_block(slot, const_cast<char*>(static_cast<const char*>(src)),
              [](int fd, char* p, size_t n, off_t off) { return pwrite(fd, p, n, off); }, "writing",
              "no progress");
}

void DiskFile::read(int32_t slot, void* dst) const {
  whole_block(slot, static_cast<char*>(dst),
              [](int fd, char* p, size_t n, off_t off) { return pread(fd, p, n, off); }, "reading",
              "short read (file truncated?)");
}

}  // namespace pagedkv
