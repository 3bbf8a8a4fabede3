// cuda/block_crc.cu against the host's crc32c() (crc32c.h, itself checked against RFC 3720's
// values in tests/cpp/test_crc32c.cpp): random blocks of sizes that are and are not multiples
// of 16 bytes, at aligned and odd addresses, more blocks than one launch takes, results written
// into poisoned mapped pinned memory (as the engine's evictions do) and into device memory.
#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

#include "check_util.h"
#include "pagedkv/crc32c.h"

namespace {

// One batch: `count` blocks of `bytes` at `offset` past 16-byte-aligned slots; false on a mismatch.
bool check_batch(std::mt19937_64& rng, size_t bytes, int count, size_t offset, bool to_host) {
  const size_t pitch = (bytes + offset + 15) / 16 * 16;
  std::vector<unsigned char> host(pitch * size_t(count));
  for (auto& b : host) b = (unsigned char)rng();
  unsigned char* dev = nullptr;
  CK(cudaMalloc(&dev, host.size()));
  CK(cudaMemcpy(dev, host.data(), host.size(), cudaMemcpyHostToDevice));
  uint32_t* out = nullptr;      // where the host reads the CRCs
  uint32_t* written = nullptr;  // where the kernel writes them
  if (to_host) {
    CK(cudaHostAlloc(&out, sizeof(uint32_t) * count, cudaHostAllocMapped));
    CK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&written), out, 0));
  } else {
    out = new uint32_t[size_t(count)];
    CK(cudaMalloc(&written, sizeof(uint32_t) * count));
  }
  for (int i = 0; i < count; ++i) out[i] = 0xDEADBEEFu;  // poison
  if (!to_host) CK(cudaMemcpy(written, out, sizeof(uint32_t) * count, cudaMemcpyHostToDevice));
  std::vector<cuda::BlockCrcJob> jobs;
  for (int i = 0; i < count; ++i) jobs.push_back({dev + size_t(i) * pitch + offset, written + i});
  std::shuffle(jobs.begin(), jobs.end(), rng);  // any order of blocks
  CK(cuda::crc32c_blocks(jobs.data(), count, bytes, nullptr));
  CK(cudaDeviceSynchronize());
  if (!to_host) CK(cudaMemcpy(out, written, sizeof(uint32_t) * count, cudaMemcpyDeviceToHost));
  bool ok = true;
  for (int i = 0; i < count && ok; ++i) {
    const uint32_t want = crc32c(host.data() + size_t(i) * pitch + offset, bytes);
    if (out[i] != want) {
      std::printf("FAIL block_crc bytes=%zu offset=%zu block %d of %d: 0x%08x, want 0x%08x\n", bytes, offset, i,
                  count, out[i], want);
      ok = false;
    }
  }
  if (to_host) {
    CK(cudaFreeHost(out));
  } else {
    delete[] out;
    CK(cudaFree(written));
  }
  CK(cudaFree(dev));
  return ok;
}

}  // namespace

// Returns the number of failed batches; counts the batches in `n`.
int check_block_crc(std::mt19937_64& rng, bool quick, int& n) {
  struct Batch {
    size_t bytes;
    int count;
    size_t offset;
  };
  std::vector<Batch> batches = {
      {1, 3, 0},         {15, 2, 0},        {16, 5, 0},         {17, 4, 0},        {4096, 7, 0},
      {16 * 1024 + 16, 9, 0}, {16 * 1024 + 16, 9, 1}, {2 << 20, 3, 0},   {(2 << 20) + 5, 2, 3},
      {81920, 300, 0},  // more blocks than one launch takes (256)
      {2 << 20, 40, 0},  // a Llama-3-8B block (32 layers, 8 KV heads, head_dim 128, block 16, bf16)
  };
  if (!quick)
    for (int i = 0; i < 20; ++i) batches.push_back({size_t(rng() % (3 << 20)) + 1, int(rng() % 12) + 1, size_t(rng() % 16)});
  int fails = 0;
  for (const Batch& b : batches)
    for (bool to_host : {true, false}) {
      ++n;
      fails += !check_batch(rng, b.bytes, b.count, b.offset, to_host);
    }
  return fails;
}
