// The page-table view that one attention call reads. The CUDA kernels and the CPU reference read
// this same struct and share its indexing helpers, so they cannot disagree about the layout.
//
// Pool layout (DESIGN.md §3), in elements of `dtype`:
//   pool: [num_slots][num_layers][2 (K,V)][num_kv_heads][block_size][head_dim]
// Query row r of sequence i (q_indptr[i] <= r < q_indptr[i+1]) sits at position
//   kv_lens[i] - (q_indptr[i+1] - r)
// i.e. the rows of a sequence are its newest tokens, and it sees key j when j <= position and,
// with a window, j > position - window or j < sink_tokens.
//
// Sink rotation (StreamingLLM positions, python/pagedkv/streaming.py): with a sink_rope table and
// a window, a row at position p whose window starts at first = window_start(p) scores its sink keys
// j < kept = min(sink_tokens, first) with its query rotated by kept - first (sink_shift), so the
// sinks count as if they sat right before the window; every other key uses the query as given.
#pragma once
#include <cstdint>

#include "pagedkv/types.h"

#if defined(__CUDACC__)
#define PKV_HD __host__ __device__ __forceinline__
#else
#define PKV_HD inline
#endif

namespace pagedkv {

struct PagedAttentionParams {
  const void* q = nullptr;              // [num_rows, num_q_heads, head_dim] contiguous, dtype
  void* out = nullptr;                  // [num_rows, num_q_heads, head_dim] contiguous, dtype
  float* lse = nullptr;                 // [num_rows, num_q_heads] float32 natural log, or nullptr
  const void* pool = nullptr;           // [num_slots, num_layers, 2, num_kv_heads, block_size, head_dim]
  const int32_t* block_table = nullptr; // [num_seqs, max_blocks] pool slot of each logical block; -1 = none;
                                        // staged_entry(i) = staged slice i (see staged_offset)
  const int32_t* kv_lens = nullptr;     // [num_seqs] tokens this layer of each sequence has seen
  const int32_t* q_indptr = nullptr;    // [num_seqs + 1] row offsets; q_indptr[0] == 0
  int32_t num_seqs = 0;
  int32_t num_rows = 0;     // == q_indptr[num_seqs]
  int32_t max_q_len = 0;    // max over i of q_indptr[i+1] - q_indptr[i]
  int32_t max_blocks = 0;   // row stride of block_table
  int32_t num_q_heads = 0;  // a multiple of num_kv_heads
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t block_size = 0;
  int32_t num_layers = 0;
  int32_t layer = 0;
  int32_t window = 0;       // <= 0: full causal
  int32_t sink_tokens = 0;  // only meaningful with window > 0
  float scale = 1.f;
  DType dtype = DType::f16; // of q, out and pool (one byte)
  // Striping (distributed context, docs/DISTRIBUTED.md): logical block b of every sequence lives on
  // rank b % stripe_world; this call runs on rank stripe_rank and reads only that rank's keys, with
  // every position, window and sink counted over the whole sequence. The block table has an entry
  // for every logical block (-1 for other ranks' blocks, which are never addressed). A row that sees
  // no key of this rank gets out = 0 and lse = -inf. stripe_world 1: the whole sequence is here.
  uint8_t stripe_world = 1;
  uint16_t stripe_rank = 0;
  // Blocks passing through (more in scope than the device tier holds): this layer's part of each,
  // [2 (K,V)][num_kv_heads][block_size][head_dim], copied back to back into a staging buffer that
  // starts `staged_offset` elements after `pool` (it may lie before it: the offset is signed).
  int64_t staged_offset = 0;
  // Sink rotation (see top), or nullptr: none, the kernels exactly as without it.
  // [2 + rope_dim / 2] doubles: rope style (kRopeNeox | kRopeGptj), rope_dim (even, <= head_dim:
  // dims [0, rope_dim) turn, the rest pass through), then the rope_dim / 2 angular frequencies,
  // scaling applied. Device memory for the kernels, host memory for the CPU reference.
  // One pointer, not three fields: the kernels take these params by value, and at 136 bytes (three
  // fields) nvcc changed the code of every instance, rotating or not; at 128 it emits the same.
  // Doubles: the angle shift * inv_freq reaches 1e5 rad in long streams, where a float frequency
  // alone would be off by ~1e-2 rad.
  const double* sink_rope = nullptr;
};
// The kernels take these by value: at 128 bytes nvcc emits the code it did before striping.
static_assert(sizeof(PagedAttentionParams) == 128, "PagedAttentionParams grew past 128 bytes");

constexpr int32_t kRopeNeox = 1, kRopeGptj = 2;  // sink_rope styles
constexpr int32_t kMaxStripeWorld = 255;         // stripe_world is one byte

// -- striping (see stripe_world above): "local" keys are this rank's, numbered in position order --
PKV_HD bool striped(const PagedAttentionParams& p) { return p.stripe_world > 1; }
// This rank's keys at positions below x (x itself when not striped, negative x included).
PKV_HD int32_t local_keys_below(const PagedAttentionParams& p, int32_t x) {
  if (!striped(p)) return x;
  if (x <= 0) return 0;
  const int32_t bs = p.block_size, span = bs * p.stripe_world;
  int32_t in_span = x % span - int32_t(p.stripe_rank) * bs;
  in_span = in_span < 0 ? 0 : (in_span > bs ? bs : in_span);
  return (x / span) * bs + in_span;
}
// Position of this rank's local key k (k itself when not striped).
PKV_HD int32_t local_key_position(const PagedAttentionParams& p, int32_t k) {
  if (!striped(p)) return k;
  const int32_t bs = p.block_size;
  return (k / bs) * bs * p.stripe_world + int32_t(p.stripe_rank) * bs + k % bs;
}

// The sink_rope table, unpacked.
struct RopeView {
  int32_t style, dim;
  const double* inv_freq;  // [dim / 2]
};
PKV_HD RopeView rope_view(const double* table) {
  return {int32_t(table[0]), int32_t(table[1]), table + 2};
}

// Block-table entry of staged slice i (entries <= -2; -1 means no block).
PKV_HD int32_t staged_entry(int32_t i) { return -2 - i; }

// Element offset of the [block_size][head_dim] tile of (slot, layer, kv, head) in the pool.
PKV_HD int64_t tile_offset(const PagedAttentionParams& p, int32_t slot, int32_t kv, int32_t head) {
  if (slot <= -2)
    return p.staged_offset +
           ((int64_t(-2 - slot) * 2 + kv) * p.num_kv_heads + head) * (int64_t)p.block_size * p.head_dim;
  return ((((int64_t)slot * p.num_layers + p.layer) * 2 + kv) * p.num_kv_heads + head) *
         (int64_t)p.block_size * p.head_dim;
}

// Position (0-based, over all tokens of the sequence in this layer) of query row r of sequence i.
PKV_HD int32_t query_position(const PagedAttentionParams& p, int32_t seq, int32_t row) {
  return p.kv_lens[seq] - (p.q_indptr[seq + 1] - row);
}

// Whether the query at position `pos` sees key `j`.
PKV_HD bool key_visible(int32_t j, int32_t pos, int32_t window, int32_t sink_tokens) {
  if (j > pos) return false;
  if (window <= 0) return true;
  return j > pos - window || j < sink_tokens;
}

// First key of the sliding part of the window for a query at `pos` (0 without a window).
PKV_HD int32_t window_start(int32_t pos, int32_t window) {
  if (window <= 0) return 0;
  int32_t s = pos - window + 1;
  return s > 0 ? s : 0;
}

// Whether this call rotates sinks at all.
PKV_HD bool rotates_sinks(const PagedAttentionParams& p) {
  return p.sink_rope != nullptr && p.window > 0 && p.sink_tokens > 0;
}

// Keys [0, sinks_kept(pos)) are the sinks a row at `pos` sees outside its window (with a window).
PKV_HD int32_t sinks_kept(int32_t pos, int32_t window, int32_t sink_tokens) {
  const int32_t first = window_start(pos, window);
  return sink_tokens < first ? sink_tokens : first;
}

// How far the query of a row at `pos` turns for its kept sinks: kept - first (<= 0).
PKV_HD int32_t sink_shift(int32_t pos, int32_t window, int32_t sink_tokens) {
  return sinks_kept(pos, window, sink_tokens) - window_start(pos, window);
}

// The dims (d0, d1) that rotation pair i turns together.
PKV_HD void rope_pair(const RopeView& r, int32_t i, int32_t* d0, int32_t* d1) {
  if (r.style == kRopeGptj) {
    *d0 = 2 * i, *d1 = 2 * i + 1;
  } else {
    *d0 = i, *d1 = i + r.dim / 2;
  }
}

}  // namespace pagedkv
