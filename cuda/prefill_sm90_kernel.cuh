// Tensor-core paged attention for multi-token queries on Hopper (sm_90a): chunked prefill,
// continuation prompts, window/streaming prefill, speculative verify steps with many rows.
//
// Work split. One CTA = (sequence, KV head, m-tile of kM = 128 packed query rows). A packed row
// m = qrow * group + g is query head kvh * group + g of the sequence's qrow-th row, so the query
// heads of a GQA group share every K/V tile (the M dimension of the MMAs). m-tiles are launched
// last-first: under a causal mask the last rows see the most keys, so the longest CTAs start first.
//
// Warp specialisation (384 threads). Warpgroup 0 is the producer: it resolves each tile's keys
// through the block table and brings K and V rows into a kStages-deep ring of 128-byte-swizzled
// shared-memory tiles (the layout wgmma reads, sm90_ptx.cuh). Each producer warp fills a quarter
// of a tile: by TMA, one box per page (or part of one), where those rows are whole pages of the
// pool in key order (kTmaKV: no window, not striped, pool blocks); otherwise row by row with
// cp.async, each thread's arrival on the stage's `full` mbarrier firing when its copies land
// (cp.async.mbarrier.arrive); consumers fence the generic->async proxy after waiting.
// Warpgroups 1 and 2 are consumers, 64 packed rows each: S = Q K^T by wgmma from shared memory,
// the online softmax in registers (base 2), then O += P V by wgmma with P from registers and V as
// an MN-major operand, and release the stage on its `empty` mbarrier. setmaxnreg moves registers
// from the producer to the consumers.
//
// Key order and masks. As in the split-K kernel (paged_attention_scope.cuh), the keys some row of
// the m-tile sees are numbered in "virtual" order (sinks, then the window of the lowest row, up to
// the highest row's position) and cut into tiles of kN; keys outside every row's scope are never
// read. A tile is masked element by element only where it is not wholly visible to every row of
// the warpgroup (the causal diagonal, window edges, the last partial tile).
#pragma once
#include <cuda.h>  // CUtensorMap (a type only: nothing is linked from the driver library)

#include <cfloat>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "paged_attention_scope.cuh"
#include "pagedkv/attention_params.h"
#include "sm90_ptx.cuh"

namespace pagedkv::cuda::detail {

template <int HD>
struct PrefillShape {
  static constexpr int kM = 128;                    // packed query rows per CTA (2 x 64)
  static constexpr int kN = HD <= 128 ? 128 : 64;   // keys per K/V tile
  static constexpr int kStages = HD == 64 ? 4 : HD == 128 ? 3 : 2;
  static constexpr int kChunks = HD / 8;            // 16-byte chunks per row
  static constexpr int kThreads = 384;
  static constexpr int kProducerRegs = 64, kConsumerRegs = 216;  // 128 x 64 + 256 x 216 <= 64K
  static constexpr uint32_t kQBytes = kM * HD * 2;
  static constexpr uint32_t kTileBytes = kN * HD * 2;
  static constexpr uint32_t kBarOffset = kQBytes + 2 * kStages * kTileBytes;
  static constexpr size_t kSmem = kBarOffset + 4 * kStages * sizeof(uint64_t) + 1024;  // + alignment
};

// The kernel's features, as bits (prefill_sm90.cu picks the default; the bench compares the
// others, cuda/NOTES.md):
//   kPingPong  the consumer warpgroups take turns issuing their MMAs (FlashAttention-3);
//   kSplitKV   K and V of a stage land and are released separately: S = QK^T waits only for K,
//              and K's half of the stage goes back to the producer as soon as S is computed;
//   kMaskSplit two softmax bodies, one for masked tiles and one with no mask code at all (else
//              the compiler predicates the per-element masking, and unmasked tiles still issue it);
//              which tiles need a mask is found once per warpgroup (first_tile), not per tile;
//   kFastDesc  wgmma descriptors built once (per warpgroup, per stage) and stepped by constants,
//              the warpgroup index made warp-uniform (shuffled from lane 0) for the compiler;
//   kPrefetchBT the producer loads the next tile's block-table entries before it waits for the
//              stage to come free, so that load's latency is not on its path;
//   kTmaKV     a producer warp whose rows are whole pages (or aligned parts of one) in key order
//              brings them by TMA boxes of tma_rows rows (the host's tensor map over the pool's
//              rows of head_dim), not by 16-byte cp.async copies computed thread by thread;
//   kEarlyRescale O is rescaled between issuing the next S = QK^T and issuing P.V (while the QK
//              product runs: FlashAttention-3's order), not after P.V lands.
enum PrefillFeature : int {
  kPingPong = 1, kSplitKV = 2, kMaskSplit = 4, kFastDesc = 8, kPrefetchBT = 16, kTmaKV = 32, kEarlyRescale = 64
};

constexpr float kPrefillLog2e = 1.4426950408889634f;
constexpr float kPrefillLn2 = 0.6931471805599453f;

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)

