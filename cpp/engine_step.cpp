// Decode steps planned once for every layer (DESIGN.md §5): begin_step() does a whole step's
// host-side work (slots, copy-on-write, residency, block tables, policy clock), and append() and
// attend() of that batch then only launch kernels on metadata in fixed buffers, which a caller
// can capture in a CUDA graph once and replay step after step.
#include <algorithm>
#include <unordered_map>

#include "pagedkv/attention_cpu.h"
#include "pagedkv/engine.h"
#include "pagedkv/errors.h"
#ifdef PAGEDKV_WITH_CUDA
#include "pagedkv/cuda_context.h"
#include "pagedkv/kernels.h"
#endif

namespace pagedkv {
namespace {

// The block table's row stride grows this many blocks at a time, so that a captured step holds
// while contexts grow (at block 16, a capture per 1,024 tokens of the longest sequence).
constexpr int32_t kStrideGrain = 64;

}  // namespace

bool Engine::is_step_batch(const std::vector<SeqId>& seqs, const char* what) const {
  if (!decode_.open) return false;
  if (seqs == decode_.seqs) return true;
  for (SeqId s : seqs)
    PKV_CHECK(!decode_.members.count(s), ArgumentError, what, ": sequence ", s,
              " is in the open decode step (begin_step); call it with the step's whole batch, or "
              "end_step() first");
  return false;
}

void Engine::check_not_in_step(SeqId seq, const char* what) const {
  PKV_CHECK(!decode_.open || !decode_.members.count(seq), ArgumentError, what, ": sequence ", seq,
            " is in the open decode step (begin_step); call end_step() first");
}

// Appends of `tokens` rows at every layer's length: the blocks they write, the blocks those rows
// read (the cache's window and sinks), and how many new device blocks they take (new blocks,
// copies of shared ones). Changes nothing.
int64_t Engine::step_blocks(const std::vector<SeqId>& seqs, int32_t tokens, std::vector<BlockId>& scope) const {
  const int32_t bs = cfg_.block_size;
  int64_t fresh = 0;
  std::unordered_map<BlockId, int32_t> released;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const SequenceTable& t = tables_.at(seqs[i]);
    const int32_t len = t.lens[0];
    PKV_CHECK(std::all_of(t.lens.begin(), t.lens.end(), [&](int32_t n) { return n == len; }), ArgumentError,
              "begin_step(): the layers of sequence ", seqs[i], " hold different numbers of tokens; a step "
              "appends the same rows to every layer");
    PKV_CHECK(int64_t(len) + tokens < (int64_t(1) << 31), ArgumentError, "begin_step(): tokens takes sequence ",
              seqs[i], " past 2^31 tokens");
    const int32_t have = int32_t(t.blocks.size()), need = blocks_for(int64_t(len) + tokens, bs);
    fresh += std::max(0, need - have);
    for (int32_t b = len / bs; b < std::min(need, have); ++b) {  // written: copied first when shared
      const BlockId id = t.blocks[size_t(b)];
      PKV_CHECK(id != kNoBlock, InternalError, "begin_step() writes into a dropped block");
      if (directory_.refcount(id) > 1 && directory_.refcount(id) - released[id] > 1) {
        ++fresh;
        ++released[id];
      }
    }
    const ScopeBlocks sc = scope_blocks(len + tokens, tokens, cfg_.window);
    for (int32_t b = 0; b < std::min(sc.sinks, have); ++b)
      if (t.blocks[size_t(b)] != kNoBlock) scope.push_back(t.blocks[size_t(b)]);
    for (int32_t b = sc.first; b < std::min(sc.last, have); ++b)
      if (t.blocks[size_t(b)] != kNoBlock) scope.push_back(t.blocks[size_t(b)]);
  }
  return fresh;
}

