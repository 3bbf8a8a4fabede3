#include "cuda_context.h"

#include <algorithm>
#include <cstring>

#include "pagedkv/errors.h"
#include "pagedkv/kernels.h"

namespace pagedkv {

void cuda_check(cudaError_t err, const char* what, const char* file, int line) {
  if (err == cudaSuccess) return;
  cudaGetLastError();  // clear a sticky-free error so later calls are not blamed for it
  detail::raise<CudaError>(file, line, what, " failed: ", cudaGetErrorString(err));
}

bool cuda_device_present() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return n > 0;
}

DeviceBuffer::~DeviceBuffer() {
  if (data_) cudaFree(data_);
}

void* DeviceBuffer::reserve(size_t bytes) {
  if (bytes <= bytes_ && data_) return data_;
  size_t want = std::max<size_t>({bytes, bytes_ * 2, 4096});
  void* fresh = nullptr;
  PKV_CUDA(cudaMalloc(&fresh, want));
  if (data_) PKV_CUDA(cudaFree(data_));  // cudaFree waits for work that may still read it
  data_ = fresh;
  bytes_ = want;
  return data_;
}

DeviceGuard::DeviceGuard(int device) {
  PKV_CUDA(cudaGetDevice(&previous_));
  if (previous_ != device) PKV_CUDA(cudaSetDevice(device));
}

DeviceGuard::~DeviceGuard() {
  int now = -1;
  if (cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
}

CudaContext::CudaContext(int device) : device_(device) {
  DeviceGuard guard(device);
  PKV_CUDA(cudaDeviceGetAttribute(&num_sms_, cudaDevAttrMultiProcessorCount, device));
  PKV_CUDA(cudaHostAlloc(reinterpret_cast<void**>(&ring_), kSegments * kSegmentBytes,
                         cudaHostAllocMapped));
  PKV_CUDA(cudaHostGetDevicePointer(reinterpret_cast<void**>(&ring_device_), ring_, 0));
  segment_done_.resize(kSegments);
  segment_pending_.assign(kSegments, false);
  for (auto& e : segment_done_) PKV_CUDA(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
}

CudaContext::~CudaContext() {
  for (auto& e : segment_done_) cudaEventDestroy(e);
  if (ring_) cudaFreeHost(ring_);
}

// The ring moves one segment at a time. Leaving a segment records an event behind every copy
// that read it; coming back to it waits for that event, which passed long ago unless the host
// runs kSegments segments ahead of the GPU.
void* CudaContext::stage(const void* src, size_t bytes, cudaStream_t stream) {
  const size_t aligned = (bytes + 255) & ~size_t(255);
  if (offset_ + aligned > kSegmentBytes) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    PKV_CUDA(cudaStreamIsCapturing(stream, &capture));
    if (capture == cudaStreamCaptureStatusNone) {
      PKV_CUDA(cudaEventRecord(segment_done_[size_t(segment_)], stream));
      segment_pending_[size_t(segment_)] = true;
    }
    segment_ = (segment_ + 1) % kSegments;
    offset_ = 0;
    if (segment_pending_[size_t(segment_)]) {
      PKV_CUDA(cudaEventSynchronize(segment_done_[size_t(segment_)]));
      segment_pending_[size_t(segment_)] = false;
    }
  }
  char* dst = ring_ + size_t(segment_) * kSegmentBytes + offset_;
  std::memcpy(dst, src, bytes);
  offset_ += aligned;
  return dst;
}

void CudaContext::upload(void* dst, const void* src, size_t bytes, cudaStream_t stream) {
  const char* from = static_cast<const char*>(src);
  char* to = static_cast<char*>(dst);
  while (bytes > 0) {
    size_t chunk = std::min(bytes, kSegmentBytes);
    char* staged = static_cast<char*>(stage(from, chunk, stream));
    PKV_CUDA(cuda::copy_from_mapped_host(to, ring_device_ + (staged - ring_), chunk, stream));
    from += chunk;
    to += chunk;
    bytes -= chunk;
  }
}

template <typename T>
const T* DeviceArray<T>::send(CudaContext& ctx, const T* values, size_t count, cudaStream_t stream) {
  const size_t bytes = count * sizeof(T);
  const void* before = buffer_.data();
  void* dst = buffer_.reserve(bytes);
  const bool same = count == sent_.size() && std::equal(values, values + count, sent_.begin());
  if (bytes > 0 && (dst != before || !same)) {  // grown (fresh memory) or changed
    ctx.upload(dst, values, bytes, stream);
    sent_.assign(values, values + count);
  }
  return static_cast<const T*>(dst);
}
template class DeviceArray<int32_t>;
template class DeviceArray<double>;

size_t CudaContext::scratch_bytes() const {
  return table.bytes() + attn_meta.bytes() + slot_map.bytes() + call_table.bytes() + call_lens.bytes() +
         call_indptr.bytes() + staged_slots.bytes() + sink_rope.bytes() + workspace.bytes() + staging.bytes() + step_meta.bytes() + step_table.bytes() +
         step_workspace.bytes();
}

}  // namespace pagedkv
