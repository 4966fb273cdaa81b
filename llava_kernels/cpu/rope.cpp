// Rotary position embedding (rotate-half, the HF LLaMA convention) of fp32 rows for CPU inference:
//   out[t, n, :] = x[t, n, :] · cos[t] + rotate_half(x[t, n, :]) · sin[t],   rotate_half(a | b) = (−b | a)
//
// Built with the other CPU ops by llava_kernels/_cpu.py; the reference and the reasons are in
// llava_kernels/rope.py. Registers torch.ops.llava_cpu.rope.
//
// The formula is six torch ops (chunk, neg, cat, mul, mul, add; ~30 µs a call for one decode row of 24 heads
// of 64 on the 2-core development machine). Here one pass with the same roundings: a product, a product, a
// sum, each rounded (mul/add intrinsics, and -ffp-contract=off for the scalar tail: never an FMA), so the
// result equals the formula's bit for bit.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <immintrin.h>

#include "ops.h"

namespace {

// One head's row: lo = x[:h]·c[:h] + (−x[h:])·s[:h], hi = x[h:]·c[h:] + x[:h]·s[h:].
inline void head(const float* x, const float* c, const float* s, float* y, int64_t half) {
  int64_t i = 0;
  for (; i + 8 <= half; i += 8) {
    const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + half + i);
    const __m256 nb = _mm256_xor_ps(b, _mm256_set1_ps(-0.0f));  // −b: the sign bit flipped, as torch's neg
    _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_mul_ps(a, _mm256_loadu_ps(c + i)),
                                          _mm256_mul_ps(nb, _mm256_loadu_ps(s + i))));
    _mm256_storeu_ps(y + half + i, _mm256_add_ps(_mm256_mul_ps(b, _mm256_loadu_ps(c + half + i)),
                                                 _mm256_mul_ps(a, _mm256_loadu_ps(s + half + i))));
  }
  for (; i < half; ++i) {
    const float a = x[i], b = x[half + i];
    y[i] = a * c[i] + -b * s[i];             // built with -ffp-contract=off: two products, then the sum
    y[half + i] = b * c[half + i] + a * s[half + i];
  }
}

}  // namespace

namespace llava_cpu {

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == x.size(0) &&
                  cos.size(1) == x.size(2) && x.size(2) % 2 == 0,
              "llava_cpu::rope: x [T, heads, Dh] (Dh even) and cos, sin [T, Dh]; got ", x.sizes(), ", ", cos.sizes(),
              ", ", sin.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              "llava_cpu::rope: fp32 only");
  TORCH_CHECK(x.device().is_cpu() && cos.device().is_cpu() && sin.device().is_cpu(), "llava_cpu::rope: CPU only");
  TORCH_CHECK(x.is_contiguous() && cos.stride(1) == 1 && sin.stride(1) == 1,
              "llava_cpu::rope: contiguous x, and cos/sin rows of contiguous floats");
  at::Tensor y = at::empty_like(x);
  const int64_t T = x.size(0), n = x.size(1), D = x.size(2), half = D / 2;
  const float *X = x.data_ptr<float>(), *C = cos.data_ptr<float>(), *S = sin.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < n; ++h)
      head(X + (t * n + h) * D, C + t * cos.stride(0), S + t * sin.stride(0), Y + (t * n + h) * D, half);
  return y;
}

}  // namespace llava_cpu

TORCH_LIBRARY_FRAGMENT(llava_cpu, m) { m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor"); }

TORCH_LIBRARY_IMPL(llava_cpu, CPU, m) { m.impl("rope", llava_cpu::rope); }
