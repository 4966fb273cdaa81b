// y[M, N] = (x[M, K] · q[N, K]ᵀ) · scale[N] for int8 weights q with one fp32 scale per output row (symmetric
// weight-only int8, torchao's Int8WeightOnlyConfig with PerRow), fp32 activations, few rows M (CPU decoding).
//
// Built with the other CPU ops by llava_kernels/_cpu.py; the reference and the reasons are in
// llava_kernels/small_gemm_int8.py. Registers torch.ops.llava_cpu.small_gemm_int8.
//
// small_gemm.cpp's layout with a quarter of the bytes: 4-row blocks taken in chunks by torch's threads, the next
// block prefetched during the first pass, every x row summed against a block while it is in L1/L2. Each 8 int8
// weights are widened to fp32 in registers (exact: |q| ≤ 127) and multiplied into eight lane-wise partial sums
// over k = 0, 8, 16, …; a fixed horizontal add, the k tail in order, then one multiply by the row's scale.
// Whatever M is, an output element is summed the same way (a row does not depend on its batch).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>

#include "ops.h"
#include "simd.h"

namespace {

inline __m256 widen(const int8_t* q) {  // 8 int8 → 8 fp32, exactly
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
}

inline float finish_q(__m256 acc, const int8_t* q, const float* x, int64_t k, int64_t K) {
  float s = llava_cpu::hsum(acc);
  for (; k < K; ++k) s += static_cast<float>(q[k]) * x[k];
  return s;
}

inline void prefetch_step(const char* next, int64_t k) {  // 4 rows × 8 bytes consumed per step: 1 line / 2 steps
  if (next != nullptr && (k & 15) == 0) _mm_prefetch(next + k * 4, _MM_HINT_T0);
}

// Four int8 weight rows against one x row.
inline void one_x4(const float* x, const int8_t* q, int64_t K, float* y, const float* scale, const char* next) {
  const int8_t *q1 = q + K, *q2 = q1 + K, *q3 = q2 + K;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    prefetch_step(next, k);
    const __m256 xv = _mm256_loadu_ps(x + k);
    a0 = _mm256_fmadd_ps(widen(q + k), xv, a0);
    a1 = _mm256_fmadd_ps(widen(q1 + k), xv, a1);
    a2 = _mm256_fmadd_ps(widen(q2 + k), xv, a2);
    a3 = _mm256_fmadd_ps(widen(q3 + k), xv, a3);
  }
  y[0] = finish_q(a0, q, x, k, K) * scale[0];
  y[1] = finish_q(a1, q1, x, k, K) * scale[1];
  y[2] = finish_q(a2, q2, x, k, K) * scale[2];
  y[3] = finish_q(a3, q3, x, k, K) * scale[3];
}

// Four int8 weight rows against two x rows: each widened weight feeds two FMAs; per element one_x4's order.
inline void two_x4(const float* x0, const float* x1, const int8_t* q, int64_t K, float* y0, float* y1,
                   const float* scale, const char* next) {
  const int8_t *q1 = q + K, *q2 = q1 + K, *q3 = q2 + K;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    prefetch_step(next, k);
    const __m256 xa = _mm256_loadu_ps(x0 + k), xb = _mm256_loadu_ps(x1 + k);
    __m256 t = widen(q + k);
    a0 = _mm256_fmadd_ps(t, xa, a0);
    b0 = _mm256_fmadd_ps(t, xb, b0);
    t = widen(q1 + k);
    a1 = _mm256_fmadd_ps(t, xa, a1);
    b1 = _mm256_fmadd_ps(t, xb, b1);
    t = widen(q2 + k);
    a2 = _mm256_fmadd_ps(t, xa, a2);
    b2 = _mm256_fmadd_ps(t, xb, b2);
    t = widen(q3 + k);
    a3 = _mm256_fmadd_ps(t, xa, a3);
    b3 = _mm256_fmadd_ps(t, xb, b3);
  }
  y0[0] = finish_q(a0, q, x0, k, K) * scale[0];
  y0[1] = finish_q(a1, q1, x0, k, K) * scale[1];
  y0[2] = finish_q(a2, q2, x0, k, K) * scale[2];
  y0[3] = finish_q(a3, q3, x0, k, K) * scale[3];
  y1[0] = finish_q(b0, q, x1, k, K) * scale[0];
  y1[1] = finish_q(b1, q1, x1, k, K) * scale[1];
  y1[2] = finish_q(b2, q2, x1, k, K) * scale[2];
  y1[3] = finish_q(b3, q3, x1, k, K) * scale[3];
}

