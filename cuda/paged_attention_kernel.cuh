// The split-K paged attention kernel (decode and multi-token causal queries).
//
// Work split. One CTA = (sequence, KV head, m-tile of 16 packed query rows, split). A packed row
// m = qrow_local * group + g is query head kvh * group + g of the sequence's qrow_local-th row, so
// every query head of a GQA group (and every query row of a short multi-token step) shares one
// read of each KV chunk: the 16 packed rows are the M dimension of mma.sync m16n8k16.
//
// Key order. The keys that some row of the m-tile can see are [0, n_sink) (attention sinks) then
// [ws, max_pos] (the window of the lowest row, or everything); they are numbered 0..n_keys-1 in
// that "virtual" order and cut into chunks of 16. Keys outside it, and so whole blocks outside
// every row's scope, are never addressed. A split takes a contiguous run of chunks; inside the
// CTA, warp w takes chunks w, w + NWARPS, ... and streams them through its own STAGES-deep
// cp.async ring in shared memory (only __syncwarp in the loop), keeping its own online-softmax
// state. The warps' states are merged in shared memory at the end; splits are merged by
// merge_splits_kernel (paged_attention_merge.cuh) from float partials in the workspace.
//
// Sink rotation (ROPE instances only; attention_params.h): virtual keys [0, n_rot) are sinks of
// some row of the m-tile. Chunks there score against a second, rotated Q tile in shared memory
// (each packed row turned by its own row's sink_shift) and, where a chunk also holds keys that
// some row sees unturned, against the plain tile too, picking per (row, key). Every other chunk
// runs exactly the code of the instances without rotation (paged_attention_rope.cuh).
#pragma once
#include <cfloat>
#include <cstdint>
#include <type_traits>

#include "mma_ptx.cuh"
#include "paged_attention_rope.cuh"
#include "paged_attention_scope.cuh"
#include "pagedkv/attention_params.h"