bool Engine::begin_step(const std::vector<SeqId>& seqs, int32_t tokens, int32_t num_q_heads, void* stream) {
  const Entry entry(*this, "begin_step()");
  const char* what = "begin_step()";
  PKV_CHECK(!seqs.empty(), ArgumentError, what, ": seqs is empty");
  PKV_CHECK(tokens >= 1, ArgumentError, what, ": tokens must be >= 1, got ", tokens);
  PKV_CHECK(num_q_heads >= 0 && num_q_heads % cfg_.num_kv_heads == 0, ArgumentError, what,
            ": num_q_heads must be a positive multiple of num_kv_heads=", cfg_.num_kv_heads,
            " (or 0: sized at the first attend), got ", num_q_heads);
  check_batch(seqs, std::vector<int32_t>(seqs.size(), tokens), what);
  // Checks first, the previous step's pins not counted (it ends here); on a throw it stays open.
  std::vector<BlockId> scope;
  KeepSet keep;  // tiered caches: the blocks that must stay while others move
  int64_t fresh = 0;
  const bool was_open = decode_.open;
  decode_.open = false;
  try {
    fresh = step_blocks(seqs, tokens, scope);
    if (!tiered()) {
      PKV_CHECK(fresh <= pool(Tier::device).num_free(), OutOfBlocks, what, ": needs ", fresh,
                " free blocks but the device tier has ", pool(Tier::device).num_free(), " of ",
                pool(Tier::device).capacity());
    } else {
      keep.insert(scope.begin(), scope.end());
      PKV_CHECK(int64_t(keep.size()) + fresh <= pool(Tier::device).capacity(), OutOfBlocks, what, ": the step reads ",
                keep.size() + size_t(fresh), " blocks but the device tier holds ", pool(Tier::device).capacity(),
                "; append() and attend() without a step pass such scopes through");
      check_room(fresh, keep, what);
    }
  } catch (...) {
    decode_.open = was_open;
    throw;
  }
  decode_.members.clear();

  // Residency: every block the step reads or writes on the device, landed, written ones no
  // longer clean copies of their host bytes, and room for the new ones.
  int64_t misses = counters_.device_misses;
  if (tiered()) {
    make_resident(scope, keep, stream);
    await_blocks(scope, stream);
    make_device_room(fresh, keep, stream);
  }
  // Pinned from here: what the step reads (`keep`; a shared block copied below stays pinned with
  // its other holder, harmlessly) and, added below, the blocks its rows go to. Only tiers move
  // blocks, so without them nothing needs pinning.
  decode_.pinned = std::move(keep);
  misses = counters_.device_misses - misses;
  ++step_;

  // The rows: copy-on-write of shared blocks, new blocks, every layer's length at once.
  const size_t S = seqs.size();
  std::vector<Fence> waits;
  decode_.meta.assign(2 * S + 1, 0);
  for (size_t i = 0; i < S; ++i) {
    SequenceTable& t = tables_.at(seqs[i]);
    const int32_t old_len = t.lens[0], new_len = old_len + tokens;
    reserve_rows(seqs[i], t, old_len, new_len, waits, decode_.meta, stream);
    if (tiered())
      for (size_t b = size_t(old_len / cfg_.block_size); b < t.blocks.size(); ++b) decode_.pinned.insert(t.blocks[b]);
    std::fill(t.lens.begin(), t.lens.end(), new_len);
    std::fill(t.scope_start.begin(), t.scope_start.end(), old_len);
    decode_.meta[i] = new_len;
    decode_.meta[S + i + 1] = int32_t(i + 1) * tokens;
    if (tiered()) {
      t.touched_step = step_;
      const ScopeBlocks sc = scope_blocks(new_len, tokens, cfg_.window);
      for (int32_t b = 0; b < sc.sinks; ++b) note_use(t, seqs[i], b);
      for (int32_t b = sc.first; b < sc.last; ++b) note_use(t, seqs[i], b);
    }
  }
  for (const Fence& f : waits) copies_->order_after(f, stream);
  if (cfg_.windowed() && !cfg_.retain)
    for (SeqId s : seqs) drop_out_of_scope(tables_.at(s));
  counters_.device_hits += int64_t(scope.size()) - misses;

  // The block table, at a stride that changes only when the longest sequence outgrows it.
  const bool same_shape = decode_.seqs.size() == S && decode_.tokens == tokens;
  int32_t longest = 1;
  for (SeqId s : seqs) longest = std::max(longest, int32_t(tables_.at(s).blocks.size()));
  const int32_t old_stride = decode_.stride;
  if (longest > decode_.stride) decode_.stride = (longest + kStrideGrain - 1) / kStrideGrain * kStrideGrain;
  decode_.block_table.assign(S * size_t(decode_.stride), -1);
  for (size_t i = 0; i < S; ++i) {
    const SequenceTable& t = tables_.at(seqs[i]);
    const ScopeBlocks sc = scope_blocks(t.lens[0], tokens, cfg_.window);
    auto put = [&](int32_t b) {
      const BlockId id = t.blocks[size_t(b)];
      if (id == kNoBlock) return;
      decode_.block_table[i * size_t(decode_.stride) + size_t(b)] = directory_.loc(id).slot;
    };
    for (int32_t b = 0; b < sc.sinks; ++b) put(b);
    for (int32_t b = sc.first; b < sc.last; ++b) put(b);
  }
  decode_.seqs = seqs;
  decode_.members.insert(seqs.begin(), seqs.end());
  decode_.tokens = tokens;
  decode_.appended.assign(size_t(cfg_.num_layers), 0);
  decode_.open = true;
  const int32_t* old_meta = decode_.device_meta;
  const int32_t* old_table = decode_.device_table;
  const void* old_ws = decode_.workspace;
  upload_step(num_q_heads, stream);
  offload_to_watermark(stream);
  return !same_shape || old_stride != decode_.stride || old_meta != decode_.device_meta ||
         old_table != decode_.device_table || old_ws != decode_.workspace;
}

