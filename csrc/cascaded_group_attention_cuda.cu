// evit::cga_window_cuda: MSRA EfficientViT's cascaded group attention over a whole (B, C, H, W) map, inference
// only (every BatchNorm folded into its conv), one CUDA block per window.
//
// The block reads its window straight from the map (tokens past H/W are zeros that still go through the convs
// and the softmax, as in the reference: the map is zero padded, not masked), runs the heads in order with the
// cascade in shared memory (head i reads head i-1's output + its own input chunk), and writes the projected,
// cropped window. Two kernels, one picked per call by tensor_core_products():
//
// - cga_window_mma_kernel (fp16/bf16 on sm_80 and later, every product dimension a multiple of 16, as in every
//   released M0-M5 attention): the qkv conv, the scores, the value sum and the projection run as 16×16×16
//   tensor-core products (nvcuda::wmma, fp32 accumulation) on operands in the input dtype: the head input, q
//   (after its depthwise conv and the scale), k, v, the probabilities and the heads' outputs are rounded to it
//   once each, as eager rounds the outputs of its convs and matmuls; q before its conv and the logits stay fp32
//   (where eager rounds them too), and the depthwise conv and the softmax run in fp32. The window's N tokens are
//   padded to NP (a multiple of 16) with zero probabilities past N. Weight tiles go from global memory (L2)
//   into the products' fragments, once per 16-token column tile they multiply. On sm_90, where the windows are
//   fewer than half the GPU's SMs (batch 1), each window takes a cluster of 2 or 4 CTAs that share its products'
//   tiles through distributed shared memory (WindowCtas).
// - cga_window_kernel (every other case: fp32, or a dimension that is no multiple of 16): fp32 scalar FMA
//   throughout, fp16/bf16 rounded once, on store.
//
// Shared memory of the scalar kernel (fp32; SharedLayout below places it, for the launcher and the kernel alike),
// N = R² tokens, kd/vd = key/value dims, in_w = C/heads, ld = N|1 (odd, so that reading a column of the N×N
// attention is free of bank conflicts):
//   feat  in_w × N          the current head's input
//   qkv   (2kd + vd) × N    the 1×1 conv's output: q before its depthwise conv, k, v
//   q     kd × N            q after the depthwise conv, times the scale
//   attn  N × ld            logits, then probabilities
//   outs  heads·vd × N      every head's output (the projection reads them all)
// Weights are read from global memory: they are shared by every block and stay in L2. The tensor-core kernel's
// layout is MmaLayout's.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

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
  int ctas_per_window;  // 1, or the size of the thread block clusters that split each window (WindowCtas)
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

// What both kernels compute alike, one window (one block) at a time.

// The block's window: its image b and the map position (y0, x0) of its first token.
struct Window {
  int b, y0, x0;
};

template <typename T>
__device__ __forceinline__ Window block_window(const Params<T>& p) {
  const int window = blockIdx.x / p.ctas_per_window, wx = window % p.windows_w, rest = window / p.windows_w;
  return {rest / p.windows_h, rest % p.windows_h * p.R, wx * p.R};
}

// Channel c of head `head`'s chunk of x at the window's token n (< R²): zero past the map's edge.
template <typename T>
__device__ __forceinline__ float window_input(const Params<T>& p, Window w, int head, int c, int n) {
  const int y = w.y0 + n / p.R, xx = w.x0 + n % p.R;
  if (y >= p.H || xx >= p.W) return 0.f;
  return static_cast<float>(p.x[w.b * p.x_stride[0] + (head * p.in_w + c) * p.x_stride[1] + y * p.x_stride[2] +
                                xx * p.x_stride[3]]);
}

// Head `head`'s depthwise k×k conv of q channel c at token n, inside the window (zero padded at its edge), plus
// its bias: q_in holds q's channels `pitch` floats apart, each as the window's R² tokens.
template <typename T>
__device__ __forceinline__ float depthwise_q(const Params<T>& p, int head, const float* q_in, int pitch, int c,
                                             int n) {
  const int R = p.R, k = p.dw_k[head], half = k / 2, ty = n / R, tx = n % R;
  const T* dw_w = p.dw_w[head] + c * k * k;
  float acc = static_cast<float>(p.dw_b[head][c]);
  for (int dy = 0; dy < k; ++dy) {
    const int sy = ty + dy - half;
    if (sy < 0 || sy >= R) continue;
    for (int dx = 0; dx < k; ++dx) {
      const int sx = tx + dx - half;
      if (sx >= 0 && sx < R) acc = fmaf(static_cast<float>(dw_w[dy * k + dx]), q_in[c * pitch + sy * R + sx], acc);
    }
  }
  return acc;
}

