// Host side of the Hopper tensor-core prefill kernel (prefill_sm90_kernel.cuh): which calls it
// takes, the per-device launch attributes, the launch.
#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>

#include "pagedkv/kernels.h"
#include "prefill_sm90.h"
#include "prefill_sm90_kernel.cuh"

namespace pagedkv::cuda::detail {
namespace {

template <typename T, int HD, bool PINGPONG = true>
struct PrefillInstance {
  static constexpr auto kernel = prefill_sm90_kernel<T, HD, PINGPONG>;
  static constexpr int kHd = HD;
  // Sets the shared-memory limit once per device and checks that the binary holds sm_90a code
  // for this kernel (a build without the 90a target would run an empty body through PTX JIT).
  static bool ready() {
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return false;
    static std::atomic<uint64_t> ok{0}, tried{0};
    const uint64_t bit = uint64_t(1) << (dev & 63);
    if (tried.load() & bit) return (ok.load() & bit) != 0;
    cudaFuncAttributes attr{};
    bool good = cudaFuncGetAttributes(&attr, kernel) == cudaSuccess && attr.binaryVersion == 90 &&
                cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     int(PrefillShape<HD>::kSmem)) == cudaSuccess;
    if (!good) (void)cudaGetLastError();
    if (good) ok.fetch_or(bit);
    tried.fetch_or(bit);
    return good;
  }
  // One CTA per work item, or (persistent) one per SM taking items in turn.
  static cudaError_t launch(const PagedAttentionParams& p, bool persistent, cudaStream_t stream) {
    const int64_t items = prefill_items<PrefillShape<HD>::kM>(p);
    int64_t ctas = items;
    if (persistent) {
      int dev = 0, sms = 0;
      cudaError_t err = cudaGetDevice(&dev);
      if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
      if (err != cudaSuccess) return err;
      ctas = std::min<int64_t>(items, sms);
    }
    if (ctas <= 0) return cudaSuccess;
    kernel<<<unsigned(ctas), PrefillShape<HD>::kThreads, PrefillShape<HD>::kSmem, stream>>>(p);
    return cudaGetLastError();
  }
};

// Calls f(PrefillInstance<...>{}) for the call's dtype and head_dim. Variants (AttentionTuning::
// prefill_variant), for the bench to compare: 0 one CTA per item with ping-pong (the default),
// 1 no ping-pong between the consumer warpgroups (head_dim 128 only), 2 a persistent grid (one
// CTA per SM, items in turn; head_dim <= 128): 0.93-0.99x of the default on 6 of 8 bench rows,
// 1.05x on 4 x 16K n1024 (H100, cuda/NOTES.md), so not the default.
template <typename F>
bool by_type_hd(const PagedAttentionParams& p, int variant, F&& f) {
  auto hd = [&](auto tag) {
    using T = typename decltype(tag)::type;
    switch (p.head_dim) {
      case 64: return f(PrefillInstance<T, 64>{});
      case 128: return variant == 1 ? f(PrefillInstance<T, 128, false>{}) : f(PrefillInstance<T, 128>{});
      case 256: return f(PrefillInstance<T, 256>{});
      default: return false;
    }
  };
  if (p.dtype == DType::f16) return hd(TypeTag<__half>{});
  if (p.dtype == DType::bf16) return hd(TypeTag<__nv_bfloat16>{});
  return false;
}

}  // namespace

bool prefill_sm90_supports(const PagedAttentionParams& p, int variant) {
#ifdef PAGEDKV_NO_SM90A
  (void)p, (void)variant;
  return false;
#endif
  if (rotates_sinks(p) || !(p.scale > 0.f) || p.num_kv_heads > 65535 || p.num_seqs > 65535) return false;
  if (p.head_dim > 0 && prefill_items<PrefillShape<64>::kM>(p) > INT32_MAX) return false;  // (items are ints; kM is 128 for every head_dim)
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  if (major != 9 || minor != 0) return false;
  return by_type_hd(p, variant, [](auto inst) { return decltype(inst)::ready(); });
}

cudaError_t prefill_sm90(const PagedAttentionParams& p, int variant, cudaStream_t stream) {
  cudaError_t err = cudaErrorNotSupported;
  by_type_hd(p, variant, [&](auto inst) {
    err = decltype(inst)::launch(p, variant == 2 && PrefillShape<decltype(inst)::kHd>::kPersistent, stream);
    return true;
  });
  return err;
}

}  // namespace pagedkv::cuda::detail
