// Hybrid: recency and frequency in one score,
//   score = recency_weight * last_step + frequency_weight * log2(1 + uses),
// kept in an ordered set so a touch is O(log n); the lowest score is evicted first. A block used
// often survives a burst of one-off blocks that plain LRU would let push it out. Blocks used in
// the last two steps go last whatever their score: they are what the running batch reads next,
// and evicting them only to fetch them back one layer later is the worst trade there is.
#include <algorithm>
#include <cmath>
#include <set>
#include <unordered_map>

#include "policy_impl.h"

namespace pagedkv {
namespace {

class HybridPolicy final : public EvictionPolicy {
 public:
  HybridPolicy(double rw, double fw) : rw_(rw), fw_(fw) {}
  const char* name() const override { return "hybrid"; }

  void on_arrive(BlockId id, const BlockUse& use) override { touch(id, use.step); }
  void on_use(BlockId id, const BlockUse& use) override { touch(id, use.step); }

  void on_leave(BlockId id) override {
    auto it = state_.find(id);
    if (it == state_.end()) return;
    order_.erase({it->second.score, id});
    state_.erase(it);
  }

  std::vector<BlockId> victims(int64_t n, const std::function<bool(BlockId)>& keep) const override {
    std::vector<BlockId> out, recent;
    for (auto it = order_.begin(); it != order_.end() && int64_t(out.size()) < n; ++it) {
      if (keep(it->second)) continue;
      if (state_.at(it->second).last + kGuardSteps > now_) recent.push_back(it->second);
      else out.push_back(it->second);
    }
    for (size_t i = 0; i < recent.size() && int64_t(out.size()) < n; ++i) out.push_back(recent[i]);
    return out;
  }
  int64_t size() const override { return int64_t(state_.size()); }

 private:
  static constexpr uint64_t kGuardSteps = 2;
  struct State {
    double score = 0;
    int64_t uses = 0;
    uint64_t last = 0;
  };
  void touch(BlockId id, uint64_t step) {
    now_ = std::max(now_, step);
    State& s = state_[id];
    s.last = step;
    if (s.uses > 0) order_.erase({s.score, id});
    ++s.uses;  // counts survive only while the block stays on the device
    s.score = rw_ * double(step) + fw_ * std::log2(1.0 + double(s.uses));
    order_.insert({s.score, id});
  }

  double rw_, fw_;
  uint64_t now_ = 0;
  std::unordered_map<BlockId, State> state_;
  std::set<std::pair<double, BlockId>> order_;
};

}  // namespace

std::unique_ptr<EvictionPolicy> make_hybrid_policy(double recency_weight, double frequency_weight) {
  return std::make_unique<HybridPolicy>(recency_weight, frequency_weight);
}

}  // namespace pagedkv
