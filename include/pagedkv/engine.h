// The engine: tiered pools, block directory, page tables and the calls of DESIGN.md §4, on raw
// pointers. Every public call validates everything and checks for room before it changes
// anything, so a throw leaves the engine exactly as it was.
#pragma once
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "pagedkv/attention_params.h"
#include "pagedkv/block_directory.h"
#include "pagedkv/block_pool.h"
#include "pagedkv/config.h"
#include "pagedkv/gather_shape.h"
#include "pagedkv/copy_engine.h"
#include "pagedkv/disk_file.h"
#include "pagedkv/page_table.h"
#include "pagedkv/policy.h"
#include "pagedkv/stats.h"
#include "pagedkv/step_plan.h"

namespace pagedkv {

class CudaContext;  // cuda_context.h; exists only in CUDA builds
class IoPool;       // cpp/io_pool.h: the disk tier's I/O threads

Fence take_fence(std::unordered_map<BlockId, Fence>& fences, BlockId id);

struct AttendArgs {
  const void* q = nullptr;  // [num_rows, num_q_heads, head_dim] contiguous, cfg.dtype
  void* out = nullptr;      // [num_rows, num_q_heads, head_dim] contiguous, cfg.dtype
  float* lse = nullptr;     // [num_rows, num_q_heads] or nullptr
  int32_t num_q_heads = 0;
  float scale = 0.f;        // <= 0: 1/sqrt(head_dim)
  int32_t window = -1;      // < 0: the cache's window; 0: full causal; > 0: this window
  int32_t sink_tokens = -1; // < 0: the cache's sinks; else these (with a window)
  // StreamingLLM positions: the sink rotation table of attention_params.h ([2 + rope_dim / 2]
  // doubles: style, rope_dim, frequencies) in host memory, or nullptr for none. attend() only.
  const double* sink_rope = nullptr;
  void* stream = nullptr;   // cudaStream_t on CUDA
};

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
  // enqueued: later moves are ordered after them on the stream they are given.
  void end_step();
  bool step_open() const { return decode_.open; }
  // Starts bringing every block of these sequences to the device (as far as it fits), so a later
  // attend finds them there.
  void prefetch(const std::vector<SeqId>& seqs, void* stream);
  // Moves every device block of these sequences down to the host tier now (asynchronously on
  // CUDA): a session going idle makes room for others before anyone needs it.
  void offload(const std::vector<SeqId>& seqs, void* stream);
  // Copies the stored K/V of one layer into k_out, v_out: [seq_len, num_kv_heads, head_dim],
  // from whichever tier each block is in.
  void gather(SeqId seq, int32_t layer, void* k_out, void* v_out, void* stream);

  int32_t seq_len(SeqId seq, int32_t layer) const;
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

  // One thread at a time (docs/DESIGN.md §5): every public call holds this for its duration, and a
  // second thread entering meanwhile gets ConcurrentUse (RuntimeError) instead of a torn engine.
  class Entry {
   public:
    Entry(const Engine& e, const char* what);
    ~Entry() { e_.busy_.store(false, std::memory_order_release); }
    Entry(const Entry&) = delete;
    Entry& operator=(const Entry&) = delete;

   private:
    const Engine& e_;
  };

 private:
  friend struct EngineTestAccess;  // tests/cpp: corrupts state to prove check_invariants() sees it
  using KeepSet = std::unordered_set<BlockId>;

  const SequenceTable& table(SeqId seq, const char* what) const;
  SequenceTable& table(SeqId seq, const char* what);
  void check_layer(int32_t layer, const char* what) const;
  void check_batch(const std::vector<SeqId>& seqs, const std::vector<int32_t>& lengths,
                   const char* what) const;
  bool tiered() const { return cfg_.host_blocks > 0; }
  BlockPool& pool(Tier t) { return pools_[int(t)]; }
  const BlockPool& pool(Tier t) const { return pools_[int(t)]; }
  char* slot_ptr(BlockLoc loc) const;

  void append_checked(const std::vector<SeqId>& seqs, int32_t layer, const std::vector<int32_t>& lengths,
                      const void* k, const void* v, void* stream, bool drop);
  void append_in_pieces(const std::vector<SeqId>& seqs, int32_t layer, const std::vector<int32_t>& lengths,
                        const void* k, const void* v, int64_t fresh, void* stream);

