// The C++ reference of the paged attention kernels: the same function over the same
// PagedAttentionParams, on the CPU, float32 accumulation. `p.pool`, `p.q`, `p.out`, `p.lse` and
// the index arrays are host pointers. Exact softmax (max first, then exponentials), so it is
// also the oracle the CUDA kernels are checked against.
#pragma once
#include "pagedkv/attention_params.h"

namespace pagedkv {

// num_threads <= 0: one per hardware thread.
void attention_cpu(const PagedAttentionParams& p, int num_threads = 0);

}  // namespace pagedkv
