// The CPU backend: the device tier is host memory, block copies run as memcpy on one worker thread
// behind the same fences as CUDA's copy streams (so CI exercises the ordering), metadata is read in
// place, and attention is the C++ reference (attention_cpu.h).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>

#include "cpu_copy_worker.h"
#include "host_memory.h"
#include "pagedkv/attention_cpu.h"
#include "pagedkv/device_backend.h"
#include "pagedkv/errors.h"
#include "pagedkv/half_convert.h"

namespace pagedkv {
namespace {

class CpuBackend final : public DeviceBackend {
 public:
  using DeviceBackend::send;
  explicit CpuBackend(const CacheConfig& c) : block_bytes_(size_t(c.block_bytes())) {}

  bool on_cuda() const override { return false; }
  int num_sms() const override { return 0; }

  void* allocate(MemoryKind kind, size_t bytes) override {
    PKV_CHECK(kind == MemoryKind::host, ArgumentError, "device: this cache runs on the CPU");
    return host_memory_allocate(bytes);
  }
  void deallocate(MemoryKind, void* p) noexcept override { host_memory_free(p); }
  void* device_address(void*) override { return nullptr; }
  void copy_now(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }

  // The worker runs jobs in order, so a job's `waits` (fences of earlier jobs) have passed by the
  // time it starts; the caller's own work is synchronous, so "after compute" holds too.
  Fence to_host(const std::vector<BlockCopy>& copies, const std::vector<Fence>&, void*) override {
    return copies.empty() ? nullptr : copy(copies);
  }
  Fence to_device(const std::vector<BlockCopy>& copies, const std::vector<Fence>&, void*,
                  bool compute_waits) override {
    if (copies.empty()) return nullptr;
    Fence landed = copy(copies);
    if (compute_waits) fence_wait_host(landed);
    return landed;
  }
  Fence slices_to_device(const std::vector<SliceRun>& runs, const std::vector<Fence>& waits, void*) override {
    if (runs.empty()) return nullptr;
    for (const Fence& f : waits) fence_wait_host(f);
    Fence landed = worker_.submit([runs] {
      for (const SliceRun& r : runs)
        for (size_t i = 0; i < r.count; ++i)
          std::memcpy(static_cast<char*>(r.dst) + i * r.width, static_cast<const char*>(r.src) + i * r.src_pitch,
                      r.width);
    });
    fence_wait_host(landed);
    return landed;
  }
  Fence mark(void*) override { return nullptr; }  // the CPU "stream" is the calling thread: done
  void order_after(const Fence& f, void*) override { fence_wait_host(f); }
  void copy_block(void* dst, const void* src, size_t bytes, void*) override { std::memcpy(dst, src, bytes); }
  void copy_rows(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width, size_t rows, bool,
                 void*) override {
    for (size_t r = 0; r < rows; ++r)
      std::memcpy(static_cast<char*>(dst) + r * dst_pitch, static_cast<const char*>(src) + r * src_pitch, width);
  }
  void synchronize(void*) override {}
  void drain() override { fence_wait_host(worker_.submit([] {})); }  // the worker runs jobs in order

  const int32_t* send(Meta, const int32_t* values, size_t, void*) override { return values; }
  const double* send_rope(const double* table, size_t, void*) override { return table; }

  void write_rows(const CacheConfig& c, const RowWrite& w, void*) override {
    const int32_t bs = c.block_size, H = c.num_kv_heads, D = c.head_dim;
    const size_t es = dtype_size(c.dtype);
    char* base = static_cast<char*>(w.pool);
    const int64_t tile = c.tile_elems();
    for (int32_t r = 0; r < w.rows; ++r) {
      if (w.slot_mapping[r] < 0) continue;  // another rank's row (striped): not stored here
      const int64_t slot = w.slot_mapping[r] / bs, off = w.slot_mapping[r] % bs;
      for (int32_t h = 0; h < H; ++h) {
        const int64_t src = (int64_t(r) * H + h) * D;
        const int64_t kdst = (((slot * c.num_layers + w.layer) * 2 + 0) * H + h) * tile + off * D;
        const int64_t vdst = kdst + int64_t(H) * tile;
        std::memcpy(base + kdst * es, static_cast<const char*>(w.k) + src * es, size_t(D) * es);
        std::memcpy(base + vdst * es, static_cast<const char*>(w.v) + src * es, size_t(D) * es);
      }
    }
  }

  size_t attention_scratch_bytes(const PagedAttentionParams&) override { return 0; }
  size_t scratch_size(Scratch) const override { return 0; }
  const void* grow_scratch(Scratch, size_t) override { return nullptr; }
  void attention(const PagedAttentionParams& p, Scratch, void*) override { attention_cpu(p); }

  void merge_partials(const void* outs, const float* lses, int32_t parts, int64_t rows_heads, int32_t head_dim,
                      DType dtype, void* out, float* lse, void*) override {
    std::vector<float> acc(static_cast<size_t>(head_dim));
    for (int64_t rh = 0; rh < rows_heads; ++rh) {
      float m = -INFINITY;
      for (int32_t i = 0; i < parts; ++i) m = std::max(m, lses[int64_t(i) * rows_heads + rh]);
      float total = 0.f;
      std::fill(acc.begin(), acc.end(), 0.f);
      if (m != -INFINITY) {
        for (int32_t i = 0; i < parts; ++i) {
          const float w = std::exp(lses[int64_t(i) * rows_heads + rh] - m);
          total += w;
          const int64_t at = (int64_t(i) * rows_heads + rh) * head_dim;
          for (int32_t d = 0; d < head_dim; ++d) acc[size_t(d)] += w * load_as_float(outs, at + d, dtype);
        }
      }
      for (int32_t d = 0; d < head_dim; ++d)
        store_from_float(out, rh * head_dim + d, total > 0.f ? acc[size_t(d)] / total : 0.f, dtype);
      if (lse) lse[rh] = total > 0.f ? m + std::log(total) : -INFINITY;
    }
  }

  void* staging(size_t bytes) override {
    if (staging_.size() < bytes) staging_.resize(bytes);
    return staging_.data();
  }
  bool gather_slices(void*, const void*, const std::vector<int32_t>&, int64_t, int64_t, int64_t,
                     const GatherShape&, void*) override {
    return false;
  }
  bool capturing(void*) override { return false; }
  size_t scratch_bytes() const override { return 0; }

 private:
  // Calls issue(dst, src, bytes) once per run of blocks adjacent in both source and destination.
  Fence copy(const std::vector<BlockCopy>& copies) {
    std::vector<std::tuple<void*, const void*, size_t>> runs;
    for_each_run(copies, block_bytes_, [&](void* d, const void* s, size_t n) { runs.emplace_back(d, s, n); });
    return worker_.submit([runs = std::move(runs)] {
      for (const auto& [d, s, n] : runs) std::memcpy(d, s, n);
    });
  }

  size_t block_bytes_;
  std::vector<char> staging_;  // one layer's slices of host blocks passing through attend()
  CpuCopyWorker worker_;       // last: finishes its queued copies before the rest goes
};

}  // namespace

std::unique_ptr<DeviceBackend> make_cpu_backend(const CacheConfig& c) { return std::make_unique<CpuBackend>(c); }

std::unique_ptr<DeviceBackend> make_backend(const CacheConfig& c) {
  return c.on_cuda ? make_cuda_backend(c) : make_cpu_backend(c);
}

}  // namespace pagedkv