// What one CTA works on, derived the same way by every warpgroup.
struct PrefillTile {
  int seq, kvh, group, row0, m0, m_count, first_pos, n_tiles;
  KeyScope sc;
  // Position of tile-local packed row r (padding rows borrow the last real row's).
  __device__ int pos(int r) const { return first_pos + (m0 + min(r, m_count - 1)) / group; }
};

// Barriers per stage: full[s] (copies landed), empty[s] (consumers done with it); with kSplitKV
// also fullV[s] / emptyV[s] for the V half (full / empty then cover K alone).
// kv_map: the tensor map over the pool's rows (a __grid_constant__ parameter), boxes of 64 dims x
// tma_rows rows, 128-byte swizzle; tma_rows 0: none (the call is not eligible, prefill_sm90.cu).
template <typename T, int HD, int F>
__device__ __forceinline__ void prefill_producer(const PagedAttentionParams& p, const PrefillTile& w,
                                                 unsigned char* sK0, unsigned char* sV0, uint64_t* full,
                                                 uint64_t* empty, uint64_t* fullV, uint64_t* emptyV,
                                                 const void* kv_map, int tma_rows) {
  using S = PrefillShape<HD>;
  constexpr int kRows = S::kN / 4;  // rows of a tile per producer warp
  constexpr int kIters = kRows * S::kChunks / 32;
  constexpr int kGroups = (F & kSplitKV) != 0 ? 2 : 1;  // cp.async groups committed per tile (K, V)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* pool = static_cast<const T*>(p.pool);
  const int32_t* bt_row = p.block_table + int64_t(w.seq) * p.max_blocks;
  const int64_t v_off = int64_t(p.num_kv_heads) * p.block_size * HD;  // K tile -> V tile
  // Lane l resolves row warp * kRows + l of each tile (the copies take it by shuffle): its key,
  // and the block-table entry of the key's block (kNoRow's stand-in -1 past the scope).
  auto lookup = [&](int t, int& key, int32_t& blk) {
    const int v = t * S::kN + warp * kRows + lane;
    key = -1, blk = -1;
    if (lane < kRows && v < w.sc.n_keys) key = w.sc.key(v), blk = bt_row[key / p.block_size];
  };
  int key_next = -1;
  int32_t blk_next = -1;
  if constexpr ((F & kPrefetchBT) != 0) lookup(0, key_next, blk_next);
  for (int t = 0; t < w.n_tiles; ++t) {
    const int s = t % S::kStages;
    int key;
    int32_t blk;
    if constexpr ((F & kPrefetchBT) != 0) {
      key = key_next, blk = blk_next;
      if (t + 1 < w.n_tiles) lookup(t + 1, key_next, blk_next);  // lands while this tile waits
    }
    if (t >= S::kStages) mbar_wait(&empty[s], ((t / S::kStages) - 1) & 1);
    // Tile t - kStages's copies into this stage have landed: its consumers could release the stage
    // only after its full barrier, which this thread's arrival reached only once they had. Saying
    // so with a group wait costs nothing (no group is pending that long) and lets compute-sanitizer
    // racecheck, which follows cp.async groups and not mbarrier arrivals, see the order.
    if (t >= S::kStages) cp_async_wait<kGroups * (S::kStages - 1)>();
    if constexpr ((F & kPrefetchBT) == 0) lookup(t, key, blk);
    int64_t off = kNoRow;
    if (key >= 0) off = tile_offset(p, blk, 0, w.kvh) + int64_t(key % p.block_size) * HD;
    unsigned char* dK = sK0 + s * S::kTileBytes;
    unsigned char* dV = sV0 + s * S::kTileBytes;
    // kTmaKV: this warp's rows are whole pool pages in key order (the call's keys are contiguous
    // and page-aligned when tma_rows > 0), so lane l with l % tma_rows == 0 brings rows
    // [l, l + tma_rows) as one box per 64 head dims; its pool row (off / HD) must fit the map's
    // int32 coordinate. Row l's smem offset in the swizzled tile is (warp * kRows + l) * 128 per
    // column block, and the TMA swizzle lays each box out as swz_offset does.
    bool tma = false;
    if constexpr ((F & kTmaKV) != 0)
      tma = tma_rows > 0 &&
            __all_sync(0xffffffffu, lane >= kRows || (key >= 0 && blk >= 0 && off / HD + v_off / HD + kRows <= INT_MAX));
    auto tma_copy = [&](uint64_t* bar, bool with_k, bool with_v) {
      if (lane == 0) mbar_arrive_expect_tx(bar, uint32_t((int(with_k) + int(with_v)) * kRows * HD * sizeof(T)));
      __syncwarp();
      if (lane < kRows && lane % tma_rows == 0) {
        const int row = int(off / HD);
#pragma unroll
        for (int c = 0; c < HD / 64; ++c) {
          const uint32_t d = uint32_t(c * S::kN * 128 + (warp * kRows + lane) * 128);
          if (with_k) tma_load_2d(dK + d, kv_map, c * 64, row, bar);
          if (with_v) tma_load_2d(dV + d, kv_map, c * 64, row + int(v_off / HD), bar);
        }
      }
      if (lane != 0) mbar_arrive(bar);
    };
    // This thread's copies of the tile's K rows and/or V rows into stage s.
    auto copy = [&](bool with_k, bool with_v) {
#pragma unroll
      for (int i = 0; i < kIters; ++i) {
        const int it = lane + 32 * i, rl = it / S::kChunks, cv = it % S::kChunks;
        const int64_t o = __shfl_sync(0xffffffffu, off, rl);
        const bool ok = o != kNoRow;
        const uint32_t d = swz_offset(warp * kRows + rl, cv, S::kN);
        const T* src = pool + (ok ? o + cv * 8 : 0);
        if (with_k) cp_async_16(dK + d, src, ok);
        if (with_v) cp_async_16(dV + d, ok ? src + v_off : src, ok);
      }
    };
    // A barrier gets this thread's arrival once every copy it issued before has landed.
    // (A TMA warp arrives once per barrier too: lane 0 with the bytes expected, the others plain.)
    if constexpr ((F & kSplitKV) != 0) {  // K, its arrival; then V once its half of the stage is free
      if (tma) {
        tma_copy(&full[s], true, false);
      } else {
        copy(true, false);
        cp_async_arrive_noinc(&full[s]);
      }
      cp_async_commit();  // (empty when the tile came by TMA: the count stays per tile)
      if (t >= S::kStages) mbar_wait(&emptyV[s], ((t / S::kStages) - 1) & 1);
      if (tma) {
        tma_copy(&fullV[s], false, true);
      } else {
        copy(false, true);
        cp_async_arrive_noinc(&fullV[s]);
      }
    } else if (tma) {
      tma_copy(&full[s], true, true);
    } else {
      copy(true, true);
      cp_async_arrive_noinc(&full[s]);
    }
    cp_async_commit();
  }
  cp_async_wait<0>();
}