void Engine::end_step() {
  const Entry entry(*this, "end_step()");
  decode_.open = false;
  decode_.pinned.clear();
  decode_.members.clear();
}

// Sends the step's metadata to its device buffers (CUDA), and sizes the split-K scratch for
// num_q_heads query heads (with sink rotation or without, whichever takes more).
void Engine::upload_step(int32_t num_q_heads, void* stream) {
#ifdef PAGEDKV_WITH_CUDA
  if (!cfg_.on_cuda) return;
  auto st = static_cast<cudaStream_t>(stream);
  decode_.device_meta = cuda_->step_meta.send(*cuda_, decode_.meta, st);
  decode_.device_table = cuda_->step_table.send(*cuda_, decode_.block_table, st);
  if (num_q_heads <= 0) return;
  AttendArgs args;
  args.num_q_heads = num_q_heads;
  PagedAttentionParams p = step_params(args, 0);
  size_t bytes = cuda::paged_attention_workspace_bytes(p, cuda_->num_sms());
  const double any_table[2] = {0, 0};  // rotating instances may split differently
  p.sink_rope = any_table;
  bytes = std::max(bytes, cuda::paged_attention_workspace_bytes(p, cuda_->num_sms()));
  if (bytes > cuda_->step_workspace.bytes()) decode_.workspace = cuda_->step_workspace.reserve(bytes);
#else
  (void)num_q_heads;
  (void)stream;
#endif
}

void Engine::step_append(int32_t layer, const std::vector<int32_t>& lengths, const void* k, const void* v,
                         void* stream) {
  PKV_CHECK(std::all_of(lengths.begin(), lengths.end(), [&](int32_t n) { return n == decode_.tokens; }),
            ArgumentError, "append(): the open decode step takes ", decode_.tokens, " rows per sequence");
  PKV_CHECK(!decode_.appended[size_t(layer)], ArgumentError, "append(): layer ", layer,
            " was already appended in this decode step (begin_step reserves one set of rows per layer)");
  decode_.appended[size_t(layer)] = 1;
  write_rows(decode_.slot_mapping(), decode_.rows(), layer, k, v, stream,
             decode_.device_meta ? decode_.device_meta + decode_.slots_at() : nullptr);
}

PagedAttentionParams Engine::step_params(const AttendArgs& args, int32_t layer) const {
  PagedAttentionParams p = base_params(args, layer);
  p.num_seqs = int32_t(decode_.seqs.size());
  p.num_rows = decode_.rows();
  p.max_q_len = decode_.tokens;
  p.max_blocks = decode_.stride;
  p.window = cfg_.window;
  p.sink_tokens = cfg_.window > 0 ? (args.sink_tokens < 0 ? cfg_.sink_tokens : args.sink_tokens) : 0;
  return p;
}

void Engine::step_attend(int32_t layer, const std::vector<int32_t>& lengths, const AttendArgs& args) {
  PKV_CHECK(std::all_of(lengths.begin(), lengths.end(), [&](int32_t n) { return n == decode_.tokens; }),
            ArgumentError, "attend(): the open decode step takes ", decode_.tokens, " rows per sequence");
  PKV_CHECK(args.window < 0 || args.window == cfg_.window, ArgumentError,
            "attend(): the open decode step was planned for the cache's window (", cfg_.window,
            "), got window=", args.window);
  PagedAttentionParams p = step_params(args, layer);
  set_sink_rope(p, args);
  if (!cfg_.on_cuda) {
    p.block_table = decode_.block_table.data();
    p.kv_lens = decode_.kv_lens();
    p.q_indptr = decode_.q_indptr();
    attention_cpu(p);
    return;
  }
#ifdef PAGEDKV_WITH_CUDA
  auto st = static_cast<cudaStream_t>(args.stream);
  p.block_table = decode_.device_table;
  p.kv_lens = decode_.device_meta;
  p.q_indptr = decode_.device_meta + decode_.q_indptr_at();
  const size_t want = cuda::paged_attention_workspace_bytes(p, cuda_->num_sms());
  if (want > cuda_->step_workspace.bytes()) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    PKV_CUDA(cudaStreamIsCapturing(st, &capture));
    PKV_CHECK(capture == cudaStreamCaptureStatusNone, ArgumentError,
              "attend(): the decode step's split-K scratch cannot grow inside a CUDA graph capture; "
              "pass num_q_heads to begin_step()");
    decode_.workspace = cuda_->step_workspace.reserve(want);
  }
  PKV_CUDA(cuda::paged_attention(p, cuda_->step_workspace.data(), cuda_->step_workspace.bytes(), cuda_->num_sms(),
                                 st));
#endif
}

}  // namespace pagedkv
