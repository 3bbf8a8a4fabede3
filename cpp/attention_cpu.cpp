#include "pagedkv/attention_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "pagedkv/half_convert.h"
#include "pagedkv/parallel.h"

namespace pagedkv {
namespace {

// Keys a query at `pos` may see, as [begin, end) ranges: the sinks, then the window up to pos.
// Blocks outside both ranges are never touched, as in the kernel. Striped (attention_params.h):
// only this rank's keys, numbered locally: index i < n_sink is local key i, the others local key
// window_first + (i - n_sink).
struct KeyRanges {
  int32_t sink_end;      // keys [0, sink_end) are sinks (already clipped to pos + 1)
  int32_t window_begin;  // keys [window_begin, pos + 1)
  int32_t n_sink, window_first, num_keys;  // in local keys
  int32_t key(const PagedAttentionParams& p, int32_t i) const {
    return local_key_position(p, i < n_sink ? i : window_first + (i - n_sink));
  }
};

KeyRanges key_ranges(const PagedAttentionParams& p, int32_t pos) {
  KeyRanges r;
  r.sink_end = p.window > 0 ? sinks_kept(pos, p.window, p.sink_tokens) : 0;
  r.window_begin = window_start(pos, p.window);
  r.n_sink = local_keys_below(p, r.sink_end);
  r.window_first = local_keys_below(p, r.window_begin);
  r.num_keys = r.n_sink + local_keys_below(p, pos + 1) - r.window_first;
  return r;
}

// Element loads specialised per storage type, so the inner loops carry no dtype switch.
template <DType D>
struct Elem;
template <>
struct Elem<DType::f32> {
  static float load(const void* b, int64_t i) { return static_cast<const float*>(b)[i]; }
};
template <>
struct Elem<DType::f16> {
  static float load(const void* b, int64_t i) { return f16_to_float(static_cast<const uint16_t*>(b)[i]); }
};
template <>
struct Elem<DType::bf16> {
  static float load(const void* b, int64_t i) { return bf16_to_float(static_cast<const uint16_t*>(b)[i]); }
};

// q . key in eight independent partial sums, so the compiler can vectorise the loop (a single
// running sum is a dependency chain it may not reorder).
template <DType DT>
float dot(const float* q, const void* pool, int64_t base, int32_t D) {
  float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int32_t d = 0;
  for (; d + 8 <= D; d += 8)
    for (int32_t j = 0; j < 8; ++j) part[j] += q[d + j] * Elem<DT>::load(pool, base + d + j);
  float tail = 0.f;
  for (; d < D; ++d) tail += q[d] * Elem<DT>::load(pool, base + d);
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7])) + tail;
}

// cos and sin of shift * inv_freq[i]: the angle in double (it reaches 1e5 rad in long streams),
// then rounded to float, as the kernel does.
void rotation_table(const RopeView& r, int32_t shift, std::vector<float>& cs) {
  const int32_t half = r.dim / 2;
  cs.resize(size_t(2 * half));
  for (int32_t i = 0; i < half; ++i) {
    const double angle = double(shift) * r.inv_freq[i];
    cs[size_t(2 * i)] = float(std::cos(angle));
    cs[size_t(2 * i + 1)] = float(std::sin(angle));
  }
}

// qr = q rotated by the table (float arithmetic), rounded to the query's dtype like the query
// itself: the kernel holds the rotated query in the dtype of its Q tile.
void rotate_query(const RopeView& r, DType dtype, const std::vector<float>& q, const std::vector<float>& cs,
                  std::vector<float>& qr) {
  qr = q;
  for (int32_t i = 0; i < r.dim / 2; ++i) {
    int32_t d0, d1;
    rope_pair(r, i, &d0, &d1);
    const float c = cs[size_t(2 * i)], s = cs[size_t(2 * i + 1)];
    const float x0 = q[size_t(d0)], x1 = q[size_t(d1)];
    qr[size_t(d0)] = x0 * c - x1 * s;
    qr[size_t(d1)] = x1 * c + x0 * s;
  }
  if (dtype == DType::f32) return;
  for (float& x : qr) {
    uint16_t bits;
    store_from_float(&bits, 0, x, dtype);
    x = load_as_float(&bits, 0, dtype);
  }
}

// Scratch of one thread.
struct Scratch {
  std::vector<float> scores, acc, qf, qr, cs;
};

