// Eviction policies: which device blocks go down to the host tier when the device runs short.
// The engine tells a policy when a block arrives on the device, each time it is used, and when
// it leaves; the policy answers with victims, best first. Each touch is O(1) or O(log n).
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "pagedkv/types.h"

namespace pagedkv {

struct BlockUse {
  SeqId seq = -1;              // the sequence that used it (one of them, for shared blocks)
  int32_t logical = 0;         // its logical index in that sequence
  int32_t seq_blocks = 0;      // logical blocks that sequence has now
  uint64_t step = 0;           // the engine's step counter (one per append/attend call)
};

using PolicyParams = std::map<std::string, double>;

class EvictionPolicy {
 public:
  virtual ~EvictionPolicy() = default;
  virtual const char* name() const = 0;
  // A block is now on the device (new, fetched back, or copied on write).
  virtual void on_arrive(BlockId id, const BlockUse& use) = 0;
  // A block on the device was read or written.
  virtual void on_use(BlockId id, const BlockUse& use) = 0;
  // A block left the device (evicted, dropped or freed); unknown ids are ignored.
  virtual void on_leave(BlockId id) = 0;
  // Up to n victims among the device blocks it tracks, best first, skipping those `keep` holds.
  virtual std::vector<BlockId> victims(int64_t n, const std::function<bool(BlockId)>& keep) const = 0;
  virtual int64_t size() const = 0;
};

// name: "lru" | "window" | "hybrid". Throws ArgumentError on an unknown name or parameter.
//   window: recent_blocks (default 4): each sequence's newest blocks stay hot; sink_blocks (1).
//   hybrid: recency_weight (1.0), frequency_weight (8.0): score = recency_weight * last_step
//           + frequency_weight * log2(1 + uses); the lowest score goes first.
std::unique_ptr<EvictionPolicy> make_policy(const std::string& name, const PolicyParams& params);

}  // namespace pagedkv