inline void block4(const float* X, int64_t M, const int8_t* q, int64_t K, float* Y, int64_t N, const float* scale,
                   const int8_t* next) {
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) {
    two_x4(X + m * K, X + (m + 1) * K, q, K, Y + m * N, Y + (m + 1) * N, scale, reinterpret_cast<const char*>(next));
    next = nullptr;
  }
  if (m < M) one_x4(X + m * K, q, K, Y + m * N, scale, reinterpret_cast<const char*>(next));
}

}  // namespace

namespace llava_cpu {

at::Tensor small_gemm_int8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && scale.dim() == 1, "llava_cpu::small_gemm_int8: x [M, K], q [N, K] ",
              "and scale [N], got ", x.sizes(), ", ", q.sizes(), " and ", scale.sizes());
  TORCH_CHECK(x.size(1) == q.size(1) && scale.size(0) == q.size(0), "llava_cpu::small_gemm_int8: shapes differ: x ",
              x.sizes(), ", q ", q.sizes(), ", scale ", scale.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && q.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat,
              "llava_cpu::small_gemm_int8: fp32 x, int8 q and fp32 scale, got ", x.scalar_type(), ", ",
              q.scalar_type(), " and ", scale.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && q.device().is_cpu() && scale.device().is_cpu(),
              "llava_cpu::small_gemm_int8: CPU tensors only");
  TORCH_CHECK(x.is_contiguous() && q.is_contiguous() && scale.is_contiguous(),
              "llava_cpu::small_gemm_int8: contiguous x, q and scale only");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const float* X = x.data_ptr<float>();
  const int8_t* Q = q.data_ptr<int8_t>();
  const float* S = scale.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const int64_t blocks = N / 4;
  constexpr int64_t chunk = 32;  // as small_gemm: chunks from a shared counter, 16 blocks a thread at least
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (blocks + 15) / 16);
  at::parallel_for(0, std::max<int64_t>(threads, 1), 1, [&](int64_t, int64_t) {
    for (int64_t begin = next.fetch_add(chunk); begin < blocks; begin = next.fetch_add(chunk)) {
      const int64_t end = std::min(blocks, begin + chunk);
      for (int64_t b = begin; b < end; ++b)
        block4(X, M, Q + b * 4 * K, K, Y + b * 4, N, S + b * 4, b + 1 < end ? Q + (b + 1) * 4 * K : nullptr);
    }
  });
  for (int64_t n = blocks * 4; n < N; ++n)  // one_x4's order, one row at a time
    for (int64_t m = 0; m < M; ++m) {
      __m256 acc = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k + 8 <= K; k += 8) acc = _mm256_fmadd_ps(widen(Q + n * K + k), _mm256_loadu_ps(X + m * K + k), acc);
      Y[m * N + n] = finish_q(acc, Q + n * K, X + m * K, k, K) * S[n];
    }
  return y;
}

}  // namespace llava_cpu

TORCH_LIBRARY_FRAGMENT(llava_cpu, m) { m.def("small_gemm_int8(Tensor x, Tensor q, Tensor scale) -> Tensor"); }

TORCH_LIBRARY_IMPL(llava_cpu, CPU, m) { m.impl("small_gemm_int8", llava_cpu::small_gemm_int8); }
