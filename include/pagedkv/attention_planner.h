// The attention planner: turns (sequences, layer, lengths, scope) into PagedAttentionParams and
// launches them through the backend. It owns the step plan (the batch's block table, reused while
// nothing changed), the staged plan (host blocks whose slices pass through a staging buffer when
// a scope exceeds the device tier), and the open decode step's metadata. It reads the page tables
// and the block store and never moves a block: residency is decided before it is called.
//
// Every path ends in attend_partial(): attention of the rows over exactly the pages a block table
// names, giving out and lse. Results over disjoint page sets merge by log-sum-exp
// (merge_partials): that is how pass-through ranges (python/pagedkv/passthrough.py) combine.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "pagedkv/attention_params.h"
#include "pagedkv/config.h"
#include "pagedkv/device_backend.h"
#include "pagedkv/step_plan.h"
#include "pagedkv/types.h"

namespace pagedkv {

class BlockStore;
class PageTables;

struct AttendArgs {
  const void* q = nullptr;  // [num_rows, num_q_heads, head_dim] contiguous, cfg.dtype
  void* out = nullptr;      // [num_rows, num_q_heads, head_dim] contiguous, cfg.dtype
  float* lse = nullptr;     // [num_rows, num_q_heads] or nullptr
  int32_t num_q_heads = 0;
  float scale = 0.f;        // <= 0: 1/sqrt(head_dim)
  int32_t window = -1;      // < 0: the cache's window; 0: full causal; > 0: this window
  int32_t sink_tokens = -1; // < 0: the cache's sinks; else these (with a window)
  // StreamingLLM positions: the sink rotation table of attention_params.h ([2 + rope_dim / 2]
  // doubles: style, rope_dim, frequencies) in host memory, or nullptr for none. attend() only.
  const double* sink_rope = nullptr;
  void* stream = nullptr;   // cudaStream_t on CUDA
};

class AttentionPlanner {
 public:
  AttentionPlanner(const CacheConfig& cfg, DeviceBackend& backend, const PageTables& tables, BlockStore& store);

  // What plans are checked by: the page tables' and the store's mutation counters together.
  uint64_t version() const;

  // -- parameters --
  // The fields every attention call shares; the caller fills the batch and the scope.
  PagedAttentionParams base_params(const AttendArgs& args, int32_t layer) const;
  // Points p.sink_rope at args.sink_rope (checked by the caller) as the backend reads it.
  void set_sink_rope(PagedAttentionParams& p, const AttendArgs& args);

  // -- the partial-attention primitive --
  // p's rows over exactly the pages p.block_table names (kv_lens, q_indptr set): out and, with
  // p.lse, each row's log-sum-exp over those keys.
  void attend_partial(const PagedAttentionParams& p, Scratch scratch, void* stream);
  // out = the log-sum-exp merge of `parts` partial results (device_backend.h).
  void merge_partials(const void* outs, const float* lses, int32_t parts, int64_t rows_heads, void* out,
                      float* lse, void* stream);

  // -- the step plan: the batch's block table of device slots --
  const StepPlan& plan_for(const std::vector<SeqId>& seqs, void* stream);
  bool plan_current(const std::vector<SeqId>& seqs) const { return plan_.matches(seqs, version()); }
  const StepPlan& plan() const { return plan_; }
  void note_awaited(uint64_t epoch, void* stream) {
    plan_.awaited_epoch = epoch;
    plan_.awaited_stream = stream;
  }
  // Attention over the step plan (every block in scope on the device).
  void run_planned(PagedAttentionParams& p, const StepPlan& plan, const std::vector<int32_t>& kv_lens,
                   const std::vector<int32_t>& q_indptr, void* stream);
  // Attention over a table of its own: tables [rows, max_blocks], kv_lens [rows] (row r at
  // kv_lens[r] - 1), one query row each.
  void run_single_rows(PagedAttentionParams& p, const std::vector<int32_t>& tables,
                       const std::vector<int32_t>& kv_lens, void* stream);

  // -- staged slices (attention_staged.cpp): scopes larger than the device tier --
  bool staged_current(const std::vector<SeqId>& seqs, const std::vector<int32_t>& kv_lens,
                      const std::vector<int32_t>& lengths, int32_t window) const {
    return staged_.matches(seqs, version(), kv_lens, lengths, window);
  }
  // Which host blocks of `needed` pass through (cold ones come up to the host first) and the
  // table that names them; reused while staged_current().
  void build_staged_plan(const std::vector<SeqId>& seqs, const std::vector<BlockId>& needed,
                         const std::vector<int32_t>& kv_lens, const std::vector<int32_t>& lengths, int32_t window);
  int64_t staged_blocks() const { return int64_t(staged_.order.size()); }
  void run_staged(int32_t layer, PagedAttentionParams& p, const std::vector<int32_t>& kv_lens,
                  const std::vector<int32_t>& q_indptr, void* stream);

  // -- the open decode step (decode_step.cpp) --
  const DecodeStep& step() const { return step_; }
  DecodeStep& step() { return step_; }
  // True when `seqs` is the open step's batch; throws when it shares a sequence with it otherwise.
  bool is_step_batch(const std::vector<SeqId>& seqs, const char* what) const;
  void check_not_in_step(SeqId seq, const char* what) const;
  // The step's block table at a stride that grows 64 blocks at a time; then its metadata sent and
  // the split-K scratch sized for num_q_heads (0: at the first attend).
  void build_step_table(const std::vector<SeqId>& seqs, int32_t tokens);
  void upload_step(int32_t num_q_heads, void* stream);
  // One layer of the open step (the engine checked the call matches it).
  void step_attend(int32_t layer, const AttendArgs& args);

 private:
  // The open step's attention params (batch, rows, table stride, the cache's window).
  PagedAttentionParams step_params(const AttendArgs& args, int32_t layer) const;
  void run_with_tables(PagedAttentionParams& p, const std::vector<int32_t>& tables,
                       const std::vector<int32_t>& kv_lens, const std::vector<int32_t>& q_indptr, void* stream);

  const CacheConfig& cfg_;
  DeviceBackend& backend_;
  const PageTables& tables_;
  BlockStore& store_;
  StepPlan plan_;
  StagedPlan staged_;
  DecodeStep step_;
  std::vector<int32_t> meta_host_;  // attend(): kv_lens then q_indptr, reused every call
};

}  // namespace pagedkv
