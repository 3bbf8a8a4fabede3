// The engine: the calls of DESIGN.md §4 on raw pointers, as a thin facade over four parts that
// each own their state (docs/DESIGN.md §2):
//   DeviceBackend    (device_backend.h)    streams, events, copies, launches: CPU or CUDA
//   BlockStore       (block_store.h)       tiers, block directory, residency, fences, eviction
//   PageTables       (page_tables.h)       sequences, lengths, scope, copy-on-write, drops
//   AttentionPlanner (attention_planner.h) kernel parameters, step/staged plans, decode steps
// Every public call validates everything and checks for room before it changes anything, so a
// throw leaves the engine exactly as it was.
#pragma once
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "pagedkv/attention_planner.h"
#include "pagedkv/block_store.h"
#include "pagedkv/config.h"
#include "pagedkv/device_backend.h"
#include "pagedkv/page_tables.h"
#include "pagedkv/stats.h"

namespace pagedkv {

class Engine {
 public:
  explicit Engine(const CacheConfig& cfg);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  const CacheConfig& config() const { return cfg_; }

  SeqId add_sequence();
  SeqId fork(SeqId parent);
  void free(SeqId seq);
  // Keeps the first `tokens` tokens of every layer (layers already shorter keep theirs); blocks
  // past the new end go back (a shared one only loses this sequence's reference).
  void truncate(SeqId seq, int32_t tokens);

  // k, v: [sum(lengths), num_kv_heads, head_dim] contiguous in cfg.dtype, rows of seqs[i]
  // consecutive, on the device tier's device.
  void append(const std::vector<SeqId>& seqs, int32_t layer, const std::vector<int32_t>& lengths,
              const void* k, const void* v, void* stream);
  // Throws what append() with these arguments would throw for bad arguments or lack of room, and
  // changes nothing (a striped cache's ranks agree on an append before any of them makes it).
  void check_append(const std::vector<SeqId>& seqs, int32_t layer, const std::vector<int32_t>& lengths);
  // The rows of seqs[i] are its last lengths[i] tokens in `layer`.
  void attend(const std::vector<SeqId>& seqs, int32_t layer, const std::vector<int32_t>& lengths,
              const AttendArgs& args);
  // Blocks in scope of these rows, all sequences together: more than the device tier holds means
  // the call must pass them through in chunks (attend_range).
  int64_t blocks_needed(const std::vector<SeqId>& seqs, int32_t layer,
                        const std::vector<int32_t>& lengths, int32_t window) const;
  // One query row (args.q/out/lse hold 1 row) at `position` over keys [key_begin, key_end) only,
  // for contexts larger than the device tier; args.lse is required to merge the parts.
  void attend_range(SeqId seq, int32_t layer, int32_t position, int32_t key_begin, int32_t key_end,
                    const AttendArgs& args);
  // Builds (or reuses) the block table of this batch, as attend() does once per step; returns
  // its row stride. Lets a caller pay the host-side preparation before the first layer.
  int32_t prepare(const std::vector<SeqId>& seqs, void* stream);
  // A decode step planned once for every layer (DESIGN.md §5). Reserves `tokens` rows of each
  // sequence in every layer (seq_len counts them at once), brings every block the step reads or
  // writes to the device and pins it there, and writes the lengths, slot mapping and block table
  // into device buffers that keep their addresses from step to step. Until end_step() or the
  // next begin_step(), append() and attend() of exactly this batch (`tokens` rows each, the
  // cache's window) only launch kernels on that metadata: a caller may capture one step's calls
  // in a CUDA graph and replay it after every begin_step(). Returns true when something such a
  // capture holds changed (a buffer moved, the batch size, `tokens`, the table stride, the
  // split-K scratch): capture again then. num_q_heads > 0 sizes the scratch now, which a capture
  // needs; 0 sizes it at the step's first attend.
  bool begin_step(const std::vector<SeqId>& seqs, int32_t tokens, int32_t num_q_heads, void* stream);
  // Closes the open step (its blocks may move again). Call it after the step's kernels were
  // enqueued: later moves are ordered after them on the stream they are given. Rows the step
  // reserved in a layer that append() never wrote are given back (that layer's length returns to
  // where the step began; blocks past every layer's end are freed). Without an open step it does
  // nothing, like closing a closed file. (begin_step() over an open step with a layer never
  // appended raises ArgumentError and changes nothing.) Once a CUDA graph captured the step's
  // appends, until begin_step() returns true, every step's rows count as written by its replay.
  void end_step();
  bool step_open() const;
  // Starts bringing every block of these sequences to the device (as far as it fits), so a later
  // attend finds them there.
  void prefetch(const std::vector<SeqId>& seqs, void* stream);
  // Moves every device block of these sequences down to the host tier now (asynchronously on
  // CUDA): a session going idle makes room for others before anyone needs it.
  void offload(const std::vector<SeqId>& seqs, void* stream);
  // Copies the stored K/V of one layer into k_out, v_out: [seq_len, num_kv_heads, head_dim],
  // from whichever tier each block is in.
  // `rows` >= 0: the rows k_out and v_out hold, checked against seq_len under the engine's lock
  // (a caller that sized them by an earlier seq_len() learns if another thread appended since).
  void gather(SeqId seq, int32_t layer, void* k_out, void* v_out, void* stream, int32_t rows = -1);

