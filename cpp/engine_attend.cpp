// attend() and gather(): build (or reuse) the step plan, then run the kernel or the CPU reference.
#include <cmath>
#include <cstring>

#include "pagedkv/attention_cpu.h"
#include "pagedkv/engine.h"
#include "pagedkv/errors.h"
#ifdef PAGEDKV_WITH_CUDA
#include "pagedkv/cuda_context.h"
#include "pagedkv/kernels.h"
#endif

namespace pagedkv {

// The fields every attention call shares; the caller fills the batch and the scope.
PagedAttentionParams Engine::base_params(const AttendArgs& args, int32_t layer) const {
  PagedAttentionParams p;
  p.q = args.q;
  p.out = args.out;
  p.lse = args.lse;
  p.pool = pool(Tier::device).data();
  p.num_q_heads = args.num_q_heads;
  p.num_kv_heads = cfg_.num_kv_heads;
  p.head_dim = cfg_.head_dim;
  p.block_size = cfg_.block_size;
  p.num_layers = cfg_.num_layers;
  p.layer = layer;
  p.scale = args.scale > 0 ? args.scale : 1.f / std::sqrt(float(cfg_.head_dim));
  p.dtype = cfg_.dtype;
  return p;
}

// Points p.sink_rope at the sink rotation table (checked by attend() first), on CUDA at its device
// copy, which is sent again only when the table changes. Without a window or sinks nothing turns,
// and the kernels without rotation run.
void Engine::set_sink_rope(PagedAttentionParams& p, const AttendArgs& args) {
  p.sink_rope = args.sink_rope;
  if (!rotates_sinks(p)) {
    p.sink_rope = nullptr;
    return;
  }
  if (!cfg_.on_cuda) return;
#ifdef PAGEDKV_WITH_CUDA
  const size_t n = size_t(2 + rope_view(args.sink_rope).dim / 2);
  p.sink_rope = cuda_->sink_rope.send(*cuda_, args.sink_rope, n, static_cast<cudaStream_t>(args.stream));
#endif
}

#ifdef PAGEDKV_WITH_CUDA
void Engine::launch(const PagedAttentionParams& p, void* stream) {
  const size_t ws_bytes = cuda::paged_attention_workspace_bytes(p, cuda_->num_sms());
  void* ws = ws_bytes ? cuda_->workspace.reserve(ws_bytes) : nullptr;
  PKV_CUDA(cuda::paged_attention(p, ws, ws_bytes, cuda_->num_sms(), static_cast<cudaStream_t>(stream)));
}
#endif

const StepPlan& Engine::plan_for(const std::vector<SeqId>& seqs, void* stream) {
  if (plan_.matches(seqs, version_)) return plan_;
  plan_.seqs = seqs;
  plan_.version = version_;
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
      const bool on_device = blocks[b] != kNoBlock && directory_.loc(blocks[b]).tier == Tier::device;
      if (on_device) plan_.block_table[i * size_t(plan_.max_blocks) + b] = directory_.loc(blocks[b]).slot;
      if (head && on_device) ++plan_.resident_head[i];
      else head = false;
      if (!on_device && blocks[b] != kNoBlock) tail = int32_t(b) + 1;
    }
    plan_.resident_tail[i] = tail;
  }
#ifdef PAGEDKV_WITH_CUDA
  // Moves of other sequences' blocks change the version too: an equal table is not sent again.
  if (cuda_) plan_.device_block_table = cuda_->table.send(*cuda_, plan_.block_table, static_cast<cudaStream_t>(stream));
#else
  (void)stream;
#endif
  return plan_;
}

int32_t Engine::prepare(const std::vector<SeqId>& seqs, void* stream) {
  const Entry entry(*this, "prepare()");
  check_batch(seqs, std::vector<int32_t>(seqs.size(), 0), "prepare()");
  return plan_for(seqs, stream).max_blocks;
}