// Head `head`'s position bias between query n and key m, gathered by |Δy|·R + |Δx|.
template <typename T>
__device__ __forceinline__ float position_bias(const Params<T>& p, int head, int n, int m) {
  const int R = p.R, dy = abs(n / R - m / R), dx = abs(n % R - m % R);
  return static_cast<float>(p.attention_biases[head * R * R + dy * R + dx]);
}

// Softmax over keys in fp32 of the N rows of `logits` (pitch ld), one warp per query: the exponentials overwrite
// the logits, and store(n, m, probability) takes each result.
template <typename Store>
__device__ __forceinline__ void softmax_rows(float* logits, int ld, int N, Store store) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int n = warp; n < N; n += warps) {
    float* row = logits + n * ld;
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
    for (int m = lane; m < N; m += 32) store(n, m, row[m] * inv);
  }
}

// Output channel o at the window's token n, plus the projection's bias, unless n lies past the map's edge.
template <typename T>
__device__ __forceinline__ void store_output(const Params<T>& p, Window w, int o, int n, float value) {
  const int y = w.y0 + n / p.R, xx = w.x0 + n % p.R;
  if (y >= p.H || xx >= p.W) return;
  p.out[((int64_t(w.b) * p.c_out + o) * p.H + y) * p.W + xx] = static_cast<T>(value + static_cast<float>(p.proj_b[o]));
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads) cga_window_kernel(const Params<T> p) {
  extern __shared__ float smem[];
  const int N = p.R * p.R, kd = p.key_dim, vd = p.val_dim, in_w = p.in_w;
  const int qkv_rows = 2 * kd + vd;
  const SharedLayout layout = shared_layout(p.R, p.heads, in_w, kd, vd);
  const int ld = static_cast<int>(layout.ld);
  float* feat = smem + layout.feat;
  float* qkv = smem + layout.qkv;
  float* q = smem + layout.q;
  float* attn = smem + layout.attn;
  float* outs = smem + layout.outs;
  const Window w = block_window(p);

  for (int head = 0; head < p.heads; ++head) {
    // The cascade: this head's input chunk (zeros past the map's edge) plus the previous head's output.
    for (int idx = threadIdx.x; idx < in_w * N; idx += blockDim.x) {
      const int c = idx / N, n = idx % N;
      feat[idx] = window_input(p, w, head, c, n) + (head > 0 ? outs[((head - 1) * vd + c) * N + n] : 0.f);
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

    for (int idx = threadIdx.x; idx < kd * N; idx += blockDim.x)
      q[idx] = depthwise_q(p, head, qkv, N, idx / N, idx % N) * p.scale;
    __syncthreads();

    // Logits (queries n × keys m) plus the position bias.
    const float* keys = qkv + kd * N;
    gemm_rows4(
        N, kd, N, [](int) { return 0.f; }, [&](int n, int c) { return q[c * N + n]; },
        [&](int c, int m) { return keys[c * N + m]; },
        [&](int n, int m, float v) { attn[n * ld + m] = v + position_bias(p, head, n, m); });
    __syncthreads();

    softmax_rows(attn, ld, N, [&](int n, int m, float prob) { attn[n * ld + m] = prob; });
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
  gemm_rows4(
      p.c_out, K, N, [](int) { return 0.f; }, [&](int o, int c) { return static_cast<float>(p.proj_w[o * K + c]); },
      [&](int c, int n) { return fmaxf(outs[c * N + n], 0.f); },
      [&](int o, int n, float v) { store_output(p, w, o, n, v); });
}

// --- the tensor-core kernel -----------------------------------------------------------------------------------

constexpr int kTile = 16;     // the wmma shape: 16×16 outputs, 16-long steps over the reduction
constexpr int kMmaWarps = 16;  // 512 threads: one block per SM holds a wide window, so many warps hide latency

// Whether cga_window_cuda runs the tensor-core kernel: fp16/bf16 on sm_80 or later (the bf16 products need it), with
// every dimension of the four products a multiple of the 16-wide tiles.
bool tensor_core_products(at::ScalarType dtype, int64_t arch_major, int64_t in_w, int64_t kd, int64_t vd,
                          int64_t c_out) {
  const bool half = dtype == at::ScalarType::Half || dtype == at::ScalarType::BFloat16;
  return half && arch_major >= 8 && in_w % kTile == 0 && kd % kTile == 0 && vd % kTile == 0 && c_out % kTile == 0;
}

// Byte offsets of the tensor-core kernel's arrays (each 128-byte aligned, as wmma's 32-byte-aligned tiles need)
// and its bytes in all, for the launcher and the kernel alike. NP = N rounded up to 16 (the products' token
// width), E = the input's 16-bit type:
//   feat     in_w × NP     E      the current head's input (zero past N)
//   q32      kd × NP       fp32   q before its depthwise conv
//   q, k, v  kd|kd|vd × NP E      the products' operands (q convolved and scaled)
//   logits   N × ld        fp32   scores plus the position bias (ld = N|1, as the scalar kernel's)
//   probs    NP × NP       E      probabilities; zero past N in either direction
//   outs     heads·vd × NP E      every head's output (zero past N), relu'd before the projection
//   scratch  16 warps × 16×16 fp32: each warp's accumulator tile on its way to the epilogue
struct MmaLayout {
  int64_t np, ld, feat, q32, q, k, v, logits, probs, outs, scratch, bytes;
};

__host__ __device__ inline int64_t aligned_128(int64_t bytes) { return (bytes + 127) / 128 * 128; }

__host__ __device__ inline MmaLayout mma_layout(int64_t window, int64_t heads, int64_t in_w, int64_t kd,
                                                int64_t vd) {
  const int64_t N = window * window;
  MmaLayout s{};
  s.np = (N + kTile - 1) / kTile * kTile;
  s.ld = N | 1;
  s.feat = 0;
  s.q32 = aligned_128(s.feat + in_w * s.np * 2);
  s.q = aligned_128(s.q32 + kd * s.np * 4);
  s.k = aligned_128(s.q + kd * s.np * 2);
  s.v = aligned_128(s.k + kd * s.np * 2);
  s.logits = aligned_128(s.v + vd * s.np * 2);
  s.probs = aligned_128(s.logits + N * s.ld * 4);
  s.outs = aligned_128(s.probs + s.np * s.np * 2);
  s.scratch = aligned_128(s.outs + heads * vd * s.np * 2);
  s.bytes = s.scratch + kMmaWarps * kTile * kTile * 4;
  return s;
}

// PyTorch's 16-bit types as the wmma fragments name them (the same bits).
template <typename T>
struct WmmaType;
template <>
struct WmmaType<at::Half> {
  using type = __half;
};
template <>
struct WmmaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

// One warp's 16×16 output tile: Σ_s A_s·B_s over `steps` 16-long steps of the reduction (A_s = a + s·a_step with
// leading dimension lda in layout LayoutA, B_s likewise), accumulated in fp32 on the tensor cores, then handed
// element by element to epilogue(row, column, value) through the warp's fp32 scratch tile.
template <typename LayoutA, typename LayoutB, typename E, typename Epilogue>
__device__ __forceinline__ void warp_tile(const E* a, int lda, int a_step, const E* b, int ldb, int b_step,
                                          int steps, float* scratch, Epilogue epilogue) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float> acc;
  wmma::fill_fragment(acc, 0.f);
  for (int s = 0; s < steps; ++s) {
    wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, E, LayoutA> fa;
    wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, E, LayoutB> fb;
    wmma::load_matrix_sync(fa, a + s * a_step, lda);
    wmma::load_matrix_sync(fb, b + s * b_step, ldb);
    wmma::mma_sync(acc, fa, fb, acc);
  }
  wmma::store_matrix_sync(scratch, acc, kTile, wmma::mem_row_major);
  __syncwarp();
  for (int e = threadIdx.x % 32; e < kTile * kTile; e += 32) epilogue(e / kTile, e % kTile, scratch[e]);
  __syncwarp();  // the scratch tile is the next call's
#endif
}

// The CTAs that share one window: a thread block cluster of `size` CTAs (sm_90), or one CTA (size 1). Each
// computes its share of the tiles of the qkv conv, the value sum and the projection and stores the qkv and head
// outputs into every member's shared memory (distributed shared memory), so that each member holds the whole
// window for the steps they all repeat (the depthwise conv, the scores, the softmax). Launched so where the
// windows are fewer than the GPU's SMs (batch 1), to put up to four SMs on a window instead of one.
struct WindowCtas {
  int rank, size;

  // Tiles t = first(warp), first(warp) + step(warps), ... of a product are this CTA's share.
  __device__ __forceinline__ int first(int warp, int warps) const { return warp + rank * warps; }
  __device__ __forceinline__ int step(int warps) const { return warps * size; }

  // local[idx] = value in every member's copy of the shared array `local`.
  template <typename U>
  __device__ __forceinline__ void store(U* local, int idx, U value) const {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (size > 1) {
      for (int r = 0; r < size; ++r) cooperative_groups::this_cluster().map_shared_rank(local, r)[idx] = value;
      return;
    }
#endif
    local[idx] = value;
  }

  // A barrier across the members, after which every store above is visible to all of them.
  __device__ __forceinline__ void sync() const {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (size > 1) {
      cooperative_groups::this_cluster().sync();
      return;
    }
#endif
    __syncthreads();
  }
};

__device__ __forceinline__ WindowCtas window_ctas(int size) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (size > 1) return {static_cast<int>(cooperative_groups::this_cluster().block_rank()), size};
#endif
  return {0, 1};
}