  // Merges `parts` partial attention results over disjoint key sets by log-sum-exp:
  // outs [parts, rows_heads, head_dim] (cfg.dtype), lses [parts, rows_heads] float32 ->
  // out [rows_heads, head_dim] and, when non-null, lse [rows_heads]; on the cache's device.
  void merge_partials(const void* outs, const float* lses, int32_t parts, int64_t rows_heads, void* out,
                      float* lse, void* stream);

  // `what` names the call in errors (gather() asks seq_len() to size its output).
  int32_t seq_len(SeqId seq, int32_t layer, const char* what = "seq_len()") const;
  // The rows gather() returns: seq_len less rows the open decode step reserved in this layer and
  // append() has not written yet (seq_len counts those from begin_step on; they hold no data).
  int32_t written_len(SeqId seq, int32_t layer) const;
  std::vector<BlockLoc> block_table(SeqId seq) const;
  Stats stats() const;
  std::vector<SeqId> sequences() const;
  void* pool_data(Tier tier) const;
  int64_t pool_blocks(Tier tier) const;
  int num_sms() const;

  // Throws InternalError naming the first broken invariant: every block owned once, reference
  // counts equal to page-table references, free lists disjoint from used slots, page tables
  // pointing at live blocks, block counts matching lengths, the policy tracking exactly the
  // device-resident blocks.
  void check_invariants() const;

 private:
  friend struct EngineTestAccess;  // tests/cpp: corrupts state to prove check_invariants() sees it
  // Every public call holds the engine's mutex for its duration (docs/DESIGN.md §5): calls from
  // several threads run one after another, each seeing and leaving the engine whole. (No public
  // call makes another one: the mutex is not recursive.)
  class Entry {
   public:
    Entry(const Engine& e, const char* /*what*/) : lock_(e.mutex_) {}

   private:
    std::lock_guard<std::mutex> lock_;
  };

  void append_checked(const std::vector<SeqId>& seqs, int32_t layer, const std::vector<int32_t>& lengths,
                      const void* k, const void* v, void* stream, bool drop);
  void append_in_pieces(const std::vector<SeqId>& seqs, int32_t layer, const std::vector<int32_t>& lengths,
                        const void* k, const void* v, int64_t fresh, void* stream);
  int64_t append_needs(const std::vector<SeqId>& seqs, int32_t layer, const std::vector<int32_t>& lengths,
                       std::vector<BlockId>& written) const;
  void check_pieces_room(int64_t fresh) const;
  void close_step();
  int32_t written_rows(SeqId seq, const SequenceTable& t, int32_t layer) const;
  void step_append(int32_t layer, const std::vector<int32_t>& lengths, const void* k, const void* v, void* stream);
  // begin_step's checks: the blocks the step reads or writes now, and how many new ones it takes.
  int64_t step_blocks(const std::vector<SeqId>& seqs, int32_t tokens, std::vector<BlockId>& scope) const;
  // -- argument checks (engine_checks.cpp: every check of a caller's argument, in one file) --
  void check_layer(int32_t layer, const char* what) const;
  // Known ids, none twice, lengths as many and non-negative.
  void check_batch(const std::vector<SeqId>& seqs, const std::vector<int32_t>& lengths, const char* what) const;
  void check_attend_args(const AttendArgs& args) const;
  void check_step_args(const std::vector<SeqId>& seqs, int32_t tokens, int32_t num_q_heads) const;
  void check_range_args(const SequenceTable& t, SeqId seq, int32_t layer, int32_t position, int32_t key_begin,
                        int32_t key_end) const;
  void check_gather_args(const SequenceTable& t, SeqId seq, int32_t layer, int32_t len, int32_t rows) const;
  // append() and attend() of the open decode step's batch: its rows per sequence, its window.
  void check_step_rows(const std::vector<int32_t>& lengths, const char* what) const;
  // Reports the blocks rows [len - n, len) read to the policy, once per step (not per layer).
  void note_scope_use(SeqId seq, SequenceTable& t, int32_t len, int32_t n, int32_t window);
  void write_rows(const int32_t* slot_mapping, int32_t rows, int32_t layer, const void* k, const void* v,
                  void* stream, const int32_t* on_device = nullptr);

  CacheConfig cfg_;
  std::unique_ptr<DeviceBackend> backend_;
  BlockStore store_;
  PageTables tables_;
  AttentionPlanner planner_;
  mutable std::mutex mutex_;  // held by every public call (Entry)
};

}  // namespace pagedkv