namespace pagedkv::cuda::detail {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int HD, int NWARPS, int STAGES>
struct AttnShape {
  static constexpr int kChunk = 16;        // keys per warp step: the k of one P.V mma
  static constexpr int kVecs = HD / 8;     // 16-byte vectors per row
  // Shared-memory tiles ([16 rows][HD] of Q, K or V). Where a row is whole 128-byte lines (head
  // dims 64, 128, 256) rows are packed and vector cv of row r sits at cv ^ (r % 8): each 128-byte
  // line a cp.async reads lands in one aligned 128-byte smem line, and the 8 rows one ldmatrix
  // reads sit on 8 distinct bank quads. (Rows padded by 16 bytes, as before, made every line two
  // partial L2 requests: 1.5x the L2 sectors of the KV, ncu on H100, cuda/NOTES.md.) Other head
  // dims keep the padded rows.
  static constexpr bool kSwizzle = kVecs % 8 == 0;
  static constexpr int kStride = kSwizzle ? HD : HD + 8;  // smem row stride (elements)
  static constexpr int kTile = kChunk * kStride;  // one K (or V) chunk
  static constexpr int kWarpElems = STAGES * 2 * kTile;
  static constexpr int kQElems = 16 * kStride;
  static constexpr int kThreads = NWARPS * 32;
  static constexpr int kOStride = HD + 4;  // float row stride when a warp's O is parked in smem
  static_assert(16 * kOStride * 4 <= kWarpElems * 2, "warp O must fit in its KV ring");
  static constexpr bool kQInRegs = HD <= 128;  // HD 256 would not leave room for O: Q stays in smem
  // The rotated Q tile of sink rotation: in place of the plain one once that sits in registers,
  // else a tile of its own after the rings (so rotation never costs the others occupancy at
  // HD <= 128).
  static constexpr bool kRotTileOwn(bool rope) { return rope && !kQInRegs; }
  template <typename T, bool ROPE = false>
  static constexpr size_t smem_bytes() {
    return size_t(kQElems * (kRotTileOwn(ROPE) ? 2 : 1) + NWARPS * kWarpElems) * sizeof(T);
  }
  // Element offset of 16-byte vector cv of row r in a tile, and of element d of row r.
  __device__ static int vec(int r, int cv) {
    return kSwizzle ? r * HD + ((cv ^ (r & 7)) << 3) : r * kStride + cv * 8;
  }
  __device__ static int elem(int r, int d) { return vec(r, d >> 3) + (d & 7); }
  // One lane's ldmatrix address in a tile at k-step k: vector 2 k + c0 of row `row`.
  struct Frag {
    int base, y;
    __device__ Frag(int row, int c0)
        : base(kSwizzle ? row * HD : row * kStride + c0 * 8), y(kSwizzle ? (c0 ^ (row & 7)) << 3 : 0) {}
    __device__ int at(int k) const { return kSwizzle ? base + ((16 * k) ^ y) : base + 16 * k; }
  };
};

// Issue the cp.async copies of one chunk (16 keys x HD of K and of V) into sK/sV; `off` is this
// lane's resolve_row. Index map: vector it = lane + 32 i of the chunk is row it / kVecs, 16-byte
// column it % kVecs, so a warp instruction reads whole rows. Rows past the scope are zero-filled.
template <typename T, int HD, int NWARPS, int STAGES>
__device__ __forceinline__ void issue_chunk(const T* pool, int64_t off, int64_t v_off, T* sK,
                                            T* sV, int lane) {
  using S = AttnShape<HD, NWARPS, STAGES>;
#pragma unroll
  for (int i = 0; i < S::kChunk * S::kVecs / 32; ++i) {
    const int it = lane + 32 * i;
    const int r = it / S::kVecs, cv = it % S::kVecs;
    const int64_t o = __shfl_sync(0xffffffffu, off, r);
    const bool ok = o != kNoRow;
    const T* src = pool + (ok ? o + cv * 8 : 0);
    cp_async_16(sK + S::vec(r, cv), src, ok);
    cp_async_16(sV + S::vec(r, cv), ok ? src + v_off : src, ok);
  }
}

template <typename T, int HD, int NWARPS, int STAGES, bool ROPE>
__global__ void __launch_bounds__(NWARPS * 32)
    paged_attention_kernel(const PagedAttentionParams p, const int num_splits,
                           float* __restrict__ part_o,    // [num_splits, num_rows, num_q_heads, HD]
                           float* __restrict__ part_lse)  // [num_splits, num_rows, num_q_heads] log2
{
  using S = AttnShape<HD, NWARPS, STAGES>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // the m-tile's 16 packed query rows (AttnShape::vec)
  __shared__ float s_m[NWARPS][16], s_l[NWARPS][16];

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Let the split merge (launched with programmatic serialisation) get resident early; it
  // still waits for this whole grid before reading the partials.
  asm volatile("griddepcontrol.launch_dependents;\n" ::);
#endif
  const int kvh = blockIdx.x % p.num_kv_heads, seq = blockIdx.x / p.num_kv_heads;
  const int group = p.num_q_heads / p.num_kv_heads;
  const int row0 = p.q_indptr[seq];
  const int q_len = p.q_indptr[seq + 1] - row0;
  const int m0 = blockIdx.y * 16;
  const int m_count = min(16, q_len * group - m0);
  if (m_count <= 0) return;  // uniform over the CTA: shorter query than the grid's longest
  const int first_pos = p.kv_lens[seq] - q_len;  // position of the sequence's first query row
  const int min_pos = first_pos + m0 / group;
  const int max_pos = first_pos + (m0 + m_count - 1) / group;
  // The ROPE instances are the general ones: they also serve striped calls (paged_attention_scope.cuh).
  constexpr bool kStriped = ROPE;
  const KeyScope sc = make_scope<kStriped>(p, min_pos, max_pos);
  const int n_chunks = (sc.n_keys + S::kChunk - 1) / S::kChunk;
  const int c_begin = int(int64_t(blockIdx.z) * n_chunks / num_splits);
  const int c_end = int(int64_t(blockIdx.z + 1) * n_chunks / num_splits);
  // Sink rotation: virtual keys [0, n_rot) are kept sinks of some row (the sinks of the lowest row,
  // then, in the window part, those of higher rows). None while every row's window still starts
  // at or before sink_tokens: then nothing turns.
  int n_rot = 0;
  if constexpr (ROPE) {
    if (rotates_sinks(p) && window_start(max_pos, p.window) > p.sink_tokens)
      n_rot = sc.n_sink + max(0, sc.below(sinks_kept(max_pos, p.window, p.sink_tokens)) - sc.lws);
  }

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int quad_row = lane / 4, quad_col = 2 * (lane % 4);  // mma accumulator coordinates
  T* ring = sQ + S::kQElems + warp * S::kWarpElems;          // this warp's STAGES x {K, V}
  const T* pool = static_cast<const T*>(p.pool);
  const int32_t* bt_row = p.block_table + int64_t(seq) * p.max_blocks;

  // Positions of this lane's two accumulator rows (quad_row, quad_row + 8); padding rows past
  // m_count borrow the last real row so their (discarded) softmax stays finite.
  int pos[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) pos[h] = first_pos + (m0 + min(quad_row + 8 * h, m_count - 1)) / group;

  const int my_first = c_begin + warp;
  const int n_mine = my_first < c_end ? (c_end - my_first + NWARPS - 1) / NWARPS : 0;
  const int64_t v_off = int64_t(p.num_kv_heads) * p.block_size * HD;  // K tile -> V tile
  int64_t next_off = n_mine > 0 ? resolve_row<kStriped>(p, bt_row, sc, kvh, my_first, lane) : kNoRow;
  auto issue = [&](int i) {  // chunk i of this warp; resolves chunk i + 1 for the next call
    T* st = ring + (i % STAGES) * 2 * S::kTile;
    issue_chunk<T, HD, NWARPS, STAGES>(pool, next_off, v_off, st, st + S::kTile, lane);
    if (i + 1 < n_mine) next_off = resolve_row<kStriped>(p, bt_row, sc, kvh, my_first + (i + 1) * NWARPS, lane);
  };
  // KV copies go out before the Q tile is loaded, so both latencies overlap.
#pragma unroll
  for (int i = 0; i < STAGES - 1; ++i) {
    if (i < n_mine) issue(i);
    cp_async_commit();
  }

  // Q tile: thread t loads 16-byte vectors t, t + kThreads, ... of the [16][HD] packed rows.
  const T* q = static_cast<const T*>(p.q);
  for (int it = threadIdx.x; it < 16 * S::kVecs; it += S::kThreads) {
    const int r = it / S::kVecs, cv = it % S::kVecs;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (r < m_count) {
      const int m = m0 + r;
      const int64_t qrow = row0 + m / group, head = int64_t(kvh) * group + m % group;
      val = *reinterpret_cast<const uint4*>(q + (qrow * p.num_q_heads + head) * HD + cv * 8);
    }
    *reinterpret_cast<uint4*>(sQ + S::vec(r, cv)) = val;
  }
  __syncthreads();

  constexpr bool kQInRegs = S::kQInRegs;
  uint32_t qf[kQInRegs ? HD / 16 : 1][4];
  // ldmatrix rows and 16-byte columns: A (Q) rows l%8 + 8*((l/8)%2), column l/16; B (K) rows
  // 8*(l/16) + l%8, column (l/8)%2; B (V, transposed) as A; plus 2 per k-step.
  using Frag = typename S::Frag;
  const Frag qa(lane % 8 + 8 * ((lane / 8) % 2), lane / 16);
  const Frag ka(8 * (lane / 16) + lane % 8, (lane / 8) % 2);
  const Frag& va = qa;
  if constexpr (kQInRegs) {
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) ldmatrix_x4(qf[kk], sQ + qa.at(kk));
  }
  // The rotated tile, only in CTAs whose chunks reach a rotated one (uniform over the CTA).
  T* const sQr = S::kRotTileOwn(ROPE) ? sQ + S::kQElems + NWARPS * S::kWarpElems : sQ;
  if constexpr (ROPE) {
    if (c_begin < c_end && c_begin * S::kChunk < n_rot) {
      if constexpr (kQInRegs) __syncthreads();  // every warp holds its qf: sQ may be turned in place
      rotate_q_tile<T, S>(p, sQ, sQr, first_pos, m0, m_count, group);
      __syncthreads();
    }
  }

