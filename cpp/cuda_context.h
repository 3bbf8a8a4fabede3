// The engine's CUDA-side state: device properties, grow-only device buffers for per-call metadata
// and split-K scratch, and a pinned staging ring for host -> device metadata copies.
// Private to the CUDA backend (backend_cuda.cpp); only CUDA builds compile it.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace pagedkv {

// Throws CudaError with the call's text and the CUDA message when `err` is not cudaSuccess.
void cuda_check(cudaError_t err, const char* what, const char* file, int line);
#define PKV_CUDA(call) ::pagedkv::cuda_check((call), #call, __FILE__, __LINE__)

// Whether a CUDA device and a driver that can run our kernels are present. Never throws.
bool cuda_device_present();

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  ~DeviceBuffer();
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  // Grows (never shrinks) to at least `bytes`; growing frees the old buffer, which waits for the
  // device, so callers size buffers before capturing graphs.
  void* reserve(size_t bytes);
  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

class CudaContext;

// A device copy of an array that is sent again only when the array changes: every layer of a
// decode step finds the same lengths, slot mapping, block table and sink rotation, and sends
// nothing.
template <typename T>
class DeviceArray {
 public:
  const T* send(CudaContext& ctx, const T* values, size_t count, cudaStream_t stream);
  const T* send(CudaContext& ctx, const std::vector<T>& values, cudaStream_t stream) {
    return send(ctx, values.data(), values.size(), stream);
  }
  size_t bytes() const { return buffer_.bytes(); }

 private:
  DeviceBuffer buffer_;
  std::vector<T> sent_;  // what buffer_ holds
};
using DeviceInts = DeviceArray<int32_t>;

class CudaContext {
 public:
  explicit CudaContext(int device);
  ~CudaContext();

  int device() const { return device_; }
  int num_sms() const { return num_sms_; }

  // Copies `bytes` from host memory to `dst` (device) on `stream` through the pinned ring, so the
  // caller may reuse `src` at once and the host never waits for the copy. A kernel reads the ring
  // (cuda::copy_from_mapped_host), so the copy does not queue behind swaps on the copy engines.
  void upload(void* dst, const void* src, size_t bytes, cudaStream_t stream);

  DeviceInts table;         // the step plan's block table
  DeviceInts attn_meta;     // attend(): kv_lens then q_indptr
  DeviceInts slot_map;      // append(): row -> slot * block_size + offset
  DeviceInts call_table, call_lens, call_indptr;  // tables of their own: staged, single rows
  DeviceInts staged_slots;  // host slot of each staged slice (kernel staging)
  DeviceInts step_meta;     // begin_step(): kv_lens, q_indptr, slot mapping (DecodeStep::meta)
  DeviceInts step_table;    // begin_step(): the step's block table
  DeviceBuffer step_workspace;  // split-K partial results of the step's attention calls
  DeviceArray<double> sink_rope;  // attend(): the sink rotation table (attention_params.h)
  DeviceBuffer workspace;   // split-K partial results
  DeviceBuffer staging;     // one layer's slices of host blocks passing through attend()
  // Device memory all of the above hold.
  size_t scratch_bytes() const;

 private:
  void* stage(const void* src, size_t bytes, cudaStream_t stream);
  int device_ = 0;
  int num_sms_ = 0;
  static constexpr int kSegments = 16;
  static constexpr size_t kSegmentBytes = size_t(1) << 20;
  char* ring_ = nullptr;                       // [kSegments * kSegmentBytes] pinned, mapped
  char* ring_device_ = nullptr;                // the ring's device address (the same under UVA)
  std::vector<cudaEvent_t> segment_done_;      // [kSegments] recorded when the cursor leaves one
  std::vector<bool> segment_pending_;          // [kSegments] an event was recorded and not waited
  int segment_ = 0;
  size_t offset_ = 0;                          // within the current segment
};

// Makes `device` current for the lifetime of the guard and restores the previous one after.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();

 private:
  int previous_ = -1;
};

}  // namespace pagedkv
