// The device backend: the one object that touches the accelerator. It owns the streams, events,
// device buffers and launches; the block store, the page tables and the attention planner call it
// and carry no CUDA of their own. Two implementations: cpp/backend_cpu.cpp (the device tier is host
// memory; copies on a worker thread, attention by the C++ reference) and cpp/backend_cuda.cpp
// (streams, events, the kernels of include/pagedkv/kernels.h). CMake compiles the CUDA one only
// when it builds CUDA; otherwise cpp/backend_cuda_absent.cpp answers that there is none.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "pagedkv/attention_params.h"
#include "pagedkv/config.h"
#include "pagedkv/fence.h"

namespace pagedkv {

enum class MemoryKind { host, pinned_host, cuda_device };

struct BlockCopy {
  void* dst;        // one block of `block_bytes` in the destination tier
  const void* src;  // one block in the source tier
  // to_host() on a backend that checksums_blocks(): where the source block's CRC-32C goes (one
  // uint32 of memory from allocate(pinned_host), by its device_address()), or nullptr for none.
  uint32_t* crc = nullptr;
};

// Calls f(dst, src, bytes) once per run of `copies` adjacent in both source and destination, so
// each backend issues one copy per run.
template <typename F>
void for_each_run(const std::vector<BlockCopy>& copies, size_t block_bytes, F&& f) {
  size_t i = 0;
  while (i < copies.size()) {
    size_t j = i + 1;
    while (j < copies.size() &&
           static_cast<char*>(copies[j].dst) == static_cast<char*>(copies[j - 1].dst) + block_bytes &&
           static_cast<const char*>(copies[j].src) == static_cast<const char*>(copies[j - 1].src) + block_bytes)
      ++j;
    f(copies[i].dst, copies[i].src, (j - i) * block_bytes);
    i = j;
  }
}

// `count` pieces of `width` bytes, `src_pitch` apart in the source, back to back at `dst`: one
// layer's part of consecutive host blocks (a 2-D copy).
struct SliceRun {
  void* dst;
  const void* src;
  size_t width;
  size_t src_pitch;
  size_t count;
};

// Host arrays that kernels read, each sent into a device buffer of its own (on the CPU the array
// itself is read). A buffer is sent again only when its contents change.
enum class Meta : int32_t {
  table,         // the step plan's block table
  attn_meta,     // attend(): kv_lens then q_indptr
  slot_map,      // append(): row -> slot * block_size + offset
  call_table,    // block tables of their own (staged, single rows)
  call_lens,
  call_indptr,
  staged_slots,  // host slot of each staged slice (kernel staging)
  step_meta,     // begin_step(): kv_lens, q_indptr, slot mapping (DecodeStep::meta)
  step_table,    // begin_step(): the step's block table
  count
};

// The split-K scratch an attention launch uses: one per call, or the decode step's, whose
// address a captured graph holds.
enum class Scratch : int32_t { call, step };

// One layer's new K/V rows scattered into device-pool slots.
struct RowWrite {
  const void* k = nullptr;            // [rows, num_kv_heads, head_dim] contiguous, cfg.dtype
  const void* v = nullptr;            // [rows, num_kv_heads, head_dim] contiguous, cfg.dtype
  void* pool = nullptr;               // the device tier: [slots, num_layers, 2, num_kv_heads, block_size, head_dim]
  const int32_t* slot_mapping = nullptr;  // [rows] slot * block_size + offset, host memory
  const int32_t* on_device = nullptr;     // the same already sent (CUDA), or nullptr
  int32_t rows = 0;
  int32_t layer = 0;
};

class DeviceBackend {
 public:
  virtual ~DeviceBackend() = default;
  virtual bool on_cuda() const = 0;
  virtual int num_sms() const = 0;  // 0 on the CPU

  // -- memory --
  // Throws OutOfBlocks when the memory is not there.
  virtual void* allocate(MemoryKind kind, size_t bytes) = 0;
  virtual void deallocate(MemoryKind kind, void* p) noexcept = 0;
  // Mapped pinned host memory as kernels address it (nullptr on the CPU).
  virtual void* device_address(void* pinned_host) = 0;
  // Synchronous copy of `bytes` between any two memories of this backend.
  virtual void copy_now(void* dst, const void* src, size_t bytes) = 0;

