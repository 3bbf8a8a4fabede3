// attend() over a scope larger than the device tier: nothing moves between tiers. The kernel reads
// the device-resident blocks in place and, for every other block, this layer's slice from a
// staging buffer it was copied to for the call (block-table entries staged_entry(i)).
#include <algorithm>
#include <cstdint>
#include <unordered_map>
#include <unordered_set>

#include "pagedkv/attention_planner.h"
#include "pagedkv/block_store.h"
#include "pagedkv/page_tables.h"
#include "pagedkv/errors.h"

namespace pagedkv {

void AttentionPlanner::build_staged_plan(const std::vector<SeqId>& seqs, const std::vector<BlockId>& needed,
                               const std::vector<int32_t>& kv_lens, const std::vector<int32_t>& lengths,
                               int32_t window) {
  const KeepSet keep(needed.begin(), needed.end());
  store_.cold_to_host(needed, keep);  // the cold ones come up to the host first
  StagedPlan& sp = staged_;
  sp.order.clear();
  sp.host_slots.clear();
  sp.waits.clear();
  sp.waited = false;
  std::unordered_map<BlockId, int32_t> index;
  std::unordered_set<const void*> fences;  // distinct ones: thousands of blocks share a few
  for (BlockId id : needed) {
    const BlockLoc loc = store_.loc(id);
    if (loc.tier != Tier::host || !index.emplace(id, int32_t(sp.order.size())).second) continue;
    sp.order.push_back(id);
    sp.host_slots.push_back(loc.slot);
    const Fence* ready = store_.host_landing(id);
    if (ready && fences.insert(ready->get()).second) sp.waits.push_back(*ready);
  }
  int32_t max_blocks = 1;
  for (SeqId s : seqs) max_blocks = std::max(max_blocks, int32_t(tables_.at(s).blocks.size()));
  sp.tables.assign(seqs.size() * size_t(max_blocks), -1);
  for (size_t i = 0; i < seqs.size(); ++i) {
    const auto& blocks = tables_.at(seqs[i]).blocks;
    for (size_t b = 0; b < blocks.size(); ++b) {
      if (blocks[b] == kNoBlock) continue;
      auto it = index.find(blocks[b]);
      const BlockLoc loc = store_.loc(blocks[b]);
      if (it != index.end()) sp.tables[i * size_t(max_blocks) + b] = staged_entry(it->second);
      else if (loc.tier == Tier::device) sp.tables[i * size_t(max_blocks) + b] = loc.slot;
    }
  }
  // One cell for every slot this plan reads: each call stores its copy's fence there, and a host
  // slot released later waits for the latest.
  sp.last_read = std::make_shared<Fence>();
  if (backend_.on_cuda()) store_.note_host_readers(sp.order, sp.last_read);
  sp.seqs = seqs;
  sp.kv_lens = kv_lens;
  sp.lengths = lengths;
  sp.window = window;
  sp.version = version();  // after the cold reads above
}

void AttentionPlanner::run_staged(int32_t layer, PagedAttentionParams& p, const std::vector<int32_t>& kv_lens,
                        const std::vector<int32_t>& q_indptr, void* stream) {
  StagedPlan& sp = staged_;
  const size_t slice = size_t(cfg_.block_bytes() / cfg_.num_layers), block = size_t(cfg_.block_bytes());
  const size_t n = sp.order.size();
  char* staging = static_cast<char*>(backend_.staging(std::max<size_t>(n, 1) * slice));
  Fence landed;
  if (backend_.on_cuda() && cfg_.staging == Staging::kernel && n > 0) {  // SM loads over the link, on the compute stream
    if (!sp.waited || sp.waited_stream != stream) {  // evictions still writing a slot (once per stream)
      for (const Fence& w : sp.waits) backend_.order_after(w, stream);
      sp.waited = true;
      sp.waited_stream = stream;
    }
    if (backend_.gather_slices(staging, store_.host_mapped(), sp.host_slots, int64_t(slice), int64_t(block),
                               int64_t(layer) * int64_t(slice), cfg_.gather_shape, stream))
      landed = backend_.mark(stream);
  }
  if (!landed && n > 0) {  // copies: a run of blocks in consecutive host slots is one 2-D copy
    std::vector<SliceRun> runs;
    const char* host = static_cast<const char*>(store_.tier(Tier::host).data()) + size_t(layer) * slice;
    for (size_t i = 0; i < n; ++i) {
      const char* src = host + size_t(sp.host_slots[i]) * block;
      if (!runs.empty() && static_cast<const char*>(runs.back().src) + runs.back().count * block == src)
        ++runs.back().count;
      else
        runs.push_back({staging + i * slice, src, slice, block, 1});
    }
    landed = backend_.slices_to_device(runs, sp.waits, stream);
    sp.waits.clear();  // the copy engine's stream now runs after them, for every later call too
  }
  if (sp.last_read && landed && backend_.on_cuda()) *sp.last_read = landed;
  TransferCounters& counters = store_.counters();
  counters.slices_staged += int64_t(n);
  counters.bytes_staged += int64_t(n * slice);
  if (layer == 0) counters.device_misses += int64_t(n);
  const size_t es = dtype_size(cfg_.dtype);
  p.staged_offset = (reinterpret_cast<intptr_t>(staging) - reinterpret_cast<intptr_t>(p.pool)) / intptr_t(es);
  run_with_tables(p, sp.tables, kv_lens, q_indptr, stream);
}

}  // namespace pagedkv
