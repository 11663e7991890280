// What this build of evit_kernels._C was compiled for. nvcc defines __CUDA_ARCH_LIST__ (e.g. "800,900") in
// host code too, so the library can report its archs without a GPU.
#include <cstdint>
#include <vector>

#include <cuda_runtime_api.h>

namespace evit {

std::vector<int64_t> cuda_build_archs() {
#ifdef __CUDA_ARCH_LIST__
  return {__CUDA_ARCH_LIST__};
#else
  return {};
#endif
}

int64_t cuda_build_version() { return CUDART_VERSION; }

}  // namespace evit