// Whether every key of virtual tile [v0, v0 + kN) is visible to every row at [pmin, pmax].
template <int KN>
__device__ __forceinline__ bool tile_unmasked(const PagedAttentionParams& p, const KeyScope& sc, int v0,
                                              int pmin, int pmax) {
  if (v0 + KN > sc.n_keys) return false;
  if (sc.key(v0 + KN - 1) > pmin) return false;
  if (p.window <= 0 || v0 + KN <= sc.n_sink) return true;
  return sc.key(max(v0, sc.n_sink)) > pmax - p.window;
}

// The first t in [lo, hi) for which pred(t) holds, or hi; pred must be false then true over t.
template <typename Pred>
__device__ __forceinline__ int first_tile(int lo, int hi, Pred pred) {
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (pred(mid)) hi = mid;
    else lo = mid + 1;
  }
  return lo;
}

// Reduces the pairs (sc[4j + off], sc[4j + off + 1]) over j < N with op, as a tree (levels by
// template recursion: every index stays a compile-time constant, so t stays in registers).
template <int W, typename Op>
__device__ __forceinline__ void tree_level(float* t, Op op) {
  if constexpr (W >= 1) {
#pragma unroll
    for (int j = 0; j < W; ++j) t[j] = op(t[j], t[j + W]);
    tree_level<W / 2>(t, op);
  }
}
template <int N, typename Op>
__device__ __forceinline__ float tree_reduce(const float* sc, int off, Op op) {
  float t[N];
#pragma unroll
  for (int j = 0; j < N; ++j) t[j] = op(sc[4 * j + off], sc[4 * j + off + 1]);
  tree_level<N / 2>(t, op);
  return t[0];
}

