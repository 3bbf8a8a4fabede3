// Decode steps planned once for every layer (DESIGN.md §5): begin_step() does a whole step's
// host-side work (slots, copy-on-write, residency, block tables, policy clock), and append() and
// attend() of that batch then only launch kernels on metadata in fixed buffers, which a caller
// can capture in a CUDA graph once and replay step after step.
#include <algorithm>
#include <unordered_map>

#include "pagedkv/engine.h"
#include "pagedkv/errors.h"

namespace pagedkv {

// Appends of `tokens` rows at every layer's length: the blocks they write, the blocks those rows
// read (the cache's window and sinks), and how many new device blocks they take (new blocks,
// copies of shared ones). Changes nothing.
int64_t Engine::step_blocks(const std::vector<SeqId>& seqs, int32_t tokens, std::vector<BlockId>& scope) const {
  int64_t fresh = 0;
  std::unordered_map<BlockId, int32_t> copied;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const SequenceTable& t = tables_.at(seqs[i]);
    const int32_t len = t.lens[0];
    PKV_CHECK(std::all_of(t.lens.begin(), t.lens.end(), [&](int32_t n) { return n == len; }), ArgumentError,
              "begin_step(): the layers of sequence ", seqs[i], " hold different numbers of tokens; a step "
              "appends the same rows to every layer");
    PKV_CHECK(int64_t(len) + tokens < (int64_t(1) << 31), ArgumentError, "begin_step(): tokens takes sequence ",
              seqs[i], " past 2^31 tokens");
    fresh += tables_.blocks_to_take(t, len, int64_t(len) + tokens, store_, copied, nullptr, "begin_step()");
    tables_.for_each_in_scope(t, len + tokens, tokens, cfg_.window, [&](int32_t b) {
      if (t.blocks[size_t(b)] != kNoBlock) scope.push_back(t.blocks[size_t(b)]);
    });
  }
  return fresh;
}

bool Engine::begin_step(const std::vector<SeqId>& seqs, int32_t tokens, int32_t num_q_heads, void* stream) {
  const Entry entry(*this, "begin_step()");
  const char* what = "begin_step()";
  check_step_args(seqs, tokens, num_q_heads);
  DecodeStep& step = planner_.step();
  const BlockPool& dev = store_.tier(Tier::device).slots();
  // Checks first, the previous step's pins not counted (it ends here); on a throw it stays open.
  std::vector<BlockId> scope;
  KeepSet keep;  // tiered caches: the blocks that must stay while others move
  int64_t fresh = 0;
  const bool was_open = step.open;
  KeepSet was_pinned = store_.take_pins();
  store_.unpin_all();
  step.open = false;
  try {
    fresh = step_blocks(seqs, tokens, scope);
    // The open step's rows must all be written before the next step reserves more (end_step()
    // gives back unwritten ones).
    for (size_t layer = 0; was_open && !step.graph_held && layer < step.appended.size(); ++layer)
      PKV_CHECK(step.appended[layer], ArgumentError, what, ": layer ", layer, " of the open decode step was never "
                "appended; append every layer's rows, or call end_step() to give the unwritten rows back");
    if (!store_.tiered()) {
      PKV_CHECK(fresh <= dev.num_free(), OutOfBlocks, what, ": needs ", fresh,
                " free blocks but the device tier has ", dev.num_free(), " of ", dev.capacity());
    } else {
      keep.insert(scope.begin(), scope.end());
      PKV_CHECK(int64_t(keep.size()) + fresh <= dev.capacity(), OutOfBlocks, what, ": the step reads ",
                keep.size() + size_t(fresh), " blocks but the device tier holds ", dev.capacity(),
                "; append() and attend() without a step pass such scopes through");
      store_.check_room(fresh, keep, what);
    }
  } catch (...) {
    step.open = was_open;
    store_.set_pins(std::move(was_pinned));
    throw;
  }
  step.members.clear();

  // Residency: every block the step reads or writes on the device, landed, written ones no
  // longer clean copies of their host bytes, and room for the new ones.
  int64_t misses = store_.counters().device_misses;
  if (store_.tiered()) {
    store_.make_resident(scope, keep, stream);
    store_.await(scope, stream);
    store_.make_device_room(fresh, keep, stream);
  }
  // Pinned from here: what the step reads (`keep`; a shared block copied below stays pinned with
  // its other holder, harmlessly) and, added below, the blocks its rows go to. Only tiers move
  // blocks, so without them nothing needs pinning.
  store_.set_pins(std::move(keep));
  misses = store_.counters().device_misses - misses;
  store_.tick();

  // The rows: copy-on-write of shared blocks, new blocks, every layer's length at once.
  const size_t S = seqs.size();
  std::vector<Fence> waits;
  step.meta.assign(2 * S + 1, 0);
  for (size_t i = 0; i < S; ++i) {
    SequenceTable& t = tables_.at(seqs[i]);
    const int32_t old_len = t.lens[0], new_len = old_len + tokens;
    tables_.reserve_rows(seqs[i], t, old_len, new_len, store_, waits, step.meta, stream);
    if (store_.tiered())
      for (size_t b = size_t(old_len / cfg_.block_size); b < t.blocks.size(); ++b)
        if (t.blocks[b] != kNoBlock) store_.pin(t.blocks[b]);
    std::fill(t.lens.begin(), t.lens.end(), new_len);
    std::fill(t.scope_start.begin(), t.scope_start.end(), old_len);
    step.meta[i] = new_len;
    step.meta[S + i + 1] = int32_t(i + 1) * tokens;
    if (store_.tiered()) {
      t.touched_step = ~store_.clock();  // report this step's use now
      note_scope_use(seqs[i], t, new_len, tokens, cfg_.window);
    }
  }
  for (const Fence& f : waits) backend_->order_after(f, stream);
  if (cfg_.windowed() && !cfg_.retain)
    for (SeqId s : seqs) tables_.drop_out_of_scope(tables_.at(s), store_);
  store_.counters().device_hits += int64_t(scope.size()) - misses;

  // The block table, at a stride that changes only when the longest sequence outgrows it.
  const bool same_shape = step.seqs.size() == S && step.tokens == tokens;
  const int32_t old_stride = step.stride;
  planner_.build_step_table(seqs, tokens);
  step.seqs = seqs;
  step.members.insert(seqs.begin(), seqs.end());
  step.tokens = tokens;
  step.appended.assign(size_t(cfg_.num_layers), 0);
  step.open = true;
  const int32_t* old_meta = step.device_meta;
  const int32_t* old_table = step.device_table;
  const void* old_ws = step.workspace;
  planner_.upload_step(num_q_heads, stream);
  store_.offload_to_watermark(stream);
  // (On the CPU the metadata is read where it lies: no buffer a capture holds.)
  const bool moved = backend_->on_cuda() &&
                     (old_meta != step.device_meta || old_table != step.device_table || old_ws != step.workspace);
  const bool changed = !same_shape || old_stride != step.stride || moved;
  if (changed) step.graph_held = false;  // the next capture (if any) holds again
  return changed;
}

