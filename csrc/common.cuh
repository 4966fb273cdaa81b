// Device helpers shared by the csrc/*.cu kernels: element conversion, 16-byte vectors, dtype dispatch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "llava_ops.h"

namespace llava {

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Elements of T in one 16-byte vector.
template <typename T> struct Vec { static constexpr int N = 16 / sizeof(T); };

// A 16-byte register vector viewed as N elements of T.
template <typename T> union Pack16 {
  uint4 raw;
  T v[Vec<T>::N];
};

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

__device__ __forceinline__ float gelu_erf(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }

// d/dx [x Φ(x)] = Φ(x) + x φ(x)
__device__ __forceinline__ float gelu_erf_grad(float x) {
  const float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
  const float pdf = 0.39894228040143268f * expf(-0.5f * x * x);
  return cdf + x * pdf;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace llava

// Runs `body` with `scalar_t` bound to the element type of dtype code `code`; unknown codes return
// cudaErrorInvalidValue from the enclosing launcher.
#define LLAVA_DISPATCH(code, ...)                                   \
  switch (code) {                                                   \
    case LLAVA_F32: { using scalar_t = float; __VA_ARGS__; break; } \
    case LLAVA_F16: { using scalar_t = __half; __VA_ARGS__; break; } \
    case LLAVA_BF16: { using scalar_t = __nv_bfloat16; __VA_ARGS__; break; } \
    default: return cudaErrorInvalidValue;                          \
  }
