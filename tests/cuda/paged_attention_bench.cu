// Decode timings of cuda/paged_attention.cu for the harness's --bench (paged_attention_check.cu):
// median over 9 replays of a CUDA graph holding 20 calls, per shape.
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
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
    const int B = sh[0], ctx = sh[1], Hq = 32, H = 8, hd = 128, bs = 16, nb = ctx / bs;
    const size_t pool_elems = size_t(B) * nb * 2 * H * bs * hd;
    std::vector<int> bt(size_t(B) * nb), kv(B, ctx), qi(B + 1);
    for (size_t s = 0; s < bt.size(); ++s) bt[s] = int(s);
    if (!std::getenv("PKV_SEQ_PAGES")) std::shuffle(bt.begin(), bt.end(), rng);  // else best-case locality
    for (int i = 0; i <= B; ++i) qi[i] = i;
    uint16_t *d_pool, *d_q, *d_out;
    int *d_bt, *d_kv, *d_qi;
    void* d_ws = nullptr;
    CK(cudaMalloc(&d_pool, pool_elems * 2));
    CK(cudaMalloc(&d_q, size_t(B) * Hq * hd * 2));
    CK(cudaMalloc(&d_out, size_t(B) * Hq * hd * 2));
    CK(cudaMalloc(&d_bt, bt.size() * 4));
    CK(cudaMalloc(&d_kv, B * 4));
    CK(cudaMalloc(&d_qi, (B + 1) * 4));
    fill_random<<<4096, 256>>>(d_pool, pool_elems, 1);
    fill_random<<<64, 256>>>(d_q, size_t(B) * Hq * hd, 2);
    CK(cudaGetLastError());
    CK(cudaMemcpy(d_bt, bt.data(), bt.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_kv, kv.data(), B * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_qi, qi.data(), (B + 1) * 4, cudaMemcpyHostToDevice));
    PagedAttentionParams p;
    p.q = d_q, p.out = d_out, p.pool = d_pool, p.block_table = d_bt, p.kv_lens = d_kv, p.q_indptr = d_qi;
    p.num_seqs = B, p.num_rows = B, p.max_q_len = 1, p.max_blocks = nb, p.num_q_heads = Hq;
    p.num_kv_heads = H, p.head_dim = hd, p.block_size = bs, p.num_layers = 1, p.layer = 0;
    p.scale = 0.08838834764f, p.dtype = DType::bf16;
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
    for (void* ptr : {(void*)d_pool, (void*)d_q, (void*)d_out, (void*)d_bt, (void*)d_kv, (void*)d_qi, d_ws}) CK(cudaFree(ptr));
  }
  if (f) std::fclose(f);
}


