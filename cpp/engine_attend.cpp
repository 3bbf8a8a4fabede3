// attend(): decide where the scope's blocks are read from (already on the device, brought up, or
// staged slices when the scope exceeds the device tier), then let the planner launch.
#include <algorithm>

#include "pagedkv/engine.h"
#include "pagedkv/errors.h"

namespace pagedkv {

void Engine::note_scope_use(SeqId seq, SequenceTable& t, int32_t len, int32_t n, int32_t window) {
  if (t.touched_step == store_.clock()) return;  // once per step, not once per layer
  t.touched_step = store_.clock();
  const BlockUse use{seq, 0, int32_t(t.blocks.size()), store_.clock()};
  tables_.for_each_in_scope(t, len, n, window, [&](int32_t b) {
    BlockUse u = use;
    u.logical = b;
    store_.note_use(t.blocks[size_t(b)], u);
  });
}

void Engine::attend(const std::vector<SeqId>& seqs, int32_t layer,
                    const std::vector<int32_t>& lengths, const AttendArgs& args) {
  const Entry entry(*this, "attend()");
  check_layer(layer, "attend()");
  check_batch(seqs, lengths, "attend()");
  check_attend_args(args);
  const int32_t window = args.window < 0 ? cfg_.window : args.window;
  if (planner_.is_step_batch(seqs, "attend()")) {
    check_step_rows(lengths, "attend()");
    PKV_CHECK(args.window < 0 || args.window == cfg_.window, ArgumentError,
              "attend(): the open decode step was planned for the cache's window (", cfg_.window,
              "), got window=", args.window);
    return planner_.step_attend(layer, args);
  }
  std::vector<int32_t> kv_lens(seqs.size()), q_indptr(seqs.size() + 1, 0);
  int32_t max_q_len = 0;
  int64_t in_scope = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const SequenceTable& t = tables_.at(seqs[i]);
    in_scope += tables_.check_in_scope(seqs[i], t, layer, lengths[i], window, i);
    kv_lens[i] = t.lens[size_t(layer)];
    q_indptr[i + 1] = q_indptr[i] + lengths[i];
    max_q_len = std::max(max_q_len, lengths[i]);
  }
  if (q_indptr.back() == 0) return;
  const bool tiered = store_.tiered();
  const bool plan_current = planner_.plan_current(seqs);
  bool resident = plan_current;
  const StepPlan& last = planner_.plan();
  for (size_t i = 0; resident && i < seqs.size(); ++i) {  // every block in scope is on the device
    if (lengths[i] == 0) continue;
    const ScopeBlocks sc = tables_.scope(kv_lens[i], lengths[i], window);
    resident = sc.first >= last.resident_tail[i] && sc.sinks <= last.resident_head[i];
  }
  // Prefetches still landing: once per prefetch, the stream waits for those of this batch.
  const bool awaited = !store_.landing() || (plan_current && last.awaited_epoch == store_.landing_epoch() &&
                                             last.awaited_stream == args.stream);
  std::vector<BlockId> needed;  // filled when the batch's blocks may not all be on the device
  // The same scope as the last staged call, nothing moved since: its plan holds.
  bool staged = tiered && !resident && awaited && planner_.staged_current(seqs, kv_lens, lengths, window);
  const bool staged_again = staged;
  if (tiered && !staged_again && (!resident || !awaited)) {
    // Bring every block in scope to the device (a batch whose blocks all sit there skips this)
    // and order the kernel after prefetches still landing in them. A scope larger than the
    // device tier passes through instead: its off-device blocks are read from staged slices.
    for (size_t i = 0; i < seqs.size(); ++i) tables_.blocks_in_scope(tables_.at(seqs[i]), layer, lengths[i], window, needed);
    if (!resident) {
      const KeepSet keep(needed.begin(), needed.end());
      // Fetching whole blocks pays only when they then stay: a scope that leaves less free than
      // the proactive offload keeps would evict what the next layer reads again.
      const int64_t cap = store_.tier(Tier::device).capacity();
      staged = int64_t(keep.size()) > cap - int64_t(cfg_.high_watermark * double(cap));
      if (staged) {
        // Every staged block is read from a host slot, the cold ones brought up to one first.
        // When they cannot all be there at once this throws before anything moves, and
        // PagedKV.attend passes the scope through in ranges instead (passthrough.py).
        int64_t off_device = 0, cold = 0;
        for (BlockId id : keep) {
          off_device += store_.loc(id).tier != Tier::device;
          cold += store_.loc(id).tier == Tier::disk;
        }
        PKV_CHECK(off_device <= store_.tier(Tier::host).capacity(), OutOfBlocks, "attend(): ", off_device,
                  " blocks in scope are off the device tier (", cap, " blocks) and the host tier holds only ",
                  store_.tier(Tier::host).capacity());
        PKV_CHECK(cold <= store_.eviction_room(keep), OutOfBlocks, "attend(): ", cold, " blocks in scope are on "
                  "the disk tier and the host tier has room for only ", store_.eviction_room(keep), " of them");
      } else {
        store_.check_room(0, keep, "attend()");
        const int64_t misses_before = store_.counters().device_misses;
        store_.make_resident(needed, keep, args.stream);
        in_scope -= store_.counters().device_misses - misses_before;
      }
    }
    if (!awaited) {  // every block of the batch, so that other layers and scopes need not look
      std::vector<BlockId> all;
      for (SeqId s : seqs)
        for (BlockId id : tables_.at(s).blocks)
          if (id != kNoBlock) all.push_back(id);
      store_.await(all, args.stream);
    }
  }
  if (tiered && layer == 0) store_.tick();
  if (tiered)
    for (size_t i = 0; i < seqs.size(); ++i)
      note_scope_use(seqs[i], tables_.at(seqs[i]), kv_lens[i], lengths[i], window);
  if (staged && !staged_again) planner_.build_staged_plan(seqs, needed, kv_lens, lengths, window);
  if (staged) in_scope -= planner_.staged_blocks();
  if (layer == 0) store_.counters().device_hits += in_scope;  // per step: every layer reads the same blocks

