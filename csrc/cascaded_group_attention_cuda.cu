// evit::cga_window_cuda: MSRA EfficientViT's cascaded group attention over a whole (B, C, H, W) map, inference
// only (every BatchNorm folded into its conv), one CUDA block per window.
//
// The block reads its window straight from the map (tokens past H/W are zeros that still go through the convs
// and the softmax, as in the reference: the map is zero padded, not masked), runs the heads in order with the
// cascade in shared memory (head i reads head i-1's output + its own input chunk), and writes the projected,
// cropped window. Everything on chip is fp32; fp16/bf16 are rounded once, on store.
//
// Shared memory (fp32; SharedLayout below places it, for the launcher and the kernel alike), N = R² tokens,
// kd/vd = key/value dims, in_w = C/heads, ld = N|1 (odd, so that reading a column of the N×N attention is free
// of bank conflicts):
//   feat  in_w × N          the current head's input
//   qkv   (2kd + vd) × N    the 1×1 conv's output: q before its depthwise conv, k, v
//   q     kd × N            q after the depthwise conv, times the scale
//   attn  N × ld            logits, then probabilities
//   outs  heads·vd × N      every head's output (the projection reads them all)
// Weights are read from global memory: they are shared by every block and stay in L2.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <string>

#include "common.cuh"

