// Engine lifecycle and bookkeeping: construction, sequences, forks, frees and read-only queries.
#include "pagedkv/engine.h"

#include <algorithm>

#include "io_pool.h"
#include "pagedkv/errors.h"
#ifdef PAGEDKV_WITH_CUDA
#include "pagedkv/cuda_context.h"
#endif

namespace pagedkv {

constexpr int kDiskThreads = 4;  // whole-block reads or writes in flight at once

#ifndef PAGEDKV_WITH_CUDA
class CudaContext {};  // CPU-only builds hold no CUDA state
#endif

Engine::Engine(const CacheConfig& cfg) : cfg_(cfg) {
  validate_config(cfg_);
  PKV_CHECK(cfg_.disk_blocks == 0 || cfg_.host_blocks > 0, ArgumentError,
            "disk_blocks: the disk tier is staged through pinned host memory; give host_blocks > 0");
  const size_t block = size_t(cfg_.block_bytes());
  stage_by_kernel_ = cfg_.staging == Staging::kernel;
  gather_shape_ = cfg_.gather_shape;
  policy_ = make_policy(cfg_.policy, cfg_.policy_params);
  host_order_ = make_policy("lru", {});
  clean_order_ = make_policy("lru", {});
  MemoryKind device_kind = MemoryKind::host, host_kind = MemoryKind::host;
  if (cfg_.on_cuda) {
#ifdef PAGEDKV_WITH_CUDA
    PKV_CHECK(cfg_.dtype != DType::f32, TypeMismatch,
              "dtype: the CUDA kernels take float16 or bfloat16, got float32");
    const int32_t d = cfg_.head_dim;
    PKV_CHECK(d == 64 || d == 80 || d == 96 || d == 128 || d == 256, ArgumentError,
              "head_dim: the CUDA kernels take 64, 80, 96, 128 or 256, got ", d);
    cuda_ = std::make_unique<CudaContext>(cfg_.cuda_device);
    device_kind = MemoryKind::cuda_device;
    host_kind = MemoryKind::pinned_host;
#else
    PKV_FAIL(ArgumentError, "device: this build of pagedkv has no CUDA support");
#endif
  }
  pool(Tier::device) = BlockPool(cfg_.device_blocks,
                                 TierMemory(device_kind, size_t(cfg_.device_blocks) * block, cfg_.cuda_device));
  pool(Tier::host) = BlockPool(cfg_.host_blocks,
                               TierMemory(host_kind, size_t(cfg_.host_blocks) * block, cfg_.cuda_device));
  pool(Tier::disk) = BlockPool(cfg_.disk_blocks, TierMemory());
#ifdef PAGEDKV_WITH_CUDA
  if (cfg_.on_cuda && tiered()) {  // staged slices are read from here (engine_staged.cpp)
    DeviceGuard guard(cfg_.cuda_device);
    PKV_CUDA(cudaHostGetDevicePointer(&host_mapped_, pool(Tier::host).data(), 0));
  }
#endif
  if (cfg_.disk_blocks > 0) {
    disk_ = DiskFile(cfg_.disk_path, cfg_.disk_blocks, block);
    io_ = std::make_unique<IoPool>(kDiskThreads);
  }
  copies_ = std::make_unique<CopyEngine>(cfg_.on_cuda, cfg_.cuda_device, block, cfg_.copy_batch);
}

Engine::~Engine() = default;

Engine::Entry::Entry(const Engine& e, const char* what) : e_(e) {
  PKV_CHECK(!e.busy_.exchange(true, std::memory_order_acquire), ConcurrentUse, what,
            ": this engine is in use by another thread; an engine serves one thread at a time "
            "(give each thread its own PagedKV, or hold a lock around every call)");
}

SeqId Engine::add_sequence() {
  const Entry entry(*this, "add_sequence()");
  SeqId id = next_seq_++;
  SequenceTable t;
  t.lens.assign(size_t(cfg_.num_layers), 0);
  t.scope_start.assign(size_t(cfg_.num_layers), 0);
  tables_.emplace(id, std::move(t));
  return id;
}

SeqId Engine::fork(SeqId parent) {
  const Entry entry(*this, "fork()");
  const SequenceTable& src = table(parent, "fork()");
  check_not_in_step(parent, "fork()");
  SequenceTable copy = src;
  for (BlockId id : copy.blocks)
    if (id != kNoBlock) directory_.retain(id);
  SeqId id = next_seq_++;
  tables_.emplace(id, std::move(copy));
  ++version_;
  return id;
}

void Engine::free(SeqId seq) {
  const Entry entry(*this, "free()");
  SequenceTable& t = table(seq, "free()");
  check_not_in_step(seq, "free()");
  for (BlockId id : t.blocks)
    if (id != kNoBlock) release_block(id);
  tables_.erase(seq);
  ++version_;
}

void Engine::truncate(SeqId seq, int32_t tokens) {
  const Entry entry(*this, "truncate()");
  SequenceTable& t = table(seq, "truncate()");
  check_not_in_step(seq, "truncate()");
  PKV_CHECK(tokens >= 0, ArgumentError, "truncate(): tokens must be >= 0, got ", tokens);
  for (int32_t& n : t.lens) n = std::min(n, tokens);
  for (int32_t& s : t.scope_start) s = std::min(s, tokens);
  const size_t keep = size_t(blocks_for(t.max_len(), cfg_.block_size));
  for (size_t b = keep; b < t.blocks.size(); ++b)
    if (t.blocks[b] != kNoBlock) release_block(t.blocks[b]);
  if (t.blocks.size() > keep) {
    t.blocks.resize(keep);
    ++version_;
  }
  t.drop_cursor = std::min(t.drop_cursor, int32_t(keep));
}

const SequenceTable& Engine::table(SeqId seq, const char* what) const {
  auto it = tables_.find(seq);
  PKV_CHECK(it != tables_.end(), UnknownSequence, what, ": unknown sequence id ", seq);
  return it->second;
}

SequenceTable& Engine::table(SeqId seq, const char* what) {
  return const_cast<SequenceTable&>(static_cast<const Engine*>(this)->table(seq, what));
}

void Engine::check_layer(int32_t layer, const char* what) const {
  PKV_CHECK(layer >= 0 && layer < cfg_.num_layers, LayerOutOfRange, what, ": layer ", layer,
            " is out of range for a cache of ", cfg_.num_layers, " layers");
}

void Engine::check_batch(const std::vector<SeqId>& seqs, const std::vector<int32_t>& lengths,
                         const char* what) const {
  PKV_CHECK(seqs.size() == lengths.size(), ArgumentError, what, ": lengths has ", lengths.size(),
            " entries but seqs has ", seqs.size());
  std::unordered_set<SeqId> seen;
  for (size_t i = 0; i < seqs.size(); ++i) {
    table(seqs[i], what);
    PKV_CHECK(seen.insert(seqs[i]).second, ArgumentError, what, ": seqs lists sequence ", seqs[i],
              " twice");
    PKV_CHECK(lengths[i] >= 0, ArgumentError, what, ": lengths[", i, "] is negative (", lengths[i], ")");
  }
}

char* Engine::slot_ptr(BlockLoc loc) const {
  return static_cast<char*>(pool(loc.tier).data()) + size_t(loc.slot) * size_t(cfg_.block_bytes());
}

int32_t Engine::seq_len(SeqId seq, int32_t layer) const {
  const Entry entry(*this, "seq_len()");
  const SequenceTable& t = table(seq, "seq_len()");
  check_layer(layer, "seq_len()");
  return t.lens[size_t(layer)];
}

std::vector<BlockLoc> Engine::block_table(SeqId seq) const {
  const Entry entry(*this, "block_table()");
  const SequenceTable& t = table(seq, "block_table()");
  std::vector<BlockLoc> out;
  out.reserve(t.blocks.size());
  for (BlockId id : t.blocks) out.push_back(id == kNoBlock ? BlockLoc{} : directory_.loc(id));
  return out;
}

Stats Engine::stats() const {
  const Entry entry(*this, "stats()");
  Stats s;
  s.device_blocks_used = pool(Tier::device).num_used();
  s.device_blocks_free = pool(Tier::device).num_free();
  s.host_blocks_used = pool(Tier::host).num_used();
  s.host_blocks_free = pool(Tier::host).num_free();
  s.disk_blocks_used = pool(Tier::disk).num_used();
  s.disk_blocks_free = pool(Tier::disk).num_free();
  s.num_sequences = int64_t(tables_.size());
  s.counters = counters_;
#ifdef PAGEDKV_WITH_CUDA
  if (cuda_)
    s.device_scratch_bytes = int64_t(cuda_->scratch_bytes());
#endif
  return s;
}

std::vector<SeqId> Engine::sequences() const {
  const Entry entry(*this, "sequences()");
  std::vector<SeqId> ids;
  for (const auto& kv : tables_) ids.push_back(kv.first);
  std::sort(ids.begin(), ids.end());
  return ids;
}

void* Engine::pool_data(Tier tier) const { return tier == Tier::disk ? nullptr : pool(tier).data(); }

int64_t Engine::pool_blocks(Tier tier) const { return pool(tier).capacity(); }

int Engine::num_sms() const {
#ifdef PAGEDKV_WITH_CUDA
  if (cuda_) return cuda_->num_sms();
#endif
  return 0;
}

}  // namespace pagedkv