template <typename T>
__global__ void __launch_bounds__(kMmaWarps * 32, 2) cga_window_mma_kernel(const Params<T> p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using E = typename WmmaType<T>::type;
  using RowMajor = nvcuda::wmma::row_major;
  using ColMajor = nvcuda::wmma::col_major;
  extern __shared__ __align__(128) unsigned char mma_smem[];
  const int N = p.R * p.R, kd = p.key_dim, vd = p.val_dim, in_w = p.in_w;
  const MmaLayout layout = mma_layout(p.R, p.heads, in_w, kd, vd);
  const int np = static_cast<int>(layout.np), ld = static_cast<int>(layout.ld), tiles_n = np / kTile;
  T* feat = reinterpret_cast<T*>(mma_smem + layout.feat);
  float* q32 = reinterpret_cast<float*>(mma_smem + layout.q32);
  T* q = reinterpret_cast<T*>(mma_smem + layout.q);
  T* k = reinterpret_cast<T*>(mma_smem + layout.k);
  T* v = reinterpret_cast<T*>(mma_smem + layout.v);
  float* logits = reinterpret_cast<float*>(mma_smem + layout.logits);
  T* probs = reinterpret_cast<T*>(mma_smem + layout.probs);
  T* outs = reinterpret_cast<T*>(mma_smem + layout.outs);
  const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
  float* scratch = reinterpret_cast<float*>(mma_smem + layout.scratch) + warp * kTile * kTile;
  auto e = [](const T* t) { return reinterpret_cast<const E*>(t); };

  const Window w = block_window(p);
  const WindowCtas ctas = window_ctas(p.ctas_per_window);

  // The padded queries' and keys' probabilities stay zero for every head (the softmax writes rows and keys < N),
  // and so do the padded queries (the depthwise conv writes tokens < N), whose logits are dropped.
  for (int idx = threadIdx.x; idx < np * np; idx += blockDim.x) probs[idx] = static_cast<T>(0.f);
  for (int idx = threadIdx.x; idx < kd * np; idx += blockDim.x) q[idx] = static_cast<T>(0.f);
  ctas.sync();  // and every member runs before any stores into its shared memory

  for (int head = 0; head < p.heads; ++head) {
    // The cascade: this head's input chunk (zeros past the map's edge) plus the previous head's output.
    for (int idx = threadIdx.x; idx < in_w * np; idx += blockDim.x) {
      const int c = idx / np, n = idx % np;
      float val = 0.f;
      if (n < N)
        val = window_input(p, w, head, c, n) +
              (head > 0 ? static_cast<float>(outs[((head - 1) * vd + c) * np + n]) : 0.f);
      feat[idx] = static_cast<T>(val);
    }
    __syncthreads();

    // qkv = W·feat + bias: q kept in fp32 for its depthwise conv, k and v rounded for their products.
    const T* qkv_b = p.qkv_b[head];
    const int row_tiles = (2 * kd + vd) / kTile;
    for (int t = ctas.first(warp, warps); t < row_tiles * tiles_n; t += ctas.step(warps)) {
      const int rt = t / tiles_n, nt = t % tiles_n;
      warp_tile<RowMajor, RowMajor>(
          e(p.qkv_w[head]) + rt * kTile * in_w, in_w, kTile, e(feat) + nt * kTile, np, kTile * np, in_w / kTile,
          scratch, [&](int r, int col, float acc) {
            const int o = rt * kTile + r, n = nt * kTile + col;
            const float val = acc + static_cast<float>(qkv_b[o]);
            if (o < kd)
              ctas.store(q32, o * np + n, val);
            else if (o < 2 * kd)
              ctas.store(k, (o - kd) * np + n, static_cast<T>(val));
            else
              ctas.store(v, (o - 2 * kd) * np + n, static_cast<T>(val));
          });
    }
    ctas.sync();

    // q's depthwise conv (fp32), times the scale, rounded for the scores.
    for (int idx = threadIdx.x; idx < kd * N; idx += blockDim.x)
      q[idx / N * np + idx % N] = static_cast<T>(depthwise_q(p, head, q32, np, idx / N, idx % N) * p.scale);
    __syncthreads();

    // Logits (queries n × keys m) = qᵀk plus the position bias. q (kd × NP, row-major) is qᵀ column-major.
    for (int t = warp; t < tiles_n * tiles_n; t += warps) {
      const int qt = t / tiles_n, mt = t % tiles_n;
      warp_tile<ColMajor, RowMajor>(e(q) + qt * kTile, np, kTile * np, e(k) + mt * kTile, np, kTile * np,
                                    kd / kTile, scratch, [&](int r, int col, float acc) {
                                      const int n = qt * kTile + r, m = mt * kTile + col;
                                      if (n < N && m < N) logits[n * ld + m] = acc + position_bias(p, head, n, m);
                                    });
    }
    __syncthreads();

    // The probabilities, rounded once.
    softmax_rows(logits, ld, N, [&](int n, int m, float prob) { probs[n * np + m] = static_cast<T>(prob); });
    __syncthreads();

    // out[c, n] = Σ_m v[c, m]·probs[n, m]: probs (NP × NP, row-major) is probsᵀ column-major.
    for (int t = ctas.first(warp, warps); t < vd / kTile * tiles_n; t += ctas.step(warps)) {
      const int ct = t / tiles_n, nt = t % tiles_n;
      warp_tile<RowMajor, ColMajor>(e(v) + ct * kTile * np, np, kTile, e(probs) + nt * kTile * np, np, kTile,
                                    tiles_n, scratch, [&](int r, int col, float acc) {
                                      const int c = ct * kTile + r, n = nt * kTile + col;
                                      ctas.store(outs, (head * vd + c) * np + n, static_cast<T>(n < N ? acc : 0.f));
                                    });
    }
    ctas.sync();  // also the last access to another member's shared memory, before any member may exit
  }

  // ReLU, the projection and the crop to the map.
  const int K = p.heads * vd;
  for (int idx = threadIdx.x; idx < K * np; idx += blockDim.x)
    outs[idx] = static_cast<T>(fmaxf(static_cast<float>(outs[idx]), 0.f));
  __syncthreads();
  for (int t = ctas.first(warp, warps); t < p.c_out / kTile * tiles_n; t += ctas.step(warps)) {
    const int ot = t / tiles_n, nt = t % tiles_n;
    warp_tile<RowMajor, RowMajor>(e(p.proj_w) + ot * kTile * K, K, kTile, e(outs) + nt * kTile, np, kTile * np,
                                  K / kTile, scratch, [&](int r, int col, float acc) {
                                    const int n = nt * kTile + col;
                                    if (n < N) store_output(p, w, ot * kTile + r, n, acc);
                                  });
  }
#else
  __trap();  // built without sm_80 code (a PTX-only build for older GPUs): fail loudly, never leave the output unset
#endif
}

