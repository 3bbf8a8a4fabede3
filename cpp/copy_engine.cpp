#include "pagedkv/copy_engine.h"

#include <cstring>
#include <tuple>

#include "cpu_copy_worker.h"
#include "fence_state.h"
#include "pagedkv/errors.h"
#ifdef PAGEDKV_WITH_CUDA
#include "pagedkv/cuda_context.h"
#endif

namespace pagedkv {

bool fence_done(const Fence& f) {
  if (!f) return true;
#ifdef PAGEDKV_WITH_CUDA
  if (!f->event) return f->done.load();
  const cudaError_t err = cudaEventQuery(f->event);
  if (err == cudaErrorNotReady) {
    cudaGetLastError();
    return false;
  }
  PKV_CUDA(err);
  return true;
#else
  return f->done.load();
#endif
}

void fence_wait_host(const Fence& f) {
  if (!f) return;
#ifdef PAGEDKV_WITH_CUDA
  if (f->event) {
    PKV_CUDA(cudaEventSynchronize(f->event));
    return;
  }
#endif
  f->wait();
}

namespace {
#ifdef PAGEDKV_WITH_CUDA
Fence record(cudaStream_t s) {
  auto f = std::make_shared<FenceState>();
  PKV_CUDA(cudaEventCreateWithFlags(&f->event, cudaEventDisableTiming));
  PKV_CUDA(cudaEventRecord(f->event, s));
  return f;
}
#endif
}  // namespace

CopyEngine::CopyEngine(bool cuda, int device, size_t block_bytes, CopyBatch batch)
    : cuda_(cuda), device_(device), block_bytes_(block_bytes) {
#ifdef PAGEDKV_WITH_CUDA
  if (cuda_) {
    DeviceGuard guard(device_);
    cudaStream_t a = nullptr, b = nullptr;
    PKV_CUDA(cudaStreamCreateWithFlags(&a, cudaStreamNonBlocking));
    PKV_CUDA(cudaStreamCreateWithFlags(&b, cudaStreamNonBlocking));
    d2h_ = a;
    h2d_ = b;
    batch_ = batch != CopyBatch::off;
#if CUDART_VERSION >= 13000
    if (batch == CopyBatch::overlap) batch_flags_ = cudaMemcpyFlagPreferOverlapWithCompute;
#endif
  }
#endif
  if (!cuda_) worker_ = std::make_unique<CpuCopyWorker>();
}

CopyEngine::~CopyEngine() {
#ifdef PAGEDKV_WITH_CUDA
  if (d2h_) cudaStreamDestroy(static_cast<cudaStream_t>(d2h_));
  if (h2d_) cudaStreamDestroy(static_cast<cudaStream_t>(h2d_));
#endif
}

// Calls issue(dst, src, bytes) once per run of blocks adjacent in both source and destination.
template <typename Issue>
void CopyEngine::merged(const std::vector<BlockCopy>& copies, Issue&& issue) const {
  size_t i = 0;
  while (i < copies.size()) {
    size_t j = i + 1;
    while (j < copies.size() &&
           static_cast<char*>(copies[j].dst) == static_cast<char*>(copies[j - 1].dst) + block_bytes_ &&
           static_cast<const char*>(copies[j].src) == static_cast<const char*>(copies[j - 1].src) + block_bytes_)
      ++j;
    issue(copies[i].dst, copies[i].src, (j - i) * block_bytes_);
    i = j;
  }
}

// The worker runs jobs in order, so a CPU job's `waits` (fences of earlier jobs) have passed
// by the time it starts; the caller's own work is synchronous, so "after compute" holds too.
Fence CopyEngine::cpu_copy(const std::vector<BlockCopy>& copies) {
  std::vector<std::tuple<void*, const void*, size_t>> runs;
  merged(copies, [&](void* d, const void* s, size_t n) { runs.emplace_back(d, s, n); });
  return worker_->submit([runs = std::move(runs)] {
    for (const auto& [d, s, n] : runs) std::memcpy(d, s, n);
  });
}

Fence CopyEngine::to_host(const std::vector<BlockCopy>& copies, const std::vector<Fence>& waits,
                          void* compute) {
  if (copies.empty()) return nullptr;
  if (!cuda_) return cpu_copy(copies);
#ifdef PAGEDKV_WITH_CUDA
  auto st = static_cast<cudaStream_t>(d2h_);
  Fence after_compute = record(static_cast<cudaStream_t>(compute));
  PKV_CUDA(cudaStreamWaitEvent(st, after_compute->event, 0));
  for (const Fence& f : waits)
    if (f && !fence_done(f)) PKV_CUDA(cudaStreamWaitEvent(st, f->event, 0));
  issue_runs(copies, st, cudaMemcpyDeviceToHost);
  return record(st);
#else
  (void)waits;
  (void)compute;
  return nullptr;
#endif
}

#ifdef PAGEDKV_WITH_CUDA
void CopyEngine::issue_runs(const std::vector<BlockCopy>& copies, void* stream, int kind) const {
  auto st = static_cast<cudaStream_t>(stream);
  std::vector<void*> dsts;
  std::vector<const void*> srcs;
  std::vector<size_t> sizes;
  merged(copies, [&](void* d, const void* s, size_t n) {
    dsts.push_back(d);
    srcs.push_back(s);
    sizes.push_back(n);
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
  for (size_t i = 0; i < dsts.size(); ++i)
    PKV_CUDA(cudaMemcpyAsync(dsts[i], srcs[i], sizes[i], cudaMemcpyKind(kind), st));
}

// Host -> device work on the H2D stream after `compute`'s work so far and after `waits`; with
// `compute_waits`, `compute` waits for it in turn.
Fence CopyEngine::on_h2d_stream(const std::vector<Fence>& waits, void* compute, bool compute_waits,
                                const std::function<void(void*)>& issue) {
  auto st = static_cast<cudaStream_t>(h2d_);
  auto cs = static_cast<cudaStream_t>(compute);
  Fence after_compute = record(cs);
  PKV_CUDA(cudaStreamWaitEvent(st, after_compute->event, 0));
  for (const Fence& f : waits)
    if (f && !fence_done(f)) PKV_CUDA(cudaStreamWaitEvent(st, f->event, 0));
  issue(st);
  Fence landed = record(st);
  if (compute_waits) PKV_CUDA(cudaStreamWaitEvent(cs, landed->event, 0));
  return landed;
}
#endif

Fence CopyEngine::to_device(const std::vector<BlockCopy>& copies, const std::vector<Fence>& waits,
                            void* compute, bool compute_waits) {
  if (copies.empty()) return nullptr;
  if (!cuda_) {
    Fence landed = cpu_copy(copies);
    if (compute_waits) fence_wait_host(landed);
    return landed;
  }
#ifdef PAGEDKV_WITH_CUDA
  return on_h2d_stream(waits, compute, compute_waits,
                       [&](void* st) { issue_runs(copies, st, cudaMemcpyHostToDevice); });
#else
  (void)waits;
  (void)compute;
  (void)compute_waits;
  return nullptr;
#endif
}

Fence CopyEngine::slices_to_device(const std::vector<SliceRun>& runs, const std::vector<Fence>& waits,
                                   void* compute) {
  if (runs.empty()) return nullptr;
  if (!cuda_) {
    for (const Fence& f : waits) fence_wait_host(f);
    Fence landed = worker_->submit([runs] {
      for (const SliceRun& r : runs)
        for (size_t i = 0; i < r.count; ++i)
          std::memcpy(static_cast<char*>(r.dst) + i * r.width, static_cast<const char*>(r.src) + i * r.src_pitch,
                      r.width);
    });
    fence_wait_host(landed);
    return landed;
  }
#ifdef PAGEDKV_WITH_CUDA
  return on_h2d_stream(waits, compute, true, [&](void* st) {
    for (const SliceRun& r : runs)
      PKV_CUDA(cudaMemcpy2DAsync(r.dst, r.width, r.src, r.src_pitch, r.width, r.count, cudaMemcpyHostToDevice,
                                 static_cast<cudaStream_t>(st)));
  });
#else
  (void)compute;
  return nullptr;
#endif
}

Fence CopyEngine::mark(void* stream) {
#ifdef PAGEDKV_WITH_CUDA
  if (cuda_) return record(static_cast<cudaStream_t>(stream));
#endif
  (void)stream;
  return nullptr;  // the CPU "stream" is the calling thread: its work is already done
}

void CopyEngine::order_after(const Fence& f, void* stream) {
  if (!f || fence_done(f)) return;
  if (!cuda_) return fence_wait_host(f);  // the CPU "stream" is the calling thread
#ifdef PAGEDKV_WITH_CUDA
  PKV_CUDA(cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), f->event, 0));
#else
  (void)stream;
#endif
}

}  // namespace pagedkv
