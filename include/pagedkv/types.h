// Small value types shared by the host core, the CPU reference and the CUDA kernels.
#pragma once
#include <cstddef>
#include <cstdint>

namespace pagedkv {

enum class DType : uint8_t { f32 = 0, f16 = 1, bf16 = 2 };

inline constexpr size_t dtype_size(DType d) { return d == DType::f32 ? 4 : 2; }
inline constexpr const char* dtype_name(DType d) {
  return d == DType::f32 ? "float32" : d == DType::f16 ? "float16" : "bfloat16";
}

// Where a block's data lives. `dropped` marks a logical block that a window released for good.
enum class Tier : uint8_t { device = 0, host = 1, disk = 2, dropped = 3 };
inline constexpr int kNumStorageTiers = 3;  // device, host, disk

inline constexpr const char* tier_name(Tier t) {
  switch (t) {
    case Tier::device: return "device";
    case Tier::host: return "host";
    case Tier::disk: return "disk";
    default: return "dropped";
  }
}

struct BlockLoc {
  Tier tier = Tier::dropped;
  int32_t slot = -1;  // index into that tier's pool; -1 when dropped
  bool operator==(const BlockLoc& o) const { return tier == o.tier && slot == o.slot; }
};

using SeqId = int64_t;
using BlockId = int32_t;  // identity of a block across tier moves; index into the block directory
inline constexpr BlockId kNoBlock = -1;

}  // namespace pagedkv