template <typename T>
void launch(const at::Tensor& x, const std::vector<at::Tensor>& qkv_w, const std::vector<at::Tensor>& qkv_b,
            const std::vector<at::Tensor>& dw_w, const std::vector<at::Tensor>& dw_b, const at::Tensor& biases,
            const at::Tensor& proj_w, const at::Tensor& proj_b, at::Tensor& out, int64_t key_dim, int64_t window,
            int64_t smem_bytes, int windows, bool tensor_cores, int ctas_per_window) {
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
  p.ctas_per_window = ctas_per_window;
  p.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(key_dim)));  // as key_dim ** -0.5

  // Past 48 KB a kernel must opt in; where only one block fits on an SM anyway, more threads hide latency.
  auto kernel = cga_window_kernel<T>;
  int threads = smem_bytes > 112 * 1024 ? kMaxThreads : 256;
  if constexpr (!std::is_same_v<T, float>) {
    if (tensor_cores) {
      kernel = cga_window_mma_kernel<T>;
      threads = kMmaWarps * 32;
    }
  }
  if (smem_bytes > 48 * 1024)
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes)));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (ctas_per_window == 1) {
    kernel<<<windows, threads, smem_bytes, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  cudaLaunchAttribute cluster{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = static_cast<unsigned>(ctas_per_window);
  cluster.val.clusterDim.y = cluster.val.clusterDim.z = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(windows * ctas_per_window));
  config.blockDim = dim3(static_cast<unsigned>(threads));
  config.dynamicSmemBytes = static_cast<size_t>(smem_bytes);
  config.stream = stream;
  config.attrs = &cluster;
  config.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, p));
}

