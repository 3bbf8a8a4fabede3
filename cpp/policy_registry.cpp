// The registry: policies by name, with their parameters checked.
#include <cmath>

#include "pagedkv/errors.h"
#include "policy_impl.h"

namespace pagedkv {
namespace {

double take(PolicyParams& p, const char* key, double fallback) {
  auto it = p.find(key);
  if (it == p.end()) return fallback;
  double v = it->second;
  p.erase(it);
  return v;
}

}  // namespace

std::unique_ptr<EvictionPolicy> make_policy(const std::string& name, const PolicyParams& params) {
  PolicyParams p = params;
  std::unique_ptr<EvictionPolicy> out;
  if (name == "lru") {
    out = make_lru_policy();
  } else if (name == "window") {
    const double recent = take(p, "recent_blocks", 4), sinks = take(p, "sink_blocks", 1);
    PKV_CHECK(recent >= 0 && sinks >= 0 && recent < 2147483648.0 && sinks < 2147483648.0, ArgumentError,
              "policy: window needs recent_blocks and sink_blocks in 0..2^31-1, got ", recent, " and ", sinks);
    out = make_window_policy(int32_t(recent), int32_t(sinks));
  } else if (name == "hybrid") {
    const double rw = take(p, "recency_weight", 1.0), fw = take(p, "frequency_weight", 8.0);
    PKV_CHECK(rw >= 0 && fw >= 0 && std::isfinite(rw) && std::isfinite(fw), ArgumentError,
              "policy: hybrid recency_weight and frequency_weight must be finite and >= 0, got ", rw, " and ", fw);
    out = make_hybrid_policy(rw, fw);
  } else {
    PKV_FAIL(ArgumentError, "policy: unknown policy '", name, "' (lru, window, hybrid)");
  }
  PKV_CHECK(p.empty(), ArgumentError, "policy: ", name, " has no parameter '", p.begin()->first, "'");
  return out;
}

}  // namespace pagedkv
