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
      double m = -INFINITY, sum = 0;
      for (double x : s) m = std::max(m, x);
      for (double x : s) sum += std::exp(x - m);
      for (size_t i = 0; i < s.size(); ++i)
        for (int32_t d = 0; d < D; ++d)
          out[(size_t(r) * Hq + h) * D + d] += std::exp(s[i] - m) / sum * v[(size_t(js[i]) * H + kh) * D + d];
      lse[size_t(r) * Hq + h] = m + std::log(sum);
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
  CacheConfig cfg = small_config(c.block_size, 256);
  cfg.num_kv_heads = c.num_kv_heads;
  cfg.head_dim = c.head_dim;
  cfg.window = c.window;
  cfg.sink_tokens = c.sinks;
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

INSTANTIATE_TEST_SUITE_P(Shapes, AttentionCpu,
                         ::testing::Values(Case{4, 2, 1, 8, 0, 0}, Case{1, 1, 5, 16, 0, 0},
                                           Case{3, 2, 7, 8, 0, 0}, Case{16, 2, 2, 64, 0, 0},
                                           Case{4, 1, 8, 8, 6, 0}, Case{4, 2, 2, 8, 5, 3},
                                           Case{3, 2, 1, 8, 9, 4}),
                         ::testing::PrintToStringParamName());

}  // namespace
