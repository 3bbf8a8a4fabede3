// Host side of the Hopper tensor-core prefill kernel (prefill_sm90_kernel.cuh): which calls it
// takes, the per-device launch attributes, the TMA tensor map over the pool, the launch.
#include <cuda.h>

#include <atomic>
#include <climits>
#include <type_traits>

#include "pagedkv/kernels.h"
#include "prefill_sm90.h"
#include "prefill_sm90_kernel.cuh"

namespace pagedkv::cuda::detail {
namespace {

// The tensor-core kernel's features (prefill_sm90_kernel.cuh, PrefillFeature): the fastest set
// measured (cuda/NOTES.md, 2026-12-06; kSplitKV is faster alone but slower with kPrefetchBT;
// TMA pages 1.00-1.10x the cp.async set, variant 10; kEarlyRescale slower, variant 12).
constexpr int kDefaultFeatures = kPingPong | kMaskSplit | kFastDesc | kPrefetchBT | kTmaKV;

// cuTensorMapEncodeTiled, reached through the runtime (no link against the driver library), or
// nullptr where the driver lacks it.
using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
EncodeTiled encode_tiled() {
  static const EncodeTiled fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      return EncodeTiled(nullptr);
    }
    return reinterpret_cast<EncodeTiled>(f);
  }();
  return fn;
}

// The rows of one TMA box (kTmaKV) for this call, 0 where it takes cp.async throughout: a
// producer warp's kN / 4 rows must be whole pages (or aligned parts of one) in key order, i.e.
// no window or sinks (their key order restarts mid-page), not striped, and a power-of-two block
// size of at least 16 rows; and the map must be made. `map` is set where the result is > 0.
template <typename T, int HD>
int make_kv_map(const PagedAttentionParams& p, CUtensorMap* map) {
  const int warp_rows = PrefillShape<HD>::kN / 4, bs = p.block_size;
  if (p.window > 0 || striped(p) || bs < 16 || (bs & (bs - 1)) != 0) return 0;
  if ((reinterpret_cast<uintptr_t>(p.pool) & 15) != 0) return 0;
  const EncodeTiled encode = encode_tiled();
  if (encode == nullptr) return 0;
  const int rows = bs < warp_rows ? bs : warp_rows;
  // The pool as rows of head_dim elements. The kernel addresses rows by block-table entry (never
  // past the pool) with int32 coordinates, so the map spans INT_MAX rows from the pool's start.
  const cuuint64_t dims[2] = {cuuint64_t(HD), cuuint64_t(INT_MAX)};
  const cuuint64_t strides[1] = {cuuint64_t(HD) * sizeof(T)};
  const cuuint32_t box[2] = {64, cuuint32_t(rows)}, elem_strides[2] = {1, 1};
  const CUtensorMapDataType type =
      std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const CUresult r = encode(map, type, 2, const_cast<void*>(p.pool), dims, strides, box, elem_strides,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? rows : 0;
}

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
    CUtensorMap map{};
    const int tma_rows = (F & kTmaKV) != 0 ? make_kv_map<T, HD>(p, &map) : 0;
    kernel<<<grid, PrefillShape<HD>::kThreads, PrefillShape<HD>::kSmem, stream>>>(p, map, tma_rows);
    return cudaGetLastError();
  }
};

// Calls f(PrefillInstance<...>{}) for the call's dtype and head_dim. Variants (head_dim 128 only,
// for the bench to compare; AttentionTuning::prefill_variant): 0 the default, 1 the default
// without ping-pong; bf16 only: 9 the default without kPrefetchBT, 10 the default without kTmaKV
// (cp.async alone), 12 the default with kEarlyRescale, 13 the default with kSplitKV, 14 the
// kernel of 2026-12-04 (kPingPong alone).
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
            case 10: return f(PrefillInstance<T, 128, kDefaultFeatures & ~kTmaKV>{});
            case 12: return f(PrefillInstance<T, 128, kDefaultFeatures | kEarlyRescale>{});
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