// Blocks that rows [len - n, len) of a sequence read: the sink blocks and those from the first
// row's window start on. Throws when a window without retention already dropped one of them.
int64_t Engine::check_in_scope(SeqId seq, const SequenceTable& t, int32_t layer, int32_t n,
                               int32_t window, size_t index) const {
  const int32_t len = t.lens[size_t(layer)], bs = cfg_.block_size;
  PKV_CHECK(n <= len, ArgumentError, "attend(): lengths[", index, "] = ", n, " but layer ", layer,
            " of sequence ", seq, " has seen only ", len, " tokens");
  if (n == 0) return 0;
  const ScopeBlocks sc = scope_blocks(len, n, window);
  for (int32_t b = sc.first; b < std::min(t.drop_cursor, sc.last); ++b)
    PKV_CHECK(t.blocks[size_t(b)] != kNoBlock || int64_t(b) * bs < cfg_.sink_tokens, ArgumentError,
              "attend(): lengths[", index, "] = ", n, " reaches keys of sequence ", seq,
              " that the window already dropped (retain=False)");
  return int64_t(sc.last - sc.first) + sc.sinks;
}

Engine::ScopeBlocks Engine::scope_blocks(int32_t len, int32_t n, int32_t window) const {
  const int32_t bs = cfg_.block_size, first = window_start(len - n, window) / bs;
  return {window > 0 ? std::min(blocks_for(cfg_.sink_tokens, bs), first) : 0, first, blocks_for(len, bs)};
}

// The blocks rows [len - n, len) read, sinks first; dropped ones never are (check_in_scope).
std::vector<BlockId> Engine::blocks_in_scope(const SequenceTable& t, int32_t layer, int32_t n,
                                             int32_t window) const {
  std::vector<BlockId> out;
  if (n == 0) return out;
  const ScopeBlocks sc = scope_blocks(t.lens[size_t(layer)], n, window);
  for (int32_t b = 0; b < sc.sinks; ++b) out.push_back(t.blocks[size_t(b)]);
  for (int32_t b = sc.first; b < sc.last; ++b) out.push_back(t.blocks[size_t(b)]);
  return out;
}