  float o[HD / 8][4];
#pragma unroll
  for (int nd = 0; nd < HD / 8; ++nd) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.f;
  float row_m[2] = {-INFINITY, -INFINITY}, row_l[2] = {0.f, 0.f};
  const float scale_log2 = p.scale * kLog2e;

  for (int i = 0; i < n_mine; ++i) {
    if (i + STAGES - 1 < n_mine) issue(i + STAGES - 1);  // refills the stage freed last step
    cp_async_commit();
    cp_async_wait<STAGES - 1>();
    __syncwarp();  // every lane's copies of chunk i have landed
    const T* sK = ring + (i % STAGES) * 2 * S::kTile;
    const T* sV = sK + S::kTile;

    // S = Q K^T for 16 keys: s[nt] holds keys 8 nt + quad_col + {0,1} of rows quad_row (+8).
    float s[2][4] = {};
    bool plain = true;  // chunks with no rotated key: the code of the instances without rotation
    if constexpr (ROPE) plain = (my_first + i * NWARPS) * S::kChunk >= n_rot;
    if (plain) {
#pragma unroll
      for (int kk = 0; kk < HD / 16; ++kk) {
        uint32_t a[4], b[4];
        if constexpr (kQInRegs) {
#pragma unroll
          for (int j = 0; j < 4; ++j) a[j] = qf[kk][j];
        } else {
          ldmatrix_x4(a, sQ + qa.at(kk));
        }
        ldmatrix_x4(b, sK + ka.at(kk));
        mma_16816<T>(s[0], a, b[0], b[1]);
        mma_16816<T>(s[1], a, b[2], b[3]);
      }
    } else if constexpr (ROPE) {
      score_rotated_chunk<T, S>(s, qf, sQ, sQr, qa, sK, ka, sc, (my_first + i * NWARPS) * S::kChunk, quad_col,
                                pos, p);
    }

    // Mask only chunks that straddle an edge (scope end, causal diagonal, window start).
    const int vbase = (my_first + i * NWARPS) * S::kChunk;
    bool interior = vbase + S::kChunk <= sc.n_keys && sc.key<kStriped>(vbase + S::kChunk - 1) <= min_pos;
    if (interior && p.window > 0 && vbase + S::kChunk > sc.n_sink)
      interior = sc.key<kStriped>(max(vbase, sc.n_sink)) > max_pos - p.window;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        s[nt][j] *= scale_log2;
        if (!interior) {
          const int v = vbase + nt * 8 + quad_col + (j & 1);
          if (v >= sc.n_keys || !key_visible(sc.key<kStriped>(v), pos[j / 2], p.window, p.sink_tokens))
            s[nt][j] = -INFINITY;
        }
      }