  // -- whole-block copies between the device and host tiers (adjacent blocks merge) --
  // Device -> host after everything enqueued on `compute` so far and after `waits` (host slots an
  // earlier copy still reads). The fence passes when the host copies are complete and the device
  // sources may be overwritten.
  // Copies that ask (BlockCopy::crc) also get their source block's CRC-32C, written by the time
  // the fence passes.
  virtual Fence to_host(const std::vector<BlockCopy>& copies, const std::vector<Fence>& waits, void* compute) = 0;
  // Whether to_host() computes the CRC-32C of blocks on the device (CUDA: a kernel beside the
  // copy), so the disk tier need not read them again to checksum them. The CPU does not: its
  // blocks are checksummed by the disk tier itself.
  virtual bool checksums_blocks() const { return false; }
  // Host -> device after `compute`'s work so far and after `waits`. With `compute_waits`,
  // `compute` waits for the copies before its next work; without (prefetches), the caller keeps
  // the fence and orders a reader after it when one comes.
  virtual Fence to_device(const std::vector<BlockCopy>& copies, const std::vector<Fence>& waits, void* compute,
                          bool compute_waits = true) = 0;
  // Host -> device slices, ordered like to_device with compute_waits.
  virtual Fence slices_to_device(const std::vector<SliceRun>& runs, const std::vector<Fence>& waits,
                                 void* compute) = 0;
  // A fence that passes when everything enqueued on `stream` so far is done.
  virtual Fence mark(void* stream) = 0;
  // `stream` waits (on the device, not the host) for `f` to pass.
  virtual void order_after(const Fence& f, void* stream) = 0;
  // One device block onto another (copy-on-write), on `stream`.
  virtual void copy_block(void* dst, const void* src, size_t bytes, void* stream) = 0;
  // `rows` pieces of `width` bytes, src_pitch apart, to dst at dst_pitch, on `stream`; dst is in
  // the device tier's memory, src in device (src_on_device) or host memory. Host sources must stay
  // valid until synchronize(stream).
  virtual void copy_rows(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width,
                         size_t rows, bool src_on_device, void* stream) = 0;
  virtual void synchronize(void* stream) = 0;
  // Waits for every copy the backend has in flight (before the memory they touch goes).
  virtual void drain() = 0;

  // -- metadata and launches --
  // The pointer kernels read `values` through: a device copy (sent only when changed) on CUDA,
  // `values` itself on the CPU (valid while the caller's array is).
  virtual const int32_t* send(Meta which, const int32_t* values, size_t count, void* stream) = 0;
  const int32_t* send(Meta which, const std::vector<int32_t>& values, void* stream) {
    return send(which, values.data(), values.size(), stream);
  }
  // The sink rotation table ([count] doubles, attention_params.h), likewise.
  virtual const double* send_rope(const double* table, size_t count, void* stream) = 0;
  virtual void write_rows(const CacheConfig& c, const RowWrite& w, void* stream) = 0;
  // Split-K scratch: bytes `p` needs, the scratch's current size and address, and growing it
  // (growing frees the old buffer: size it before a graph capture).
  virtual size_t attention_scratch_bytes(const PagedAttentionParams& p) = 0;
  virtual size_t scratch_size(Scratch which) const = 0;
  virtual const void* grow_scratch(Scratch which, size_t bytes) = 0;
  // Attention over p's block table (the partial-attention primitive: out and, with p.lse, the
  // log-sum-exp of every row over exactly the keys the table names). Scratch::call grows as
  // needed; Scratch::step must already hold attention_scratch_bytes(p).
  virtual void attention(const PagedAttentionParams& p, Scratch which, void* stream) = 0;
  // out = merge of `parts` partial results by log-sum-exp: outs [parts, rows, heads, head_dim]
  // (dtype) with lses [parts, rows, heads] float32 -> out [rows, heads, head_dim] and, when
  // non-null, lse [rows, heads]. Memory of this backend's device.
  virtual void merge_partials(const void* outs, const float* lses, int32_t parts, int64_t rows_heads,
                              int32_t head_dim, DType dtype, void* out, float* lse, void* stream) = 0;
  // A buffer of at least `bytes` in device memory for staged slices (grows, keeps its contents
  // only until the next call).
  virtual void* staging(size_t bytes) = 0;
  // Stages `count` slices with SM loads from mapped host memory (kernel staging); false when this
  // backend has no such path (then the caller copies with slices_to_device).
  virtual bool gather_slices(void* dst, const void* host_mapped, const std::vector<int32_t>& slots,
                             int64_t slice_bytes, int64_t block_bytes, int64_t offset, const GatherShape& shape,
                             void* stream) = 0;
  // Whether `stream` is capturing a CUDA graph.
  virtual bool capturing(void* stream) = 0;
  // Device memory the backend holds beside the pools (tables, split-K, staging).
  virtual size_t scratch_bytes() const = 0;
};

std::unique_ptr<DeviceBackend> make_cpu_backend(const CacheConfig& c);
// The CUDA backend; in builds without CUDA, throws ArgumentError naming `device`.
std::unique_ptr<DeviceBackend> make_cuda_backend(const CacheConfig& c);
// The backend the config asks for (cfg.on_cuda).
std::unique_ptr<DeviceBackend> make_backend(const CacheConfig& c);
bool built_with_cuda();
// Whether a CUDA device and a driver that can run our kernels are present. Never throws.
bool cuda_usable();

}  // namespace pagedkv