void Engine::end_step() {
  const Entry entry(*this, "end_step()");
  close_step();
}

// Ends the open step (none open: nothing to do). Rows it reserved in a layer that append() never
// wrote are given back: that layer's length returns to where the step began, and blocks past
// every layer's end return to the pool, so seq_len and gather never count rows holding no data.
// (Not while a captured graph holds the step: its replays write every layer without append().)
void Engine::close_step() {
  DecodeStep& step = planner_.step();
  if (!step.open) return;
  step.open = false;
  step.members.clear();
  store_.unpin_all();
  if (step.graph_held || std::all_of(step.appended.begin(), step.appended.end(), [](uint8_t a) { return a != 0; }))
    return;
  for (size_t i = 0; i < step.seqs.size(); ++i) {
    SequenceTable& t = tables_.at(step.seqs[i]);  // (members cannot be freed while the step is open)
    const int32_t begun = step.meta[i] - step.tokens;
    for (size_t layer = 0; layer < t.lens.size(); ++layer)
      if (!step.appended[layer]) {
        t.lens[layer] = std::min(t.lens[layer], begun);
        t.scope_start[layer] = std::min(t.scope_start[layer], begun);
      }
    tables_.truncate(step.seqs[i], t.max_len(), store_);
  }
}

// The rows of `layer` of `seq` that hold data: seq_len less rows the open step reserved there and
// append() has not written yet.
int32_t Engine::written_rows(SeqId seq, const SequenceTable& t, int32_t layer) const {
  const DecodeStep& step = planner_.step();
  const int32_t len = t.lens[size_t(layer)];
  if (step.open && !step.graph_held && !step.appended[size_t(layer)] && step.members.count(seq))
    return len - step.tokens;
  return len;
}

bool Engine::step_open() const {
  const Entry entry(*this, "step_open()");
  return planner_.step().open;
}

void Engine::step_append(int32_t layer, const std::vector<int32_t>& lengths, const void* k, const void* v,
                         void* stream) {
  DecodeStep& step = planner_.step();
  check_step_rows(lengths, "append()");
  PKV_CHECK(!step.appended[size_t(layer)], ArgumentError, "append(): layer ", layer,
            " was already appended in this decode step (begin_step reserves one set of rows per layer)");
  step.appended[size_t(layer)] = 1;
  if (backend_->capturing(stream)) step.graph_held = true;
  write_rows(step.slot_mapping(), step.rows(), layer, k, v, stream,
             step.device_meta ? step.device_meta + step.slots_at() : nullptr);
}

}  // namespace pagedkv
