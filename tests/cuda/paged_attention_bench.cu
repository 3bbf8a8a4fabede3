// Decode timings of cuda/paged_attention.cu for the harness's --bench (paged_attention_check.cu):
// median over 9 replays of a CUDA graph holding 20 calls, per shape.
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "check_util.h"
#include "pagedkv/kernels.h"

// Decode timing: bf16, 32 query / 8 KV heads, head_dim 128, page 16, pages in random order.
__global__ void fill_random(uint16_t* x, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 15, h *= 2246822519u, h ^= h >> 13;
    x[i] = __bfloat16_as_ushort(__float2bfloat16((h & 0xFFFF) / 32768.f - 1.f));
  }
}

// One timing shape's device buffers: B sequences of ctx tokens (pages in random order unless
// `in_order`), the last n tokens of each as query rows; bf16, 32 query / 8 KV heads, head_dim 128,
// page 16. params() describes them; the destructor frees them.
struct BenchCache {
  static constexpr int kHq = 32, kH = 8, kHd = 128, kBs = 16;
  int B, ctx, n, nb;
  size_t pool_elems, q_elems;
  uint16_t *pool = nullptr, *q = nullptr, *out = nullptr;
  int *bt = nullptr, *kv = nullptr, *qi = nullptr;
  BenchCache(int B_, int ctx_, int n_, bool in_order, std::mt19937_64& rng)
      : B(B_), ctx(ctx_), n(n_), nb(ctx_ / kBs) {
    pool_elems = size_t(B) * nb * 2 * kH * kBs * kHd;
    q_elems = size_t(B) * n * kHq * kHd;
    std::vector<int> h_bt(size_t(B) * nb), h_kv(B, ctx), h_qi(B + 1);
    for (size_t s = 0; s < h_bt.size(); ++s) h_bt[s] = int(s);
    if (!in_order) std::shuffle(h_bt.begin(), h_bt.end(), rng);
    for (int i = 0; i <= B; ++i) h_qi[i] = i * n;
    CK(cudaMalloc(&pool, pool_elems * 2));
    CK(cudaMalloc(&q, q_elems * 2));
    CK(cudaMalloc(&out, q_elems * 2));
    CK(cudaMalloc(&bt, h_bt.size() * 4));
    CK(cudaMalloc(&kv, B * 4));
    CK(cudaMalloc(&qi, (B + 1) * 4));
    fill_random<<<4096, 256>>>(pool, pool_elems, 1);
    fill_random<<<1024, 256>>>(q, q_elems, 2);
    CK(cudaGetLastError());
    CK(cudaMemcpy(bt, h_bt.data(), h_bt.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(kv, h_kv.data(), B * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(qi, h_qi.data(), (B + 1) * 4, cudaMemcpyHostToDevice));
  }
  ~BenchCache() {
    for (void* ptr : {(void*)pool, (void*)q, (void*)out, (void*)bt, (void*)kv, (void*)qi}) CK(cudaFree(ptr));
  }
  PagedAttentionParams params() const {
    PagedAttentionParams p;
    p.q = q, p.out = out, p.pool = pool, p.block_table = bt, p.kv_lens = kv, p.q_indptr = qi;
    p.num_seqs = B, p.num_rows = B * n, p.max_q_len = n, p.max_blocks = nb, p.num_q_heads = kHq;
    p.num_kv_heads = kH, p.head_dim = kHd, p.block_size = kBs, p.num_layers = 1, p.layer = 0;
    p.scale = 0.08838834764f, p.dtype = DType::bf16;
    return p;
  }
};

void bench(const char* out_path) {
  const int shapes[][2] = {{1, 32768}, {8, 8192},   {32, 8192},  {64, 4096},
                           {16, 32768}, {4, 131072}, {1, 131072}, {128, 2048}};
  const int n_shapes = int(sizeof shapes / sizeof shapes[0]);
  FILE* f = out_path ? std::fopen(out_path, "w") : nullptr;
  std::mt19937_64 rng(7);
  const char* only = std::getenv("PKV_SHAPE");  // index into shapes: time just that one
  for (int si = 0; si < n_shapes; ++si) {
    if (only && std::atoi(only) != si) continue;
    const auto& sh = shapes[si];
    const int B = sh[0], ctx = sh[1];
    BenchCache c(B, ctx, 1, std::getenv("PKV_SEQ_PAGES") != nullptr, rng);  // in order: best-case locality
    const size_t pool_elems = c.pool_elems;
    const PagedAttentionParams p = c.params();
    void* d_ws = nullptr;
    cuda::AttentionTuning tu = g_tuning;
    if (const char* sp = std::getenv("PKV_SPLITS")) tu.force_splits = std::atoi(sp);
    const size_t ws = cuda::paged_attention_workspace_bytes(p, g_num_sms, tu);
    if (ws) CK(cudaMalloc(&d_ws, ws));
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    for (int i = 0; i < 3; ++i) CK(cuda::paged_attention(p, d_ws, ws, g_num_sms, st, tu));
    const int kPerGraph = 20;
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
    for (int i = 0; i < kPerGraph; ++i) CK(cuda::paged_attention(p, d_ws, ws, g_num_sms, st, tu));
    CK(cudaStreamEndCapture(st, &g));
    CK(cudaGraphInstantiate(&ge, g, 0));
    CK(cudaGraphLaunch(ge, st));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    std::vector<float> t;
    for (int rep = 0; rep < 9; ++rep) {
      CK(cudaEventRecord(e0, st));
      CK(cudaGraphLaunch(ge, st));
      CK(cudaEventRecord(e1, st));
      CK(cudaEventSynchronize(e1));
      float ms;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      t.push_back(ms * 1000.f / kPerGraph);
    }
    std::sort(t.begin(), t.end());
    const double us = t[t.size() / 2], bytes = double(pool_elems) * 2;
    std::printf("BENCH %3d x %6d  %8.1f us  %5.2f TB/s  ws=%zu B\n", B, ctx, us, bytes / us * 1e-6, ws);
    if (f) std::fprintf(f, "%d %d %.2f\n", B, ctx, us);
    CK(cudaGraphExecDestroy(ge));
    CK(cudaGraphDestroy(g));
    CK(cudaStreamDestroy(st));
    if (d_ws) CK(cudaFree(d_ws));
  }
  if (f) std::fclose(f);
}


// Multi-token timings (--prefill-bench): bf16, 32 query / 8 KV heads, head_dim 128, page 16, pages in
// random order; the n new rows are the last n tokens of each sequence of L. The split-K kernel and
// the tensor-core kernel's variants (PKV_VARIANTS, default "0,1"; cuda/prefill_sm90.cu) per shape,
// PKV_ROUNDS rounds (default 1) of 7 x 3 calls each, the variants taking turns within a round;
// median over all. TFLOP/s counts 4 x heads x head_dim x the keys each query row sees.
void bench_prefill(const char* out_path) {
  const int shapes[][3] = {{1, 8192, 2048}, {1, 32768, 4096}, {1, 131072, 4096}, {4, 16384, 1024},
                           {8, 4096, 4096}, {32, 8192, 8},    {64, 4096, 4},    {1, 131072, 16384}};
  FILE* f = out_path ? std::fopen(out_path, "w") : nullptr;
  std::mt19937_64 rng(7);
  const char* only = std::getenv("PKV_SHAPE");  // index into shapes: just that one, tensor cores only (ncu)
  std::vector<int> variants;
  {
    std::string list = std::getenv("PKV_VARIANTS") ? std::getenv("PKV_VARIANTS") : "0,1";
    for (size_t at = 0; at < list.size();) {
      size_t end = list.find(',', at);
      if (end == std::string::npos) end = list.size();
      variants.push_back(std::atoi(list.substr(at, end - at).c_str()));
      at = end + 1;
    }
  }
  const int rounds = std::getenv("PKV_ROUNDS") ? std::max(1, std::atoi(std::getenv("PKV_ROUNDS"))) : 1;
  for (int si = 0; si < int(sizeof shapes / sizeof shapes[0]); ++si) {
    if (only && std::atoi(only) != si) continue;
    const auto& sh = shapes[si];
    const int B = sh[0], ctx = sh[1], n = sh[2], Hq = BenchCache::kHq, hd = BenchCache::kHd;
    BenchCache c(B, ctx, n, false, rng);
    const PagedAttentionParams p = c.params();
    // keys seen per row: ctx - n + 1 + i for row i
    const double keys = double(B) * (double(n) * (ctx - n) + double(n) * (n + 1) / 2);
    const double flops = 4.0 * Hq * hd * keys;
    // runs[0]: split-K; runs[1 + i]: tensor cores, variant variants[i]
    const int nrun = 1 + int(variants.size());
    std::vector<std::vector<float>> t(nrun);
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    for (int round = 0; round < rounds; ++round)
      for (int r = 0; r < nrun; ++r) {
        if (r == 0 && (only || round > 0)) continue;  // split-K: once, and not under ncu
        cuda::AttentionTuning tu = g_tuning;
        tu.path = r == 0 ? cuda::AttentionTuning::kSplitK : cuda::AttentionTuning::kTensorCore;
        tu.prefill_variant = r == 0 ? 0 : variants[size_t(r - 1)];
        void* d_ws = nullptr;
        const size_t ws = cuda::paged_attention_workspace_bytes(p, g_num_sms, tu);
        if (ws) CK(cudaMalloc(&d_ws, ws));
        CK(cuda::paged_attention(p, d_ws, ws, g_num_sms, st, tu));
        CK(cudaStreamSynchronize(st));
        for (int rep = 0; rep < 7; ++rep) {
          CK(cudaEventRecord(e0, st));
          for (int i = 0; i < 3; ++i) CK(cuda::paged_attention(p, d_ws, ws, g_num_sms, st, tu));
          CK(cudaEventRecord(e1, st));
          CK(cudaEventSynchronize(e1));
          float ms;
          CK(cudaEventElapsedTime(&ms, e0, e1));
          t[size_t(r)].push_back(ms * 1000.f / 3);
        }
        if (d_ws) CK(cudaFree(d_ws));
      }
    CK(cudaEventDestroy(e0));
    CK(cudaEventDestroy(e1));
    CK(cudaStreamDestroy(st));
    auto median = [](std::vector<float> v) {
      if (v.empty()) return 0.0;
      std::sort(v.begin(), v.end());
      return double(v[v.size() / 2]);
    };
    const double sk = median(t[0]), tc = median(t[1]);
    std::printf("PREFILL %2d x %6d n %5d  split-K %9.1f us %6.1f TF/s", B, ctx, n, sk, sk > 0 ? flops / sk * 1e-6 : 0.0);
    for (int r = 1; r < nrun; ++r) {
      const double us = median(t[size_t(r)]);
      std::printf(" | v%d %9.1f us %6.1f TF/s %.3fx", variants[size_t(r - 1)], us, flops / us * 1e-6, tc / us);
    }
    std::printf("\n");
    if (f) std::fprintf(f, "%d %d %d %.2f %.2f\n", B, ctx, n, sk, tc);
  }
  if (f) std::fclose(f);
}
