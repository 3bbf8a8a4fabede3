// The disk tier: one preallocated file of block slots under disk_path (disk_file.h), whole blocks
// by pread/pwrite on the store's I/O threads. Every block written carries a CRC-32C (crc32c.h),
// kept in memory beside its slot (the file lives no longer than the engine), and every read checks
// it: a block that comes back different raises CorruptBlock instead of handing out wrong data.
//
// A block that comes with its CRC (write_block_with_crc: computed on the GPU before the block
// left the device, cuda/block_crc.cu, or the one a read checked) is written without reading it
// again. Otherwise its CRC is computed on a checksum thread while its own write runs (both only
// read the buffer), so the write waits for the disk, not for the checksum, when a core is free.
// (On an H100 host any CPU pass over a buffer before or during its O_DIRECT write slowed the
// write ~40%, docs/LAB_NOTES.md: hence the GPU's CRC where there is one.) A block is
// read in pieces, each piece's CRC (continuing the one before) running on a checksum thread while
// the next piece is read: only the last piece's checksum, computed on the I/O thread itself, adds
// to the read. (Without the checksum a block is read in the same pieces, so that benches compare
// the checksum alone.) CacheConfig::disk_read_piece sets the piece (0: whole blocks, the CRC after
// the read) and CacheConfig::disk_crc caps the CRC path: benches time the ways against each other.
// CacheConfig::disk_checksum = false skips both (benches time the checksum's cost with it).
#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <optional>
#include <vector>

#include "checksum_threads.h"
#include "pagedkv/crc32c.h"
#include "pagedkv/disk_file.h"
#include "pagedkv/errors.h"
#include "pagedkv/tier.h"

namespace pagedkv {
namespace {

// Blocks smaller than this are checksummed inline: handing them to another thread would cost
// more than the CRC itself.
constexpr size_t kOverlapMin = 256 << 10;
constexpr int kChecksumThreads = 4;       // one per I/O thread (block_store.cpp, kColdThreads)

class DiskTier final : public TierStorage {
 public:
  explicit DiskTier(const TierSpec& s)
      : TierStorage(s.num_slots, s.block_bytes),
        checksum_(s.cfg.disk_checksum),
        path_(std::min(crc32c_best(), s.cfg.disk_crc)),
        read_piece_(size_t(s.cfg.disk_read_piece)) {
    if (s.num_slots > 0) {
      file_ = DiskFile(s.cfg.disk_path, s.num_slots, s.block_bytes);
      crc_.assign(size_t(s.num_slots), 0);
      if (checksum_ && s.block_bytes >= kOverlapMin) checksums_ = std::make_unique<ChecksumThreads>(kChecksumThreads, path_);
    }
  }
  const char* kind() const override { return "disk"; }

  // (Writes and reads of different slots run on several threads at once: each touches its own
  // entry of crc_, and the store's I/O pool orders a slot's write before any read of it.)
  void write_block(int32_t slot, const void* src) override {
    if (!checksum_) return file_.write(slot, src);
    if (!checksums_) {
      const uint32_t crc = crc32c_on(path_, src, bytes_per_block());
      file_.write(slot, src);
      crc_[size_t(slot)] = crc;
      return;
    }
    ChecksumThreads::Pending crc = checksums_->start(src, bytes_per_block());  // the bytes being written
    file_.write(slot, src);
    crc_[size_t(slot)] = crc.value();
  }

  bool keeps_crc() const override { return checksum_; }
  void write_block_with_crc(int32_t slot, const void* src, uint32_t crc) override {
    file_.write(slot, src);
    if (checksum_) crc_[size_t(slot)] = crc;
  }
  uint32_t block_crc(int32_t slot) const override { return crc_[size_t(slot)]; }

  void read_block(int32_t slot, void* dst) const override {
    const uint32_t got = read_pieces(slot, static_cast<char*>(dst));
    if (!checksum_) return;
    const uint32_t want = crc_[size_t(slot)];
    if (got == want) return;
    const std::string why = detail::concat("slot ", slot, " of ", file_.path(), " fails its checksum (crc32c ",
                                           hex(got), ", written ", hex(want), ")");
    throw CorruptBlock("disk tier: " + why, EIO, why);
  }

 private:
  // Reads a block in pieces of read_piece_ (the same reads with the checksum and without, so
  // benches compare the checksum alone) and returns its CRC (0 without the checksum). Piece i's
  // CRC runs on a checksum thread while piece i + 1 is read; the last piece's, with nothing left
  // to overlap, on this thread. (A block of more than one piece is at least kOverlapMin: it has
  // checksum threads.)
  uint32_t read_pieces(int32_t slot, char* dst) const {
    const size_t n = bytes_per_block();
    std::optional<ChecksumThreads::Pending> before;
    uint32_t crc = 0;
    const size_t piece = read_piece_ == 0 ? n : read_piece_;
    for (size_t at = 0; at < n; at += piece) {
      const size_t len = std::min(piece, n - at);
      file_.read(slot, dst + at, at, len);
      if (!checksum_) continue;
      if (before) crc = before->value();
      if (at + len == n) return crc32c_on(path_, dst + at, len, crc);
      before.emplace(checksums_->start(dst + at, len, crc));
    }
    return crc;
  }
  static std::string hex(uint32_t v) {
    char s[11];
    std::snprintf(s, sizeof s, "0x%08x", v);
    return s;
  }
  bool checksum_;
  Crc32cPath path_;    // CacheConfig::disk_crc, or below it where this CPU lacks it
  size_t read_piece_;  // bytes (a multiple of 4096, at least kOverlapMin: config.cpp), 0: whole blocks
  DiskFile file_;
  std::vector<uint32_t> crc_;  // [capacity] the CRC-32C of the block last written to each slot
  std::unique_ptr<ChecksumThreads> checksums_;  // with the checksum, for blocks of kOverlapMin or more
};

}  // namespace

std::unique_ptr<TierStorage> make_disk_tier(const TierSpec& spec) { return std::make_unique<DiskTier>(spec); }

}  // namespace pagedkv
