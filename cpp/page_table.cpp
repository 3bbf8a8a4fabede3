#include "pagedkv/page_table.h"

#include <algorithm>

namespace pagedkv {

int32_t SequenceTable::max_len() const {
  return lens.empty() ? 0 : *std::max_element(lens.begin(), lens.end());
}

int32_t SequenceTable::min_scope_start() const {
  return scope_start.empty() ? 0 : *std::min_element(scope_start.begin(), scope_start.end());
}

}  // namespace pagedkv