// Multi-token timings (--prefill-bench): bf16, 32 query / 8 KV heads, head_dim 128, page 16, pages in
// random order; the n new rows are the last n tokens of each sequence of L. Both kernels per
// shape; TFLOP/s counts 4 x heads x head_dim x the keys each query row sees.
void bench_prefill(const char* out_path) {
  const int shapes[][3] = {{1, 8192, 2048}, {1, 32768, 4096}, {1, 131072, 4096}, {4, 16384, 1024},
                           {8, 4096, 4096}, {32, 8192, 8},    {64, 4096, 4},    {1, 131072, 16384}};
  FILE* f = out_path ? std::fopen(out_path, "w") : nullptr;
  std::mt19937_64 rng(7);
  const char* only = std::getenv("PKV_SHAPE");  // index into shapes: just that one, tensor cores only (ncu)
  for (int si = 0; si < int(sizeof shapes / sizeof shapes[0]); ++si) {
    if (only && std::atoi(only) != si) continue;
    const auto& sh = shapes[si];
    const int B = sh[0], ctx = sh[1], n = sh[2], Hq = 32, H = 8, hd = 128, bs = 16, nb = ctx / bs;
    const size_t pool_elems = size_t(B) * nb * 2 * H * bs * hd;
    std::vector<int> bt(size_t(B) * nb), kv(B, ctx), qi(B + 1);
    for (size_t s = 0; s < bt.size(); ++s) bt[s] = int(s);
    std::shuffle(bt.begin(), bt.end(), rng);
    for (int i = 0; i <= B; ++i) qi[i] = i * n;
    const size_t q_elems = size_t(B) * n * Hq * hd;
    uint16_t *d_pool, *d_q, *d_out;
    int *d_bt, *d_kv, *d_qi;
    CK(cudaMalloc(&d_pool, pool_elems * 2));
    CK(cudaMalloc(&d_q, q_elems * 2));
    CK(cudaMalloc(&d_out, q_elems * 2));
    CK(cudaMalloc(&d_bt, bt.size() * 4));
    CK(cudaMalloc(&d_kv, B * 4));
    CK(cudaMalloc(&d_qi, (B + 1) * 4));
    fill_random<<<4096, 256>>>(d_pool, pool_elems, 1);
    fill_random<<<1024, 256>>>(d_q, q_elems, 2);
    CK(cudaGetLastError());
    CK(cudaMemcpy(d_bt, bt.data(), bt.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_kv, kv.data(), B * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_qi, qi.data(), (B + 1) * 4, cudaMemcpyHostToDevice));
    PagedAttentionParams p;
    p.q = d_q, p.out = d_out, p.pool = d_pool, p.block_table = d_bt, p.kv_lens = d_kv, p.q_indptr = d_qi;
    p.num_seqs = B, p.num_rows = B * n, p.max_q_len = n, p.max_blocks = nb, p.num_q_heads = Hq;
    p.num_kv_heads = H, p.head_dim = hd, p.block_size = bs, p.num_layers = 1, p.layer = 0;
    p.scale = 0.08838834764f, p.dtype = DType::bf16;
    // keys seen per row: ctx - n + 1 + i for row i
    const double keys = double(B) * (double(n) * (ctx - n) + double(n) * (n + 1) / 2);
    const double flops = 4.0 * Hq * hd * keys;
    double us_by[4] = {0, 0, 0, 0};  // [path]; [3]: tensor cores without ping-pong
    for (int path : {1, 2, 3}) {
      if (only && path == cuda::AttentionTuning::kSplitK) continue;
      cuda::AttentionTuning tu = g_tuning;
      tu.path = path == 3 ? cuda::AttentionTuning::kTensorCore : path;
      tu.prefill_variant = path == 3 ? 1 : 0;
      void* d_ws = nullptr;
      const size_t ws = cuda::paged_attention_workspace_bytes(p, g_num_sms, tu);
      if (ws) CK(cudaMalloc(&d_ws, ws));
      cudaStream_t st;
      CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
      CK(cuda::paged_attention(p, d_ws, ws, g_num_sms, st, tu));
      CK(cudaStreamSynchronize(st));
      cudaEvent_t e0, e1;
      CK(cudaEventCreate(&e0));
      CK(cudaEventCreate(&e1));
      std::vector<float> t;
      for (int rep = 0; rep < 7; ++rep) {
        CK(cudaEventRecord(e0, st));
        for (int i = 0; i < 3; ++i) CK(cuda::paged_attention(p, d_ws, ws, g_num_sms, st, tu));
        CK(cudaEventRecord(e1, st));
        CK(cudaEventSynchronize(e1));
        float ms;
        CK(cudaEventElapsedTime(&ms, e0, e1));
        t.push_back(ms * 1000.f / 3);
      }
      std::sort(t.begin(), t.end());
      us_by[path] = t[t.size() / 2];
      CK(cudaEventDestroy(e0));
      CK(cudaEventDestroy(e1));
      CK(cudaStreamDestroy(st));
      if (d_ws) CK(cudaFree(d_ws));
    }
    const double tc = us_by[cuda::AttentionTuning::kTensorCore], sk = us_by[cuda::AttentionTuning::kSplitK];
    const double np = us_by[3];
    std::printf("PREFILL %2d x %6d n %5d  split-K %9.1f us %6.1f TF/s | tensor-core %9.1f us %6.1f TF/s | %.2fx | no ping-pong %9.1f us %6.1f TF/s\n",
                B, ctx, n, sk, flops / sk * 1e-6, tc, flops / tc * 1e-6, sk / tc, np, flops / np * 1e-6);
    if (f) std::fprintf(f, "%d %d %d %.2f %.2f\n", B, ctx, n, sk, tc);
    for (void* ptr : {(void*)d_pool, (void*)d_q, (void*)d_out, (void*)d_bt, (void*)d_kv, (void*)d_qi}) CK(cudaFree(ptr));
  }
  if (f) std::fclose(f);
}
