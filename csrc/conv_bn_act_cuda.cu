// evit::depthwise_conv_cuda: the depthwise k×k conv of evit::conv_bn_act (k = 3, 5, 7; stride 1 or 2 per
// dimension; any zero padding; every BatchNorm folded into weight and bias), inference only:
//
//     out = act(depthwise_conv2d(x, weight) + bias) + residual
//
// A block stages one input tile, halo included ((tile - 1)·stride + k rows and columns), in shared memory as fp32,
// with zeros where the tile overhangs the map (that is the padding); its threads then read every tap from there.
// Bias, activation and residual are applied to the fp32 accumulator and the output is rounded once, on store.
// The tiling follows the output's layout (evit::conv_bn_act's rule: channels-last when x is):
//   NCHW           a block is a tile of one (image, channel) plane, one thread per output pixel; warps read and
//                  write along W.
//   channels-last  a block is an 8×8 tile of output pixels × 32 channels, lane = channel, warp = output row, each
//                  thread computing its row's 8 pixels; warps read and write along C.
// x and residual are read through their strides and the output written through its own, so any layout is
// correct (the tiling's own layout is the fast one). Global offsets are 64-bit; pixel coordinates are 32-bit.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string_view>
#include <type_traits>
#include <utility>

#include "common.cuh"

