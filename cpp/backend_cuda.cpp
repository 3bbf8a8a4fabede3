// The CUDA backend: the only engine file that knows CUDA. It owns the copy streams (one per
// direction, ordered against the caller's compute stream by events), the device buffers of
// per-call metadata and split-K scratch (cuda_context.h), and the launches of
// include/pagedkv/kernels.h. Never makes a CUDA call before a CUDA cache is made.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <functional>

#include "fence_state.h"
#include "host_memory.h"
#include "cuda_context.h"
#include "pagedkv/device_backend.h"
#include "pagedkv/errors.h"
#include "pagedkv/kernels.h"

namespace pagedkv {

// cpp/merge_partials.cu
cudaError_t merge_partials_cuda(const void* outs, const float* lses, int32_t parts, int64_t rows_heads,
                                int32_t head_dim, DType dtype, void* out, float* lse, cudaStream_t stream);

namespace {

struct CudaFence final : FenceState {
  cudaEvent_t event = nullptr;
  ~CudaFence() override {
    if (event) cudaEventDestroy(event);
  }
  bool done() override {
    const cudaError_t err = cudaEventQuery(event);
    if (err == cudaErrorNotReady) {
      cudaGetLastError();
      return false;
    }
    PKV_CUDA(err);
    return true;
  }
  void wait() override { PKV_CUDA(cudaEventSynchronize(event)); }
};

Fence record(cudaStream_t s) {
  auto f = std::make_shared<CudaFence>();
  PKV_CUDA(cudaEventCreateWithFlags(&f->event, cudaEventDisableTiming));
  PKV_CUDA(cudaEventRecord(f->event, s));
  return f;
}

cudaEvent_t event_of(const Fence& f) { return static_cast<CudaFence*>(f.get())->event; }

cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

class CudaBackend final : public DeviceBackend {
 public:
  using DeviceBackend::send;
  explicit CudaBackend(const CacheConfig& c)
      : device_(c.cuda_device), block_bytes_(size_t(c.block_bytes())), ctx_(c.cuda_device) {
    DeviceGuard guard(device_);
    cudaStream_t a = nullptr, b = nullptr, k = nullptr;
    PKV_CUDA(cudaStreamCreateWithFlags(&a, cudaStreamNonBlocking));
    PKV_CUDA(cudaStreamCreateWithFlags(&b, cudaStreamNonBlocking));
    PKV_CUDA(cudaStreamCreateWithFlags(&k, cudaStreamNonBlocking));
    d2h_ = a;
    h2d_ = b;
    crc_ = k;
    batch_ = c.copy_batch != CopyBatch::off;
#if CUDART_VERSION >= 13000
    if (c.copy_batch == CopyBatch::overlap) batch_flags_ = cudaMemcpyFlagPreferOverlapWithCompute;
#endif
  }
  ~CudaBackend() override {
    if (d2h_) cudaStreamDestroy(d2h_);
    if (h2d_) cudaStreamDestroy(h2d_);
    if (crc_) cudaStreamDestroy(crc_);
  }

  bool on_cuda() const override { return true; }
  int num_sms() const override { return ctx_.num_sms(); }

  void* allocate(MemoryKind kind, size_t bytes) override {
    if (kind == MemoryKind::host) return host_memory_allocate(bytes);
    DeviceGuard guard(device_);
    void* p = nullptr;
    cudaError_t err = kind == MemoryKind::cuda_device ? cudaMalloc(&p, bytes)
                                                      : cudaHostAlloc(&p, bytes, cudaHostAllocMapped);
    if (err == cudaErrorMemoryAllocation) {
      cudaGetLastError();
      PKV_FAIL(OutOfBlocks, "could not allocate ", bytes, " bytes of ",
               kind == MemoryKind::cuda_device ? "GPU" : "pinned host", " memory");
    }
    PKV_CUDA(err);
    return p;
  }
  void deallocate(MemoryKind kind, void* p) noexcept override {
    if (kind == MemoryKind::host) return host_memory_free(p);
    int prev = 0;
    cudaGetDevice(&prev);
    cudaSetDevice(device_);
    if (kind == MemoryKind::cuda_device) cudaFree(p); else cudaFreeHost(p);
    cudaSetDevice(prev);
  }
  void* device_address(void* pinned_host) override {
    if (!pinned_host) return nullptr;
    DeviceGuard guard(device_);
    void* d = nullptr;
    PKV_CUDA(cudaHostGetDevicePointer(&d, pinned_host, 0));
    return d;
  }
  void copy_now(void* dst, const void* src, size_t bytes) override {
    PKV_CUDA(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault));
  }