  // -- block lifecycle (engine_blocks.cpp) --
  BlockId new_device_block(const BlockUse& use, std::vector<Fence>& waits);
  BlockId clone_block(BlockId id, const BlockUse& use, std::vector<Fence>& waits, void* stream);
  // Rows [old_len, new_len) of `seq`: a shared block they write is copied first, new blocks come
  // from the device pool (room was made), and each row's slot * block_size + offset goes onto
  // `slot_mapping`. Slots still read by eviction copies add their fences to `waits`.
  void reserve_rows(SeqId seq, SequenceTable& t, int32_t old_len, int32_t new_len, std::vector<Fence>& waits,
                    std::vector<int32_t>& slot_mapping, void* stream);
  void release_block(BlockId id);
  void drop_out_of_scope(SequenceTable& t);
  void copy_block(int32_t src_slot, int32_t dst_slot, void* stream);
  // slot_mapping: [rows] slot * block_size + offset. `on_device`: its device copy, already sent
  // (CUDA builds; nullptr sends it).
  void write_rows(const int32_t* slot_mapping, int32_t rows, int32_t layer, const void* k,
                  const void* v, void* stream, const int32_t* on_device = nullptr);

  // -- residency (engine_residency.cpp) --
  // Throws OutOfBlocks unless `fresh` new device blocks plus every block in `keep` fit on the
  // device together, evicting others to lower tiers as needed.
  void check_room(int64_t fresh, const KeepSet& keep, const char* what) const;
  // Frees device slots until `n` are free, moving policy victims outside `keep` down a tier.
  void make_device_room(int64_t n, const KeepSet& keep, void* stream);
  // Brings every block of `ids` that is not on the device up, evicting outside `keep`.
  // prefetch: on behalf of prefetch(), nobody reads yet (the landing is awaited by later reads).
  void make_resident(const std::vector<BlockId>& ids, const KeepSet& keep, void* stream, bool prefetch = false);
  void land_on_host(BlockId id, int32_t host_slot, Fence device_free, const Fence& host_ready);
  void evict_to_host(const std::vector<BlockId>& victims, const KeepSet& keep, void* stream);
  void drop_clean_copy(BlockId id);
  // Until `want_free` host slots are free: clean copies go first (no I/O), then host blocks
  // outside `keep` spill to disk.
  void make_host_room(int64_t want_free, const KeepSet& keep);
  int64_t host_resident() const { return pool(Tier::host).num_used() - int64_t(clean_copy_.size()); }
  int64_t eviction_room(const KeepSet& keep) const;
  // The blocks of `ids` on disk come up to host slots (reads on the I/O threads, together).
  void disk_to_host(const std::vector<BlockId>& ids, const KeepSet& keep);
  void host_to_device(const std::vector<BlockId>& ids, void* stream, bool prefetch);
  // Orders `stream` after prefetch copies still landing in any of `ids` (no-op when none are).
  void await_blocks(const std::vector<BlockId>& ids, void* stream);
  void spill_host_to_disk(int64_t n, const KeepSet& keep);
  void offload_to_watermark(void* stream);
  void note_use(const SequenceTable& t, SeqId seq, int32_t logical);

  // -- decode steps (engine_step.cpp) --
  // True when `seqs` is the open step's batch; throws when it shares a sequence with it otherwise.
  bool is_step_batch(const std::vector<SeqId>& seqs, const char* what) const;
  void check_not_in_step(SeqId seq, const char* what) const;
  bool pinned(BlockId id) const { return decode_.open && decode_.pinned.count(id) != 0; }
  void step_append(int32_t layer, const std::vector<int32_t>& lengths, const void* k, const void* v, void* stream);
  void step_attend(int32_t layer, const std::vector<int32_t>& lengths, const AttendArgs& args);
  // The open step's attention params (batch, rows, table stride, the cache's window); the
  // caller points them at the metadata.
  PagedAttentionParams step_params(const AttendArgs& args, int32_t layer) const;
  // begin_step's checks: the blocks the step reads or writes now, and how many new ones it takes.
  int64_t step_blocks(const std::vector<SeqId>& seqs, int32_t tokens, std::vector<BlockId>& scope) const;
  void upload_step(int32_t num_q_heads, void* stream);

