// The keys an m-tile of the paged attention kernel sees, in "virtual" order (sinks, then the
// window; see the top of paged_attention_kernel.cuh), and where each key's K row lies in the pool.
#pragma once
#include <cstdint>

#include "pagedkv/attention_params.h"

namespace pagedkv::cuda::detail {

// The keys some row of an m-tile sees, in virtual order.
struct KeyScope {
  int n_sink;  // virtual [0, n_sink) are keys [0, n_sink)
  int ws;      // virtual [n_sink, n_keys) are keys [ws, ws + n_keys - n_sink)
  int n_keys;
  __device__ __forceinline__ int key(int v) const { return v < n_sink ? v : ws + (v - n_sink); }
};

__device__ __forceinline__ KeyScope make_scope(int min_pos, int max_pos, int window, int sinks) {
  KeyScope s;
  s.ws = window_start(min_pos, window);
  s.n_sink = window > 0 ? min(max(sinks, 0), s.ws) : 0;
  s.n_keys = s.n_sink + (max_pos + 1 - s.ws);
  return s;
}

// Offsets are signed (a staged slice may sit below the pool), so "no row" is its own value.
constexpr int64_t kNoRow = INT64_MIN;

// Pool element offset of the K row of virtual key c * 16 + (lane & 15), or kNoRow past the scope.
// Lanes 0-15 and 16-31 resolve the same 16 rows (one block-table lookup per row per chunk); the
// result is consumed one pipeline step later, so the lookup's latency hides behind compute.
__device__ __forceinline__ int64_t resolve_row(const PagedAttentionParams& p, const int32_t* bt_row,
                                               const KeyScope& sc, int kvh, int c, int lane) {
  const int v = c * 16 + (lane & 15);
  if (v >= sc.n_keys) return kNoRow;
  const int key = sc.key(v);
  const int lb = key / p.block_size;
  return tile_offset(p, bt_row[lb], 0, kvh) + int64_t(key - lb * p.block_size) * p.head_dim;
}

}  // namespace pagedkv::cuda::detail