namespace evit {
namespace {

constexpr int kMaxHeads = 8;
constexpr int kMaxThreads = 512;

// Where the block's fp32 arrays start in shared memory, in floats, and how many floats it needs in all: the
// launcher sizes the allocation (and evit::cga_window_cuda_shared_memory_bytes reports it) with the same function
// that the kernel places its arrays with.
struct SharedLayout {
  int64_t feat, qkv, q, attn, outs, floats;
  int64_t ld;  // the attention's row pitch
};

__host__ __device__ inline SharedLayout shared_layout(int64_t window, int64_t heads, int64_t in_w, int64_t kd,
                                                      int64_t vd) {
  const int64_t N = window * window;
  SharedLayout s{};
  s.ld = N | 1;
  s.feat = 0;
  s.qkv = s.feat + in_w * N;
  s.q = s.qkv + (2 * kd + vd) * N;
  s.attn = s.q + kd * N;
  s.outs = s.attn + N * s.ld;
  s.floats = s.outs + heads * vd * N;
  return s;
}

template <typename T>
struct Params {
  const T* x;
  int64_t x_stride[4];
  T* out;  // contiguous (B, c_out, H, W)
  const T* qkv_w[kMaxHeads];  // (2kd + vd, in_w) each
  const T* qkv_b[kMaxHeads];
  const T* dw_w[kMaxHeads];  // (kd, k, k) each
  const T* dw_b[kMaxHeads];
  int dw_k[kMaxHeads];
  const T* attention_biases;  // (heads, R²)
  const T* proj_w;            // (c_out, heads·vd)
  const T* proj_b;
  int H, W, heads, in_w, key_dim, val_dim, c_out, R, windows_h, windows_w;
  float scale;
};

// store(o, n, init(o) + Σ_c weight(o, c)·src(c, n)) for o < O, n < N. Each thread owns four consecutive rows o
// of one column n, so one src value feeds four FMAs; neighbouring threads take neighbouring n, so a warp's
// weight loads are (nearly) one broadcast address and its src loads are consecutive.
template <typename Init, typename Weight, typename Src, typename Store>
__device__ __forceinline__ void gemm_rows4(int O, int K, int N, Init init, Weight weight, Src src, Store store) {
  const int groups = (O + 3) / 4;
  for (int idx = threadIdx.x; idx < groups * N; idx += blockDim.x) {
    const int o0 = idx / N * 4, n = idx % N;
    int rows[4];
    float acc[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      rows[j] = min(o0 + j, O - 1);  // rows past O repeat the last one and are not stored
      acc[j] = init(rows[j]);
    }
    for (int c = 0; c < K; ++c) {
      const float s = src(c, n);
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[j] = fmaf(weight(rows[j], c), s, acc[j]);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (o0 + j < O) store(o0 + j, n, acc[j]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads) cga_window_kernel(const Params<T> p) {
  extern __shared__ float smem[];
  const int R = p.R, N = R * R, kd = p.key_dim, vd = p.val_dim, in_w = p.in_w;
  const int qkv_rows = 2 * kd + vd;
  const SharedLayout layout = shared_layout(R, p.heads, in_w, kd, vd);
  const int ld = static_cast<int>(layout.ld);
  float* feat = smem + layout.feat;
  float* qkv = smem + layout.qkv;
  float* q = smem + layout.q;
  float* attn = smem + layout.attn;
  float* outs = smem + layout.outs;

  int window = blockIdx.x;
  const int wx = window % p.windows_w;
  window /= p.windows_w;
  const int wy = window % p.windows_h;
  const int b = window / p.windows_h;
  const int y0 = wy * R, x0 = wx * R;
  const T* x = p.x + b * p.x_stride[0];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;

  for (int head = 0; head < p.heads; ++head) {
    // The cascade: this head's input chunk (zeros past the map's edge) plus the previous head's output.
    for (int idx = threadIdx.x; idx < in_w * N; idx += blockDim.x) {
      const int c = idx / N, n = idx % N, y = y0 + n / R, xx = x0 + n % R;
      float v = 0.f;
      if (y < p.H && xx < p.W)
        v = static_cast<float>(x[(head * in_w + c) * p.x_stride[1] + y * p.x_stride[2] + xx * p.x_stride[3]]);
      if (head > 0) v += outs[((head - 1) * vd + c) * N + n];
      feat[idx] = v;
    }
    __syncthreads();

    const T* qkv_w = p.qkv_w[head];
    const T* qkv_b = p.qkv_b[head];
    gemm_rows4(
        qkv_rows, in_w, N, [&](int o) { return static_cast<float>(qkv_b[o]); },
        [&](int o, int c) { return static_cast<float>(qkv_w[o * in_w + c]); },
        [&](int c, int n) { return feat[c * N + n]; },
        [&](int o, int n, float v) { qkv[o * N + n] = v; });
    __syncthreads();

    // Depthwise k×k conv of q inside the window, zero padded at the window's edge.
    const int k = p.dw_k[head], half = k / 2;
    const T* dw_w = p.dw_w[head];
    const T* dw_b = p.dw_b[head];
    for (int idx = threadIdx.x; idx < kd * N; idx += blockDim.x) {
      const int c = idx / N, ty = idx % N / R, tx = idx % R;
      float acc = static_cast<float>(dw_b[c]);
      for (int dy = 0; dy < k; ++dy) {
        const int sy = ty + dy - half;
        if (sy < 0 || sy >= R) continue;
        for (int dx = 0; dx < k; ++dx) {
          const int sx = tx + dx - half;
          if (sx >= 0 && sx < R)
            acc = fmaf(static_cast<float>(dw_w[(c * k + dy) * k + dx]), qkv[c * N + sy * R + sx], acc);
        }
      }
      q[idx] = acc * p.scale;
    }
    __syncthreads();

    // Logits (queries n × keys m) plus the position bias, gathered by |Δy|·R + |Δx|.
    const float* keys = qkv + kd * N;
    const T* bias = p.attention_biases + head * N;
    gemm_rows4(
        N, kd, N, [](int) { return 0.f; }, [&](int n, int c) { return q[c * N + n]; },
        [&](int c, int m) { return keys[c * N + m]; },
        [&](int n, int m, float v) {
          const int dy = abs(n / R - m / R), dx = abs(n % R - m % R);
          attn[n * ld + m] = v + static_cast<float>(bias[dy * R + dx]);
        });
    __syncthreads();

    // Softmax over keys in fp32, one warp per query.
    for (int n = warp; n < N; n += warps) {
      float* row = attn + n * ld;
      float peak = -INFINITY;
      for (int m = lane; m < N; m += 32) peak = fmaxf(peak, row[m]);
      for (int offset = 16; offset > 0; offset /= 2) peak = fmaxf(peak, __shfl_xor_sync(0xffffffffu, peak, offset));
      float sum = 0.f;
      for (int m = lane; m < N; m += 32) {
        const float e = expf(row[m] - peak);  // full-accuracy expf: the build does not use fast math
        row[m] = e;
        sum += e;
      }
      for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
      const float inv = __frcp_rn(sum);
      for (int m = lane; m < N; m += 32) row[m] *= inv;
    }
    __syncthreads();

    // out[c, n] = Σ_m v[c, m]·attn[n, m]
    const float* values = qkv + 2 * kd * N;
    float* out = outs + head * vd * N;
    gemm_rows4(
        vd, N, N, [](int) { return 0.f; }, [&](int c, int m) { return values[c * N + m]; },
        [&](int m, int n) { return attn[n * ld + m]; }, [&](int c, int n, float v) { out[c * N + n] = v; });
    __syncthreads();
  }

  // ReLU, the projection and the crop to the map.
  const int K = p.heads * vd;
  T* y_out = p.out + int64_t(b) * p.c_out * p.H * p.W;
  gemm_rows4(
      p.c_out, K, N, [&](int o) { return static_cast<float>(p.proj_b[o]); },
      [&](int o, int c) { return static_cast<float>(p.proj_w[o * K + c]); },
      [&](int c, int n) { return fmaxf(outs[c * N + n], 0.f); },
      [&](int o, int n, float v) {
        const int y = y0 + n / R, xx = x0 + n % R;
        if (y >= p.H || xx >= p.W) return;
        y_out[(int64_t(o) * p.H + y) * p.W + xx] = static_cast<T>(v);
      });
}

template <typename T>
void launch(const at::Tensor& x, const std::vector<at::Tensor>& qkv_w, const std::vector<at::Tensor>& qkv_b,
            const std::vector<at::Tensor>& dw_w, const std::vector<at::Tensor>& dw_b, const at::Tensor& biases,
            const at::Tensor& proj_w, const at::Tensor& proj_b, at::Tensor& out, int64_t key_dim, int64_t window,
            int64_t smem_bytes, int blocks) {
  Params<T> p{};
  p.x = x.const_data_ptr<T>();
  for (int d = 0; d < 4; ++d) p.x_stride[d] = x.stride(d);
  p.out = out.mutable_data_ptr<T>();
  const int heads = static_cast<int>(qkv_w.size());
  for (int i = 0; i < heads; ++i) {
    p.qkv_w[i] = qkv_w[i].const_data_ptr<T>();
    p.qkv_b[i] = qkv_b[i].const_data_ptr<T>();
    p.dw_w[i] = dw_w[i].const_data_ptr<T>();
    p.dw_b[i] = dw_b[i].const_data_ptr<T>();
    p.dw_k[i] = static_cast<int>(dw_w[i].size(-1));
  }
  p.attention_biases = biases.const_data_ptr<T>();
  p.proj_w = proj_w.const_data_ptr<T>();
  p.proj_b = proj_b.const_data_ptr<T>();
  p.H = static_cast<int>(x.size(2));
  p.W = static_cast<int>(x.size(3));
  p.heads = heads;
  p.in_w = static_cast<int>(x.size(1) / heads);
  p.key_dim = static_cast<int>(key_dim);
  p.val_dim = static_cast<int>(qkv_w[0].size(0) - 2 * key_dim);
  p.c_out = static_cast<int>(proj_w.size(0));
  p.R = static_cast<int>(window);
  p.windows_h = static_cast<int>((p.H + window - 1) / window);
  p.windows_w = static_cast<int>((p.W + window - 1) / window);
  p.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(key_dim)));  // as key_dim ** -0.5

  // Past 48 KB a kernel must opt in; where only one block fits on an SM anyway, more threads hide latency.
  if (smem_bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(cga_window_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem_bytes)));
  const int threads = smem_bytes > 112 * 1024 ? kMaxThreads : 256;
  cga_window_kernel<T><<<blocks, threads, smem_bytes, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::vector<at::Tensor> contiguous(at::TensorList tensors) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) out.push_back(t.contiguous());
  return out;
}

}  // namespace