void Engine::attend(const std::vector<SeqId>& seqs, int32_t layer,
                    const std::vector<int32_t>& lengths, const AttendArgs& args) {
  const Entry entry(*this, "attend()");
  check_layer(layer, "attend()");
  check_batch(seqs, lengths, "attend()");
  PKV_CHECK(args.num_q_heads > 0 && args.num_q_heads % cfg_.num_kv_heads == 0, ArgumentError,
            "attend(): q has ", args.num_q_heads, " heads, which is not a multiple of num_kv_heads=",
            cfg_.num_kv_heads);
  const int32_t window = args.window < 0 ? cfg_.window : args.window;
  PKV_CHECK(args.sink_tokens <= cfg_.sink_tokens, ArgumentError, "attend(): sink_tokens ",
            args.sink_tokens, " exceeds the cache's ", cfg_.sink_tokens, " (only those are kept)");
  if (args.sink_rope) {
    const RopeView r = rope_view(args.sink_rope);
    PKV_CHECK((r.style == kRopeNeox || r.style == kRopeGptj) && r.dim > 0 && r.dim % 2 == 0 &&
                  r.dim <= cfg_.head_dim, ArgumentError, "attend(): the sink rotation needs style ",
              kRopeNeox, " (neox) or ", kRopeGptj, " (gptj) and an even rotary_dim <= head_dim=",
              cfg_.head_dim, ", got style ", r.style, " and rotary_dim ", r.dim);
  }
  if (is_step_batch(seqs, "attend()")) return step_attend(layer, lengths, args);
  std::vector<int32_t> kv_lens(seqs.size()), q_indptr(seqs.size() + 1, 0);
  int32_t max_q_len = 0;
  int64_t in_scope = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const SequenceTable& t = tables_.at(seqs[i]);
    in_scope += check_in_scope(seqs[i], t, layer, lengths[i], window, i);
    kv_lens[i] = t.lens[size_t(layer)];
    q_indptr[i + 1] = q_indptr[i] + lengths[i];
    max_q_len = std::max(max_q_len, lengths[i]);
  }
  if (q_indptr.back() == 0) return;
  const bool plan_current = plan_.matches(seqs, version_);
  bool resident = plan_current;
  for (size_t i = 0; resident && i < seqs.size(); ++i) {  // every block in scope is on the device
    if (lengths[i] == 0) continue;
    const ScopeBlocks sc = scope_blocks(kv_lens[i], lengths[i], window);
    resident = sc.first >= plan_.resident_tail[i] && sc.sinks <= plan_.resident_head[i];
  }
  // Prefetches still landing: once per prefetch, the stream waits for those of this batch.
  const bool awaited = device_ready_.empty() || (plan_current && plan_.awaited_epoch == landing_epoch_ &&
                                                 plan_.awaited_stream == args.stream);
  std::vector<BlockId> needed;  // filled when the batch's blocks may not all be on the device
  // The same scope as the last staged call, nothing moved since: its plan holds.
  bool staged = tiered() && !resident && awaited &&
                staged_plan_.matches(seqs, version_, kv_lens, lengths, window);
  const bool staged_again = staged;
  if (tiered() && !staged_again && (!resident || !awaited)) {
    // Bring every block in scope to the device (a batch whose blocks all sit there skips this)
    // and order the kernel after prefetches still landing in them. A scope larger than the
    // device tier passes through instead: its off-device blocks are read from staged slices.
    for (size_t i = 0; i < seqs.size(); ++i) {
      auto ids = blocks_in_scope(tables_.at(seqs[i]), layer, lengths[i], window);
      needed.insert(needed.end(), ids.begin(), ids.end());
    }
    if (!resident) {
      const KeepSet keep(needed.begin(), needed.end());
      // Fetching whole blocks pays only when they then stay: a scope that leaves less free than
      // the proactive offload keeps would evict what the next layer reads again.
      const int64_t cap = pool(Tier::device).capacity();
      staged = int64_t(keep.size()) > cap - int64_t(cfg_.high_watermark * double(cap));
      if (staged) {
        int64_t off_device = 0;
        for (BlockId id : keep) off_device += directory_.loc(id).tier != Tier::device;
        PKV_CHECK(off_device <= pool(Tier::host).capacity(), OutOfBlocks, "attend(): ", off_device,
                  " blocks in scope are off the device tier (", cap, " blocks) and the host tier holds only ",
                  pool(Tier::host).capacity());
      } else {
        check_room(0, keep, "attend()");
        const int64_t misses_before = counters_.device_misses;
        make_resident(needed, keep, args.stream);
        in_scope -= counters_.device_misses - misses_before;
      }
    }
    if (!awaited) {  // every block of the batch, so that other layers and scopes need not look
      std::vector<BlockId> all;
      for (SeqId s : seqs)
        for (BlockId id : tables_.at(s).blocks)
          if (id != kNoBlock) all.push_back(id);
      await_blocks(all, args.stream);
    }
  }
  if (tiered() && layer == 0) ++step_;
  if (tiered())
    for (size_t i = 0; i < seqs.size(); ++i) {
      SequenceTable& t = tables_.at(seqs[i]);
      if (t.touched_step == step_) continue;  // once per step, not once per layer
      t.touched_step = step_;
      if (lengths[i] == 0) continue;
      const ScopeBlocks sc = scope_blocks(kv_lens[i], lengths[i], window);
      for (int32_t b = 0; b < sc.sinks; ++b) note_use(t, seqs[i], b);
      for (int32_t b = sc.first; b < sc.last; ++b) note_use(t, seqs[i], b);
    }
  if (staged && !staged_again) build_staged_plan(seqs, needed, kv_lens, lengths, window);
  if (staged) in_scope -= int64_t(staged_plan_.order.size());
  if (layer == 0) counters_.device_hits += in_scope;  // per step: every layer reads the same blocks

  PagedAttentionParams p = base_params(args, layer);
  p.num_seqs = int32_t(seqs.size());
  p.num_rows = q_indptr.back();
  p.max_q_len = max_q_len;
  p.window = window;
  p.sink_tokens = window > 0 ? (args.sink_tokens < 0 ? cfg_.sink_tokens : args.sink_tokens) : 0;
  set_sink_rope(p, args);
  if (staged) {  // a table of its own: the step plan holds device slots only
    run_staged(layer, p, kv_lens, q_indptr, args.stream);
    return;
  }
  const StepPlan& plan = plan_for(seqs, args.stream);
  if (!awaited) {
    plan_.awaited_epoch = landing_epoch_;
    plan_.awaited_stream = args.stream;
  }
  p.max_blocks = plan.max_blocks;
  if (!cfg_.on_cuda) {
    p.block_table = plan.block_table.data();
    p.kv_lens = kv_lens.data();
    p.q_indptr = q_indptr.data();
    attention_cpu(p);
    offload_to_watermark(args.stream);
    return;
  }
