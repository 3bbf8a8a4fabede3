// StreamingLLM sink rotation for the paged attention kernel's ROPE instances (see the top of
// paged_attention_kernel.cuh): the rotated Q tile and the scores of chunks holding rotated keys.
#pragma once
#include <cstdint>

#include "mma_ptx.cuh"
#include "paged_attention_scope.cuh"
#include "pagedkv/attention_params.h"

namespace pagedkv::cuda::detail {

// sQr = the m-tile's Q tile sQ (layout S::elem) with packed row r turned by the sink_shift of its
// query row (first_pos + (m0 + r) / group; padding rows past m_count borrow the last real one).
// The angle in double (it reaches 1e5 rad in long streams), cos/sin rounded to float, the turn in
// float without contraction (the CPU reference rounds the same way), stored in T like the Q tile.
// sQr may be sQ: every element pair is read and written by one thread.
template <typename T, typename S>
__device__ __forceinline__ void rotate_q_tile(const PagedAttentionParams& p, const T* sQ, T* sQr,
                                              int first_pos, int m0, int m_count, int group) {
  const RopeView rope = rope_view(p.sink_rope);
  constexpr int HD = S::kVecs * 8;
  const int half = rope.dim / 2;
  for (int it = threadIdx.x; it < 16 * (HD / 2); it += S::kThreads) {
    const int r = it / (HD / 2), i = it % (HD / 2);
    int d0, d1;
    if (i < half) {
      rope_pair(rope, i, &d0, &d1);
    } else {  // past rope_dim: copied as they are (only needed when sQr is a tile of its own)
      if (sQr == sQ) continue;
      d0 = rope.dim + 2 * (i - half), d1 = d0 + 1;
    }
    const float x0 = float(sQ[S::elem(r, d0)]), x1 = float(sQ[S::elem(r, d1)]);
    float y0 = x0, y1 = x1;
    if (i < half) {
      const int pos = first_pos + (m0 + min(r, m_count - 1)) / group;
      double sn, cs;
      sincos(double(sink_shift(pos, p.window, p.sink_tokens)) * rope.inv_freq[i], &sn, &cs);
      const float c = float(cs), s = float(sn);
      y0 = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
      y1 = __fadd_rn(__fmul_rn(x1, c), __fmul_rn(x0, s));
    }
    sQr[S::elem(r, d0)] = T(y0);
    sQr[S::elem(r, d1)] = T(y1);
  }
}

// S of a chunk holding rotated keys (virtual keys [vbase, vbase + 16), some below n_rot): from the
// rotated Q tile sQr, and where the chunk reaches past the lowest row's sinks also from the plain
// one (qf, or sQ), element (row, key) taking the rotated score only below that row's kept sinks
// (pos: this lane's two accumulator rows). qa, ka: this lane's ldmatrix addresses in a Q and a K tile.
template <typename T, typename S>
__device__ __forceinline__ void score_rotated_chunk(float (&s)[2][4],
                                                    const uint32_t (&qf)[S::kQInRegs ? S::kVecs / 2 : 1][4],
                                                    const T* sQ, const T* sQr, const typename S::Frag& qa,
                                                    const T* sK, const typename S::Frag& ka,
                                                    const KeyScope& sc, int vbase, int quad_col,
                                                    const int (&pos)[2], const PagedAttentionParams& p) {
  constexpr int HD = S::kVecs * 8;
  constexpr bool Q_IN_REGS = S::kQInRegs;
  auto qk = [&](float (&acc)[2][4], bool rotated) {
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
      uint32_t a[4], b[4];
      if (Q_IN_REGS && !rotated) {
#pragma unroll
        for (int j = 0; j < 4; ++j) a[j] = qf[Q_IN_REGS ? kk : 0][j];
      } else {
        ldmatrix_x4(a, (rotated ? sQr : sQ) + qa.at(kk));
      }
      ldmatrix_x4(b, sK + ka.at(kk));
      mma_16816<T>(acc[0], a, b[0], b[1]);
      mma_16816<T>(acc[1], a, b[2], b[3]);
    }
  };
  qk(s, true);
  if (vbase + 16 <= sc.n_sink) return;  // sinks of every row
  float su[2][4] = {};
  qk(su, false);
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (sc.key(vbase + nt * 8 + quad_col + (j & 1)) >= sinks_kept(pos[j / 2], p.window, p.sink_tokens))
        s[nt][j] = su[nt][j];
}

}  // namespace pagedkv::cuda::detail
