// Where the disk checksum's time goes on a host, outside the engine: four threads write (then read)
// N blocks of B bytes through DiskFile (O_DIRECT), with the CRC-32C placed in each of the ways the
// disk tier could place it, the ways taking turns for R rounds; median ms per round of each.
//   write        pwrite alone                       read        pread alone
//   crc+write    CRC inline, then pwrite            read+crc    pread, then the CRC inline
//   write||crc   CRC on a checksum thread during    crc-alone   the CRC of every block on the
//                the pwrite (the disk tier's                    four threads, no I/O
//                ChecksumThreads, as it does it)
//   crc32+write  crc+write on SSE4.2's crc32 instruction instead of the AVX-512 folding (does
//                512-bit code on the I/O cores slow the writes?)
// The buffer (N x B, larger than the last-level cache by default) is rewritten by memset before
// each write round, as the host tier's slots are rewritten by the copy engines between swaps.
// Build: g++ -O2 -std=c++17 -Iinclude bench/disk_crc_probe.cpp cpp/disk_file.cpp cpp/crc32c.cpp
//        cpp/checksum_threads.cpp -pthread -o build/disk_crc_probe
// Run:   build/disk_crc_probe DIR [N=128] [B_MiB=2] [R=21]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "../cpp/checksum_threads.h"
#include "pagedkv/crc32c.h"
#include "pagedkv/disk_file.h"

using namespace pagedkv;

namespace {

constexpr int kThreads = 4;

double run_threads(int n, const std::function<void(int)>& job) {
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::thread> ts;
  for (int w = 0; w < kThreads; ++w)
    ts.emplace_back([&, w] {
      for (int i = w; i < n; i += kThreads) job(i);
    });
  for (auto& t : ts) t.join();
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return std::fprintf(stderr, "usage: disk_crc_probe DIR [N] [B_MiB] [R]\n"), 2;
  const std::string dir = argv[1];
  const int n = argc > 2 ? std::atoi(argv[2]) : 128;
  const size_t bytes = size_t(argc > 3 ? std::atoi(argv[3]) : 2) << 20;
  const int rounds = argc > 4 ? std::atoi(argv[4]) : 21;
  char* buf = static_cast<char*>(std::aligned_alloc(1 << 21, size_t(n) * bytes));
  std::memset(buf, 1, size_t(n) * bytes);
  DiskFile file(dir, n, bytes);
  std::vector<uint32_t> crcs(static_cast<size_t>(n));
  ChecksumThreads checksums(kThreads, crc32c_best());  // the disk tier's: one per I/O thread
  auto blk = [&](int i) { return buf + size_t(i) * bytes; };
  auto refresh = [&](int r) {  // the host slots get new bytes between swaps (not in the timing)
    for (int i = 0; i < n; ++i) std::memset(blk(i), r & 0xff, bytes);
  };
  std::map<std::string, std::vector<double>> ms;
  for (int r = 0; r <= rounds; ++r) {
    std::vector<std::pair<std::string, std::function<void(int)>>> ways = {
        {"write", [&](int i) { file.write(i, blk(i)); }},
        {"crc+write", [&](int i) { crcs[size_t(i)] = crc32c(blk(i), bytes); file.write(i, blk(i)); }},
        {"write||crc", [&](int i) {
           ChecksumThreads::Pending crc = checksums.start(blk(i), bytes);
           file.write(i, blk(i));
           crcs[size_t(i)] = crc.value();
         }},
        {"crc-alone", [&](int i) { crcs[size_t(i)] = crc32c(blk(i), bytes); }},
        {"crc32+write", [&](int i) {
           crcs[size_t(i)] = crc32c_on(Crc32cPath::crc32, blk(i), bytes);
           file.write(i, blk(i));
         }},
        {"read", [&](int i) { file.read(i, blk(i), 0, bytes); }},
        {"read+crc", [&](int i) { file.read(i, blk(i), 0, bytes); crcs[size_t(i)] ^= crc32c(blk(i), bytes); }},
    };
    if (r % 2) std::reverse(ways.begin(), ways.begin() + 5);  // which write way goes first alternates
    for (auto& [name, job] : ways) {
      if (name.rfind("read", 0) != 0) refresh(r);
      const double t = run_threads(n, job);
      if (r > 0) ms[name].push_back(t);  // round 0: warm-up
    }
  }
  const double gb = double(n) * double(bytes) / 1e9;
  std::printf("disk_crc_probe: %d blocks of %zu MiB, %d threads, %d rounds (median ms per round, GB/s)\n", n,
              bytes >> 20, kThreads, rounds);
  for (auto& [name, v] : ms) {
    std::sort(v.begin(), v.end());
    const double med = v[v.size() / 2];
    std::printf("  %-11s %8.2f ms  %6.2f GB/s\n", name.c_str(), med, gb / med * 1e3);
  }
  std::free(buf);
}