// The keys a row at `pos` sees, as virtual-key offsets from `base`: offset c is visible iff
// c <= hi and (c >= lo or c < sink_end). Virtual keys are sinks [0, n_sink), then the window
// part whose key is ws + (v - n_sink); the key tests of key_visible become offset compares, so a
// masked tile costs a few compares per element and no branches (the kernel's code stays small).
struct RowLimits {
  int hi, lo, sink_end;
  __device__ bool sees(int c) const { return (c <= hi) & ((c >= lo) | (c < sink_end)); }
};
__device__ __forceinline__ RowLimits row_limits(const PagedAttentionParams& p, const KeyScope& sc, int pos, int base) {
  // (vindex: key -> virtual index in the window part; unstriped it adds n_sink - ws)
  RowLimits r;
  r.hi = min(sc.vindex(pos + 1) - 1, sc.n_keys - 1) - base;
  r.lo = p.window > 0 ? sc.vindex(pos - p.window + 1) - base : INT_MIN / 2;
  r.sink_end = (p.window > 0 ? max(sc.n_sink, sc.vindex(min(p.sink_tokens, pos + 1))) : 0) - base;
  return r;
}

template <typename T, int HD, int F>
__device__ __forceinline__ void prefill_consumer(const PagedAttentionParams& p, const PrefillTile& w, int cw, bool pair,
                                                 unsigned char* sQ, unsigned char* sK0, unsigned char* sV0,
                                                 uint64_t* full, uint64_t* empty, uint64_t* fullV, uint64_t* emptyV) {
  constexpr bool kSplit = (F & kSplitKV) != 0;
  using S = PrefillShape<HD>;
  constexpr int kN = S::kN;
  const int ctid = threadIdx.x - 128 * (cw + 1), warp = ctid / 32, lane = ctid % 32;
  const int g = lane / 4, q4 = lane % 4;
  const int num_q_heads = p.num_q_heads;

  // This warpgroup's 64 packed Q rows into the swizzled Q tile (zeros past the real rows).
  const T* q = static_cast<const T*>(p.q);
  for (int it = ctid; it < 64 * S::kChunks; it += 128) {
    const int r = 64 * cw + it / S::kChunks, cv = it % S::kChunks, m = w.m0 + r;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (r < w.m_count) {
      const int64_t qrow = w.row0 + m / w.group, h = int64_t(w.kvh) * w.group + m % w.group;
      val = *reinterpret_cast<const uint4*>(q + (qrow * num_q_heads + h) * HD + cv * 8);
    }
    *reinterpret_cast<uint4*>(sQ + swz_offset(r, cv, S::kM)) = val;
  }
  fence_proxy_async();
  named_barrier(1 + cw, 128);
  // Ping-pong (FlashAttention-3): with two consumer warpgroups, each issues its MMAs only on its
  // turn (named barrier 3 + cw) and then hands the turn over, so one group's softmax runs while
  // the other's MMAs keep the tensor cores busy. Group 1 gives group 0 the first turn.
  const bool turns = (F & kPingPong) != 0 && pair;
  auto my_turn = [&] {
    if (turns) named_barrier(3 + cw, 256);
  };
  auto their_turn = [&] {
    if (turns) named_barrier_arrive(3 + (1 - cw), 256);
  };
  if (turns && cw == 1) named_barrier_arrive(3, 256);

  const int rA = 64 * cw + 16 * warp + g, rB = rA + 8;  // this thread's two accumulator rows
  const int posA = w.pos(rA), posB = w.pos(rB);
  const int pmin = w.pos(64 * cw), pmax = w.pos(64 * cw + 63);
  const float sl2 = p.scale * kPrefillLog2e;
  const uint32_t q_addr = smem_u32(sQ) + 64 * cw * 128;
  const uint32_t k_addr = smem_u32(sK0), v_addr = smem_u32(sV0);

  float o[HD / 2];
#pragma unroll
  for (int i = 0; i < HD / 2; ++i) o[i] = 0.f;
  float mA = -INFINITY, mB = -INFINITY, lA = 0.f, lB = 0.f;
  float sc[kN / 2];       // S of the newest tile, then its P (float)
  uint32_t pf[kN / 16][4];  // P of the previous tile as the A operand of P.V

  // (kFastDesc: a descriptor's address field is bits 0-13 of address / 16, and every shared
  // address here is under 256 KiB, so adding offset / 16 to a descriptor moves its address.)
  const uint64_t q_desc = smem_desc(q_addr, 16, 1024), k_desc = smem_desc(k_addr, 16, 1024);
  const uint64_t v_desc = smem_desc(v_addr, kN * 128, 1024);
  // S = Q K^T of the tile in stage s, issued (not waited for).
  auto issue_qk = [&](int s) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
      const uint32_t col = (kk / 4) * 128, sub = (kk % 4) * 32;
      uint64_t da, db;
      if constexpr ((F & kFastDesc) != 0) {
        da = q_desc + ((col * S::kM + sub) >> 4);
        db = k_desc + ((s * S::kTileBytes) >> 4) + ((col * kN + sub) >> 4);
      } else {
        da = smem_desc(q_addr + col * S::kM + sub, 16, 1024);
        db = smem_desc(k_addr + s * S::kTileBytes + col * kN + sub, 16, 1024);
      }
      wgmma_ss<0>(sc, da, db, kk > 0, static_cast<T*>(nullptr));
    }
    wgmma_commit();
  };
  // O += P V of the tile in stage s, issued.
  auto issue_pv = [&](int s) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk) {
      const uint64_t db = (F & kFastDesc) != 0
                              ? v_desc + ((s * S::kTileBytes) >> 4) + ((kk * 16 * 128) >> 4)
                              : smem_desc(v_addr + s * S::kTileBytes + kk * 16 * 128, kN * 128, 1024);
      wgmma_rs<1>(o, pf[kk], db, 1, static_cast<T*>(nullptr));
    }
    wgmma_commit();
  };
  // Online softmax of tile t in place (sc becomes P in float); returns O's rescale factors.
  // (mode: 0 masking decided per tile at run time, in one body; 1 masked; 2 unmasked.)
  auto softmax_body = [&](auto mode, bool masked, int t, float* alphaA, float* alphaB) {
    constexpr int kMode = decltype(mode)::value;
    if constexpr (kMode != 0) masked = kMode == 1;
    const int v0 = t * kN;
    RowLimits la, lb;
    if (masked) la = row_limits(p, w.sc, posA, v0 + 2 * q4), lb = row_limits(p, w.sc, posB, v0 + 2 * q4);
#pragma unroll
    for (int j = 0; j < kN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e)
        if (masked) {
          if (!la.sees(8 * j + e)) sc[4 * j + e] = -INFINITY;
          if (!lb.sees(8 * j + e)) sc[4 * j + 2 + e] = -INFINITY;
        }
    // Row maxima of the raw scores (scale > 0, so the scaled maximum is the scaled raw one), as
    // trees rather than chains so the compares overlap.
    float xA = tree_reduce<kN / 8>(sc, 0, [](float x, float y) { return fmaxf(x, y); });
    float xB = tree_reduce<kN / 8>(sc, 2, [](float x, float y) { return fmaxf(x, y); });
#pragma unroll
    for (int d = 1; d <= 2; d <<= 1) {
      xA = fmaxf(xA, __shfl_xor_sync(0xffffffffu, xA, d));
      xB = fmaxf(xB, __shfl_xor_sync(0xffffffffu, xB, d));
    }
    const float nA = fmaxf(mA, xA * sl2), nB = fmaxf(mB, xB * sl2);
    const float uA = nA == -INFINITY ? 0.f : nA, uB = nB == -INFINITY ? 0.f : nB;
    *alphaA = ex2(mA - uA), *alphaB = ex2(mB - uB);
    mA = nA, mB = nB;
#pragma unroll
    for (int j = 0; j < kN / 8; ++j) {  // one FFMA and one ex2 per score
      sc[4 * j] = ex2(fmaf(sc[4 * j], sl2, -uA)), sc[4 * j + 1] = ex2(fmaf(sc[4 * j + 1], sl2, -uA));
      sc[4 * j + 2] = ex2(fmaf(sc[4 * j + 2], sl2, -uB)), sc[4 * j + 3] = ex2(fmaf(sc[4 * j + 3], sl2, -uB));
    }
    const float sumA = tree_reduce<kN / 8>(sc, 0, [](float x, float y) { return x + y; });
    const float sumB = tree_reduce<kN / 8>(sc, 2, [](float x, float y) { return x + y; });
    lA = lA * *alphaA + sumA, lB = lB * *alphaB + sumB;
    // Pin the exponentials here, under the P.V product in flight: left alone, the compiler sinks
    // them below the wait for it (they are first needed after), and nothing overlaps.
    fence_regs(sc);
  };
  // kMaskSplit: tile t is wholly visible to every row of this warpgroup iff t < t_hi and (no
  // window, or t lies in the sinks, or t >= t_lo): tile_unmasked's tests, each monotone in t.
  int t_hi = w.n_tiles, t_lo = 0;
  if constexpr ((F & kMaskSplit) != 0) {
    t_hi = first_tile(0, w.n_tiles, [&](int t) {
      const int last = t * kN + kN - 1;
      return last >= w.sc.n_keys || w.sc.key(last) > pmin;
    });
    if (p.window > 0)
      t_lo = first_tile(0, w.n_tiles, [&](int t) {
        const int v = max(t * kN, w.sc.n_sink);
        return v >= w.sc.n_keys || w.sc.key(v) > pmax - p.window;
      });
  }
  auto softmax = [&](int t, float* alphaA, float* alphaB) {
    if constexpr ((F & kMaskSplit) != 0) {
      const bool masked = !(t < t_hi && (p.window <= 0 || (t + 1) * kN <= w.sc.n_sink || t >= t_lo));
      if (masked)
        softmax_body(std::integral_constant<int, 1>{}, true, t, alphaA, alphaB);
      else
        softmax_body(std::integral_constant<int, 2>{}, false, t, alphaA, alphaB);
    } else {
      const bool masked = !tile_unmasked<kN>(p, w.sc, t * kN, pmin, pmax);
      softmax_body(std::integral_constant<int, 0>{}, masked, t, alphaA, alphaB);
    }
  };
  auto to_operand = [&] {
#pragma unroll
    for (int j = 0; j < kN / 8; ++j) {
      pf[j / 2][(j % 2) * 2] = Pack<T>::two(sc[4 * j], sc[4 * j + 1]);
      pf[j / 2][(j % 2) * 2 + 1] = Pack<T>::two(sc[4 * j + 2], sc[4 * j + 3]);
    }
  };

  // Software pipeline (FlashAttention-3's intra-warpgroup overlap): while the tensor cores run
  // S_t = Q K_t and O += P_{t-1} V_{t-1}, nothing waits; the softmax of S_t then overlaps the
  // P.V product, and O is rescaled once that product has landed.
  // (kSplitKV: K's half of stage s is released once S_t has landed, V's once P V has.)
  auto release = [&](uint64_t* bar) {
    __syncwarp();
    if (lane == 0) mbar_arrive(bar);
  };
  // O *= alpha row by row: after P.V has landed, or (kEarlyRescale) once the next QK^T is issued.
  auto rescale = [&](float aA, float aB) {
#pragma unroll
    for (int j = 0; j < HD / 8; ++j) {
      o[4 * j] *= aA, o[4 * j + 1] *= aA;
      o[4 * j + 2] *= aB, o[4 * j + 3] *= aB;
    }
  };
  constexpr bool kEarly = (F & kEarlyRescale) != 0;
  float alphaA, alphaB;
  mbar_wait(&full[0], 0);
  fence_proxy_async();
  my_turn();
  issue_qk(0);
  their_turn();
  wgmma_wait<0>();
  fence_regs(sc);
  if (kSplit) release(&empty[0]);
  softmax(0, &alphaA, &alphaB);
  to_operand();
  for (int t = 1; t < w.n_tiles; ++t) {
    const int s = t % S::kStages, prev = (t - 1) % S::kStages;
    mbar_wait(&full[s], (t / S::kStages) & 1);
    if (kSplit) mbar_wait(&fullV[prev], ((t - 1) / S::kStages) & 1);
    fence_proxy_async();  // the producer's cp.async writes, now seen, to wgmma's async proxy
    my_turn();
    issue_qk(s);
    if (kEarly) rescale(alphaA, alphaB);  // (the previous tile's factors; O has no product in flight)
    issue_pv(prev);
    their_turn();
    wgmma_wait<1>();
    fence_regs(sc);
    if (kSplit) release(&empty[s]);
    softmax(t, &alphaA, &alphaB);
    wgmma_wait<0>();
    fence_regs(o);
    fence_regs_u32(pf);
    release(kSplit ? &emptyV[prev] : &empty[prev]);
    if (!kEarly) rescale(alphaA, alphaB);
    to_operand();
  }
  if (kSplit) {
    mbar_wait(&fullV[(w.n_tiles - 1) % S::kStages], ((w.n_tiles - 1) / S::kStages) & 1);
    fence_proxy_async();
  }
  my_turn();
  if (kEarly) rescale(alphaA, alphaB);
  issue_pv((w.n_tiles - 1) % S::kStages);
  their_turn();
  wgmma_wait<0>();
  fence_regs(o);
  // (The last stage needs no release: the producer has nothing more to put there.)

  // Epilogue: normalise, write this thread's pairs of columns and the rows' LSE.
