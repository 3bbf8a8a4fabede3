// Host side of paged attention: dtype/head_dim dispatch, the split-K heuristic, the workspace
// layout and the two launches. Kernels: paged_attention_kernel.cuh, paged_attention_merge.cuh.
#include <algorithm>
#include <atomic>
#include <type_traits>

#include "paged_attention_kernel.cuh"
#include "paged_attention_merge.cuh"
#include "prefill_sm90.h"
#include "pagedkv/kernels.h"

namespace pagedkv::cuda {
namespace detail {

constexpr int kStages = 2;
constexpr int kMaxSplits = 256;


// Calls f(Tag<T>, integral_constant<HD>, bool_constant<ROPE>) for the runtime dtype, head_dim
// and ROPE = sink rotation or striping (the general instances serve both; the others run the plain
// key order only, paged_attention_scope.cuh).
template <typename F>
cudaError_t dispatch(const PagedAttentionParams& p, F&& f) {
  auto by_rope = [&](auto tag, auto hd) -> cudaError_t {
    if (rotates_sinks(p) || striped(p)) return f(tag, hd, std::true_type{});
    return f(tag, hd, std::false_type{});
  };
  auto by_hd = [&](auto tag) -> cudaError_t {
    switch (p.head_dim) {
      case 64: return by_rope(tag, std::integral_constant<int, 64>{});
      case 80: return by_rope(tag, std::integral_constant<int, 80>{});
      case 96: return by_rope(tag, std::integral_constant<int, 96>{});
      case 128: return by_rope(tag, std::integral_constant<int, 128>{});
      case 256: return by_rope(tag, std::integral_constant<int, 256>{});
      default: return cudaErrorNotSupported;
    }
  };
  if (p.dtype == DType::f16) return by_hd(TypeTag<__half>{});
  if (p.dtype == DType::bf16) return by_hd(TypeTag<__nv_bfloat16>{});
  return cudaErrorNotSupported;  // f32 runs on the CPU reference only
}

// Kernel configurations (warps x ring stages x loader).
enum class Config {
  kBase,  // 4 warps, 2 stages, cp.async
  kHalf,  // 2 warps, 2 stages: head_dim 256 where a block gets < 139 KB of smem (sm_86/89)
  kDeep,  // 4 warps, 3 stages (head_dim <= 128): a full wave of units or more, see make_plan
};

struct Plan {
  Config config = Config::kBase;
  int nwarps = 4;
  size_t smem = 0;
  int ctas_per_sm = 1;
  int n_mtiles = 1;
  int splits = 1;
  bool pdl = false;  // sm_90+: the merge launches while the main kernel drains
};

// Per-instance launch facts, computed once (occupancy does not change between calls, and doing
// it once keeps the per-call path free of anything but the launches). ROPE: the instance that
// rotates sinks (attention_params.h); calls without rotation never run it.
template <typename T, int HD, bool ROPE, int NWARPS, int STAGES = kStages>
struct Instance {
  using Shape = AttnShape<HD, NWARPS, STAGES>;
  static constexpr auto kernel = paged_attention_kernel<T, HD, NWARPS, STAGES, ROPE>;
  static constexpr size_t smem = Shape::template smem_bytes<T, ROPE>();
  static cudaError_t prepare(int* ctas_per_sm) {
    int dev = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err != cudaSuccess) return err;
    static std::atomic<uint64_t> configured{0};  // bit d: attribute set on device d
    const uint64_t bit = uint64_t(1) << (dev & 63);
    if (!(configured.load() & bit)) {
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
      if (err != cudaSuccess) return err;
      configured.fetch_or(bit);
    }
    static const int occ = [] {
      int n = 0;
      if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, NWARPS * 32, smem) != cudaSuccess) {
        (void)cudaGetLastError();
        n = 1;
      }
      return std::max(n, 1);
    }();
    *ctas_per_sm = occ;
    return cudaSuccess;
  }
  static void launch(dim3 grid, cudaStream_t st, const PagedAttentionParams& p, int splits, float* po, float* pl) {
    kernel<<<grid, NWARPS * 32, smem, st>>>(p, splits, po, pl);
  }
};