  PagedAttentionParams p = planner_.base_params(args, layer);
  p.num_seqs = int32_t(seqs.size());
  p.num_rows = q_indptr.back();
  p.max_q_len = max_q_len;
  p.window = window;
  p.sink_tokens = window > 0 ? (args.sink_tokens < 0 ? cfg_.sink_tokens : args.sink_tokens) : 0;
  planner_.set_sink_rope(p, args);
  if (staged) {  // a table of its own: the step plan holds device slots only
    planner_.run_staged(layer, p, kv_lens, q_indptr, args.stream);
  } else {
    const StepPlan& plan = planner_.plan_for(seqs, args.stream);
    if (!awaited) planner_.note_awaited(store_.landing_epoch(), args.stream);
    planner_.run_planned(p, plan, kv_lens, q_indptr, args.stream);
  }
  store_.offload_to_watermark(args.stream);
}

int64_t Engine::blocks_needed(const std::vector<SeqId>& seqs, int32_t layer,
                              const std::vector<int32_t>& lengths, int32_t window) const {
  const Entry entry(*this, "blocks_needed()");
  check_layer(layer, "attend()");
  check_batch(seqs, lengths, "attend()");
  if (window < 0) window = cfg_.window;
  int64_t total = 0;
  for (size_t i = 0; i < seqs.size(); ++i)
    total += tables_.check_in_scope(seqs[i], tables_.at(seqs[i]), layer, lengths[i], window, i);
  return total;
}

int32_t Engine::prepare(const std::vector<SeqId>& seqs, void* stream) {
  const Entry entry(*this, "prepare()");
  check_batch(seqs, std::vector<int32_t>(seqs.size(), 0), "prepare()");
  return planner_.plan_for(seqs, stream).max_blocks;
}

// One query row at `position` over keys [key_begin, key_end) only: the kernel sees a sequence of
// key_end tokens whose single row sits at key_end - 1, with a window reaching back to key_begin.
// A partial result: ranges merge by their log-sum-exp (merge_partials).
void Engine::attend_range(SeqId seq, int32_t layer, int32_t position, int32_t key_begin,
                          int32_t key_end, const AttendArgs& args) {
  const Entry entry(*this, "attend_range()");
  const SequenceTable& t = tables_.get(seq, "attend_range()");
  planner_.check_not_in_step(seq, "attend_range()");
  check_layer(layer, "attend_range()");
  check_range_args(t, seq, layer, position, key_begin, key_end);
  const int32_t bs = cfg_.block_size;
  std::vector<BlockId> ids;
  for (int32_t b = key_begin / bs; b < blocks_for(key_end, bs); ++b)
    if (t.blocks[size_t(b)] != kNoBlock) ids.push_back(t.blocks[size_t(b)]);  // (striped: this rank's)
  if (store_.tiered()) {
    const KeepSet keep(ids.begin(), ids.end());
    store_.check_room(0, keep, "attend_range()");
    const int64_t before = store_.counters().device_misses;
    store_.make_resident(ids, keep, args.stream);
    store_.await(ids, args.stream);
    store_.counters().device_hits += int64_t(ids.size()) - (store_.counters().device_misses - before);
  } else {
    store_.counters().device_hits += int64_t(ids.size());
  }
  std::vector<int32_t> table_row(size_t(blocks_for(key_end, bs)), -1);
  for (int32_t b = key_begin / bs; b < blocks_for(key_end, bs); ++b)
    if (t.blocks[size_t(b)] != kNoBlock) table_row[size_t(b)] = store_.loc(t.blocks[size_t(b)]).slot;
  PagedAttentionParams p = planner_.base_params(args, layer);
  p.window = key_end - key_begin;
  p.sink_tokens = 0;
  planner_.run_single_rows(p, table_row, {key_end}, args.stream);
}

}  // namespace pagedkv
