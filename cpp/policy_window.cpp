// Window: per sequence, the newest `recent_blocks` blocks and the first `sink_blocks` stay hot
// (what a sliding-window or decode-heavy workload reads next); everything else is cold. Victims
// come from the cold list first, least recently used first, then from the hot list.
#include <deque>
#include <unordered_map>
#include <unordered_set>

#include "policy_impl.h"

namespace pagedkv {
namespace {

class WindowPolicy final : public EvictionPolicy {
 public:
  WindowPolicy(int32_t recent, int32_t sinks) : recent_(recent), sinks_(sinks) {}
  const char* name() const override { return "window"; }

  void on_arrive(BlockId id, const BlockUse& use) override { classify(id, use); }
  void on_use(BlockId id, const BlockUse& use) override { classify(id, use); }

  void on_leave(BlockId id) override {
    hot_.remove(id);
    cold_.remove(id);
  }

  std::vector<BlockId> victims(int64_t n, const std::function<bool(BlockId)>& keep) const override {
    std::vector<BlockId> out;
    cold_.oldest(n, keep, out);
    hot_.oldest(n, keep, out);
    return out;
  }
  int64_t size() const override { return hot_.size() + cold_.size(); }

 private:
  void classify(BlockId id, const BlockUse& use) {
    const bool sink = use.logical < sinks_;
    const bool recent = use.logical >= use.seq_blocks - recent_;
    if (sink || recent) {
      cold_.remove(id);
      hot_.touch(id);
    } else {
      hot_.remove(id);
      cold_.touch(id);
    }
    if (recent && !sink) track_recent(id, use);
  }

  // Blocks that slid out of their sequence's recent window turn cold without being touched.
  void track_recent(BlockId id, const BlockUse& use) {
    auto& q = recent_of_[use.seq];
    if (q.empty() || q.back().first < use.logical) q.emplace_back(use.logical, id);
    const int32_t first_recent = use.seq_blocks - recent_;
    while (!q.empty() && q.front().first < first_recent) {
      const BlockId old = q.front().second;
      q.pop_front();
      if (hot_.contains(old)) {
        hot_.remove(old);
        cold_.touch(old);
      }
    }
  }

  int32_t recent_, sinks_;
  RecencyList hot_, cold_;
  std::unordered_map<SeqId, std::deque<std::pair<int32_t, BlockId>>> recent_of_;
};

}  // namespace

std::unique_ptr<EvictionPolicy> make_window_policy(int32_t recent_blocks, int32_t sink_blocks) {
  return std::make_unique<WindowPolicy>(recent_blocks, sink_blocks);
}

}  // namespace pagedkv