// Splits per (seq, kv head, m-tile): the count that best fills whole waves of resident CTAs,
// from what the host knows (max_blocks bounds the context; kv_lens stay on the device).
inline int choose_splits(const PagedAttentionParams& p, int num_sms, const Plan& plan, const AttentionTuning& tu) {
  if (tu.force_splits > 0) return tu.force_splits;
  const int64_t units = int64_t(p.num_seqs) * p.num_kv_heads * plan.n_mtiles;
  int64_t max_keys = int64_t(p.max_blocks) * p.block_size;
  if (p.window > 0)
    max_keys = std::min<int64_t>(max_keys, int64_t(p.window) + std::max(p.sink_tokens, 0) + p.max_q_len);
  const int64_t max_chunks = (max_keys + 15) / 16;
  // At least two chunks per warp per split, or the ring never fills.
  const int cap = int(std::min<int64_t>(kMaxSplits, std::max<int64_t>(1, max_chunks / (2 * plan.nwarps))));
  const int64_t full_slots = int64_t(std::max(num_sms, 1)) * plan.ctas_per_sm;
  // Enough units for a wave: split only to even out the last wave. Fewer: split-K aiming at two
  // resident CTAs per SM, which measured faster than three (cuda/NOTES.md, batch 1 x 32K).
  const int64_t slots =
      units >= full_slots ? full_slots : int64_t(std::max(num_sms, 1)) * std::min(plan.ctas_per_sm, std::max(tu.aim_ctas, 1));
  // Time ~ waves x (chunk rounds per CTA + ~2 rounds of per-CTA overhead: first-load latency,
  // Q tile, epilogue, its share of the merge); a round is one chunk for each warp.
  const int64_t rounds = (max_chunks + plan.nwarps - 1) / plan.nwarps;
  auto cost = [&](int64_t s) { return ((units * s + slots - 1) / slots) * ((rounds + s - 1) / s + 2); };
  int best = 1;
  for (int s = 2; s <= cap; ++s)
    if (cost(s) < cost(best)) best = s;
  return best;
}

inline size_t split_bytes(const PagedAttentionParams& p, int splits) {
  if (splits <= 1) return 0;
  const size_t rows_heads = size_t(p.num_rows) * p.num_q_heads;
  return size_t(splits) * rows_heads * (size_t(p.head_dim) + 1) * sizeof(float);
}

// Calls f(Instance<...>{}) for the configuration (a configuration that does not exist for this
// head_dim falls back to kBase; make_plan never picks one).
template <typename T, int HD, bool ROPE, typename F>
cudaError_t with_config(Config c, F&& f) {
  if constexpr (HD == 256) {
    if (c == Config::kHalf) return f(Instance<T, HD, ROPE, 2>{});
  }
  if constexpr (HD <= 128) {
    if (c == Config::kDeep) return f(Instance<T, HD, ROPE, 4, 3>{});
  }
  return f(Instance<T, HD, ROPE, 4>{});
}

template <typename T, int HD, bool ROPE>
cudaError_t make_plan(const PagedAttentionParams& p, int num_sms, const AttentionTuning& tu, Plan* plan) {
  int dev = 0, optin = 0, major = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (err != cudaSuccess) return err;
  plan->pdl = major >= 9;
  const int group = p.num_q_heads / p.num_kv_heads;
  plan->n_mtiles = (p.max_q_len * group + 15) / 16;
  plan->config = Config::kBase;
  if constexpr (HD == 256) {  // sm_86/89 give a block 99 KB: half the warps, half the rings
    if (Instance<T, HD, ROPE, 4>::smem > size_t(optin)) plan->config = Config::kHalf;
  }
  if constexpr (HD <= 128) {
    // A full wave of (seq, kv head, m-tile) units or more at 3 CTAs/SM (the base kernel on
    // H100/H200): a third stage at 2 CTAs/SM streamed faster there (64 x 4K and 128 x 2K decode,
    // cuda/NOTES.md); below a wave, split-K fills the machine and 3 CTAs/SM of 2 stages won.
    // Only where the 3-stage kernel still keeps 2 CTAs on an SM, and chosen by itself only at
    // head_dim 128 (the one measured; the other head dims get it through the test hook).
    int base_ctas = 1, deep_ctas = 0;
    err = Instance<T, HD, ROPE, 4>::prepare(&base_ctas);
    if (err != cudaSuccess) return err;
    if (Instance<T, HD, ROPE, 4, 3>::smem <= size_t(optin)) {
      err = Instance<T, HD, ROPE, 4, 3>::prepare(&deep_ctas);
      if (err != cudaSuccess) return err;
    }
    const int64_t units = int64_t(p.num_seqs) * p.num_kv_heads * plan->n_mtiles;
    const bool wave = HD == 128 && units >= int64_t(std::max(num_sms, 1)) * base_ctas;
    if (deep_ctas >= 2 && (tu.variant == 1 || (tu.variant == 0 && wave))) plan->config = Config::kDeep;
  }
  err = with_config<T, HD, ROPE>(plan->config, [&](auto inst) {
    using I = decltype(inst);
    plan->nwarps = I::Shape::kThreads / 32, plan->smem = I::smem;
    return I::prepare(&plan->ctas_per_sm);
  });
  if (err != cudaSuccess) return err;
  plan->splits = choose_splits(p, num_sms, *plan, tu);
  return cudaSuccess;
}