namespace evit {
namespace {

constexpr int kThreads = 256;
// Channels-last tiling: 32 channels make a warp's loads and stores one contiguous run per pixel and its
// shared-memory reads conflict-free; 8×8 pixels cover EfficientViT's 7×7 maps in one tile and its 14/28/56-wide
// maps in whole tiles, while the largest staged tile (stride 2, 7×7: 21×21 pixels × 32 channels × 4 B = 55 KB)
// still lets three blocks share an SM.
constexpr int kChannels = 32;
constexpr int kTile = 8;
static_assert(kChannels * kTile == kThreads, "one warp per output row of the channels-last tile");

enum class Act { kNone, kRelu, kRelu6, kHardswish, kGelu, kGeluTanh, kSilu };

// evit::conv_bn_act's activations in fp32, as the Triton kernel computes them; comparisons rather than fmaxf/fminf
// so that NaN stays NaN, as in PyTorch.
template <Act A>
__device__ __forceinline__ float activate(float y) {
  if constexpr (A == Act::kRelu) {
    return y < 0.f ? 0.f : y;
  } else if constexpr (A == Act::kRelu6) {
    return y < 0.f ? 0.f : (y > 6.f ? 6.f : y);
  } else if constexpr (A == Act::kHardswish) {
    return y * (y < -3.f ? 0.f : (y > 3.f ? 6.f : y + 3.f)) / 6.f;
  } else if constexpr (A == Act::kGelu) {
    return 0.5f * y * (1.f + erff(y * 0.70710678118654752f));
  } else if constexpr (A == Act::kGeluTanh) {
    // 0.5·(1 + tanh(u)) = sigmoid(2u) with u = √(2/π)·(y + 0.044715·y³): no tanh, no cancellation.
    return y / (1.f + expf(-1.5957691216057308f * (y + 0.044715f * y * y * y)));
  } else if constexpr (A == Act::kSilu) {
    return y / (1.f + expf(-y));
  } else {
    return y;
  }
}

template <typename T>
struct Params {
  const T* x;
  const T* weight;    // (C, k, k), contiguous
  const T* bias;      // nullptr when there is none
  const T* residual;  // nullptr when there is none
  T* out;
  int64_t x_stride[4], r_stride[4], o_stride[4];
  int C, H, W, out_h, out_w, stride_h, stride_w, pad_h, pad_w;
  int tile_h, tile_w;    // a block's output tile (NCHW; channels-last tiles are kTile × kTile)
  int tiles_h, tiles_w;  // tiles per map
};

template <typename T, int K>
__device__ __forceinline__ void load_weights(const T* weight, int c, float (&w)[K * K]) {
#pragma unroll
  for (int i = 0; i < K * K; ++i) w[i] = static_cast<float>(weight[int64_t(c) * K * K + i]);
}

// Σ taps of the k×k window whose top-left input sits at src: rows `pitch` floats apart, columns `step` apart.
template <int K>
__device__ __forceinline__ float window_sum(const float* src, int pitch, int step, const float (&w)[K * K]) {
  float acc = 0.f;
#pragma unroll
  for (int kh = 0; kh < K; ++kh)
#pragma unroll
    for (int kw = 0; kw < K; ++kw) acc = fmaf(src[kh * pitch + kw * step], w[kh * K + kw], acc);
  return acc;
}

// bias → activation → residual on the fp32 accumulator, then the one rounding to T.
template <typename T, Act A>
__device__ __forceinline__ void finish(const Params<T>& p, int64_t b, int c, int oy, int ox, float acc) {
  if (p.bias) acc += static_cast<float>(p.bias[c]);
  float y = activate<A>(acc);
  if (p.residual)
    y += static_cast<float>(
        p.residual[b * p.r_stride[0] + c * p.r_stride[1] + oy * p.r_stride[2] + ox * p.r_stride[3]]);
  p.out[b * p.o_stride[0] + c * p.o_stride[1] + oy * p.o_stride[2] + ox * p.o_stride[3]] = static_cast<T>(y);
}

template <typename T, int K, Act A>
__global__ void __launch_bounds__(kThreads) depthwise_nchw_kernel(const Params<T> p) {
  extern __shared__ float tile[];  // in_h × in_w
  const int tiles = p.tiles_h * p.tiles_w;
  const int64_t plane = blockIdx.x / tiles;  // b·C + c
  const int t = blockIdx.x % tiles;
  const int64_t b = plane / p.C;
  const int c = static_cast<int>(plane % p.C);
  const int oy0 = t / p.tiles_w * p.tile_h, ox0 = t % p.tiles_w * p.tile_w;
  const int iy0 = oy0 * p.stride_h - p.pad_h, ix0 = ox0 * p.stride_w - p.pad_w;
  const int in_h = (p.tile_h - 1) * p.stride_h + K, in_w = (p.tile_w - 1) * p.stride_w + K;
  const T* x = p.x + b * p.x_stride[0] + c * p.x_stride[1];
  // Consecutive threads take consecutive columns: a warp reads along W.
  for (int i = threadIdx.y * blockDim.x + threadIdx.x; i < in_h * in_w; i += blockDim.x * blockDim.y) {
    const int iy = iy0 + i / in_w, ix = ix0 + i % in_w;
    const bool inside = iy >= 0 && iy < p.H && ix >= 0 && ix < p.W;
    tile[i] = inside ? static_cast<float>(x[iy * p.x_stride[2] + ix * p.x_stride[3]]) : 0.f;
  }
  float w[K * K];
  load_weights<T, K>(p.weight, c, w);
  __syncthreads();
  const int oy = oy0 + threadIdx.y, ox = ox0 + threadIdx.x;
  if (oy < p.out_h && ox < p.out_w) {
    const float* src = tile + threadIdx.y * p.stride_h * in_w + threadIdx.x * p.stride_w;
    finish<T, A>(p, b, c, oy, ox, window_sum<K>(src, in_w, 1, w));
  }
}

// Stages the channels-last input tile [in_h][in_w][kChannels], V channels of one pixel per load. V = 4 is one 8- or
// 16-byte load and one conflict-free float4 store (the host checked that x's channels are unit-stride, that C and
// the other strides are multiples of 4 and that x is aligned); V = 1 reads any strides.
template <int V, typename T>
__device__ __forceinline__ void stage_channels_last(float* tile, const Params<T>& p, const T* x, int c0, int iy0,
                                                    int ix0, int in_h, int in_w) {
  struct alignas(V * sizeof(T)) Vec {
    T v[V];
  };
  constexpr int kLoadsPerPixel = kChannels / V;
  for (int i = threadIdx.y * kChannels + threadIdx.x; i < in_h * in_w * kLoadsPerPixel; i += kThreads) {
    const int pixel = i / kLoadsPerPixel, cl = i % kLoadsPerPixel * V, c = c0 + cl;
    const int iy = iy0 + pixel / in_w, ix = ix0 + pixel % in_w;
    float f[V] = {};
    if (iy >= 0 && iy < p.H && ix >= 0 && ix < p.W && c < p.C) {  // C % V == 0: a vector is all in or all out
      const T* src = x + iy * p.x_stride[2] + ix * p.x_stride[3] + c * p.x_stride[1];
      const Vec v = *reinterpret_cast<const Vec*>(src);
#pragma unroll
      for (int j = 0; j < V; ++j) f[j] = static_cast<float>(v.v[j]);
    }
    float* dst = tile + pixel * kChannels + cl;
    if constexpr (V == 4)
      *reinterpret_cast<float4*>(dst) = make_float4(f[0], f[1], f[2], f[3]);
    else
      *dst = f[0];
  }
}

template <typename T, int K, Act A>
__global__ void __launch_bounds__(kThreads) depthwise_channels_last_kernel(const Params<T> p, bool vector_loads) {
  extern __shared__ __align__(16) float tile[];  // [in_h][in_w][kChannels]
  // Channel groups of one tile are neighbouring blocks, so the rest of a pixel's channel run, which this block's
  // loads leave in L2, is read next.
  int block = blockIdx.x;
  const int groups = (p.C + kChannels - 1) / kChannels;
  const int c0 = block % groups * kChannels;
  block /= groups;
  const int ox0 = block % p.tiles_w * kTile;
  block /= p.tiles_w;
  const int oy0 = block % p.tiles_h * kTile;
  const int64_t b = block / p.tiles_h;
  const int iy0 = oy0 * p.stride_h - p.pad_h, ix0 = ox0 * p.stride_w - p.pad_w;
  const int in_h = (kTile - 1) * p.stride_h + K, in_w = (kTile - 1) * p.stride_w + K;
  const T* x = p.x + b * p.x_stride[0];
  if (vector_loads)
    stage_channels_last<4>(tile, p, x, c0, iy0, ix0, in_h, in_w);
  else
    stage_channels_last<1>(tile, p, x, c0, iy0, ix0, in_h, in_w);
  const int c = c0 + threadIdx.x;
  float w[K * K];
  load_weights<T, K>(p.weight, min(c, p.C - 1), w);  // lanes past C load a real channel and store nothing
  __syncthreads();
  const int oy = oy0 + threadIdx.y;
  if (c >= p.C || oy >= p.out_h) return;
  const float* row = tile + threadIdx.y * p.stride_h * in_w * kChannels + threadIdx.x;
  for (int j = 0; j < kTile && ox0 + j < p.out_w; ++j)
    finish<T, A>(p, b, c, oy, ox0 + j, window_sum<K>(row + j * p.stride_w * kChannels, in_w * kChannels,
                                                     kChannels, w));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int pow2_at_least(int64_t n) {
  int p = 1;
  while (p < n) p *= 2;
  return p;
}

template <typename T, int K, Act A>
void launch(Params<T> p, int64_t batch, bool channels_last, bool vector_loads) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (channels_last) {
    p.tiles_h = static_cast<int>(ceil_div(p.out_h, kTile));
    p.tiles_w = static_cast<int>(ceil_div(p.out_w, kTile));
    const int64_t blocks = batch * p.tiles_h * p.tiles_w * ceil_div(p.C, kChannels);
    TORCH_CHECK(blocks < (int64_t(1) << 31), "depthwise_conv_cuda: too many tiles");
    const int smem = ((kTile - 1) * p.stride_h + K) * ((kTile - 1) * p.stride_w + K) * kChannels *
                     static_cast<int>(sizeof(float));
    if (smem > 48 * 1024)  // past 48 KB a kernel must opt in
      C10_CUDA_CHECK(cudaFuncSetAttribute(depthwise_channels_last_kernel<T, K, A>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    depthwise_channels_last_kernel<T, K, A>
        <<<static_cast<unsigned>(blocks), dim3(kChannels, kTile), smem, stream>>>(p, vector_loads);
  } else {
    // A tile as wide as the map up to a warp and as tall as it up to 256 threads: a fixed 32×8 tile would leave
    // most threads idle on EfficientViT's 7×7 and 14×14 maps. The largest tile with halo (1×256 outputs at
    // stride 2, k = 7: 7×517 floats) stays under 15 KB.
    p.tile_w = std::min(32, pow2_at_least(p.out_w));
    p.tile_h = std::min(kThreads / p.tile_w, pow2_at_least(p.out_h));
    p.tiles_h = static_cast<int>(ceil_div(p.out_h, p.tile_h));
    p.tiles_w = static_cast<int>(ceil_div(p.out_w, p.tile_w));
    const int64_t blocks = batch * p.C * p.tiles_h * p.tiles_w;
    TORCH_CHECK(blocks < (int64_t(1) << 31), "depthwise_conv_cuda: too many tiles");
    const int smem =
        ((p.tile_h - 1) * p.stride_h + K) * ((p.tile_w - 1) * p.stride_w + K) * static_cast<int>(sizeof(float));
    depthwise_nchw_kernel<T, K, A>
        <<<static_cast<unsigned>(blocks), dim3(p.tile_w, p.tile_h), smem, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Runtime kernel size and activation → the compiled instantiation.
template <typename T>
void dispatch(const Params<T>& p, int64_t k, Act act, int64_t batch, bool channels_last, bool vector_loads) {
  auto with_size = [&](auto size) {
    constexpr int K = decltype(size)::value;
    switch (act) {
      case Act::kNone: return launch<T, K, Act::kNone>(p, batch, channels_last, vector_loads);
      case Act::kRelu: return launch<T, K, Act::kRelu>(p, batch, channels_last, vector_loads);
      case Act::kRelu6: return launch<T, K, Act::kRelu6>(p, batch, channels_last, vector_loads);
      case Act::kHardswish: return launch<T, K, Act::kHardswish>(p, batch, channels_last, vector_loads);
      case Act::kGelu: return launch<T, K, Act::kGelu>(p, batch, channels_last, vector_loads);
      case Act::kGeluTanh: return launch<T, K, Act::kGeluTanh>(p, batch, channels_last, vector_loads);
      case Act::kSilu: return launch<T, K, Act::kSilu>(p, batch, channels_last, vector_loads);
    }
  };
  if (k == 3)
    with_size(std::integral_constant<int, 3>{});
  else if (k == 5)
    with_size(std::integral_constant<int, 5>{});
  else
    with_size(std::integral_constant<int, 7>{});
}

Act parse_activation(std::string_view name) {
  static const std::pair<std::string_view, Act> kNames[] = {
      {"none", Act::kNone}, {"relu", Act::kRelu},          {"relu6", Act::kRelu6}, {"hardswish", Act::kHardswish},
      {"gelu", Act::kGelu}, {"gelu_tanh", Act::kGeluTanh}, {"silu", Act::kSilu}};
  for (const auto& [known, act] : kNames)
    if (name == known) return act;
  TORCH_CHECK(false, "depthwise_conv_cuda: unknown activation '", name, "'");
}

template <typename T>
Params<T> params(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                 const std::optional<at::Tensor>& residual, at::Tensor& out, at::IntArrayRef stride,
                 at::IntArrayRef padding) {
  Params<T> p{};
  p.x = x.const_data_ptr<T>();
  p.weight = weight.const_data_ptr<T>();
  p.bias = bias ? bias->const_data_ptr<T>() : nullptr;
  p.residual = residual ? residual->const_data_ptr<T>() : nullptr;
  p.out = out.mutable_data_ptr<T>();
  for (int d = 0; d < 4; ++d) {
    p.x_stride[d] = x.stride(d);
    p.r_stride[d] = residual ? residual->stride(d) : 0;
    p.o_stride[d] = out.stride(d);
  }
  p.C = static_cast<int>(x.size(1));
  p.H = static_cast<int>(x.size(2));
  p.W = static_cast<int>(x.size(3));
  p.out_h = static_cast<int>(out.size(2));
  p.out_w = static_cast<int>(out.size(3));
  p.stride_h = static_cast<int>(stride[0]);
  p.stride_w = static_cast<int>(stride[1]);
  p.pad_h = static_cast<int>(padding[0]);
  p.pad_w = static_cast<int>(padding[1]);
  return p;
}

}  // namespace

at::Tensor depthwise_conv_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               at::IntArrayRef stride, at::IntArrayRef padding, std::string_view activation,
                               const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 4, "depthwise_conv_cuda: x must be a (B, C, H, W) CUDA tensor");
  const auto dtype = x.scalar_type();  // float32, float16 or bfloat16: EVIT_DISPATCH_KERNEL_TYPES refuses others
  const Act act = parse_activation(activation);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t k = weight.dim() == 4 ? weight.size(3) : 0;
  TORCH_CHECK(k == 3 || k == 5 || k == 7, "depthwise_conv_cuda: weight must be (C, 1, k, k) with k = 3, 5 or 7, got ",
              weight.sizes());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2, "depthwise_conv_cuda: stride and padding are pairs");
  for (int d = 0; d < 2; ++d) {
    TORCH_CHECK(stride[d] == 1 || stride[d] == 2, "depthwise_conv_cuda: stride must be 1 or 2, got ", stride);
    TORCH_CHECK(padding[d] >= 0, "depthwise_conv_cuda: padding must be non-negative, got ", padding);
  }
  // Pixel coordinates (up to 2·(H + 2·padding)) are 32-bit.
  const int64_t limit = int64_t(1) << 28;
  TORCH_CHECK(C < (int64_t(1) << 31) && H < limit && W < limit && padding[0] < limit && padding[1] < limit,
              "depthwise_conv_cuda: maps and padding must be below 2^28 pixels and C below 2^31");
  TORCH_CHECK(H + 2 * padding[0] >= k && W + 2 * padding[1] >= k, "depthwise_conv_cuda: a ", k, "×", k,
              " kernel does not fit the ", H, "×", W, " map with padding ", padding);
  const int64_t out_h = (H + 2 * padding[0] - k) / stride[0] + 1, out_w = (W + 2 * padding[1] - k) / stride[1] + 1;
  auto check = [&](const at::Tensor& t, at::IntArrayRef shape, const char* name) {
    TORCH_CHECK(t.sizes() == shape, "depthwise_conv_cuda: ", name, " has shape ", t.sizes(), ", expected ", shape);
    TORCH_CHECK(t.scalar_type() == dtype && t.device() == x.device(), "depthwise_conv_cuda: ", name,
                " must have x's dtype and device");
  };
  check(weight, {C, 1, k, k}, "weight");
  if (bias) check(*bias, {C}, "bias");
  if (residual) check(*residual, {B, C, out_h, out_w}, "residual");

  // evit::conv_bn_act's layout rule: channels-last when x is and is not also plainly contiguous.
  const bool channels_last = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor out = at::empty({B, C, out_h, out_w}, x.options().memory_format(
                                                       channels_last ? at::MemoryFormat::ChannelsLast
                                                                     : at::MemoryFormat::Contiguous));
  const bool vector_loads = channels_last && x.stride(1) == 1 && C % 4 == 0 && x.stride(0) % 4 == 0 &&
                            x.stride(2) % 4 == 0 && x.stride(3) % 4 == 0 &&
                            reinterpret_cast<uintptr_t>(x.const_data_ptr()) % (4 * x.element_size()) == 0;
  const auto w = weight.contiguous();
  const auto b = bias ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  c10::cuda::CUDAGuard guard(x.device());
  EVIT_DISPATCH_KERNEL_TYPES(dtype, "depthwise_conv_cuda", [&] {
    if (out.numel() > 0)
      dispatch(params<scalar_t>(x, w, b, residual, out, stride, padding), k, act, B, channels_last, vector_loads);
  });
  return out;
}

}  // namespace evit