#ifdef PAGEDKV_WITH_CUDA
  auto st = static_cast<cudaStream_t>(args.stream);
  // kv_lens and q_indptr in one array (every layer of a decode step after the first sends nothing)
  meta_host_.assign(kv_lens.begin(), kv_lens.end());
  meta_host_.insert(meta_host_.end(), q_indptr.begin(), q_indptr.end());
  const int32_t* meta = cuda_->attn_meta.send(*cuda_, meta_host_, st);
  p.kv_lens = meta;
  p.q_indptr = meta + kv_lens.size();
  p.block_table = plan.device_block_table;
  launch(p, st);
#endif
  offload_to_watermark(args.stream);
}

int64_t Engine::blocks_needed(const std::vector<SeqId>& seqs, int32_t layer,
                              const std::vector<int32_t>& lengths, int32_t window) const {
  const Entry entry(*this, "blocks_needed()");
  check_layer(layer, "attend()");
  check_batch(seqs, lengths, "attend()");
  if (window < 0) window = cfg_.window;
  int64_t total = 0;
  for (size_t i = 0; i < seqs.size(); ++i)
    total += check_in_scope(seqs[i], tables_.at(seqs[i]), layer, lengths[i], window, i);
  return total;
}

// One query row at `position` over keys [key_begin, key_end) only: the kernel sees a sequence of
// key_end tokens whose single row sits at key_end - 1, with a window reaching back to key_begin.
// Partial results of several ranges merge by their log-sum-exp (python/pagedkv/passthrough.py).
void Engine::attend_range(SeqId seq, int32_t layer, int32_t position, int32_t key_begin,
                          int32_t key_end, const AttendArgs& args) {
  const Entry entry(*this, "attend_range()");
  const SequenceTable& t = table(seq, "attend_range()");
  check_not_in_step(seq, "attend_range()");
  check_layer(layer, "attend_range()");
  const int32_t bs = cfg_.block_size;
  PKV_CHECK(0 <= key_begin && key_begin < key_end && key_end <= position + 1 &&
                position < t.lens[size_t(layer)], ArgumentError, "attend_range(): keys [", key_begin, ", ",
            key_end, ") are not a range the row at ", position, " sees");
  std::vector<BlockId> ids;
  for (int32_t b = key_begin / bs; b < blocks_for(key_end, bs); ++b) {
    PKV_CHECK(t.blocks[size_t(b)] != kNoBlock, ArgumentError, "attend_range(): keys of sequence ",
              seq, " were dropped by the window (retain=False)");
    ids.push_back(t.blocks[size_t(b)]);
  }
  const KeepSet keep(ids.begin(), ids.end());
  if (tiered()) {
    check_room(0, keep, "attend_range()");
    const int64_t before = counters_.device_misses;
    make_resident(ids, keep, args.stream);
    await_blocks(ids, args.stream);
    counters_.device_hits += int64_t(ids.size()) - (counters_.device_misses - before);
  } else {
    counters_.device_hits += int64_t(ids.size());
  }
  std::vector<int32_t> table_row(size_t(blocks_for(key_end, bs)), -1);
  for (int32_t b = key_begin / bs; b < blocks_for(key_end, bs); ++b)
    table_row[size_t(b)] = directory_.loc(t.blocks[size_t(b)]).slot;
  PagedAttentionParams p = base_params(args, layer);
  p.window = key_end - key_begin;
  p.sink_tokens = 0;
  run_single_rows(p, table_row, {key_end}, args.stream);
}

// Runs `p` over one query row per block-table row: tables [rows, max_blocks], kv_lens [rows]
// (each row sits at kv_lens[r] - 1).
void Engine::run_single_rows(PagedAttentionParams& p, const std::vector<int32_t>& tables,
                             const std::vector<int32_t>& kv_lens, void* stream) {
  const int32_t rows = int32_t(kv_lens.size());
  std::vector<int32_t> q_indptr(size_t(rows) + 1);
  for (int32_t r = 0; r <= rows; ++r) q_indptr[size_t(r)] = r;
  p.num_seqs = rows;
  p.num_rows = rows;
  p.max_q_len = 1;
  run_with_tables(p, tables, kv_lens, q_indptr, stream);
}

