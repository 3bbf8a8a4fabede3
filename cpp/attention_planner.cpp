// Attention parameters, the step plan, and the partial-attention primitive every path ends in.
#include "pagedkv/attention_planner.h"

#include <algorithm>
#include <cmath>

#include "pagedkv/block_store.h"
#include "pagedkv/errors.h"
#include "pagedkv/page_tables.h"

namespace pagedkv {

AttentionPlanner::AttentionPlanner(const CacheConfig& cfg, DeviceBackend& backend, const PageTables& tables,
                                   BlockStore& store)
    : cfg_(cfg), backend_(backend), tables_(tables), store_(store) {}

uint64_t AttentionPlanner::version() const { return tables_.version() + store_.version(); }

PagedAttentionParams AttentionPlanner::base_params(const AttendArgs& args, int32_t layer) const {
  PagedAttentionParams p;
  p.q = args.q;
  p.out = args.out;
  p.lse = args.lse;
  p.pool = store_.device_pool();
  p.num_q_heads = args.num_q_heads;
  p.num_kv_heads = cfg_.num_kv_heads;
  p.head_dim = cfg_.head_dim;
  p.block_size = cfg_.block_size;
  p.num_layers = cfg_.num_layers;
  p.layer = layer;
  p.scale = args.scale > 0 ? args.scale : 1.f / std::sqrt(float(cfg_.head_dim));
  p.dtype = cfg_.dtype;
  p.stripe_world = uint8_t(cfg_.stripe_world);
  p.stripe_rank = uint16_t(cfg_.stripe_rank);
  return p;
}

// The rotation table goes to the device only when it changes. Without a window or sinks nothing
// turns, and the kernels without rotation run.
void AttentionPlanner::set_sink_rope(PagedAttentionParams& p, const AttendArgs& args) {
  p.sink_rope = args.sink_rope;
  if (!rotates_sinks(p)) {
    p.sink_rope = nullptr;
    return;
  }
  p.sink_rope = backend_.send_rope(args.sink_rope, size_t(2 + rope_view(args.sink_rope).dim / 2), args.stream);
}

void AttentionPlanner::attend_partial(const PagedAttentionParams& p, Scratch scratch, void* stream) {
  backend_.attention(p, scratch, stream);
}

void AttentionPlanner::merge_partials(const void* outs, const float* lses, int32_t parts, int64_t rows_heads,
                                      void* out, float* lse, void* stream) {
  backend_.merge_partials(outs, lses, parts, rows_heads, cfg_.head_dim, cfg_.dtype, out, lse, stream);
}

const StepPlan& AttentionPlanner::plan_for(const std::vector<SeqId>& seqs, void* stream) {
  const uint64_t now = version();
  if (plan_.matches(seqs, now)) return plan_;
  plan_.seqs = seqs;
  plan_.version = now;
  plan_.max_blocks = 1;
  for (SeqId s : seqs) plan_.max_blocks = std::max(plan_.max_blocks, int32_t(tables_.at(s).blocks.size()));
  plan_.block_table.assign(seqs.size() * size_t(plan_.max_blocks), -1);
  plan_.awaited_epoch = ~uint64_t(0);
  plan_.resident_head.assign(seqs.size(), 0);
  plan_.resident_tail.assign(seqs.size(), 0);
  for (size_t i = 0; i < seqs.size(); ++i) {
    const auto& blocks = tables_.at(seqs[i]).blocks;
    int32_t tail = 0;      // blocks [tail, end) are all on the device (or dropped)
    bool head = true;      // still counting the leading run of device blocks
    for (size_t b = 0; b < blocks.size(); ++b) {
      const BlockLoc where = blocks[b] != kNoBlock ? store_.loc(blocks[b]) : BlockLoc{};
      const bool on_device = where.tier == Tier::device;
      if (on_device) plan_.block_table[i * size_t(plan_.max_blocks) + b] = where.slot;
      if (head && on_device) ++plan_.resident_head[i];
      else head = false;
      if (!on_device && blocks[b] != kNoBlock) tail = int32_t(b) + 1;
    }
    plan_.resident_tail[i] = tail;
  }
  // Moves of other sequences' blocks change the version too: an equal table is not sent again.
  plan_.device_block_table = backend_.send(Meta::table, plan_.block_table, stream);
  return plan_;
}

void AttentionPlanner::run_planned(PagedAttentionParams& p, const StepPlan& plan, const std::vector<int32_t>& kv_lens,
                                   const std::vector<int32_t>& q_indptr, void* stream) {
  p.max_blocks = plan.max_blocks;
  // kv_lens and q_indptr in one array (every layer of a decode step after the first sends nothing)
  meta_host_.assign(kv_lens.begin(), kv_lens.end());
  meta_host_.insert(meta_host_.end(), q_indptr.begin(), q_indptr.end());
  const int32_t* meta = backend_.send(Meta::attn_meta, meta_host_, stream);
  p.kv_lens = meta;
  p.q_indptr = meta + kv_lens.size();
  p.block_table = plan.device_block_table;
  attend_partial(p, Scratch::call, stream);
}

void AttentionPlanner::run_single_rows(PagedAttentionParams& p, const std::vector<int32_t>& tables,
                                       const std::vector<int32_t>& kv_lens, void* stream) {
  const int32_t rows = int32_t(kv_lens.size());
  std::vector<int32_t> q_indptr(size_t(rows) + 1);
  for (int32_t r = 0; r <= rows; ++r) q_indptr[size_t(r)] = r;
  p.num_seqs = rows;
  p.num_rows = rows;
  p.max_q_len = 1;
  run_with_tables(p, tables, kv_lens, q_indptr, stream);
}

void AttentionPlanner::run_with_tables(PagedAttentionParams& p, const std::vector<int32_t>& tables,
                                       const std::vector<int32_t>& kv_lens, const std::vector<int32_t>& q_indptr,
                                       void* stream) {
  p.max_blocks = int32_t(tables.size() / kv_lens.size());
  p.block_table = backend_.send(Meta::call_table, tables, stream);
  p.kv_lens = backend_.send(Meta::call_lens, kv_lens, stream);
  p.q_indptr = backend_.send(Meta::call_indptr, q_indptr, stream);
  attend_partial(p, Scratch::call, stream);
}

}  // namespace pagedkv
