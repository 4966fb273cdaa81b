// RMSNorm of fp32 rows for CPU inference: y = w · (x · rsqrt(mean(x²) + eps)), the LLaMA formula's order.
//
// Built with small_gemm.cpp by llava_kernels/_cpu.py; the reference and the reasons are in
// llava_kernels/rms_norm.py. Registers torch.ops.llava_cpu.rms_norm.
//
// A decode step normalises one row of D ≤ 8k floats 2·layers + 1 times; torch.rms_norm decomposes into six
// ops there (pow, mean, add, rsqrt, mul, mul) and took ~15 µs a call alone and ~43 µs inside a decode step
// on the 2-core development machine. One pass for the sum of squares (eight lane-wise fp32 partial sums, a
// fixed horizontal add, the tail in order), one for the output; rows are split between threads only when
// there are enough of them to pay for it.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <immintrin.h>

#include "ops.h"
#include "simd.h"

namespace {

void row(const float* x, const float* w, float* y, int64_t D, float eps) {
  const float ss = llava_cpu::dot(x, x, D);
  const float r = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
  const __m256 rv = _mm256_set1_ps(r);
  int64_t k = 0;
  for (; k + 8 <= D; k += 8)
    _mm256_storeu_ps(y + k, _mm256_mul_ps(_mm256_loadu_ps(w + k), _mm256_mul_ps(_mm256_loadu_ps(x + k), rv)));
  for (; k < D; ++k) y[k] = w[k] * (x[k] * r);
}

}  // namespace

namespace llava_cpu {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.dim() >= 1 && w.dim() == 1 && x.size(-1) == w.size(0),
              "llava_cpu::rms_norm: x [..., D] and w [D], got x ", x.sizes(), " and w ", w.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat,
              "llava_cpu::rms_norm: fp32 only, got ", x.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "llava_cpu::rms_norm: CPU tensors only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "llava_cpu::rms_norm: contiguous x and w only");
  at::Tensor y = at::empty_like(x);
  const int64_t D = w.size(0), rows = D ? x.numel() / D : 0;
  const float *X = x.data_ptr<float>(), *W = w.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const float e = static_cast<float>(eps);
  // ~64k floats a task: a decode step's few rows run on the calling thread, a prefill's are split.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(D, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) row(X + i * D, W, Y + i * D, D, e);
  });
  return y;
}

}  // namespace llava_cpu

TORCH_LIBRARY_FRAGMENT(llava_cpu, m) { m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor"); }

TORCH_LIBRARY_IMPL(llava_cpu, CPU, m) { m.impl("rms_norm", llava_cpu::rms_norm); }