void Engine::run_with_tables(PagedAttentionParams& p, const std::vector<int32_t>& tables,
                             const std::vector<int32_t>& kv_lens, const std::vector<int32_t>& q_indptr,
                             void* stream) {
  p.max_blocks = int32_t(tables.size() / kv_lens.size());
  if (!cfg_.on_cuda) {
    p.block_table = tables.data();
    p.kv_lens = kv_lens.data();
    p.q_indptr = q_indptr.data();
    attention_cpu(p);
    return;
  }
#ifdef PAGEDKV_WITH_CUDA
  auto st = static_cast<cudaStream_t>(stream);
  p.block_table = cuda_->call_table.send(*cuda_, tables, st);
  p.kv_lens = cuda_->call_lens.send(*cuda_, kv_lens, st);
  p.q_indptr = cuda_->call_indptr.send(*cuda_, q_indptr, st);
  launch(p, st);
#else
  (void)stream;
#endif
}

void Engine::gather(SeqId seq, int32_t layer, void* k_out, void* v_out, void* stream) {
  const Entry entry(*this, "gather()");
  const SequenceTable& t = table(seq, "gather()");
  check_layer(layer, "gather()");
  const int32_t len = t.lens[size_t(layer)], bs = cfg_.block_size;
  const int32_t H = cfg_.num_kv_heads, D = cfg_.head_dim;
  for (int32_t b = 0; b < blocks_for(len, bs); ++b)
    PKV_CHECK(t.blocks[size_t(b)] != kNoBlock, ArgumentError, "gather(): sequence ", seq,
              " has dropped blocks (window with retain=False): its oldest keys are gone");
  const size_t es = dtype_size(cfg_.dtype), row_bytes = size_t(D) * es;
  const int64_t tile = cfg_.tile_elems();
  std::vector<char> from_disk;  // a block read back from the disk tier
  for (int32_t b = 0; b < blocks_for(len, bs); ++b) {
    const BlockId id = t.blocks[size_t(b)];
    const BlockLoc loc = directory_.loc(id);
    const char* block = nullptr;
    if (loc.tier == Tier::disk) {
      from_disk.resize(size_t(cfg_.block_bytes()));
      disk_.read(loc.slot, from_disk.data());
      block = from_disk.data();
    } else {
      block = slot_ptr(loc);
    }
    const bool on_gpu = cfg_.on_cuda && loc.tier == Tier::device;
    const bool through_gpu = cfg_.on_cuda;  // outputs live on the GPU
    if (loc.tier == Tier::device) await_blocks({id}, stream);  // a prefetch may be landing
    if (loc.tier == Tier::host) {  // an eviction may still be writing it
      auto ready = host_ready_.find(id);
      if (ready != host_ready_.end()) copies_->order_after(ready->second, stream);
    }
    const int32_t n = std::min(bs, len - b * bs);
    for (int32_t kv = 0; kv < 2; ++kv) {
      char* dst = static_cast<char*>(kv == 0 ? k_out : v_out);
      for (int32_t h = 0; h < H; ++h) {
        const char* src = block + (((int64_t(layer) * 2 + kv) * H + h) * tile) * int64_t(es);
        char* d0 = dst + (int64_t(b) * bs * H + h) * int64_t(row_bytes);
        if (!through_gpu) {
          for (int32_t r = 0; r < n; ++r) std::memcpy(d0 + size_t(r) * H * row_bytes, src + r * row_bytes, row_bytes);
          continue;
        }
#ifdef PAGEDKV_WITH_CUDA
        PKV_CUDA(cudaMemcpy2DAsync(d0, size_t(H) * row_bytes, src, row_bytes, row_bytes, size_t(n),
                                   on_gpu ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice,
                                   static_cast<cudaStream_t>(stream)));
#else
        (void)stream;
        (void)on_gpu;
#endif
      }
    }
    if (loc.tier == Tier::disk && through_gpu) {
#ifdef PAGEDKV_WITH_CUDA
      // Pageable source: the copies above were staged before returning, but keep it simple and
      // certain before the buffer is reused for the next block.
      PKV_CUDA(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)));
#endif
    }
  }
}

}  // namespace pagedkv