    // Online softmax in the log2 domain, rows quad_row (h = 0) and quad_row + 8 (h = 1).
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = fmaxf(fmaxf(s[0][2 * h], s[0][2 * h + 1]), fmaxf(s[1][2 * h], s[1][2 * h + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(row_m[h], mx);
      const float base = m_new == -INFINITY ? 0.f : m_new;  // all masked so far: keep exp finite
      const float alpha = ex2(row_m[h] - base);
      row_m[h] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          s[nt][2 * h + e] = ex2(s[nt][2 * h + e] - base);
          sum += s[nt][2 * h + e];
        }
      row_l[h] = row_l[h] * alpha + sum;
#pragma unroll
      for (int nd = 0; nd < HD / 8; ++nd) {
        o[nd][2 * h] *= alpha;
        o[nd][2 * h + 1] *= alpha;
      }
    }

    // O += P V: the S accumulators of two n-tiles are exactly the A fragment of a k16 step.
    // bf16 carries P as hi + lo, two bf16 terms: rounding P to 8 bits was the largest error of
    // the bf16 kernel (2.2e-3 relative against float64, FlashInfer's CUDA-core path 1.7e-3 on
    // 128 x 2K); the second P.V mma costs nothing measurable in this memory-bound loop. Not in
    // the ROPE instances: their second score tile leaves no registers for it (head_dim 256 spilled).
    constexpr bool kSplitP = std::is_same_v<T, __nv_bfloat16> && !ROPE;
    uint32_t pa[4], pl[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      pa[j] = Pack<T>::two(s[j / 2][2 * (j % 2)], s[j / 2][2 * (j % 2) + 1]);
      if constexpr (kSplitP) pl[j] = Pack<T>::rest(s[j / 2][2 * (j % 2)], s[j / 2][2 * (j % 2) + 1], pa[j]);
    }
#pragma unroll
    for (int dp = 0; dp < HD / 16; ++dp) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, sV + va.at(dp));
      mma_16816<T>(o[2 * dp], pa, b[0], b[1]);
      mma_16816<T>(o[2 * dp + 1], pa, b[2], b[3]);
      if constexpr (kSplitP) {
        mma_16816<T>(o[2 * dp], pl, b[0], b[1]);
        mma_16816<T>(o[2 * dp + 1], pl, b[2], b[3]);
      }
    }
    __syncwarp();  // all lanes done reading this stage before it is refilled
  }
  cp_async_wait<0>();
  __syncwarp();

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row_l[h] += __shfl_xor_sync(0xffffffffu, row_l[h], 1);
    row_l[h] += __shfl_xor_sync(0xffffffffu, row_l[h], 2);
  }
  // Park this warp's unnormalised O in its own ring: float [16][kOStride].
  float* sO = reinterpret_cast<float*>(ring);