#pragma unroll
  for (int d = 1; d <= 2; d <<= 1) {
    lA += __shfl_xor_sync(0xffffffffu, lA, d);
    lB += __shfl_xor_sync(0xffffffffu, lB, d);
  }
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = h ? rB : rA;
    if (r >= w.m_count) continue;
    const float l = h ? lB : lA, m = h ? mB : mA;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int pm = w.m0 + r;
    const int64_t qrow = w.row0 + pm / w.group, head = int64_t(w.kvh) * w.group + pm % w.group;
    T* dst = out + (qrow * num_q_heads + head) * HD + 2 * q4;
#pragma unroll
    for (int j = 0; j < HD / 8; ++j)
      *reinterpret_cast<uint32_t*>(dst + 8 * j) = Pack<T>::two(o[4 * j + 2 * h] * inv, o[4 * j + 2 * h + 1] * inv);
    if (p.lse != nullptr && q4 == 0) p.lse[qrow * num_q_heads + head] = (m + __log2f(l)) * kPrefillLn2;
  }
}

// A CTA none of whose rows sees a key of this rank (striped): out = 0, lse = -inf, which the
// merge over ranks weighs 0.
template <typename T, int HD>
__device__ void prefill_no_keys(const PagedAttentionParams& p, const PrefillTile& w) {
  T* out = static_cast<T*>(p.out);
  for (int i = threadIdx.x; i < w.m_count * HD; i += blockDim.x) {
    const int pm = w.m0 + i / HD;
    const int64_t qrow = w.row0 + pm / w.group, head = int64_t(w.kvh) * w.group + pm % w.group;
    out[(qrow * p.num_q_heads + head) * HD + i % HD] = T(0.f);
    if (p.lse != nullptr && i % HD == 0) p.lse[qrow * p.num_q_heads + head] = -INFINITY;
  }
}

