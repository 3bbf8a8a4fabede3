// The engine: pools, directory, page tables and the calls of DESIGN.md §4, on raw pointers.
// Every public call validates everything before it changes anything, so a throw leaves the
// engine exactly as it was.
#pragma once
#include <cstdint>
#include <memory>
#include <unordered_map>
#include <vector>

#include "pagedkv/block_directory.h"
#include "pagedkv/block_pool.h"
#include "pagedkv/config.h"
#include "pagedkv/page_table.h"
#include "pagedkv/stats.h"
#include "pagedkv/step_plan.h"

namespace pagedkv {

class CudaContext;  // cuda_context.h; exists only in CUDA builds

struct AttendArgs {
  const void* q = nullptr;  // [num_rows, num_q_heads, head_dim] contiguous, cfg.dtype
  void* out = nullptr;      // [num_rows, num_q_heads, head_dim] contiguous, cfg.dtype
  float* lse = nullptr;     // [num_rows, num_q_heads] or nullptr
  int32_t num_q_heads = 0;
  float scale = 0.f;        // <= 0: 1/sqrt(head_dim)
  int32_t window = -1;      // < 0: the cache's window; 0: full causal; > 0: this window
  void* stream = nullptr;   // cudaStream_t on CUDA
};

class Engine {
 public:
  explicit Engine(const CacheConfig& cfg);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  const CacheConfig& config() const { return cfg_; }

  SeqId add_sequence();
  SeqId fork(SeqId parent);
  void free(SeqId seq);

  // k, v: [sum(lengths), num_kv_heads, head_dim] contiguous in cfg.dtype, rows of seqs[i]
  // consecutive, on the device tier's device.
  void append(const std::vector<SeqId>& seqs, int32_t layer, const std::vector<int32_t>& lengths,
              const void* k, const void* v, void* stream);
  // The rows of seqs[i] are its last lengths[i] tokens in `layer`.
  void attend(const std::vector<SeqId>& seqs, int32_t layer, const std::vector<int32_t>& lengths,
              const AttendArgs& args);
  // Builds (or reuses) the block table of this batch, as attend() does once per step; returns
  // its row stride. Lets a caller pay the host-side preparation before the first layer.
  int32_t prepare(const std::vector<SeqId>& seqs, void* stream);
  // Copies the stored K/V of one layer into k_out, v_out: [seq_len, num_kv_heads, head_dim].
  void gather(SeqId seq, int32_t layer, void* k_out, void* v_out, void* stream);

  int32_t seq_len(SeqId seq, int32_t layer) const;
  std::vector<BlockLoc> block_table(SeqId seq) const;
  Stats stats() const;
  std::vector<SeqId> sequences() const;
  void* pool_data(Tier tier) const;
  int64_t pool_blocks(Tier tier) const;
  int num_sms() const;

  // Throws InternalError naming the first broken invariant: every block owned once, reference
  // counts equal to page-table references, free lists disjoint from used slots, page tables
  // pointing at live blocks, block counts matching lengths.
  void check_invariants() const;

 private:
  friend struct EngineTestAccess;  // tests/cpp: corrupts state to prove check_invariants() sees it
  const SequenceTable& table(SeqId seq, const char* what) const;
  SequenceTable& table(SeqId seq, const char* what);
  void check_layer(int32_t layer, const char* what) const;
  void check_batch(const std::vector<SeqId>& seqs, const std::vector<int32_t>& lengths,
                   const char* what) const;
  BlockId clone_block(BlockId id, void* stream);  // copy-on-write: a private copy of a shared block
  void drop_out_of_scope(SequenceTable& t);
  void copy_block(int32_t src_slot, int32_t dst_slot, void* stream);
  void write_rows(const std::vector<int32_t>& slot_mapping, int32_t layer, const void* k,
                  const void* v, void* stream);
  const StepPlan& plan_for(const std::vector<SeqId>& seqs, void* stream);
  int64_t check_in_scope(SeqId seq, const SequenceTable& t, int32_t layer, int32_t n,
                         int32_t window, size_t index) const;

  CacheConfig cfg_;
  BlockPool device_pool_;
  BlockDirectory directory_;
  std::unordered_map<SeqId, SequenceTable> tables_;
  SeqId next_seq_ = 0;
  uint64_t version_ = 0;  // bumps whenever any block table changes; keys the plan cache
  StepPlan plan_;
  TransferCounters counters_;
  std::unique_ptr<CudaContext> cuda_;
};

}  // namespace pagedkv
