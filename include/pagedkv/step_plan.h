// The block table of one batch of sequences, built once per step and reused by every layer's call
// until a block table changes.
#pragma once
#include <cstdint>
#include <memory>
#include <unordered_set>
#include <vector>

#include "pagedkv/fence.h"
#include "pagedkv/types.h"

namespace pagedkv {

struct StepPlan {
  std::vector<SeqId> seqs;            // [num_seqs] the batch this plan was built for
  uint64_t version = ~uint64_t(0);    // engine version it was built at
  int32_t max_blocks = 0;             // row stride of block_table
  std::vector<int32_t> block_table;   // [num_seqs, max_blocks] device slot, -1 when not on device
  const int32_t* device_block_table = nullptr;  // the same on the GPU (CUDA builds)
  // The batch's blocks were ordered after every prefetch up to this epoch on this stream.
  uint64_t awaited_epoch = ~uint64_t(0);
  void* awaited_stream = nullptr;
  std::vector<int32_t> resident_head;  // [num_seqs] leading blocks all on the device
  std::vector<int32_t> resident_tail;  // [num_seqs] blocks from here on all on the device (or dropped)

  bool matches(const std::vector<SeqId>& s, uint64_t v) const { return version == v && seqs == s; }
};

// attend() over a scope larger than the device tier: which host blocks have this layer's slices
// staged, and the block table that names them. Every layer of a decode step reads the same
// blocks, so the plan is built at the first and reused by the rest.
struct StagedPlan {
  std::vector<SeqId> seqs;
  uint64_t version = ~uint64_t(0);
  std::vector<int32_t> kv_lens, lengths;  // the scope it was built for
  int32_t window = -1;
  std::vector<BlockId> order;             // staged blocks, slice i = order[i]
  std::vector<int32_t> host_slots;        // [order.size()] their host slots
  std::vector<int32_t> tables;            // [seqs, max_blocks] device slot, staged_entry(i), or -1
  // Evictions still writing those host slots at build time, each fence once (a batch of
  // evictions shares one). The first call orders its stream after them; the rest need not.
  std::vector<Fence> waits;
  bool waited = false;                    // kernel staging: ordered on waited_stream already
  void* waited_stream = nullptr;
  std::shared_ptr<Fence> last_read;       // the latest staging of these slots (host_read_by_ shares it)

  bool matches(const std::vector<SeqId>& s, uint64_t v, const std::vector<int32_t>& lens,
               const std::vector<int32_t>& rows, int32_t w) const {
    return version == v && window == w && seqs == s && kv_lens == lens && lengths == rows;
  }
};

// A decode step planned once for every layer (Engine::begin_step): the rows it reserved and the
// metadata its kernels read (the blocks it pins are the store's: BlockStore::pin). On CUDA the
// metadata lives in device buffers whose addresses a captured graph holds; the device_* fields
// say where they were, so the next begin_step can tell whether a capture still holds.
struct DecodeStep {
  bool open = false;
  std::vector<SeqId> seqs;
  std::unordered_set<SeqId> members;  // seqs, for lookups
  int32_t tokens = 0;                 // rows per sequence
  int32_t stride = 0;                 // row stride of block_table; grows, 64 blocks at a time
  std::vector<int32_t> meta;          // kv_lens [S], q_indptr [S + 1], slot mapping [S * tokens]
  std::vector<int32_t> block_table;   // [S, stride] device slots, -1 outside the scope
  std::vector<uint8_t> appended;      // [num_layers] append() of that layer ran in this step
  // A CUDA graph captured this step's appends: until begin_step reports a change (a capture no
  // longer holds), every step's rows count as written, by its replay, whether or not append()
  // ran (a replay never calls the engine).
  bool graph_held = false;
  const int32_t* device_meta = nullptr;   // meta's device copy
  const int32_t* device_table = nullptr;  // block_table's device copy
  const void* workspace = nullptr;        // the split-K scratch the step's attention calls used

  // Offsets into meta (host) and device_meta alike.
  size_t q_indptr_at() const { return seqs.size(); }
  size_t slots_at() const { return 2 * seqs.size() + 1; }
  const int32_t* kv_lens() const { return meta.data(); }
  const int32_t* q_indptr() const { return meta.data() + q_indptr_at(); }
  const int32_t* slot_mapping() const { return meta.data() + slots_at(); }
  int32_t rows() const { return int32_t(seqs.size()) * tokens; }
};

}  // namespace pagedkv
