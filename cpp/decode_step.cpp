// The planner's side of a decode step planned once for every layer (DESIGN.md §5): the step's
// block table and metadata in buffers that keep their addresses, and each layer's attention as a
// launch on them (capturable in a CUDA graph).
#include <algorithm>

#include "pagedkv/attention_planner.h"
#include "pagedkv/block_store.h"
#include "pagedkv/errors.h"
#include "pagedkv/page_tables.h"

namespace pagedkv {
namespace {

// The block table's row stride grows this many blocks at a time, so that a captured step holds
// while contexts grow (at block 16, a capture per 1,024 tokens of the longest sequence).
constexpr int32_t kStrideGrain = 64;

}  // namespace

bool AttentionPlanner::is_step_batch(const std::vector<SeqId>& seqs, const char* what) const {
  if (!step_.open) return false;
  if (seqs == step_.seqs) return true;
  for (SeqId s : seqs)
    PKV_CHECK(!step_.members.count(s), ArgumentError, what, ": sequence ", s,
              " is in the open decode step (begin_step); call it with the step's whole batch, or "
              "end_step() first");
  return false;
}

void AttentionPlanner::check_not_in_step(SeqId seq, const char* what) const {
  PKV_CHECK(!step_.open || !step_.members.count(seq), ArgumentError, what, ": sequence ", seq,
            " is in the open decode step (begin_step); call end_step() first");
}

void AttentionPlanner::build_step_table(const std::vector<SeqId>& seqs, int32_t tokens) {
  const size_t S = seqs.size();
  int32_t longest = 1;
  for (SeqId s : seqs) longest = std::max(longest, int32_t(tables_.at(s).blocks.size()));
  if (longest > step_.stride) step_.stride = (longest + kStrideGrain - 1) / kStrideGrain * kStrideGrain;
  step_.block_table.assign(S * size_t(step_.stride), -1);
  for (size_t i = 0; i < S; ++i) {
    const SequenceTable& t = tables_.at(seqs[i]);
    int32_t* row = step_.block_table.data() + i * size_t(step_.stride);
    tables_.for_each_in_scope(t, t.lens[0], tokens, cfg_.window, [&](int32_t b) {
      if (t.blocks[size_t(b)] != kNoBlock) row[b] = store_.loc(t.blocks[size_t(b)]).slot;
    });
  }
}

// Sends the step's metadata to its buffers, and sizes the split-K scratch for num_q_heads query
// heads (with sink rotation or without, whichever takes more).
void AttentionPlanner::upload_step(int32_t num_q_heads, void* stream) {
  step_.device_meta = backend_.send(Meta::step_meta, step_.meta, stream);
  step_.device_table = backend_.send(Meta::step_table, step_.block_table, stream);
  if (num_q_heads <= 0) return;
  AttendArgs args;
  args.num_q_heads = num_q_heads;
  PagedAttentionParams p = step_params(args, 0);
  size_t bytes = backend_.attention_scratch_bytes(p);
  const double any_table[2] = {0, 0};  // rotating instances may split differently
  p.sink_rope = any_table;
  bytes = std::max(bytes, backend_.attention_scratch_bytes(p));
  if (bytes > backend_.scratch_size(Scratch::step)) step_.workspace = backend_.grow_scratch(Scratch::step, bytes);
}

PagedAttentionParams AttentionPlanner::step_params(const AttendArgs& args, int32_t layer) const {
  PagedAttentionParams p = base_params(args, layer);
  p.num_seqs = int32_t(step_.seqs.size());
  p.num_rows = step_.rows();
  p.max_q_len = step_.tokens;
  p.max_blocks = step_.stride;
  p.window = cfg_.window;
  p.sink_tokens = cfg_.window > 0 ? (args.sink_tokens < 0 ? cfg_.sink_tokens : args.sink_tokens) : 0;
  return p;
}

void AttentionPlanner::step_attend(int32_t layer, const AttendArgs& args) {
  PagedAttentionParams p = step_params(args, layer);
  set_sink_rope(p, args);
  p.block_table = step_.device_table;
  p.kv_lens = step_.device_meta;
  p.q_indptr = step_.device_meta + step_.q_indptr_at();
  const size_t want = backend_.attention_scratch_bytes(p);
  if (want > backend_.scratch_size(Scratch::step)) {
    PKV_CHECK(!backend_.capturing(args.stream), ArgumentError,
              "attend(): the decode step's split-K scratch cannot grow inside a CUDA graph capture; "
              "pass num_q_heads to begin_step()");
    step_.workspace = backend_.grow_scratch(Scratch::step, want);
  }
  attend_partial(p, Scratch::step, args.stream);
}

}  // namespace pagedkv
