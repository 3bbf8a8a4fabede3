#include "fence_state.h"

namespace pagedkv {

bool fence_done(const Fence& f) { return !f || f->done(); }

void fence_wait_host(const Fence& f) {
  if (f) f->wait();
}

}  // namespace pagedkv
