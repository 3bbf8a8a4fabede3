// The shape of the kernel that stages host slices over the link (cuda/host_copy.cu): loads in
// flight per thread (2, 4, 8 or 16), threads per CTA, most CTAs per SM. CUDA-free, so the engine
// can hold one. 8 x 512 x 4: 0.88-0.89x of the link on one H200 machine (as 4 x 256 x 8) and
// 0.80x on another (4 x 256 x 8: 0.73x); BENCHMARKS.md, offload reruns of 2026-11-27.
#pragma once

namespace pagedkv {

struct GatherShape {
  int unroll = 8, threads = 512, ctas_per_sm = 4;
};

}  // namespace pagedkv
