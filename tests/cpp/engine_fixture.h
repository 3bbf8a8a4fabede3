// Helpers shared by the engine tests: a small float32 CPU cache and random rows.
#pragma once
#include <random>
#include <vector>

#include "pagedkv/engine.h"

namespace pagedkv::testing {

inline CacheConfig small_config(int32_t block_size = 4, int64_t device_blocks = 32) {
  CacheConfig c;
  c.num_layers = 3;
  c.num_kv_heads = 2;
  c.head_dim = 8;
  c.block_size = block_size;
  c.dtype = DType::f32;
  c.device_blocks = device_blocks;
  return c;
}

inline std::vector<float> random_rows(int64_t rows, const CacheConfig& c, std::mt19937& rng) {
  std::normal_distribution<float> dist;
  std::vector<float> out(size_t(rows * c.num_kv_heads * c.head_dim));
  for (float& x : out) x = dist(rng);
  return out;
}

// Appends `n` random rows to one layer of `seq` and returns (k, v).
inline std::pair<std::vector<float>, std::vector<float>> append_random(Engine& e, SeqId seq,
                                                                       int32_t layer, int32_t n,
                                                                       std::mt19937& rng) {
  auto k = random_rows(n, e.config(), rng);
  auto v = random_rows(n, e.config(), rng);
  e.append({seq}, layer, {n}, k.data(), v.data(), nullptr);
  return {k, v};
}

inline std::pair<std::vector<float>, std::vector<float>> gather_all(Engine& e, SeqId seq,
                                                                    int32_t layer) {
  const int64_t n = e.seq_len(seq, layer);
  std::vector<float> k(size_t(n * e.config().num_kv_heads * e.config().head_dim)), v(k.size());
  e.gather(seq, layer, k.data(), v.data(), nullptr);
  return {k, v};
}

}  // namespace pagedkv::testing
