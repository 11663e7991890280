// Registers the compiled ops under torch.ops.evit. Python defines the evit ops that have a Python reference
// (torch.library.custom_op), so this file adds to the namespace with a fragment rather than owning it.
#include <Python.h>

#include <torch/library.h>

namespace evit {
std::vector<int64_t> cuda_build_archs();
int64_t cuda_build_version();
}  // namespace evit

TORCH_LIBRARY_FRAGMENT(evit, m) {
  m.def("cuda_build_archs() -> int[]", &evit::cuda_build_archs);
  m.def("cuda_build_version() -> int", &evit::cuda_build_version);
}

// `import evit_kernels._C` only needs a module object; loading the library runs the registration above.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "evit_kernels compiled CUDA ops", -1, nullptr};
  return PyModule_Create(&module);
}