// Host only, no GPU needed: registered as evit::cga_window_cuda_shared_memory_bytes for the Python side's checks.
int64_t cga_window_cuda_shared_memory_bytes(int64_t window, int64_t heads, int64_t in_width, int64_t key_dim,
                                            int64_t val_dim) {
  return shared_layout(window, heads, in_width, key_dim, val_dim).floats * int64_t(sizeof(float));
}

at::Tensor cga_window_cuda(const at::Tensor& x, at::TensorList qkv_w, at::TensorList qkv_b, at::TensorList dw_w,
                           at::TensorList dw_b, const at::Tensor& attention_biases, const at::Tensor& proj_w,
                           const at::Tensor& proj_b, int64_t key_dim, int64_t window) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 4, "cga_window_cuda: x must be a (B, C, H, W) CUDA tensor");
  const auto dtype = x.scalar_type();  // float32, float16 or bfloat16: EVIT_DISPATCH_KERNEL_TYPES refuses others
  const int64_t heads = static_cast<int64_t>(qkv_w.size());
  TORCH_CHECK(heads >= 1 && heads <= kMaxHeads, "cga_window_cuda: 1 to ", kMaxHeads, " heads, got ", heads);
  TORCH_CHECK(qkv_b.size() == qkv_w.size() && dw_w.size() == qkv_w.size() && dw_b.size() == qkv_w.size(),
              "cga_window_cuda: qkv_w, qkv_b, dw_w and dw_b need one tensor per head");
  TORCH_CHECK(key_dim >= 1 && window >= 1, "cga_window_cuda: key_dim and window must be positive");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(C % heads == 0, "cga_window_cuda: ", C, " channels do not split into ", heads, " heads");
  const int64_t in_w = C / heads, rows = qkv_w[0].size(0), vd = rows - 2 * key_dim, N = window * window;
  TORCH_CHECK(vd >= 1 && (heads == 1 || vd == in_w), "cga_window_cuda: the qkv conv's ", rows,
              " outputs must be 2·key_dim + value dim with value dim = C/heads = ", in_w);
  // TORCH_CHECK formats its message only when the check fails: no string is built per call. (A name formatted on
  // every call, c10::str of the head index, crashed the host process inside std::ostream on the first GPU pass's
  // H200 machine: benchmarks/results/20261204-h200/cga_cuda_backtrace.txt.) head < 0: a tensor the heads share.
  auto same = [&](const at::Tensor& t, at::IntArrayRef shape, const char* name, int64_t head) {
    TORCH_CHECK(t.sizes() == shape, "cga_window_cuda: ", name, head >= 0 ? "[" + std::to_string(head) + "]" : "",
                " has shape ", t.sizes(), ", expected ", shape);
    TORCH_CHECK(t.scalar_type() == dtype && t.device() == x.device(), "cga_window_cuda: ", name,
                head >= 0 ? "[" + std::to_string(head) + "]" : "", " must have x's dtype and device");
  };
  for (int64_t i = 0; i < heads; ++i) {
    same(qkv_w[i], {rows, in_w, 1, 1}, "qkv_w", i);
    same(qkv_b[i], {rows}, "qkv_b", i);
    const int64_t k = dw_w[i].dim() == 4 ? dw_w[i].size(-1) : 0;
    TORCH_CHECK(k % 2 == 1, "cga_window_cuda: depthwise kernels must be odd");
    same(dw_w[i], {key_dim, 1, k, k}, "dw_w", i);
    same(dw_b[i], {key_dim}, "dw_b", i);
  }
  same(attention_biases, {heads, N}, "attention_biases", -1);
  const int64_t c_out = proj_w.dim() == 4 ? proj_w.size(0) : 0;
  same(proj_w, {c_out, heads * vd, 1, 1}, "proj_w", -1);
  same(proj_b, {c_out}, "proj_b", -1);

  c10::cuda::CUDAGuard guard(x.device());
  int device = 0, max_smem = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const int64_t smem_bytes = cga_window_cuda_shared_memory_bytes(window, heads, in_w, key_dim, vd);
  TORCH_CHECK(smem_bytes <= max_smem, "cga_window_cuda: this configuration needs ", smem_bytes,
              " bytes of shared memory per block, the GPU has ", max_smem);
  const int64_t blocks = B * ((H + window - 1) / window) * ((W + window - 1) / window);
  TORCH_CHECK(blocks < (int64_t(1) << 31), "cga_window_cuda: too many windows");

  at::Tensor out = x.new_empty({B, c_out, H, W});
  const auto qkv_wc = contiguous(qkv_w), qkv_bc = contiguous(qkv_b), dw_wc = contiguous(dw_w),
             dw_bc = contiguous(dw_b);
  const auto biases = attention_biases.contiguous(), pw = proj_w.contiguous(), pb = proj_b.contiguous();
  EVIT_DISPATCH_KERNEL_TYPES(dtype, "cga_window_cuda", [&] {
    if (blocks > 0)
      launch<scalar_t>(x, qkv_wc, qkv_bc, dw_wc, dw_bc, biases, pw, pb, out, key_dim, window, smem_bytes,
                       static_cast<int>(blocks));
  });
  return out;
}

}  // namespace evit
