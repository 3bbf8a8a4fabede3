// Standalone check and timing harness for cuda/paged_attention.cu and cuda/kv_write.cu.
// Oracle: a naive float64 CPU loop over the same block table and pool, rounded to the dtype.
// Every pool element no query may see is NaN, so reading one (or an unmapped block) shows up.
//
//   bash bench/kernel_check.sh (compiles build/pa_check from the files it lists), or CMake's
//   pagedkv_cuda_check (PAGEDKV_TESTS=ON with CUDA)
//   build/pa_check            full sweep       build/pa_check --quick   small sweep (sanitizers)
//   build/pa_check --bench [file]   decode timings (CUDA-graph replay), also written to file
// Environment: PKV_VARIANT=1 forces the 3-stage kernel (head_dim <= 128), -1 the base kernel
// only; PKV_AIM=n split-K target CTAs/SM; bench only:
// PKV_SPLITS=n, PKV_SHAPE=i (one shape), PKV_SEQ_PAGES=1 (pages in order).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "check_util.h"
#include "pagedkv/kernels.h"

static uint16_t to_bits(float f, DType d) {
  if (d == DType::f16) {
    __half h = __float2half_rn(f);
    uint16_t b;
    std::memcpy(&b, &h, 2);
    return b;
  }
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest even
  return uint16_t(u >> 16);
}
static double from_bits(uint16_t b, DType d) {
  if (d == DType::f16) {
    __half h;
    std::memcpy(&h, &b, 2);
    return __half2float(h);
  }
  uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static uint16_t nan_bits(DType d) { return d == DType::f16 ? 0x7E00 : 0x7FC0; }

template <typename F>
static void parallel_for(int n, F f) {
  const int nt = std::max(1u, std::thread::hardware_concurrency());
  std::vector<std::thread> ts;
  for (int t = 0; t < nt; ++t)
    ts.emplace_back([&, t] {
      for (int i = t; i < n; i += nt) f(i);
    });
  for (auto& th : ts) th.join();
}

struct Case {
  DType dtype = DType::bf16;
  int hd = 128, group = 4, kvh = 2, bs = 16;
  std::vector<int> q_lens{1}, kv_lens{1000};
  int window = 0, sinks = 0, force_splits = 0;
  int path = cuda::AttentionTuning::kAuto;  // kTensorCore: the sm_90a prefill kernel where it runs
  int variant = 0;  // AttentionTuning::prefill_variant (cuda/prefill_sm90.cu, by_type_hd: the bench's variants)
  int rope_style = 0, rope_dim = 0;  // sink rotation: kRopeNeox | kRopeGptj (0: none), rotary dims
  bool lse = true;
  bool staged = false;  // about a third of the blocks passing through a staging area (entries <= -2)
  float q_scale = 1.f;
  std::string str() const {
    char b[256];
    int n = std::snprintf(b, sizeof b, "%s hd=%d g=%d kvh=%d bs=%d win=%d sink=%d rope=%d/%d split=%d path=%d/%d lse=%d staged=%d q/kv:",
                          dtype_name(dtype), hd, group, kvh, bs, window, sinks, rope_style, rope_dim,
                          force_splits, path, variant, int(lse), int(staged));
    for (size_t i = 0; i < q_lens.size(); ++i) n += std::snprintf(b + n, sizeof b - n, " %d/%d", q_lens[i], kv_lens[i]);
    return b;
  }
};

int g_num_sms = 0;
cuda::AttentionTuning g_tuning;

// The sink rotation table of attention_params.h (theta 10000, then a linear scaling of 1/2 so the
// table is not the textbook one), and the query of a row at `pos` as the sinks must see it: turned
// by sink_shift in double, then rounded to the dtype like the kernel's rotated Q tile.
static std::vector<double> rope_table(const Case& c) {
  std::vector<double> t = {double(c.rope_style), double(c.rope_dim)};
  for (int i = 0; i < c.rope_dim / 2; ++i) t.push_back(std::pow(10000.0, -2.0 * i / c.rope_dim) / 2.0);
  return t;
}
static std::vector<double> turned_query(const Case& c, const std::vector<double>& table, const uint16_t* q, int pos) {
  std::vector<double> x(c.hd);
  for (int d = 0; d < c.hd; ++d) x[d] = from_bits(q[d], c.dtype);
  const RopeView r = rope_view(table.data());
  const int shift = sink_shift(pos, c.window, c.sinks);
  for (int i = 0; i < r.dim / 2; ++i) {
    int d0, d1;
    rope_pair(r, i, &d0, &d1);
    const double a = shift * r.inv_freq[i], x0 = x[d0], x1 = x[d1];
    x[d0] = x0 * std::cos(a) - x1 * std::sin(a);
    x[d1] = x1 * std::cos(a) + x0 * std::sin(a);
  }
  for (double& v : x) v = from_bits(to_bits(float(v), c.dtype), c.dtype);
  return x;
}

// Runs one case on the GPU and against the oracle; returns the worst error / tolerance.
static double run_case(Case c, std::mt19937_64& rng) {
  const int S = int(c.q_lens.size()), L = 2, layer = 1, Hq = c.kvh * c.group, hd = c.hd;
  for (int i = 0; i < S; ++i) c.kv_lens[i] = std::max(c.kv_lens[i], c.q_lens[i]);
  std::vector<int> q_indptr(S + 1, 0);
  for (int i = 0; i < S; ++i) q_indptr[i + 1] = q_indptr[i] + c.q_lens[i];
  const int rows = q_indptr[S];
  int max_q = 0, max_blocks = 0;
  for (int i = 0; i < S; ++i) {
    max_q = std::max(max_q, c.q_lens[i]);
    max_blocks = std::max(max_blocks, (c.kv_lens[i] + c.bs - 1) / c.bs + 1);  // +1: a spare -1 column
  }
  // Keys some query row of seq i can see (the union of the rows' scopes).
  auto seen = [&](int i, int j) {
    const int min_pos = c.kv_lens[i] - c.q_lens[i];
    return j < c.kv_lens[i] && (c.window <= 0 || j < c.sinks || j > min_pos - c.window);
  };
  std::vector<int> bt(size_t(S) * max_blocks, -1);
  int used = 0;
  for (int i = 0; i < S; ++i)
    for (int b = 0; b * c.bs < c.kv_lens[i]; ++b) {
      bool any = false;
      for (int t = 0; t < c.bs && !any; ++t) any = seen(i, b * c.bs + t);
      if (any) bt[size_t(i) * max_blocks + b] = used++;
    }
  const int num_slots = used + 2;
  std::vector<int> perm(num_slots);
  for (int s = 0; s < num_slots; ++s) perm[s] = s;
  std::shuffle(perm.begin(), perm.end(), rng);
  for (auto& x : bt) x = x < 0 ? -1 : perm[x];
  int n_staged = 0;  // staged slices, after the pool's slots in the same allocation
  if (c.staged)
    for (auto& x : bt)
      if (x >= 0 && rng() % 3 == 0) x = staged_entry(n_staged++);

  PagedAttentionParams p;
  p.num_seqs = S, p.num_rows = rows, p.max_q_len = max_q, p.max_blocks = max_blocks;
  p.num_q_heads = Hq, p.num_kv_heads = c.kvh, p.head_dim = hd, p.block_size = c.bs;
  p.num_layers = L, p.layer = layer, p.window = c.window, p.sink_tokens = c.sinks;
  p.scale = float(1.0 / std::sqrt(double(hd))), p.dtype = c.dtype;

  std::normal_distribution<float> nd(0.f, 1.f);
  std::uniform_real_distribution<float> ud(-1.f, 1.f);
  p.staged_offset = int64_t(num_slots) * L * 2 * c.kvh * c.bs * hd;
  std::vector<uint16_t> pool(size_t(p.staged_offset) + size_t(n_staged) * 2 * c.kvh * c.bs * hd, nan_bits(c.dtype));
  for (int i = 0; i < S; ++i)
    for (int j = 0; j < c.kv_lens[i]; ++j) {
      if (!seen(i, j)) continue;
      const int slot = bt[size_t(i) * max_blocks + j / c.bs];
      for (int kv = 0; kv < 2; ++kv)
        for (int h = 0; h < c.kvh; ++h) {
          uint16_t* row = pool.data() + tile_offset(p, slot, kv, h) + size_t(j % c.bs) * hd;
          for (int d = 0; d < hd; ++d) row[d] = to_bits(kv == 0 ? nd(rng) : ud(rng), c.dtype);
        }
    }
  std::vector<uint16_t> q(size_t(rows) * Hq * hd);
  for (auto& x : q) x = to_bits(nd(rng) * c.q_scale, c.dtype);

  // Oracle.
  std::vector<double> ref(q.size()), ref_lse(size_t(rows) * Hq);
  std::vector<int> row_seq(rows);
  for (int i = 0; i < S; ++i)
    for (int r = q_indptr[i]; r < q_indptr[i + 1]; ++r) row_seq[r] = i;
  const std::vector<double> table = rope_table(c);
  parallel_for(rows * Hq, [&](int rh) {
    const int r = rh / Hq, h = rh % Hq, i = row_seq[r], kvh = h / c.group;
    const int pos = c.kv_lens[i] - (q_indptr[i + 1] - r);
    // Sinks outside the window score against the turned query (all keys, without rotation).
    const int kept = c.rope_style && c.window > 0 ? sinks_kept(pos, c.window, c.sinks) : 0;
    std::vector<double> turned = kept > 0 ? turned_query(c, table, &q[size_t(rh) * hd], pos) : std::vector<double>{};
    std::vector<double> sc;
    std::vector<int> keys;
    double mx = -INFINITY;
    for (int j = 0; j <= pos; ++j) {
      if (!key_visible(j, pos, c.window, c.sinks)) continue;
      const uint16_t* k = pool.data() + tile_offset(p, bt[size_t(i) * max_blocks + j / c.bs], 0, kvh) + size_t(j % c.bs) * hd;
      double s = 0;
      for (int d = 0; d < hd; ++d)
        s += (j < kept ? turned[d] : from_bits(q[size_t(rh) * hd + d], c.dtype)) * from_bits(k[d], c.dtype);
      s *= p.scale;
      sc.push_back(s), keys.push_back(j), mx = std::max(mx, s);
    }
    double sum = 0;
    std::vector<double> acc(hd, 0.0);
    for (size_t n = 0; n < keys.size(); ++n) {
      const double w = std::exp(sc[n] - mx);
      sum += w;
      const int j = keys[n];
      const uint16_t* v = pool.data() + tile_offset(p, bt[size_t(i) * max_blocks + j / c.bs], 1, kvh) + size_t(j % c.bs) * hd;
      for (int d = 0; d < hd; ++d) acc[d] += w * from_bits(v[d], c.dtype);
    }
    for (int d = 0; d < hd; ++d) ref[size_t(rh) * hd + d] = acc[d] / sum;
    ref_lse[rh] = mx + std::log(sum);
  });

  // GPU.
  void *d_q, *d_out, *d_pool, *d_ws = nullptr, *d_rope = nullptr;
  int *d_bt, *d_kv, *d_qi;
  float* d_lse;
  CK(cudaMalloc(&d_q, q.size() * 2));
  CK(cudaMalloc(&d_out, q.size() * 2));
  CK(cudaMalloc(&d_pool, pool.size() * 2));
  CK(cudaMalloc(&d_bt, bt.size() * 4));
  CK(cudaMalloc(&d_kv, S * 4));
  CK(cudaMalloc(&d_qi, (S + 1) * 4));
  CK(cudaMalloc(&d_lse, ref_lse.size() * 4));
  CK(cudaMemcpy(d_q, q.data(), q.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_pool, pool.data(), pool.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_bt, bt.data(), bt.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_kv, c.kv_lens.data(), S * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_qi, q_indptr.data(), (S + 1) * 4, cudaMemcpyHostToDevice));
  if (c.rope_style) {
    CK(cudaMalloc(&d_rope, table.size() * 8));
    CK(cudaMemcpy(d_rope, table.data(), table.size() * 8, cudaMemcpyHostToDevice));
    p.sink_rope = static_cast<const double*>(d_rope);
  }
  CK(cudaMemset(d_out, 0xFF, q.size() * 2));  // NaN poison
  CK(cudaMemset(d_lse, 0xFF, ref_lse.size() * 4));
  p.q = d_q, p.out = d_out, p.pool = d_pool, p.block_table = d_bt, p.kv_lens = d_kv, p.q_indptr = d_qi;
  p.lse = c.lse ? d_lse : nullptr;
  cuda::AttentionTuning tu = g_tuning;
  tu.force_splits = c.force_splits, tu.path = c.path, tu.prefill_variant = c.variant;
  const size_t ws = cuda::paged_attention_workspace_bytes(p, g_num_sms, tu);
  if (ws) {
    CK(cudaMalloc(&d_ws, ws));
    CK(cudaMemset(d_ws, 0xFF, ws));
  }
  CK(cuda::paged_attention(p, d_ws, ws, g_num_sms, 0, tu));
  CK(cudaDeviceSynchronize());
  std::vector<uint16_t> out(q.size());
  std::vector<float> lse(ref_lse.size());
  CK(cudaMemcpy(out.data(), d_out, out.size() * 2, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(lse.data(), d_lse, lse.size() * 4, cudaMemcpyDeviceToHost));
  for (void* ptr : {d_q, d_out, d_pool, (void*)d_bt, (void*)d_kv, (void*)d_qi, (void*)d_lse, d_ws, d_rope}) CK(cudaFree(ptr));

  const double tol = c.dtype == DType::bf16 ? 1e-2 : 3e-3;
  double worst = 0;
  for (size_t n = 0; n < out.size(); ++n) {
    const double r = from_bits(to_bits(float(ref[n]), c.dtype), c.dtype);
    const double e = std::fabs(from_bits(out[n], c.dtype) - r) / (tol + tol * std::fabs(ref[n]));
    worst = std::isnan(e) ? INFINITY : std::max(worst, e);
  }
  if (c.lse)
    for (size_t n = 0; n < lse.size(); ++n) {
      const double e = std::fabs(lse[n] - ref_lse[n]) / (2e-3 + 1e-4 * std::fabs(ref_lse[n]));
      worst = std::isnan(e) ? INFINITY : std::max(worst, e);
    }
  return worst;
}

// kv_write: bit-exact scatter, rows with slot -1 skipped, nothing else touched.
static bool check_kv_write(std::mt19937_64& rng, DType dt, int hd, int bs) {
  const int rows = 37, H = 3, L = 2, layer = 1, slots = (rows + bs - 1) / bs + 2;
  const size_t esz = dtype_size(dt), row_elems = size_t(H) * hd;
  std::vector<uint16_t> k(rows * row_elems * esz / 2), v(k.size()), pool(size_t(slots) * L * 2 * H * bs * hd * esz / 2, 0x5A5A);
  for (auto& x : k) x = uint16_t(rng());
  for (auto& x : v) x = uint16_t(rng());
  std::vector<int> slot_map(slots * bs);
  for (int s = 0; s < slots * bs; ++s) slot_map[s] = s;
  std::shuffle(slot_map.begin(), slot_map.end(), rng);
  slot_map.resize(rows);
  slot_map[5] = -1;
  std::vector<uint16_t> expect = pool;
  const size_t e16 = esz / 2;  // uint16 words per element
  for (int r = 0; r < rows; ++r) {
    if (slot_map[r] < 0) continue;
    const int slot = slot_map[r] / bs, off = slot_map[r] % bs;
    for (int kv = 0; kv < 2; ++kv)
      for (int h = 0; h < H; ++h)
        for (size_t d = 0; d < hd * e16; ++d)
          expect[((((size_t(slot) * L + layer) * 2 + kv) * H + h) * bs + off) * hd * e16 + d] =
              (kv ? v : k)[(size_t(r) * H + h) * hd * e16 + d];
  }
  void *dk, *dv, *dp;
  int* ds;
  CK(cudaMalloc(&dk, k.size() * 2));
  CK(cudaMalloc(&dv, v.size() * 2));
  CK(cudaMalloc(&dp, pool.size() * 2));
  CK(cudaMalloc(&ds, rows * 4));
  CK(cudaMemcpy(dk, k.data(), k.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dv, v.data(), v.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dp, pool.data(), pool.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(ds, slot_map.data(), rows * 4, cudaMemcpyHostToDevice));
  cuda::KVWriteParams w;
  w.k = dk, w.v = dv, w.pool = dp, w.slot_mapping = ds, w.num_rows = rows, w.num_kv_heads = H;
  w.head_dim = hd, w.block_size = bs, w.num_layers = L, w.layer = layer, w.dtype = dt;
  CK(cuda::kv_write(w, 0));
  CK(cudaMemcpy(pool.data(), dp, pool.size() * 2, cudaMemcpyDeviceToHost));
  for (void* ptr : {dk, dv, dp, (void*)ds}) CK(cudaFree(ptr));
  return pool == expect;
}

// Multi-token rows through the tensor-core kernel (forced; it runs where the GPU is sm_90 and
// otherwise the call falls back to split-K, which the same oracle checks): head dims 64/128/256,
// fp16/bf16, block sizes 16/32/64 and odd ones, GQA groups, partial tiles and blocks, windows and
// sinks, mixed lengths (and a decode row) in one batch.
static void add_prefill_cases(std::vector<Case>& cs, bool quick, std::mt19937_64& rng) {
  const int tc = cuda::AttentionTuning::kTensorCore;
  Case b;
  b.path = tc, b.q_lens = {200}, b.kv_lens = {700}, b.kvh = 2;
  cs.push_back(b);
  { Case x = b; x.q_lens = {130, 1, 64}; x.kv_lens = {130, 900, 300}; x.group = 5; x.bs = 3; cs.push_back(x); }
  { Case x = b; x.window = 100, x.sinks = 4; x.q_lens = {300, 17}; x.kv_lens = {1000, 40}; cs.push_back(x); }
  // More CTAs than SMs, of both consumer groups, of one (64 packed rows or fewer) and of none
  // (shorter queries than the longest) in one launch; in every variant the bench times, and those
  // again with a window and sinks.
  Case many = b;
  many.group = 8, many.kvh = 8, many.q_lens = {400, 5, 300, 77, 1}, many.kv_lens = {1400, 5, 900, 2000, 50};
  for (int v : {0, 1, 9, 10, 12, 13, 14}) { Case x = many; x.variant = v; cs.push_back(x); }
  // Staged blocks among pool blocks: warps whose rows touch one copy by cp.async, the others by TMA.
  for (int bs : {16, 64}) { Case x = many; x.bs = bs, x.staged = true; cs.push_back(x); }
  for (int v : {1, 9, 10, 12, 13, 14}) { Case x = b; x.variant = v, x.window = 100, x.sinks = 4, x.q_lens = {300, 17}, x.kv_lens = {1000, 40}; cs.push_back(x); }
  if (quick) return;
  { Case x = many; x.hd = 64, x.window = 100, x.sinks = 4, x.dtype = DType::f16; cs.push_back(x); }
  { Case x = many; x.hd = 256, x.bs = 32, x.group = 3; cs.push_back(x); }
  { Case x = many; x.bs = 64, x.window = 129, x.sinks = 128, x.hd = 64; cs.push_back(x); }
  for (DType dt : {DType::bf16, DType::f16})
    for (int hd : {64, 128, 256})
      for (int bs : {16, 32, 64}) {
        Case x = b;
        x.dtype = dt, x.hd = hd, x.bs = bs;
        x.q_lens = {int(33 + rng() % 300), int(1 + rng() % 40)};
        x.kv_lens = {int(x.q_lens[0] + rng() % 900), int(x.q_lens[1] + rng() % 300)};
        x.group = int(1 + rng() % 8);
        x.q_scale = rng() % 2 ? 1.f : 3.f;
        x.lse = rng() % 3 != 0;
        cs.push_back(x);
      }
  for (int g : {1, 2, 4, 7, 8, 16}) { Case x = b; x.group = g; x.q_lens = {97}; x.kv_lens = {1000}; cs.push_back(x); }
  const int wins[][2] = {{64, 0}, {100, 4}, {7, 3}, {300, 16}, {129, 128}};
  for (auto& w : wins)
    for (int hd : {64, 128, 256}) {
      Case x = b;
      x.window = w[0], x.sinks = w[1], x.hd = hd, x.q_lens = {400, 5}, x.kv_lens = {1500, 5};
      cs.push_back(x);
    }
  { Case x = b; x.q_lens = {2048}; x.kv_lens = {2048}; x.kvh = 1; x.group = 4; cs.push_back(x); }
  { Case x = b; x.path = cuda::AttentionTuning::kAuto; x.q_lens = {16, 1, 300, 2}; x.kv_lens = {500, 300, 300, 2}; cs.push_back(x); }
}

static std::vector<Case> make_sweep(bool quick, std::mt19937_64& rng) {
  std::vector<Case> cs;
  const int hds[] = {64, 80, 96, 128, 256}, groups[] = {1, 2, 5, 7, 8, 16}, bss[] = {1, 3, 8, 16, 32};
  const int qls[] = {1, 3, 17}, kvs[] = {1, 17, 97, 1000, 33000};
  const int wins[][2] = {{64, 0}, {100, 4}, {7, 3}, {1000, 16}, {5000, 0}};
  for (DType dt : {DType::bf16, DType::f16}) {
    Case b;
    b.dtype = dt, b.q_lens = {1, 1}, b.kv_lens = {1000, 97};
    cs.push_back(b);
    // Sink rotation: decode and multi-token rows, windows and sinks on and off block edges, both
    // styles, partial rotary, the own-tile path of head_dim 256, splits, rows on both sides of the
    // window passing the sinks.
    Case r = b;
    r.window = 100, r.sinks = 4, r.rope_style = kRopeNeox, r.rope_dim = 128;
    Case r2 = r;
    r2.q_lens = {3, 17}, r2.kv_lens = {1000, 130}, r2.window = 20, r2.sinks = 5, r2.bs = 3, r2.group = 5;
    r2.rope_style = kRopeGptj, r2.rope_dim = 64, r2.force_splits = 3;
    Case r3 = r;
    r3.hd = 256, r3.rope_dim = 192, r3.q_lens = {17}, r3.kv_lens = {700}, r3.window = 64, r3.sinks = 16, r3.group = 1;
    Case r4 = r;
    r4.q_lens = {8, 16}, r4.kv_lens = {30, 40}, r4.window = 24, r4.sinks = 4, r4.bs = 16, r4.group = 2;
    r4.rope_style = kRopeGptj;
    for (const Case& x : {r, r2, r3, r4}) cs.push_back(x);
    if (quick) {
      Case m = b;
      m.q_lens = {3, 17}, m.window = 100, m.sinks = 4, m.bs = 3, m.group = 5, m.force_splits = 3;
      cs.push_back(m);
      continue;
    }
    for (int v : hds) { Case x = b; x.hd = v; cs.push_back(x); }
    for (int v : groups) { Case x = b; x.group = v; cs.push_back(x); }
    for (int v : bss) { Case x = b; x.bs = v; cs.push_back(x); }
    for (int v : qls) { Case x = b; x.q_lens = {v, v}; cs.push_back(x); }
    for (int v : kvs) { Case x = b; x.q_lens = {1}; x.kv_lens = {v}; x.kvh = 1; cs.push_back(x); }
    for (auto& w : wins) { Case x = b; x.window = w[0], x.sinks = w[1]; x.q_lens = {17, 1}; cs.push_back(x); }
    for (int v : {1, 3, 7, 40}) { Case x = b; x.force_splits = v; x.q_lens = {3, 1}; cs.push_back(x); }
  }
  add_prefill_cases(cs, quick, rng);
  if (quick) return cs;
  // Random mixes of every axis, several sequences of different lengths per call.
  for (int n = 0; n < 160; ++n) {
    Case x;
    x.dtype = rng() % 2 ? DType::bf16 : DType::f16;
    x.hd = hds[rng() % 5], x.group = groups[rng() % 6], x.bs = bss[rng() % 5], x.kvh = 1 + rng() % 2;
    const int S = 1 + rng() % 4;
    x.q_lens.clear(), x.kv_lens.clear();
    for (int i = 0; i < S; ++i) x.q_lens.push_back(qls[rng() % 3]), x.kv_lens.push_back(kvs[rng() % 5]);
    if (rng() % 2) x.window = wins[rng() % 5][0], x.sinks = wins[rng() % 5][1];
    if (x.window > 0 && x.sinks > 0 && rng() % 2) {
      x.rope_style = rng() % 2 ? kRopeNeox : kRopeGptj;
      x.rope_dim = rng() % 2 ? x.hd : x.hd / 2 - (x.hd / 2) % 2;
    }
    x.lse = rng() % 4 != 0;
    x.force_splits = rng() % 3 == 0 ? int(1 + rng() % 20) : 0;
    x.q_scale = rng() % 2 ? 1.f : 3.f;
    double cost = 0;  // keep the float64 oracle within seconds
    for (int i = 0; i < S; ++i) cost += double(x.q_lens[i]) * std::min(x.kv_lens[i], x.window > 0 ? x.window + 17 : 1 << 30);
    if (cost * x.kvh * x.group * x.hd > 4e8) { --n; continue; }
    cs.push_back(x);
  }
  return cs;
}

int main(int argc, char** argv) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: skipped\n");
    return 77;  // ctest SKIP_RETURN_CODE
  }
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  g_num_sms = prop.multiProcessorCount;
  std::printf("device: %s, %d SMs\n", prop.name, g_num_sms);
  if (const char* v = std::getenv("PKV_VARIANT")) g_tuning.variant = std::atoi(v);
  if (const char* v = std::getenv("PKV_AIM")) g_tuning.aim_ctas = std::atoi(v);
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "--bench") {  // --bench [out_file]
    bench(argc > 2 ? argv[2] : nullptr);  // paged_attention_bench.cu
    return 0;
  }
  if (mode == "--prefill-bench") {
    bench_prefill(argc > 2 ? argv[2] : nullptr);  // paged_attention_bench.cu
    return 0;
  }
  std::mt19937_64 rng(12345);
  int fails = 0, n = 0;
  for (DType dt : {DType::bf16, DType::f16})
    for (int hd : {5, 12, 64, 80, 128})
      for (int bs : {1, 3, 16}) {
        ++n;
        if (!check_kv_write(rng, dt, hd, bs)) ++fails, std::printf("FAIL kv_write %s hd=%d bs=%d\n", dtype_name(dt), hd, bs);
      }
  fails += check_block_crc(rng, mode == "--quick", n);  // block_crc_check.cu
  const auto cases = make_sweep(mode == "--quick", rng);
  double worst_all = 0;
  for (const Case& c : cases) {
    const double w = run_case(c, rng);
    ++n, worst_all = std::max(worst_all, w);
    if (!(w <= 1.0)) ++fails, std::printf("FAIL err/tol=%.3g  %s\n", w, c.str().c_str());
  }
  std::printf("checked %d cases (%zu attention), %d failed, worst err/tol %.3g\n", n, cases.size(), fails, worst_all);
  return fails ? 1 : 0;
}
