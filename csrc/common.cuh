// What the CUDA kernels of evit_kernels._C share: the element types they take and how a launcher picks one.
//
// Elements are PyTorch's own types (float, at::Half, at::BFloat16): kernels read them with static_cast<float>
// and round the fp32 result once, on store, with static_cast<scalar_t> (round to nearest even, as
// __float2half_rn / __float2bfloat16_rn), so no file needs conversion helpers of its own.
#pragma once

#include <ATen/Dispatch.h>

// Runs the lambda __VA_ARGS__ with scalar_t = float, at::Half or at::BFloat16 after x's dtype; any other dtype
// (float64 included: no kernel is compiled for it) raises "NAME" not implemented for '<dtype>'.
#define EVIT_DISPATCH_KERNEL_TYPES(TYPE, NAME, ...)                                 \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))
