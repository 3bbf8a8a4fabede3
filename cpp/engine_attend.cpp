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

const StepPlan& Engine::plan_for(const std::vector<SeqId>& seqs, void* stream) {
  if (plan_.matches(seqs, version_)) return plan_;
  plan_.seqs = seqs;
  plan_.version = version_;
  plan_.max_blocks = 1;
  for (SeqId s : seqs) plan_.max_blocks = std::max(plan_.max_blocks, int32_t(tables_.at(s).blocks.size()));
  plan_.block_table.assign(seqs.size() * size_t(plan_.max_blocks), -1);
  for (size_t i = 0; i < seqs.size(); ++i) {
    const auto& blocks = tables_.at(seqs[i]).blocks;
    for (size_t b = 0; b < blocks.size(); ++b) {
      if (blocks[b] == kNoBlock) continue;
      const BlockLoc& loc = directory_.loc(blocks[b]);
      if (loc.tier == Tier::device) plan_.block_table[i * size_t(plan_.max_blocks) + b] = loc.slot;
    }
  }
#ifdef PAGEDKV_WITH_CUDA
  if (cuda_) {
    const size_t bytes = plan_.block_table.size() * sizeof(int32_t);
    void* dst = cuda_->table.reserve(bytes);
    cuda_->upload(dst, plan_.block_table.data(), bytes, static_cast<cudaStream_t>(stream));
    plan_.device_block_table = static_cast<const int32_t*>(dst);
  }
#else
  (void)stream;
#endif
  return plan_;
}

int32_t Engine::prepare(const std::vector<SeqId>& seqs, void* stream) {
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
  const int32_t first = window_start(len - n, window) / bs;
  const int32_t last = blocks_for(len, bs);
  const int32_t sink_blocks = window > 0 ? std::min(blocks_for(cfg_.sink_tokens, bs), first) : 0;
  for (int32_t b = first; b < std::min(t.drop_cursor, last); ++b)
    PKV_CHECK(t.blocks[size_t(b)] != kNoBlock || int64_t(b) * bs < cfg_.sink_tokens, ArgumentError,
              "attend(): lengths[", index, "] = ", n, " reaches keys of sequence ", seq,
              " that the window already dropped (retain=False)");
  return int64_t(last - first) + sink_blocks;
}

void Engine::attend(const std::vector<SeqId>& seqs, int32_t layer,
                    const std::vector<int32_t>& lengths, const AttendArgs& args) {
  check_layer(layer, "attend()");
  check_batch(seqs, lengths, "attend()");
  PKV_CHECK(args.num_q_heads > 0 && args.num_q_heads % cfg_.num_kv_heads == 0, ArgumentError,
            "attend(): q has ", args.num_q_heads, " heads, which is not a multiple of num_kv_heads=",
            cfg_.num_kv_heads);
  const int32_t window = args.window < 0 ? cfg_.window : args.window;
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
  const StepPlan& plan = plan_for(seqs, args.stream);
  counters_.device_hits += in_scope;

  PagedAttentionParams p;
  p.q = args.q;
  p.out = args.out;
  p.lse = args.lse;
  p.pool = device_pool_.data();
  p.num_seqs = int32_t(seqs.size());
  p.num_rows = q_indptr.back();
  p.max_q_len = max_q_len;
  p.max_blocks = plan.max_blocks;
  p.num_q_heads = args.num_q_heads;
  p.num_kv_heads = cfg_.num_kv_heads;
  p.head_dim = cfg_.head_dim;
  p.block_size = cfg_.block_size;
  p.num_layers = cfg_.num_layers;
  p.layer = layer;
  p.window = window;
  p.sink_tokens = window > 0 ? cfg_.sink_tokens : 0;
  p.scale = args.scale > 0 ? args.scale : 1.f / std::sqrt(float(cfg_.head_dim));
  p.dtype = cfg_.dtype;
  if (!cfg_.on_cuda) {
    p.block_table = plan.block_table.data();
    p.kv_lens = kv_lens.data();
    p.q_indptr = q_indptr.data();
    attention_cpu(p);
    return;
  }
#ifdef PAGEDKV_WITH_CUDA
  auto st = static_cast<cudaStream_t>(args.stream);
  const size_t lens_bytes = kv_lens.size() * sizeof(int32_t);
  const size_t indptr_off = (lens_bytes + 255) & ~size_t(255);
  char* meta = static_cast<char*>(cuda_->meta.reserve(indptr_off + q_indptr.size() * sizeof(int32_t)));
  cuda_->upload(meta, kv_lens.data(), lens_bytes, st);
  cuda_->upload(meta + indptr_off, q_indptr.data(), q_indptr.size() * sizeof(int32_t), st);
  p.block_table = plan.device_block_table;
  p.kv_lens = reinterpret_cast<const int32_t*>(meta);
  p.q_indptr = reinterpret_cast<const int32_t*>(meta + indptr_off);
  const size_t ws_bytes = cuda::paged_attention_workspace_bytes(p, cuda_->num_sms());
  void* ws = ws_bytes ? cuda_->workspace.reserve(ws_bytes) : nullptr;
  PKV_CUDA(cuda::paged_attention(p, ws, ws_bytes, cuda_->num_sms(), st));
#endif
}

void Engine::gather(SeqId seq, int32_t layer, void* k_out, void* v_out, void* stream) {
  const SequenceTable& t = table(seq, "gather()");
  check_layer(layer, "gather()");
  const int32_t len = t.lens[size_t(layer)], bs = cfg_.block_size;
  const int32_t H = cfg_.num_kv_heads, D = cfg_.head_dim;
  for (int32_t b = 0; b < blocks_for(len, bs); ++b)
    PKV_CHECK(t.blocks[size_t(b)] != kNoBlock, ArgumentError, "gather(): sequence ", seq,
              " has dropped blocks (window with retain=False): its oldest keys are gone");
  const size_t es = dtype_size(cfg_.dtype), row_bytes = size_t(D) * es;
  const int64_t tile = cfg_.tile_elems();
  char* pool = static_cast<char*>(device_pool_.data());
  for (int32_t b = 0; b < blocks_for(len, bs); ++b) {
    const int64_t slot = directory_.loc(t.blocks[size_t(b)]).slot;
    const int32_t n = std::min(bs, len - b * bs);
    for (int32_t kv = 0; kv < 2; ++kv) {
      char* dst = static_cast<char*>(kv == 0 ? k_out : v_out);
      for (int32_t h = 0; h < H; ++h) {
        const char* src = pool + ((((slot * cfg_.num_layers + layer) * 2 + kv) * H + h) * tile) * es;
        char* d0 = dst + (int64_t(b) * bs * H + h) * row_bytes;
        if (!cfg_.on_cuda) {
          for (int32_t r = 0; r < n; ++r) std::memcpy(d0 + size_t(r) * H * row_bytes, src + r * row_bytes, row_bytes);
          continue;
        }
#ifdef PAGEDKV_WITH_CUDA
        PKV_CUDA(cudaMemcpy2DAsync(d0, size_t(H) * row_bytes, src, row_bytes, row_bytes, size_t(n),
                                   cudaMemcpyDeviceToDevice, static_cast<cudaStream_t>(stream)));
#else
        (void)stream;
#endif
      }
    }
  }
}

}  // namespace pagedkv