  Fence to_host(const std::vector<BlockCopy>& copies, const std::vector<Fence>& waits, void* compute) override {
    if (copies.empty()) return nullptr;
    Fence after_compute = record(as_stream(compute));
    PKV_CUDA(cudaStreamWaitEvent(d2h_, event_of(after_compute), 0));
    for (const Fence& f : waits)
      if (f && !fence_done(f)) PKV_CUDA(cudaStreamWaitEvent(d2h_, event_of(f), 0));
    // The checksums run on their own stream beside the copies (they read the same bytes, written
    // before the copies start), and the fence waits for both.
    std::vector<cuda::BlockCrcJob> jobs;
    for (const BlockCopy& c : copies)
      if (c.crc) jobs.push_back({c.src, c.crc});
    Fence checksummed;
    if (!jobs.empty()) {
      PKV_CUDA(cudaStreamWaitEvent(crc_, event_of(record(d2h_)), 0));
      PKV_CUDA(cuda::crc32c_blocks(jobs.data(), int64_t(jobs.size()), block_bytes_, crc_));
      checksummed = record(crc_);
    }
    issue_runs(copies, d2h_, cudaMemcpyDeviceToHost);
    if (checksummed) PKV_CUDA(cudaStreamWaitEvent(d2h_, event_of(checksummed), 0));
    return record(d2h_);
  }
  bool checksums_blocks() const override { return true; }
  Fence to_device(const std::vector<BlockCopy>& copies, const std::vector<Fence>& waits, void* compute,
                  bool compute_waits) override {
    if (copies.empty()) return nullptr;
    return on_h2d_stream(waits, compute, compute_waits,
                         [&](cudaStream_t st) { issue_runs(copies, st, cudaMemcpyHostToDevice); });
  }
  Fence slices_to_device(const std::vector<SliceRun>& runs, const std::vector<Fence>& waits, void* compute) override {
    if (runs.empty()) return nullptr;
    return on_h2d_stream(waits, compute, true, [&](cudaStream_t st) {
      for (const SliceRun& r : runs)
        PKV_CUDA(cudaMemcpy2DAsync(r.dst, r.width, r.src, r.src_pitch, r.width, r.count, cudaMemcpyHostToDevice, st));
    });
  }
  Fence mark(void* stream) override { return record(as_stream(stream)); }
  void order_after(const Fence& f, void* stream) override {
    if (!f || fence_done(f)) return;
    PKV_CUDA(cudaStreamWaitEvent(as_stream(stream), event_of(f), 0));
  }
  void copy_block(void* dst, const void* src, size_t bytes, void* stream) override {
    PKV_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, as_stream(stream)));
  }
  void copy_rows(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width, size_t rows,
                 bool src_on_device, void* stream) override {
    PKV_CUDA(cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, rows,
                               src_on_device ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice, as_stream(stream)));
  }
  void synchronize(void* stream) override { PKV_CUDA(cudaStreamSynchronize(as_stream(stream))); }
  void drain() override {
    cudaStreamSynchronize(d2h_);
    cudaStreamSynchronize(h2d_);
  }

  const int32_t* send(Meta which, const int32_t* values, size_t count, void* stream) override {
    return meta(which).send(ctx_, values, count, as_stream(stream));
  }
  const double* send_rope(const double* table, size_t count, void* stream) override {
    return ctx_.sink_rope.send(ctx_, table, count, as_stream(stream));
  }

  void write_rows(const CacheConfig& c, const RowWrite& w, void* stream) override {
    cuda::KVWriteParams p;
    p.k = w.k;
    p.v = w.v;
    p.pool = w.pool;
    p.slot_mapping = w.on_device ? w.on_device : send(Meta::slot_map, w.slot_mapping, size_t(w.rows), stream);
    p.num_rows = w.rows;
    p.num_kv_heads = c.num_kv_heads;
    p.head_dim = c.head_dim;
    p.block_size = c.block_size;
    p.num_layers = c.num_layers;
    p.layer = w.layer;
    p.dtype = c.dtype;
    PKV_CUDA(cuda::kv_write(p, as_stream(stream)));
  }

  size_t attention_scratch_bytes(const PagedAttentionParams& p) override {
    return cuda::paged_attention_workspace_bytes(p, ctx_.num_sms());
  }
  size_t scratch_size(Scratch which) const override { return scratch(which).bytes(); }
  const void* grow_scratch(Scratch which, size_t bytes) override { return scratch(which).reserve(bytes); }
  void attention(const PagedAttentionParams& p, Scratch which, void* stream) override {
    DeviceBuffer& ws = scratch(which);
    size_t bytes = ws.bytes();
    void* data = ws.data();
    if (which == Scratch::call) {
      bytes = attention_scratch_bytes(p);
      data = bytes ? ws.reserve(bytes) : nullptr;
    }
    PKV_CUDA(cuda::paged_attention(p, data, bytes, ctx_.num_sms(), as_stream(stream)));
  }
  void merge_partials(const void* outs, const float* lses, int32_t parts, int64_t rows_heads, int32_t head_dim,
                      DType dtype, void* out, float* lse, void* stream) override {
    PKV_CUDA(merge_partials_cuda(outs, lses, parts, rows_heads, head_dim, dtype, out, lse, as_stream(stream)));
  }

  void* staging(size_t bytes) override { return ctx_.staging.reserve(bytes); }
  bool gather_slices(void* dst, const void* host_mapped, const std::vector<int32_t>& slots, int64_t slice_bytes,
                     int64_t block_bytes, int64_t offset, const GatherShape& shape, void* stream) override {
    const cudaStream_t st = as_stream(stream);
    const int32_t* on_device = send(Meta::staged_slots, slots, stream);
    PKV_CUDA(cuda::gather_from_mapped_host(dst, host_mapped, on_device, int64_t(slots.size()), slice_bytes,
                                           block_bytes, offset, ctx_.num_sms(), st, shape));
    return true;
  }
  bool capturing(void* stream) override {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    PKV_CUDA(cudaStreamIsCapturing(as_stream(stream), &capture));
    return capture != cudaStreamCaptureStatusNone;
  }
  size_t scratch_bytes() const override { return ctx_.scratch_bytes(); }

 private:
  DeviceInts& meta(Meta which) {
    switch (which) {
      case Meta::table: return ctx_.table;
      case Meta::attn_meta: return ctx_.attn_meta;
      case Meta::slot_map: return ctx_.slot_map;
      case Meta::call_table: return ctx_.call_table;
      case Meta::call_lens: return ctx_.call_lens;
      case Meta::call_indptr: return ctx_.call_indptr;
      case Meta::staged_slots: return ctx_.staged_slots;
      case Meta::step_meta: return ctx_.step_meta;
      default: return ctx_.step_table;
    }
  }
  DeviceBuffer& scratch(Scratch which) const {
    return which == Scratch::step ? ctx_.step_workspace : ctx_.workspace;
  }

  // Issues the runs of `copies` adjacent in both source and destination as one copy each; several
  // go to the driver as one cudaMemcpyBatchAsync (CacheConfig::copy_batch).
  void issue_runs(const std::vector<BlockCopy>& copies, cudaStream_t st, cudaMemcpyKind kind) const {
    std::vector<void*> dsts;
    std::vector<const void*> srcs;
    std::vector<size_t> sizes;
    for_each_run(copies, block_bytes_, [&](void* d, const void* s, size_t n) {
      dsts.push_back(d), srcs.push_back(s), sizes.push_back(n);
    });
#if CUDART_VERSION >= 13000  // (12.8 has the call with another signature; older ones lack it)
    if (batch_ && dsts.size() > 1) {
      // One batch: the driver sees every copy at once (sources read in stream order, like the rest).
      cudaMemcpyAttributes attr = {};
      attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
      attr.flags = batch_flags_;
      size_t first = 0;
      PKV_CUDA(cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), dsts.size(), &attr, &first, 1, st));
      return;
    }