  const StepPlan& plan_for(const std::vector<SeqId>& seqs, void* stream);
  PagedAttentionParams base_params(const AttendArgs& args, int32_t layer) const;
  // Points p.sink_rope at args.sink_rope (checked by attend()), on CUDA at its device copy.
  void set_sink_rope(PagedAttentionParams& p, const AttendArgs& args);
  void launch(const PagedAttentionParams& p, void* stream);  // CUDA builds: kernel + workspace
  void run_single_rows(PagedAttentionParams& p, const std::vector<int32_t>& tables,
                       const std::vector<int32_t>& kv_lens, void* stream);
  // attend() over more blocks than the device tier holds (engine_staged.cpp): blocks on the
  // device are read there, the rest have this layer's slices staged into a device buffer for the
  // call. The plan (which blocks, the table) is built once and reused while nothing changes.
  void build_staged_plan(const std::vector<SeqId>& seqs, const std::vector<BlockId>& needed,
                         const std::vector<int32_t>& kv_lens, const std::vector<int32_t>& lengths,
                         int32_t window);
  void run_staged(int32_t layer, PagedAttentionParams& p, const std::vector<int32_t>& kv_lens,
                  const std::vector<int32_t>& q_indptr, void* stream);
  // Sends `tables`, `kv_lens` and `q_indptr` through the meta buffer and runs the kernel (CUDA),
  // or runs the CPU reference on them.
  void run_with_tables(PagedAttentionParams& p, const std::vector<int32_t>& tables,
                       const std::vector<int32_t>& kv_lens, const std::vector<int32_t>& q_indptr,
                       void* stream);
  // Releases a host slot, after any staging copy that still reads it.
  Fence host_slot_fence(BlockId id);
  // The logical blocks rows [len - n, len) of a layer read: [0, sinks) and [first, last).
  struct ScopeBlocks {
    int32_t sinks, first, last;
  };
  ScopeBlocks scope_blocks(int32_t len, int32_t n, int32_t window) const;
  int64_t check_in_scope(SeqId seq, const SequenceTable& t, int32_t layer, int32_t n,
                         int32_t window, size_t index) const;
  std::vector<BlockId> blocks_in_scope(const SequenceTable& t, int32_t layer, int32_t n,
                                       int32_t window) const;

  CacheConfig cfg_;
  BlockPool pools_[kNumStorageTiers];  // device, host, disk (the disk pool holds no memory)
  DiskFile disk_;
  std::unique_ptr<IoPool> io_;  // with a disk tier
  BlockDirectory directory_;
  std::unique_ptr<EvictionPolicy> policy_;
  std::unique_ptr<CopyEngine> copies_;
  std::unordered_map<BlockId, Fence> host_ready_;  // host copies still landing
  std::unordered_map<BlockId, Fence> device_ready_;  // prefetched device copies still landing
  uint64_t landing_epoch_ = 0;  // bumps with every prefetch that leaves copies landing
  // Host blocks a staging copy may still read: the cell holds the latest such copy's fence.
  std::unordered_map<BlockId, std::shared_ptr<Fence>> host_read_by_;
  StagedPlan staged_plan_;
  std::vector<int32_t> meta_host_;  // CUDA attend(): kv_lens then q_indptr, reused every call
  std::vector<char> staging_cpu_;                    // CPU builds' staging buffer
  // CUDA: stage slices with SM loads over the link (a kernel on the compute stream) rather than
  // with 2-D copies on the copy engine (CacheConfig::staging).
  bool stage_by_kernel_ = true;
  // The staging kernel's shape (CacheConfig::gather_shape) and the host pool's address as the device sees it (CUDA, with a host tier).
  GatherShape gather_shape_;
  void* host_mapped_ = nullptr;
  // Device blocks fetched from the host and not written since: their host slot still holds the
  // same bytes, so evicting them again moves nothing. The fence is the fetch that reads the slot.
  struct CleanCopy {
    int32_t host_slot;
    Fence read_by;
  };
  std::unordered_map<BlockId, CleanCopy> clean_copy_;
  std::unique_ptr<EvictionPolicy> clean_order_;  // LRU over clean copies: the first to give up
  std::unique_ptr<EvictionPolicy> host_order_;     // LRU over host-tier blocks: spill order to disk
  std::unordered_map<SeqId, SequenceTable> tables_;
  SeqId next_seq_ = 0;
  uint64_t version_ = 0;  // bumps whenever a block table or a block's location changes
  uint64_t step_ = 0;     // one per append/attend call: the policies' clock
  StepPlan plan_;
  DecodeStep decode_;
  TransferCounters counters_;
  std::unique_ptr<CudaContext> cuda_;
  mutable std::atomic<bool> busy_{false};  // a public call is running (Entry)
};

}  // namespace pagedkv
