// Builds without CUDA (CMake compiles this in place of backend_cuda.cpp): no CUDA backend.
#include "pagedkv/device_backend.h"
#include "pagedkv/errors.h"

namespace pagedkv {

std::unique_ptr<DeviceBackend> make_cuda_backend(const CacheConfig&) {
  PKV_FAIL(ArgumentError, "device: this build of pagedkv has no CUDA support");
}

bool built_with_cuda() { return false; }

bool cuda_usable() { return false; }

}  // namespace pagedkv
