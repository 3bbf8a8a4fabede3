// The engine facade: construction, sequences, moves a caller asks for (offload, prefetch, gather),
// read-only queries and the invariant checker. Each call checks its arguments, then asks the parts.
#include "pagedkv/engine.h"

#include <string>
#include <unordered_map>

#include "pagedkv/errors.h"

namespace pagedkv {
namespace {

// "sequence 3 logical block 5, sequence 4 logical block 5": where `id` sits in the page tables.
std::string block_owners(const PageTables& tables, BlockId id) {
  std::string out;
  for (SeqId s : tables.ids()) {
    const std::vector<BlockId>& blocks = tables.at(s).blocks;
    for (size_t b = 0; b < blocks.size(); ++b)
      if (blocks[b] == id) out += detail::concat(out.empty() ? "" : ", ", "sequence ", s, " logical block ", b);
  }
  return out;
}

const CacheConfig& validated(const CacheConfig& c) {
  validate_config(c);
  return c;
}

}  // namespace

Engine::Engine(const CacheConfig& cfg)
    : cfg_(validated(cfg)),
      backend_(make_backend(cfg_)),
      store_(cfg_, *backend_),
      tables_(cfg_),
      planner_(cfg_, *backend_, tables_, store_) {
  store_.set_block_namer([this](BlockId id) { return block_owners(tables_, id); });
}

Engine::~Engine() = default;

SeqId Engine::add_sequence() {
  const Entry entry(*this, "add_sequence()");
  return tables_.add();
}

SeqId Engine::fork(SeqId parent) {
  const Entry entry(*this, "fork()");
  tables_.get(parent, "fork()");
  planner_.check_not_in_step(parent, "fork()");
  return tables_.fork(parent, store_);
}

void Engine::free(SeqId seq) {
  const Entry entry(*this, "free()");
  tables_.get(seq, "free()");
  planner_.check_not_in_step(seq, "free()");
  tables_.free(seq, store_);
}

void Engine::truncate(SeqId seq, int32_t tokens) {
  const Entry entry(*this, "truncate()");
  tables_.get(seq, "truncate()");
  planner_.check_not_in_step(seq, "truncate()");
  tables_.truncate(seq, tokens, store_);
}

void Engine::offload(const std::vector<SeqId>& seqs, void* stream) {
  const Entry entry(*this, "offload()");
  check_batch(seqs, std::vector<int32_t>(seqs.size(), 0), "offload()");
  PKV_CHECK(store_.tiered(), ArgumentError, "offload(): the cache has no host tier (host_blocks=0)");
  for (SeqId s : seqs) planner_.check_not_in_step(s, "offload()");
  KeepSet seen;
  std::vector<BlockId> victims;
  for (SeqId s : seqs)  // (a block it shares with the open decode step stays for the step)
    for (BlockId id : tables_.at(s).blocks)
      if (id != kNoBlock && store_.loc(id).tier == Tier::device && !store_.pinned(id) && seen.insert(id).second)
        victims.push_back(id);
  store_.offload(victims, stream);
}

void Engine::prefetch(const std::vector<SeqId>& seqs, void* stream) {
  const Entry entry(*this, "prefetch()");
  check_batch(seqs, std::vector<int32_t>(seqs.size(), 0), "prefetch()");
  KeepSet seen;
  std::vector<BlockId> ids;
  for (SeqId s : seqs)
    for (BlockId id : tables_.at(s).blocks)
      if (id != kNoBlock && seen.insert(id).second) ids.push_back(id);
  store_.prefetch(ids, stream);
}

void Engine::gather(SeqId seq, int32_t layer, void* k_out, void* v_out, void* stream, int32_t rows) {
  const Entry entry(*this, "gather()");
  const SequenceTable& t = tables_.get(seq, "gather()");
  check_layer(layer, "gather()");
  const int32_t len = written_rows(seq, t, layer);
  check_gather_args(t, seq, layer, len, rows);
  store_.read_layer(t.blocks, len, layer, k_out, v_out, stream);
}

void Engine::merge_partials(const void* outs, const float* lses, int32_t parts, int64_t rows_heads, void* out,
                            float* lse, void* stream) {
  const Entry entry(*this, "merge_partials()");
  PKV_CHECK(parts >= 1, ArgumentError, "merge_partials(): needs at least one part, got ", parts);
  planner_.merge_partials(outs, lses, parts, rows_heads, out, lse, stream);
}

int32_t Engine::seq_len(SeqId seq, int32_t layer, const char* what) const {
  const Entry entry(*this, what);
  const SequenceTable& t = tables_.get(seq, what);
  check_layer(layer, what);
  return t.lens[size_t(layer)];
}

int32_t Engine::written_len(SeqId seq, int32_t layer) const {
  const Entry entry(*this, "gather()");
  const SequenceTable& t = tables_.get(seq, "gather()");
  check_layer(layer, "gather()");
  return written_rows(seq, t, layer);
}

std::vector<BlockLoc> Engine::block_table(SeqId seq) const {
  const Entry entry(*this, "block_table()");
  const SequenceTable& t = tables_.get(seq, "block_table()");
  std::vector<BlockLoc> out;
  out.reserve(t.blocks.size());
  for (BlockId id : t.blocks) out.push_back(id == kNoBlock ? BlockLoc{} : store_.loc(id));
  return out;
}

Stats Engine::stats() const {
  const Entry entry(*this, "stats()");
  Stats s;
  s.device_blocks_used = store_.tier(Tier::device).slots().num_used();
  s.device_blocks_free = store_.tier(Tier::device).slots().num_free();
  s.host_blocks_used = store_.tier(Tier::host).slots().num_used();
  s.host_blocks_free = store_.tier(Tier::host).slots().num_free();
  s.disk_blocks_used = store_.tier(Tier::disk).slots().num_used();
  s.disk_blocks_free = store_.tier(Tier::disk).slots().num_free();
  s.num_sequences = tables_.size();
  s.counters = store_.counters();
  s.device_scratch_bytes = int64_t(backend_->scratch_bytes());
  return s;
}

std::vector<SeqId> Engine::sequences() const {
  const Entry entry(*this, "sequences()");
  return tables_.ids();
}

void* Engine::pool_data(Tier tier) const { return store_.tier(tier).data(); }

int64_t Engine::pool_blocks(Tier tier) const { return store_.tier(tier).capacity(); }

int Engine::num_sms() const { return backend_->num_sms(); }

void Engine::check_invariants() const {
  const Entry entry(*this, "check_invariants()");
  std::unordered_map<BlockId, int32_t> refs;
  tables_.check_invariants(refs, store_);
  store_.check_invariants(refs);
}

}  // namespace pagedkv