#pragma unroll
  for (int nd = 0; nd < HD / 8; ++nd)
#pragma unroll
    for (int h = 0; h < 2; ++h)
      *reinterpret_cast<float2*>(sO + (quad_row + 8 * h) * S::kOStride + nd * 8 + quad_col) =
          make_float2(o[nd][2 * h], o[nd][2 * h + 1]);
  if (lane % 4 == 0) {
    s_m[warp][quad_row] = row_m[0], s_m[warp][quad_row + 8] = row_m[1];
    s_l[warp][quad_row] = row_l[0], s_l[warp][quad_row + 8] = row_l[1];
  }
  __syncthreads();

  // Merge the warps: thread t owns 8-float vectors t, t + kThreads, ... of the [16][HD] output.
  for (int it = threadIdx.x; it < 16 * S::kVecs; it += S::kThreads) {
    const int r = it / S::kVecs, cv = it % S::kVecs;
    if (r >= m_count) continue;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < NWARPS; ++w) mx = fmaxf(mx, s_m[w][r]);
    float acc[8] = {}, total = 0.f;
#pragma unroll
    for (int w = 0; w < NWARPS; ++w) {
      const float wt = s_m[w][r] == -INFINITY ? 0.f : ex2(s_m[w][r] - mx);
      total += wt * s_l[w][r];
      const float* src = reinterpret_cast<const float*>(sQ + S::kQElems + w * S::kWarpElems) +
                         r * S::kOStride + cv * 8;
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[j] += wt * src[j];
    }
    const float inv = total > 0.f ? 1.f / total : 0.f;
    const float lse2 = total > 0.f ? mx + __log2f(total) : -INFINITY;
    const int m = m0 + r;
    const int64_t rh = int64_t(row0 + m / group) * p.num_q_heads + int64_t(kvh) * group + m % group;
    if (num_splits == 1) {
      uint4 vec;
      uint32_t* w32 = reinterpret_cast<uint32_t*>(&vec);
#pragma unroll
      for (int j = 0; j < 4; ++j) w32[j] = Pack<T>::two(acc[2 * j] * inv, acc[2 * j + 1] * inv);
      *reinterpret_cast<uint4*>(static_cast<T*>(p.out) + rh * HD + cv * 8) = vec;
      if (cv == 0 && p.lse != nullptr) p.lse[rh] = lse2 * kLn2;
    } else {
      const int64_t prh = int64_t(blockIdx.z) * p.num_rows * p.num_q_heads + rh;
      float4* dst = reinterpret_cast<float4*>(part_o + prh * HD + cv * 8);
      dst[0] = make_float4(acc[0] * inv, acc[1] * inv, acc[2] * inv, acc[3] * inv);
      dst[1] = make_float4(acc[4] * inv, acc[5] * inv, acc[6] * inv, acc[7] * inv);
      if (cv == 0) part_lse[prh] = lse2;
    }
  }
}

}  // namespace pagedkv::cuda::detail
