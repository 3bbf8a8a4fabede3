// Moves a caller asks for by name: offload() sends sequences' device blocks down now, prefetch()
// starts bringing them up (a hint). Both go through the residency machinery of block_moves.cpp.
#include <algorithm>

#include "pagedkv/block_store.h"
#include "pagedkv/errors.h"

namespace pagedkv {

int64_t BlockStore::room_below_device() const {
  // Host blocks spill to the cold tier as the host tier fills, so the room is every free slot below.
  return tier(Tier::host).slots().num_free() + int64_t(clean_copy_.size()) + tier(Tier::disk).slots().num_free();
}

void BlockStore::offload(const std::vector<BlockId>& victims, void* stream) {
  const KeepSet none;
  PKV_CHECK(int64_t(victims.size()) <= room_below_device(), OutOfBlocks, "offload(): ", victims.size(),
            " blocks do not fit in the host and disk tiers");
  for (size_t done = 0; done < victims.size();) {  // as many per batch as the host tier takes
    const size_t n = size_t(std::min<int64_t>(int64_t(victims.size() - done), eviction_room(none)));
    evict_to_host(std::vector<BlockId>(victims.begin() + long(done), victims.begin() + long(done + n)), none, stream);
    done += n;
  }
}

void BlockStore::prefetch(const std::vector<BlockId>& ids, void* stream) {
  KeepSet check;
  std::vector<BlockId> want;
  for (BlockId id : ids) {
    if (loc(id).tier == Tier::device) check.insert(id); else want.push_back(id);
  }
  // As many as fit without evicting blocks of these same sequences; a prefetch is a hint.
  const BlockPool& dev = tier(Tier::device).slots();
  const int64_t fits = dev.num_free() + dev.num_used() - int64_t(check.size());
  if (int64_t(want.size()) > fits) want.resize(size_t(std::max<int64_t>(fits, 0)));
  if (want.empty()) return;
  check.insert(want.begin(), want.end());
  // A hint: without room it does nothing, and a move that runs out half way stops there (every
  // block stays whole wherever it is).
  try {
    check_room(0, check, "prefetch()");
    make_resident(want, check, stream, /*prefetch=*/true);
  } catch (const OutOfBlocks&) {
  }
}

}  // namespace pagedkv
