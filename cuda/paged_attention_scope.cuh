// The keys an m-tile of the paged attention kernel sees, in "virtual" order (sinks, then the
// window; see the top of paged_attention_kernel.cuh), and where each key's K row lies in the pool.
#pragma once
#include <cstdint>

#include "pagedkv/attention_params.h"

namespace pagedkv::cuda::detail {

// The keys some row of an m-tile sees, in virtual order. Striped (attention_params.h), only this
// rank's keys are numbered: virtual [0, n_sink) are its sink keys, virtual v >= n_sink its local
// key lws + (v - n_sink); unstriped, local key k is key k, and this is the plain order.
// STRIPED = false compiles to the plain order alone (the stripe fields unread, the code as before
// striping existed): the split-K kernel's instances without sink rotation take it, and striped
// calls go to the general (ROPE) instances, which take STRIPED = true.
struct KeyScope {
  int n_sink;  // virtual [0, n_sink) are (this rank's) keys below min(sinks, ws)
  int ws;      // window start of the lowest row
  int lws;     // this rank's keys below ws (ws itself unstriped)
  int n_keys;
  int world, rank_off, bs;  // stripe_world, stripe_rank * block_size, block_size
  template <bool STRIPED = true>
  __device__ __forceinline__ int key(int v) const {
    if (!STRIPED || world == 1) return v < n_sink ? v : ws + (v - n_sink);
    const int k = v < n_sink ? v : lws + (v - n_sink);
    return (k / bs) * bs * world + rank_off + k % bs;
  }
  // This rank's keys at positions below x (x itself unstriped: local_keys_below).
  template <bool STRIPED = true>
  __device__ __forceinline__ int below(int x) const {
    if (!STRIPED || world == 1) return x;
    if (x <= 0) return 0;
    const int span = bs * world;
    return (x / span) * bs + min(max(x % span - rank_off, 0), bs);
  }
  // Virtual index of the first window-part key at or after position x (x >= ws).
  __device__ __forceinline__ int vindex(int x) const { return n_sink + below(x) - lws; }
};

template <bool STRIPED = true>
__device__ __forceinline__ KeyScope make_scope(const PagedAttentionParams& p, int min_pos, int max_pos) {
  KeyScope s;
  s.world = STRIPED ? p.stripe_world : 1;
  s.rank_off = STRIPED ? int(p.stripe_rank) * p.block_size : 0;
  s.bs = p.block_size;
  s.ws = window_start(min_pos, p.window);
  s.n_sink = s.below<STRIPED>(p.window > 0 ? min(max(p.sink_tokens, 0), s.ws) : 0);
  s.lws = s.below<STRIPED>(s.ws);
  s.n_keys = s.n_sink + s.below<STRIPED>(max_pos + 1) - s.lws;
  return s;
}

// Offsets are signed (a staged slice may sit below the pool), so "no row" is its own value.
constexpr int64_t kNoRow = INT64_MIN;

// Pool element offset of the K row of virtual key c * 16 + (lane & 15), or kNoRow past the scope.
// Lanes 0-15 and 16-31 resolve the same 16 rows (one block-table lookup per row per chunk); the
// result is consumed one pipeline step later, so the lookup's latency hides behind compute.
template <bool STRIPED>
__device__ __forceinline__ int64_t resolve_row(const PagedAttentionParams& p, const int32_t* bt_row,
                                               const KeyScope& sc, int kvh, int c, int lane) {
  const int v = c * 16 + (lane & 15);
  if (v >= sc.n_keys) return kNoRow;
  const int key = sc.key<STRIPED>(v);
  const int lb = key / p.block_size;
  return tile_offset(p, bt_row[lb], 0, kvh) + int64_t(key - lb * p.block_size) * p.head_dim;
}

}  // namespace pagedkv::cuda::detail