// One (sequence, kv head) pair: every query row of the sequence, every query head of the group.
template <DType DT>
void attend_one(const PagedAttentionParams& p, int32_t seq, int32_t kv_head, Scratch& w) {
  std::vector<float>&scores = w.scores, &acc = w.acc, &qf = w.qf;
  const int32_t group = p.num_q_heads / p.num_kv_heads;
  const int32_t D = p.head_dim, bs = p.block_size;
  const int32_t* table = p.block_table + int64_t(seq) * p.max_blocks;
  const bool rotating = rotates_sinks(p);
  const RopeView rope = rotating ? rope_view(p.sink_rope) : RopeView{};
  for (int32_t row = p.q_indptr[seq]; row < p.q_indptr[seq + 1]; ++row) {
    const int32_t pos = query_position(p, seq, row);
    const KeyRanges kr = key_ranges(p, pos);
    const int32_t num_keys = kr.num_keys;
    scores.resize(size_t(num_keys));
    // The sinks [0, kr.sink_end) score against the query turned by sink_shift (exactly 0 when they
    // sit right before the window: then nothing turns).
    const int32_t shift = rotating ? sink_shift(pos, p.window, p.sink_tokens) : 0;
    const bool rotate = kr.n_sink > 0 && shift != 0;
    if (rotate) rotation_table(rope, shift, w.cs);
    for (int32_t g = 0; g < group; ++g) {
      const int32_t qh = kv_head * group + g;
      const int64_t qbase = (int64_t(row) * p.num_q_heads + qh) * D;
      qf.resize(size_t(D));
      for (int32_t d = 0; d < D; ++d) qf[size_t(d)] = load_as_float(p.q, qbase + d, p.dtype);
      if (rotate) rotate_query(rope, p.dtype, qf, w.cs, w.qr);
      if (num_keys == 0) {  // striped: no key of this rank is visible; the merge weighs this 0
        for (int32_t d = 0; d < D; ++d) store_from_float(p.out, qbase + d, 0.f, p.dtype);
        if (p.lse) p.lse[int64_t(row) * p.num_q_heads + qh] = -std::numeric_limits<float>::infinity();
        continue;
      }
      // Pass 1: scores. Key index i counts sinks first, then the window.
      float max_score = -std::numeric_limits<float>::infinity();
      for (int32_t i = 0; i < num_keys; ++i) {
        const int32_t j = kr.key(p, i);
        const int64_t base = tile_offset(p, table[j / bs], 0, kv_head) + int64_t(j % bs) * D;
        const float* qi = rotate && i < kr.n_sink ? w.qr.data() : qf.data();
        scores[size_t(i)] = dot<DT>(qi, p.pool, base, D) * p.scale;
        max_score = std::max(max_score, scores[size_t(i)]);
      }
      // Pass 2: softmax-weighted sum of V.
      acc.assign(size_t(D), 0.f);
      float sum = 0.f;
      for (int32_t i = 0; i < num_keys; ++i) {
        const int32_t j = kr.key(p, i);
        const float w = std::exp(scores[size_t(i)] - max_score);
        sum += w;
        const int64_t base = tile_offset(p, table[j / bs], 1, kv_head) + int64_t(j % bs) * D;
        for (int32_t d = 0; d < D; ++d) acc[size_t(d)] += w * Elem<DT>::load(p.pool, base + d);
      }
      const float inv = 1.f / sum;
      for (int32_t d = 0; d < D; ++d) store_from_float(p.out, qbase + d, acc[size_t(d)] * inv, p.dtype);
      if (p.lse) p.lse[int64_t(row) * p.num_q_heads + qh] = max_score + std::log(sum);
    }
  }
}

}  // namespace

void attention_cpu(const PagedAttentionParams& p, int num_threads) {
  const int64_t items = int64_t(p.num_seqs) * p.num_kv_heads;
  // Threads cost tens of microseconds to start: only worth it for real work.
  int64_t work = 0;
  for (int32_t s = 0; s < p.num_seqs; ++s)
    work += int64_t(p.q_indptr[s + 1] - p.q_indptr[s]) * p.kv_lens[s] * p.num_q_heads * p.head_dim;
  if (work < (1 << 16)) num_threads = 1;
  parallel_for(items, num_threads, [&](int64_t item) {
    thread_local Scratch scratch;
    const int32_t seq = int32_t(item / p.num_kv_heads), head = int32_t(item % p.num_kv_heads);
    switch (p.dtype) {
      case DType::f32: attend_one<DType::f32>(p, seq, head, scratch); break;
      case DType::f16: attend_one<DType::f16>(p, seq, head, scratch); break;
      default: attend_one<DType::bf16>(p, seq, head, scratch); break;
    }
  });
}

}  // namespace pagedkv