#endif  // sm_90a

// kv_map / tma_rows: see prefill_producer (the map is read only by kTmaKV instances).
template <typename T, int HD, int F>
__global__ void __launch_bounds__(384, 1)
    prefill_sm90_kernel(const PagedAttentionParams p, const __grid_constant__ CUtensorMap kv_map, const int tma_rows) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using S = PrefillShape<HD>;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  unsigned char* sQ = smem;
  unsigned char* sK0 = smem + S::kQBytes;
  unsigned char* sV0 = sK0 + S::kStages * S::kTileBytes;
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + S::kBarOffset);
  uint64_t* empty = full + S::kStages;
  uint64_t* fullV = empty + S::kStages;  // (kSplitKV only)
  uint64_t* emptyV = fullV + S::kStages;

  PrefillTile w;
  w.seq = blockIdx.z, w.kvh = blockIdx.y, w.group = p.num_q_heads / p.num_kv_heads;
  w.row0 = p.q_indptr[w.seq];
  const int q_len = p.q_indptr[w.seq + 1] - w.row0;
  w.m0 = (gridDim.x - 1 - blockIdx.x) * S::kM;
  w.m_count = min(S::kM, q_len * w.group - w.m0);
  if (w.m_count <= 0) return;  // uniform over the CTA: a shorter query than the grid's longest
  w.first_pos = p.kv_lens[w.seq] - q_len;
  w.sc = make_scope(p, w.pos(0), w.pos(S::kM - 1));
  w.n_tiles = (w.sc.n_keys + S::kN - 1) / S::kN;
  if (w.n_tiles == 0) {  // striped: no key of this rank in any row's scope (uniform over the CTA)
    prefill_no_keys<T, HD>(p, w);
    return;
  }
  const int consumers = w.m_count > 64 ? 2 : 1;
  if (threadIdx.x == 0) {
    for (int s = 0; s < S::kStages; ++s) {
      mbar_init(&full[s], 128), mbar_init(&empty[s], 4 * consumers);
      mbar_init(&fullV[s], 128), mbar_init(&emptyV[s], 4 * consumers);
    }
  }
  __syncthreads();
  // (kFastDesc: from lane 0 by shuffle, the compiler knows wg is warp-uniform and can keep what
  // derives from it, the warpgroup's Q descriptor, in uniform registers.)
  const int wg = (F & kFastDesc) != 0 ? __shfl_sync(0xffffffffu, int(threadIdx.x / 128), 0) : int(threadIdx.x / 128);
  if (wg == 0) {
    regs_dealloc<S::kProducerRegs>();
    prefill_producer<T, HD, F>(p, w, sK0, sV0, full, empty, fullV, emptyV, &kv_map, tma_rows);
  } else {
    regs_alloc<S::kConsumerRegs>();
    if (wg - 1 < consumers)
      prefill_consumer<T, HD, F>(p, w, wg - 1, consumers == 2, sQ, sK0, sV0, full, empty, fullV, emptyV);
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // not sm_90a code: the host never launches this (prefill_sm90_supports); never run empty
#endif
}

}  // namespace pagedkv::cuda::detail