constexpr int kMaxCtasPerWindow = 4;

// CTAs per window (WindowCtas): clusters of 2 or 4 for the tensor-core kernel on sm_90 or later while the windows
// times that still fit the GPU's SMs (a batch-1 map of 1 to 16 windows), else one.
int window_cluster_size(bool tensor_cores, int arch_major, int64_t windows, int sms) {
  int ctas = 1;
  if (tensor_cores && arch_major >= 9)
    while (ctas < kMaxCtasPerWindow && windows * ctas * 2 <= sms) ctas *= 2;
  return ctas;
}

// Contiguous and 32-byte aligned (a copy where a view starts elsewhere): the tensor-core kernel reads the weights
// as 16×16 tiles, which must start at 32-byte boundaries.
at::Tensor dense(const at::Tensor& t) {
  at::Tensor out = t.contiguous();
  return reinterpret_cast<std::uintptr_t>(out.const_data_ptr()) % 32 == 0 ? out : out.clone();
}

std::vector<at::Tensor> dense(at::TensorList tensors) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) out.push_back(dense(t));
  return out;
}

}  // namespace

// Host only, no GPU needed: registered as evit::cga_window_cuda_shared_memory_bytes for the Python side's checks.
// The bytes of the kernel cga_window_cuda runs for these sizes, dtype and GPU generation (arch_major: 9 for sm_90).
int64_t cga_window_cuda_shared_memory_bytes(int64_t window, int64_t heads, int64_t in_width, int64_t key_dim,
                                            int64_t val_dim, int64_t out_channels, at::ScalarType dtype,
                                            int64_t arch_major) {
  if (tensor_core_products(dtype, arch_major, in_width, key_dim, val_dim, out_channels))
    return mma_layout(window, heads, in_width, key_dim, val_dim).bytes;
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
  int device = 0, max_smem = 0, arch_major = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&arch_major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const bool tensor_cores = tensor_core_products(dtype, arch_major, in_w, key_dim, vd, c_out);
  const int64_t smem_bytes =
      cga_window_cuda_shared_memory_bytes(window, heads, in_w, key_dim, vd, c_out, dtype, arch_major);
  TORCH_CHECK(smem_bytes <= max_smem, "cga_window_cuda: this configuration needs ", smem_bytes,
              " bytes of shared memory per block, the GPU has ", max_smem);
  const int64_t windows = B * ((H + window - 1) / window) * ((W + window - 1) / window);
  TORCH_CHECK(windows < (int64_t(1) << 31), "cga_window_cuda: too many windows");

  at::Tensor out = x.new_empty({B, c_out, H, W});
  const auto qkv_wc = dense(qkv_w), qkv_bc = dense(qkv_b), dw_wc = dense(dw_w), dw_bc = dense(dw_b);
  const auto biases = dense(attention_biases), pw = dense(proj_w), pb = dense(proj_b);
  EVIT_DISPATCH_KERNEL_TYPES(dtype, "cga_window_cuda", [&] {
    if (windows > 0)
      launch<scalar_t>(x, qkv_wc, qkv_bc, dw_wc, dw_bc, biases, pw, pb, out, key_dim, window, smem_bytes,
                       static_cast<int>(windows), tensor_cores,
                       window_cluster_size(tensor_cores, arch_major, windows, sms));
  });
  return out;
}

}  // namespace evit
