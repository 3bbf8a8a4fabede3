// Pieces the policy implementations share; private to cpp/.
#pragma once
#include <functional>
#include <list>
#include <memory>
#include <unordered_map>
#include <vector>

#include "pagedkv/policy.h"

namespace pagedkv {

// Blocks in order of last use, most recent first; O(1) touch and remove.
class RecencyList {
 public:
  void touch(BlockId id);
  void remove(BlockId id);
  bool contains(BlockId id) const { return where_.count(id) != 0; }
  // Appends up to n - out.size() of the least recently used blocks that `keep` does not hold.
  void oldest(int64_t n, const std::function<bool(BlockId)>& keep, std::vector<BlockId>& out) const;
  int64_t size() const { return int64_t(where_.size()); }

 private:
  std::list<BlockId> order_;
  std::unordered_map<BlockId, std::list<BlockId>::iterator> where_;
};

std::unique_ptr<EvictionPolicy> make_lru_policy();
std::unique_ptr<EvictionPolicy> make_window_policy(int32_t recent_blocks, int32_t sink_blocks);
std::unique_ptr<EvictionPolicy> make_hybrid_policy(double recency_weight, double frequency_weight);

}  // namespace pagedkv
