// Whole-block copies between the device tier and the pinned host tier. On CUDA they run on one
// stream per direction, ordered against the caller's compute stream by events, and never block
// the host; on the CPU a worker thread runs them as memcpy, behind the same fences. Adjacent
// blocks merge into one copy.
#pragma once
#include <cstddef>
#include <functional>
#include <memory>
#include <vector>

#include "pagedkv/config.h"
#include "pagedkv/fence.h"

namespace pagedkv {

class CpuCopyWorker;

struct BlockCopy {
  void* dst;        // one block of `block_bytes` in the destination tier
  const void* src;  // one block in the source tier
};

// `count` pieces of `width` bytes, `src_pitch` apart in the source, back to back at `dst`: one
// layer's part of consecutive host blocks (a 2-D copy).
struct SliceRun {
  void* dst;
  const void* src;
  size_t width;
  size_t src_pitch;
  size_t count;
};

class CopyEngine {
 public:
  CopyEngine(bool cuda, int device, size_t block_bytes, CopyBatch batch = CopyBatch::batch);
  ~CopyEngine();
  CopyEngine(const CopyEngine&) = delete;
  CopyEngine& operator=(const CopyEngine&) = delete;

  // Device -> host after everything enqueued on `compute` so far (kernels that wrote or read the
  // blocks) and after `waits` (host slots an earlier copy still reads). The returned fence passes when the host copies are complete and the device sources
  // may be overwritten.
  Fence to_host(const std::vector<BlockCopy>& copies, const std::vector<Fence>& waits, void* compute);
  // Host -> device after `compute`'s work so far (slots freed by kernels) and after `waits`
  // (host copies still landing, device slots still being read). With `compute_waits`, `compute`
  // waits for the copies before its next work; without (prefetches), the caller keeps the fence
  // and orders a reader after it when one comes.
  Fence to_device(const std::vector<BlockCopy>& copies, const std::vector<Fence>& waits, void* compute,
                  bool compute_waits = true);

  // Host -> device slices, ordered like to_device with compute_waits: after `compute`'s work so
  // far (a kernel may still read the destination) and `waits`; `compute` waits for them.
  Fence slices_to_device(const std::vector<SliceRun>& runs, const std::vector<Fence>& waits, void* compute);

  // A fence that passes when everything enqueued on `stream` so far is done.
  Fence mark(void* stream);

  // `stream` waits (on the device, not the host) for `f` to pass.
  void order_after(const Fence& f, void* stream);

  size_t block_bytes() const { return block_bytes_; }

 private:
  template <typename Issue>
  void merged(const std::vector<BlockCopy>& copies, Issue&& issue) const;
  // Issues the merged runs of `copies` on `stream` (CUDA builds only; kind: a cudaMemcpyKind).
  void issue_runs(const std::vector<BlockCopy>& copies, void* stream, int kind) const;
  Fence cpu_copy(const std::vector<BlockCopy>& copies);
  Fence on_h2d_stream(const std::vector<Fence>& waits, void* compute, bool compute_waits,
                      const std::function<void(void*)>& issue);  // CUDA builds only
  bool cuda_;
  int device_;
  size_t block_bytes_;
  void* d2h_ = nullptr;  // cudaStream_t
  void* h2d_ = nullptr;  // cudaStream_t
  // Several runs go to the driver as one cudaMemcpyBatchAsync (CacheConfig::copy_batch: off = one
  // cudaMemcpyAsync each; overlap = the batch hints cudaMemcpyFlagPreferOverlapWithCompute).
  bool batch_ = true;
  unsigned batch_flags_ = 0;
  std::unique_ptr<CpuCopyWorker> worker_;  // CPU tiers: copies run on this thread
};

}  // namespace pagedkv
