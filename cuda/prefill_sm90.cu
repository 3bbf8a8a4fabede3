// Host side of the Hopper tensor-core prefill kernel (prefill_sm90_kernel.cuh): which calls it
// takes, the per-device launch attributes, the launch.
#include <atomic>
#include <type_traits>

#include "pagedkv/kernels.h"
#include "prefill_sm90.h"
#include "prefill_sm90_kernel.cuh"

namespace pagedkv::cuda::detail {
namespace {

// The tensor-core kernel's features (prefill_sm90_kernel.cuh, PrefillFeature): the fastest set
// measured (cuda/NOTES.md, 2026-12-06; kSplitKV is faster alone but slower with kPrefetchBT).
constexpr int kDefaultFeatures = kPingPong | kMaskSplit | kFastDesc | kPrefetchBT;

template <typename T, int HD, int F = kDefaultFeatures>
struct PrefillInstance {
  static constexpr auto kernel = prefill_sm90_kernel<T, HD, F>;
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
  static cudaError_t launch(const PagedAttentionParams& p, cudaStream_t stream) {
    const int group = p.num_q_heads / p.num_kv_heads;
    const int64_t m_tiles = (int64_t(p.max_q_len) * group + PrefillShape<HD>::kM - 1) / PrefillShape<HD>::kM;
    const dim3 grid(unsigned(m_tiles), unsigned(p.num_kv_heads), unsigned(p.num_seqs));
    kernel<<<grid, PrefillShape<HD>::kThreads, PrefillShape<HD>::kSmem, stream>>>(p);
    return cudaGetLastError();
  }
};

// Calls f(PrefillInstance<...>{}) for the call's dtype and head_dim. Variants (head_dim 128 only,
// for the bench to compare; AttentionTuning::prefill_variant): 0 the default, 1 the default
// without ping-pong; bf16 only: 9 the default without kPrefetchBT, 11 that with kSplitKV, 13 the
// default with kSplitKV, 14 the kernel of 2026-12-04 (kPingPong alone).
template <typename F>
bool by_type_hd(const PagedAttentionParams& p, int variant, F&& f) {
  auto hd = [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int k9 = kDefaultFeatures & ~kPrefetchBT;
    switch (p.head_dim) {
      case 64: return f(PrefillInstance<T, 64>{});
      case 128:
        if (variant == 1) return f(PrefillInstance<T, 128, kDefaultFeatures & ~kPingPong>{});
        if constexpr (!std::is_same_v<T, __nv_bfloat16>) {
          return f(PrefillInstance<T, 128>{});
        } else {
          switch (variant) {
            case 9: return f(PrefillInstance<T, 128, k9>{});
            case 11: return f(PrefillInstance<T, 128, k9 | kSplitKV>{});
            case 13: return f(PrefillInstance<T, 128, kDefaultFeatures | kSplitKV>{});
            case 14: return f(PrefillInstance<T, 128, kPingPong>{});
            default: return f(PrefillInstance<T, 128>{});
          }
        }
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
    err = decltype(inst)::launch(p, stream);
    return true;
  });
  return err;
}

}  // namespace pagedkv::cuda::detail
