// What the CUDA check harness (paged_attention_check.cu) and its timing part
// (paged_attention_bench.cu) share.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstdlib>
#include <random>

#include "pagedkv/kernels.h"

using namespace pagedkv;

// The harness's choices (PKV_VARIANT: 1 3-stage kernel, -1 base only; PKV_AIM: split-K target
// resident CTAs per SM), passed to every call.
extern cuda::AttentionTuning g_tuning;

#define CK(x)                                                                              \
  do {                                                                                     \
    cudaError_t e_ = (x);                                                                  \
    if (e_ != cudaSuccess) {                                                               \
      std::fprintf(stderr, "%s:%d %s -> %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                        \
    }                                                                                      \
  } while (0)

extern int g_num_sms;                   // of device 0, set by main
void bench(const char* out_path);      // --bench [file]
void bench_prefill(const char* out_path);  // --prefill-bench [file]
// cuda/block_crc.cu against crc32c() (block_crc_check.cu): failed batches, each counted in n.
int check_block_crc(std::mt19937_64& rng, bool quick, int& n);
