// The CPU reference against a naive double-precision loop over contiguous K/V, through the engine
// (so the page-table indexing is under test too), for GQA, multi-token rows, windows and sinks.
#include <gtest/gtest.h>

#include <cmath>

#include "engine_fixture.h"

using namespace pagedkv;
using namespace pagedkv::testing;

namespace {

struct Case {
  int32_t block_size, num_kv_heads, group, head_dim, window, sinks;
};

// A 256-block cache with the attention shape under test.
CacheConfig attention_config(int32_t block_size, int32_t head_dim, int32_t window, int32_t sinks) {
  CacheConfig cfg = small_config(block_size, 256);
  cfg.head_dim = head_dim;
  cfg.window = window;
  cfg.sink_tokens = sinks;
  return cfg;
}

// Softmax of the scores s (of keys js) applied to V rows of KV head kh (v: [len, H, D]): the D
// outputs into out, and the natural log-sum-exp.
double softmax_v(const std::vector<double>& s, const std::vector<int32_t>& js, const std::vector<float>& v,
                 int32_t H, int32_t kh, int32_t D, double* out) {
  double m = -INFINITY, sum = 0;
  for (double x : s) m = std::max(m, x);
  for (double x : s) sum += std::exp(x - m);
  for (int32_t d = 0; d < D; ++d) out[d] = 0;
  for (size_t i = 0; i < s.size(); ++i)
    for (int32_t d = 0; d < D; ++d) out[d] += std::exp(s[i] - m) / sum * v[(size_t(js[i]) * H + kh) * D + d];
  return m + std::log(sum);
}

// Naive attention of row positions [len - n, len) over keys k/v ([len, H, D]).
void naive(const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
           int32_t len, int32_t n, int32_t H, int32_t group, int32_t D, int32_t window, int32_t sinks,
           std::vector<double>& out, std::vector<double>& lse) {
  const int32_t Hq = H * group;
  out.assign(size_t(n) * Hq * D, 0.0);
  lse.assign(size_t(n) * Hq, 0.0);
  const double scale = 1.0 / std::sqrt(double(D));
  for (int32_t r = 0; r < n; ++r) {
    const int32_t pos = len - n + r;
    for (int32_t h = 0; h < Hq; ++h) {
      const int32_t kh = h / group;
      std::vector<double> s;
      std::vector<int32_t> js;
      for (int32_t j = 0; j <= pos; ++j) {
        if (window > 0 && !(j > pos - window || j < sinks)) continue;
        double dot = 0;
        for (int32_t d = 0; d < D; ++d)
          dot += double(q[(size_t(r) * Hq + h) * D + d]) * k[(size_t(j) * H + kh) * D + d];
        s.push_back(dot * scale);
        js.push_back(j);
      }
      lse[size_t(r) * Hq + h] = softmax_v(s, js, v, H, kh, D, &out[(size_t(r) * Hq + h) * D]);
    }
  }
}

std::ostream& operator<<(std::ostream& os, const Case& c) {
  return os << "bs" << c.block_size << "_h" << c.num_kv_heads << "_g" << c.group << "_d" << c.head_dim
            << "_w" << c.window << "_s" << c.sinks;
}

class AttentionCpu : public ::testing::TestWithParam<Case> {};

TEST_P(AttentionCpu, MatchesNaiveLoop) {
  const Case c = GetParam();
  std::mt19937 rng(11);
  CacheConfig cfg = attention_config(c.block_size, c.head_dim, c.window, c.sinks);
  cfg.num_kv_heads = c.num_kv_heads;
  Engine e(cfg);
  const int32_t H = c.num_kv_heads, Hq = H * c.group, D = c.head_dim;
  for (int32_t len : {1, 17, 40}) {
    for (int32_t n : {1, 3}) {
      if (n > len) continue;
      SeqId s = e.add_sequence();
      append_random(e, s, 1, len, rng);
      auto [k, v] = gather_all(e, s, 1);
      std::normal_distribution<float> dist;
      std::vector<float> q(size_t(n) * Hq * D), out(q.size(), NAN), lse(size_t(n) * Hq, NAN);
      for (float& x : q) x = dist(rng);
      AttendArgs a;
      a.q = q.data();
      a.out = out.data();
      a.lse = lse.data();
      a.num_q_heads = Hq;
      e.attend({s}, 1, {n}, a);
      std::vector<double> ref, ref_lse;
      naive(q, k, v, len, n, H, c.group, D, c.window, c.sinks, ref, ref_lse);
      for (size_t i = 0; i < out.size(); ++i)
        ASSERT_NEAR(out[i], ref[i], 1e-5 + 1e-5 * std::abs(ref[i])) << "len " << len << " n " << n << " i " << i;
      for (size_t i = 0; i < lse.size(); ++i) ASSERT_NEAR(lse[i], ref_lse[i], 1e-5);
      e.free(s);
    }
  }
}

// Sink rotation: a dense double loop that turns each row's query by its sink shift, straight from
// the definition (kept = min(S, first), shift = kept - first), against the engine's CPU reference.
struct RopeCase {
  int32_t block_size, group, head_dim, window, sinks, rope_dim, style;
};

void rotate(std::vector<double>& x, const RopeCase& c, const std::vector<double>& inv_freq, int32_t shift) {
  for (int32_t i = 0; i < c.rope_dim / 2; ++i) {
    const bool gptj = c.style == kRopeGptj;
    const int32_t d0 = gptj ? 2 * i : i, d1 = gptj ? 2 * i + 1 : i + c.rope_dim / 2;
    const double a = shift * inv_freq[size_t(i)], x0 = x[size_t(d0)], x1 = x[size_t(d1)];
    x[size_t(d0)] = x0 * std::cos(a) - x1 * std::sin(a);
    x[size_t(d1)] = x1 * std::cos(a) + x0 * std::sin(a);
  }
}

class AttentionCpuRope : public ::testing::TestWithParam<RopeCase> {};

TEST_P(AttentionCpuRope, SinksScoreWithTheTurnedQuery) {
  const RopeCase c = GetParam();
  std::mt19937 rng(5);
  const CacheConfig cfg = attention_config(c.block_size, c.head_dim, c.window, c.sinks);
  Engine e(cfg);
  const int32_t H = cfg.num_kv_heads, Hq = H * c.group, D = c.head_dim;
  std::vector<double> table = {double(c.style), double(c.rope_dim)}, inv_freq;
  for (int32_t i = 0; i < c.rope_dim / 2; ++i)
    inv_freq.push_back(std::pow(10000.0, -2.0 * i / c.rope_dim) / 3.0);  // theta 1e4, linear scaling 3
  table.insert(table.end(), inv_freq.begin(), inv_freq.end());
  SeqId s = e.add_sequence();
  int32_t len = 0;
  std::normal_distribution<float> dist;
  for (int32_t n : {1, 3, 1, 7, 2, 1, 1, 5, 1, 9, 1, 2, 1, 1, 4}) {  // the window slides past the sinks
    append_random(e, s, 1, n, rng);
    len += n;
    auto [k, v] = gather_all(e, s, 1);
    std::vector<float> q(size_t(n) * Hq * D), out(q.size(), NAN), lse(size_t(n) * Hq, NAN);
    for (float& x : q) x = dist(rng);
    AttendArgs a;
    a.q = q.data(), a.out = out.data(), a.lse = lse.data(), a.num_q_heads = Hq, a.sink_rope = table.data();
    e.attend({s}, 1, {n}, a);
    for (int32_t r = 0; r < n; ++r) {
      const int32_t pos = len - n + r, first = std::max(0, pos - c.window + 1);
      const int32_t kept = std::min(c.sinks, first);
      for (int32_t h = 0; h < Hq; ++h) {
        const size_t qh = size_t(r) * Hq + h, kh = size_t(h / c.group);
        std::vector<double> plain(q.begin() + qh * D, q.begin() + (qh + 1) * D), turned = plain;
        rotate(turned, c, inv_freq, kept - first);
        std::vector<double> s_, w;
        std::vector<int32_t> js;
        for (int32_t j = 0; j <= pos; ++j) {
          if (!(j >= first || j < kept)) continue;
          const std::vector<double>& qq = j < kept ? turned : plain;
          double dot = 0;
          for (int32_t d = 0; d < D; ++d) dot += qq[size_t(d)] * k[(size_t(j) * H + kh) * D + d];
          s_.push_back(dot / std::sqrt(double(D)));
          js.push_back(j);
        }
        std::vector<double> ref(size_t(D), 0.0);
        const double ref_lse = softmax_v(s_, js, v, H, int32_t(kh), D, ref.data());
        for (int32_t d = 0; d < D; ++d)
          ASSERT_NEAR(out[qh * D + d], ref[size_t(d)], 2e-5 + 2e-5 * std::abs(ref[size_t(d)]))
              << "len " << len << " row " << r << " d " << d;
        ASSERT_NEAR(lse[qh], ref_lse, 2e-5) << "len " << len << " row " << r;
      }
    }
  }
}

std::ostream& operator<<(std::ostream& os, const RopeCase& c) {
  return os << "bs" << c.block_size << "_g" << c.group << "_d" << c.head_dim << "_w" << c.window << "_s"
            << c.sinks << "_rd" << c.rope_dim << (c.style == kRopeGptj ? "_gptj" : "_neox");
}

INSTANTIATE_TEST_SUITE_P(Shapes, AttentionCpuRope,
                         ::testing::Values(RopeCase{4, 2, 16, 8, 3, 16, kRopeNeox},
                                           RopeCase{4, 1, 16, 8, 4, 16, kRopeGptj},
                                           RopeCase{3, 3, 24, 11, 5, 16, kRopeNeox},   // partial rotary
                                           RopeCase{1, 2, 8, 6, 2, 4, kRopeGptj},
                                           RopeCase{16, 2, 32, 20, 4, 32, kRopeNeox}),
                         ::testing::PrintToStringParamName());

INSTANTIATE_TEST_SUITE_P(Shapes, AttentionCpu,
                         ::testing::Values(Case{4, 2, 1, 8, 0, 0}, Case{1, 1, 5, 16, 0, 0},
                                           Case{3, 2, 7, 8, 0, 0}, Case{16, 2, 2, 64, 0, 0},
                                           Case{4, 1, 8, 8, 6, 0}, Case{4, 2, 2, 8, 5, 3},
                                           Case{3, 2, 1, 8, 9, 4}),
                         ::testing::PrintToStringParamName());

}  // namespace