inline bool params_ok(const PagedAttentionParams& p) {
  return p.num_kv_heads > 0 && p.num_q_heads > 0 && p.num_q_heads % p.num_kv_heads == 0 &&
         p.block_size > 0 && p.num_seqs >= 0 && p.max_q_len >= 0;
}

// Whether this call goes to the tensor-core prefill kernel.
inline bool use_tensor_cores(const PagedAttentionParams& p, const AttentionTuning& tu) {
  if (tu.path == AttentionTuning::kSplitK) return false;
  const int64_t rows = int64_t(p.max_q_len) * (p.num_q_heads / p.num_kv_heads);
  if (tu.path == AttentionTuning::kAuto && rows < kTensorCoreMinRows) return false;
  return prefill_sm90_supports(p, tu.prefill_variant);
}

}  // namespace detail

size_t paged_attention_workspace_bytes(const PagedAttentionParams& p, int num_sms, const AttentionTuning& tu) {
  if (!detail::params_ok(p) || p.num_rows == 0 || detail::use_tensor_cores(p, tu)) return 0;
  size_t bytes = 0;
  detail::dispatch(p, [&](auto tag, auto hd, auto rope) {
    using T = typename decltype(tag)::type;
    detail::Plan plan;
    const cudaError_t err = detail::make_plan<T, decltype(hd)::value, decltype(rope)::value>(p, num_sms, tu, &plan);
    if (err == cudaSuccess) bytes = detail::split_bytes(p, plan.splits);
    return err;
  });
  return bytes;
}

cudaError_t paged_attention(const PagedAttentionParams& p, void* workspace, size_t workspace_bytes,
                            int num_sms, cudaStream_t stream, const AttentionTuning& tu) {
  if (!detail::params_ok(p)) return cudaErrorInvalidValue;
  if (p.num_rows == 0 || p.num_seqs == 0) return cudaSuccess;
  if (detail::use_tensor_cores(p, tu)) return detail::prefill_sm90(p, tu.prefill_variant, stream);
  return detail::dispatch(p, [&](auto tag, auto hd, auto rope) -> cudaError_t {
    using T = typename decltype(tag)::type;
    constexpr int HD = decltype(hd)::value;
    constexpr bool ROPE = decltype(rope)::value;
    detail::Plan plan;
    cudaError_t err = detail::make_plan<T, HD, ROPE>(p, num_sms, tu, &plan);
    if (err != cudaSuccess) return err;
    int splits = plan.splits;
    if (detail::split_bytes(p, splits) > workspace_bytes || workspace == nullptr) {
      // Less scratch than asked for: fewest-splits fallback still computes the right answer.
      const size_t per_split = detail::split_bytes(p, 2) / 2;
      splits = workspace == nullptr ? 1 : int(std::min<size_t>(splits, workspace_bytes / per_split));
      if (splits < 2) splits = 1;
    }
    if (plan.n_mtiles > 65535 || splits > 65535) return cudaErrorInvalidConfiguration;
    float* part_o = static_cast<float*>(workspace);
    float* part_lse = splits > 1 ? part_o + size_t(splits) * p.num_rows * p.num_q_heads * HD : nullptr;
    const dim3 grid(unsigned(p.num_seqs) * unsigned(p.num_kv_heads), plan.n_mtiles, splits);
    detail::with_config<T, HD, ROPE>(plan.config, [&](auto inst) {
      decltype(inst)::launch(grid, stream, p, splits, part_o, part_lse);
      return cudaSuccess;
    });
    err = cudaGetLastError();
    if (err != cudaSuccess || splits == 1) return err;
    const int64_t rows_heads = int64_t(p.num_rows) * p.num_q_heads;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(unsigned(rows_heads));
    cfg.blockDim = dim3(detail::kMergeThreads);
    cfg.stream = stream;
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr.val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = &attr;
    cfg.numAttrs = plan.pdl ? 1 : 0;
    err = cudaLaunchKernelEx(&cfg, detail::merge_splits_kernel<T, HD>, static_cast<const float*>(part_o),
                             static_cast<const float*>(part_lse), splits, rows_heads,
                             static_cast<T*>(p.out), p.lse);
    if (err != cudaSuccess) return err;
    return cudaGetLastError();
  });
}

}  // namespace pagedkv::cuda
