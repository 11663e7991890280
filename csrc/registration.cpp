// Registers the compiled ops under torch.ops.evit. Python defines the evit ops that have a Python reference
// (torch.library.custom_op), so this file adds to the namespace with a fragment rather than owning it.
#include <Python.h>

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <string_view>

namespace evit {
std::vector<int64_t> cuda_build_archs();
int64_t cuda_build_version();

// csrc/cascaded_group_attention_cuda.cu
at::Tensor cga_window_cuda(const at::Tensor& x, at::TensorList qkv_w, at::TensorList qkv_b, at::TensorList dw_w,
                           at::TensorList dw_b, const at::Tensor& attention_biases, const at::Tensor& proj_w,
                           const at::Tensor& proj_b, int64_t key_dim, int64_t window);
int64_t cga_window_cuda_shared_memory_bytes(int64_t window, int64_t heads, int64_t in_width, int64_t key_dim,
                                            int64_t val_dim, int64_t out_channels, at::ScalarType dtype,
                                            int64_t arch_major);

// Shape only, for fake tensors (torch.compile, export): (B, C_out, H, W) in x's dtype.
at::Tensor cga_window_meta(const at::Tensor& x, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                           const at::Tensor&, const at::Tensor& proj_w, const at::Tensor&, int64_t, int64_t) {
  return x.new_empty_symint({x.sym_size(0), proj_w.sym_size(0), x.sym_size(2), x.sym_size(3)});
}

// csrc/conv_bn_act_cuda.cu
at::Tensor depthwise_conv_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               at::IntArrayRef stride, at::IntArrayRef padding, std::string_view activation,
                               const std::optional<at::Tensor>& residual);

// Shape and layout only: (B, C, H_out, W_out) in x's dtype, channels-last when x is and is not also plainly
// contiguous (evit::conv_bn_act's rule).
at::Tensor depthwise_conv_meta(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>&,
                               at::IntArrayRef stride, at::IntArrayRef padding, std::string_view,
                               const std::optional<at::Tensor>&) {
  const c10::SymInt k = weight.sym_size(3);
  const bool channels_last = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  return at::empty_symint({x.sym_size(0), weight.sym_size(0), (x.sym_size(2) + 2 * padding[0] - k) / stride[0] + 1,
                           (x.sym_size(3) + 2 * padding[1] - k) / stride[1] + 1},
                          x.options(), channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}
}  // namespace evit

TORCH_LIBRARY_FRAGMENT(evit, m) {
  m.def("cuda_build_archs() -> int[]", &evit::cuda_build_archs);
  m.def("cuda_build_version() -> int", &evit::cuda_build_version);
  // Cascaded group attention of a whole map, BatchNorm folded, inference only (no autograd); see the .cu file.
  m.def("cga_window_cuda(Tensor x, Tensor[] qkv_w, Tensor[] qkv_b, Tensor[] dw_w, Tensor[] dw_b, "
        "Tensor attention_biases, Tensor proj_w, Tensor proj_b, int key_dim, int window) -> Tensor");
  // Bytes of shared memory one block of cga_window_cuda needs (in_width = C/heads) in the kernel it runs for that
  // dtype on a GPU of compute capability arch_major.x; computed on the host, no GPU needed, by the function the
  // launcher sizes its blocks with, so Python's checks cannot drift from the kernel.
  m.def("cga_window_cuda_shared_memory_bytes(int window, int heads, int in_width, int key_dim, int val_dim, "
        "int out_channels, ScalarType dtype, int arch_major) -> int",
        &evit::cga_window_cuda_shared_memory_bytes);
  // evit::conv_bn_act's depthwise k×k conv (k = 3, 5, 7), BatchNorm folded, inference only; see the .cu file.
  m.def("depthwise_conv_cuda(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, str activation, "
        "Tensor? residual) -> Tensor");
}

TORCH_LIBRARY_IMPL(evit, CUDA, m) {
  m.impl("cga_window_cuda", &evit::cga_window_cuda);
  m.impl("depthwise_conv_cuda", &evit::depthwise_conv_cuda);
}

TORCH_LIBRARY_IMPL(evit, Meta, m) {
  m.impl("cga_window_cuda", &evit::cga_window_meta);
  m.impl("depthwise_conv_cuda", &evit::depthwise_conv_meta);
}

// `import evit_kernels._C` only needs a module object; loading the library runs the registration above.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "evit_kernels compiled CUDA ops", -1, nullptr};
  return PyModule_Create(&module);
}