#endif
    for (size_t k = 0; k < dsts.size(); ++k) PKV_CUDA(cudaMemcpyAsync(dsts[k], srcs[k], sizes[k], kind, st));
  }

  // Host -> device work on the H2D stream after `compute`'s work so far and after `waits`; with
  // `compute_waits`, `compute` waits for it in turn.
  Fence on_h2d_stream(const std::vector<Fence>& waits, void* compute, bool compute_waits,
                      const std::function<void(cudaStream_t)>& issue) {
    const cudaStream_t cs = as_stream(compute);
    Fence after_compute = record(cs);
    PKV_CUDA(cudaStreamWaitEvent(h2d_, event_of(after_compute), 0));
    for (const Fence& f : waits)
      if (f && !fence_done(f)) PKV_CUDA(cudaStreamWaitEvent(h2d_, event_of(f), 0));
    issue(h2d_);
    Fence landed = record(h2d_);
    if (compute_waits) PKV_CUDA(cudaStreamWaitEvent(cs, event_of(landed), 0));
    return landed;
  }

  int device_;
  size_t block_bytes_;
  mutable CudaContext ctx_;
  cudaStream_t d2h_ = nullptr;
  cudaStream_t h2d_ = nullptr;
  cudaStream_t crc_ = nullptr;  // checksums of blocks going down, beside their copies (to_host)
  bool batch_ = true;
  unsigned batch_flags_ = 0;
};

}  // namespace

std::unique_ptr<DeviceBackend> make_cuda_backend(const CacheConfig& c) {
  PKV_CHECK(c.dtype != DType::f32, TypeMismatch, "dtype: the CUDA kernels take float16 or bfloat16, got float32");
  const int32_t d = c.head_dim;
  PKV_CHECK(d == 64 || d == 80 || d == 96 || d == 128 || d == 256, ArgumentError,
            "head_dim: the CUDA kernels take 64, 80, 96, 128 or 256, got ", d);
  return std::make_unique<CudaBackend>(c);
}

bool built_with_cuda() { return true; }

bool cuda_usable() { return cuda_device_present(); }

}  // namespace pagedkv
