// Every check of a caller's argument in the C++ core, in one file: each failure names the call
// and the argument, and says what was expected. (The Python layer, python/pagedkv/_checks.py,
// checks first in Python's terms; the bindings check only what raw pointers need: dtype, device,
// element counts, alignment.) Room checks are the block store's (check_room).
#include <algorithm>
#include <cmath>
#include <unordered_set>

#include "pagedkv/engine.h"
#include "pagedkv/errors.h"

namespace pagedkv {

void Engine::check_layer(int32_t layer, const char* what) const {
  PKV_CHECK(layer >= 0 && layer < cfg_.num_layers, LayerOutOfRange, what, ": layer ", layer,
            " is out of range for a cache of ", cfg_.num_layers, " layers");
}

void Engine::check_batch(const std::vector<SeqId>& seqs, const std::vector<int32_t>& lengths,
                         const char* what) const {
  PKV_CHECK(seqs.size() == lengths.size(), ArgumentError, what, ": lengths has ", lengths.size(),
            " entries but seqs has ", seqs.size());
  std::unordered_set<SeqId> seen;
  for (size_t i = 0; i < seqs.size(); ++i) {
    tables_.get(seqs[i], what);
    PKV_CHECK(seen.insert(seqs[i]).second, ArgumentError, what, ": seqs lists sequence ", seqs[i], " twice");
    PKV_CHECK(lengths[i] >= 0, ArgumentError, what, ": lengths[", i, "] is negative (", lengths[i], ")");
  }
}

void Engine::check_attend_args(const AttendArgs& args) const {
  PKV_CHECK(args.num_q_heads > 0 && args.num_q_heads % cfg_.num_kv_heads == 0, ArgumentError,
            "attend(): q has ", args.num_q_heads, " heads, which is not a multiple of num_kv_heads=",
            cfg_.num_kv_heads);
  // (scale <= 0 asks for the default 1/sqrt(head_dim), attention_planner.cpp)
  PKV_CHECK(std::isfinite(args.scale), ArgumentError, "attend(): scale must be finite as float32, got ",
            double(args.scale));
  PKV_CHECK(args.sink_tokens <= cfg_.sink_tokens, ArgumentError, "attend(): sink_tokens ",
            args.sink_tokens, " exceeds the cache's ", cfg_.sink_tokens, " (only those are kept)");
  if (args.sink_rope) {
    const RopeView r = rope_view(args.sink_rope);
    PKV_CHECK((r.style == kRopeNeox || r.style == kRopeGptj) && r.dim > 0 && r.dim % 2 == 0 &&
                  r.dim <= cfg_.head_dim, ArgumentError, "attend(): the sink rotation needs style ",
              kRopeNeox, " (neox) or ", kRopeGptj, " (gptj) and an even rotary_dim <= head_dim=",
              cfg_.head_dim, ", got style ", r.style, " and rotary_dim ", r.dim);
  }
}

void Engine::check_range_args(const SequenceTable& t, SeqId seq, int32_t layer, int32_t position,
                              int32_t key_begin, int32_t key_end) const {
  PKV_CHECK(0 <= key_begin && key_begin < key_end && key_end <= position + 1 &&
                position < t.lens[size_t(layer)], ArgumentError, "attend_range(): keys [", key_begin, ", ",
            key_end, ") are not a range the row at ", position, " sees");
  const int32_t bs = cfg_.block_size;
  for (int32_t b = key_begin / bs; b < blocks_for(key_end, bs); ++b)
    PKV_CHECK(!tables_.dropped(t, b), ArgumentError, "attend_range(): keys of sequence ",
              seq, " were dropped by the window (retain=False)");
}

void Engine::check_gather_args(const SequenceTable& t, SeqId seq, int32_t layer, int32_t len, int32_t rows) const {
  PKV_CHECK(rows < 0 || rows == len, ArgumentError, "gather(): k_out and v_out hold ", rows,
            " rows but layer ", layer, " of sequence ", seq, " holds ", len);
  for (int32_t b = 0; b < blocks_for(len, cfg_.block_size); ++b)
    PKV_CHECK(!tables_.dropped(t, b), ArgumentError, "gather(): sequence ", seq,
              " has dropped blocks (window with retain=False): its oldest keys are gone");
}

void Engine::check_step_args(const std::vector<SeqId>& seqs, int32_t tokens, int32_t num_q_heads) const {
  const char* what = "begin_step()";
  PKV_CHECK(!seqs.empty(), ArgumentError, what, ": seqs is empty");
  PKV_CHECK(tokens >= 1, ArgumentError, what, ": tokens must be >= 1, got ", tokens);
  PKV_CHECK(num_q_heads >= 0 && num_q_heads % cfg_.num_kv_heads == 0, ArgumentError, what,
            ": num_q_heads must be a positive multiple of num_kv_heads=", cfg_.num_kv_heads,
            " (or 0: sized at the first attend), got ", num_q_heads);
  check_batch(seqs, std::vector<int32_t>(seqs.size(), tokens), what);
}

void Engine::check_step_rows(const std::vector<int32_t>& lengths, const char* what) const {
  const int32_t tokens = planner_.step().tokens;
  PKV_CHECK(std::all_of(lengths.begin(), lengths.end(), [&](int32_t n) { return n == tokens; }), ArgumentError,
            what, ": the open decode step takes ", tokens, " rows per sequence");
}

}  // namespace pagedkv
