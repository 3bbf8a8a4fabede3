// LRU: a recency list; a use moves the block to the front, victims come from the back.
#include <list>
#include <unordered_map>

#include "policy_impl.h"

namespace pagedkv {

void RecencyList::touch(BlockId id) {
  auto it = where_.find(id);
  if (it != where_.end()) order_.erase(it->second);
  order_.push_front(id);
  where_[id] = order_.begin();
}

void RecencyList::remove(BlockId id) {
  auto it = where_.find(id);
  if (it == where_.end()) return;
  order_.erase(it->second);
  where_.erase(it);
}

void RecencyList::oldest(int64_t n, const std::function<bool(BlockId)>& keep,
                         std::vector<BlockId>& out) const {
  for (auto it = order_.rbegin(); it != order_.rend() && int64_t(out.size()) < n; ++it)
    if (!keep(*it)) out.push_back(*it);
}

namespace {

class LruPolicy final : public EvictionPolicy {
 public:
  const char* name() const override { return "lru"; }
  void on_arrive(BlockId id, const BlockUse&) override { list_.touch(id); }
  void on_use(BlockId id, const BlockUse&) override { list_.touch(id); }
  void on_leave(BlockId id) override { list_.remove(id); }
  std::vector<BlockId> victims(int64_t n, const std::function<bool(BlockId)>& keep) const override {
    std::vector<BlockId> out;
    list_.oldest(n, keep, out);
    return out;
  }
  int64_t size() const override { return list_.size(); }

 private:
  RecencyList list_;
};

}  // namespace

std::unique_ptr<EvictionPolicy> make_lru_policy() { return std::make_unique<LruPolicy>(); }

}  // namespace pagedkv
