// y[M, N] = x[M, K] · w[N, K]ᵀ in fp32 for few rows M (CPU decoding): the weights stream from DRAM once.
//
// Built on first use by llava_kernels/_cpu.py (torch.utils.cpp_extension.load, -mavx2 -mfma); the reference
// and the reasons for this kernel are in llava_kernels/small_gemm.py. Registers torch.ops.llava_cpu.small_gemm.
//
// Layout of the work: the N weight rows in blocks of 4, taken in chunks by the threads of torch's intra-op pool
// (at::parallel_for); every x row is multiplied with a 4-row block while that block is in L1/L2, so the
// weights are read from memory once whatever M is. A decode step is memory-bound: while a block is summed, its
// first pass over x also prefetches the next block (two cache lines per 128 bytes consumed), since the hardware
// prefetchers lose track of four interleaved 3 KB streams. On the 2-core development machine, over the 438 MB
// of the bench model's decoder, this reads at 1.01× a plain `sum` over the same bytes (median of 12
// interleaved rounds; 0.88× without the prefetch); oneDNN's matmul ~0.8× and MKL's ~0.5×.
//
// Every output element is summed in the same order whatever M is and whichever x rows share a pass: eight
// lane-wise partial sums over k = 0, 8, 16, … (one FMA chain per lane), a fixed horizontal add, then the
// k tail in order. So a sequence's row does not depend on what else is in the batch (engine batch
// invariance) and the M = 1 and M = 2 paths agree bit for bit.
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

using llava_cpu::dot;
using llava_cpu::finish;


// Prefetch the two cache lines of the next 4-row block (`next`, 16·K bytes) that match step k of a pass over
// this block (128 bytes consumed per step): the whole next block arrives while this one is summed. A prefetch
// never faults, but `next` is null at the end of a thread's range so that no bytes beyond it are fetched.
inline void prefetch_step(const char* next, int64_t k) {
  if (next != nullptr) {
    _mm_prefetch(next + k * 16, _MM_HINT_T0);
    _mm_prefetch(next + k * 16 + 64, _MM_HINT_T0);
  }
}

// Four weight rows against one x row: four FMA chains in registers (the accumulators are named, not an
// array: GCC kept an array on the stack and stored it every iteration, at half the bandwidth).
inline void one_x4(const float* x, const float* w, int64_t K, float* y, const char* next) {
  const float *w1 = w + K, *w2 = w1 + K, *w3 = w2 + K;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    prefetch_step(next, k);
    const __m256 xv = _mm256_loadu_ps(x + k);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), xv, a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + k), xv, a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + k), xv, a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + k), xv, a3);
  }
  y[0] = finish(a0, w, x, k, K);
  y[1] = finish(a1, w1, x, k, K);
  y[2] = finish(a2, w2, x, k, K);
  y[3] = finish(a3, w3, x, k, K);
}

// Four weight rows against two x rows: each weight load feeds two FMAs; per element the order of one_x4.
inline void two_x4(const float* x0, const float* x1, const float* w, int64_t K, float* y0, float* y1,
                   const char* next) {
  const float *w1 = w + K, *w2 = w1 + K, *w3 = w2 + K;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    prefetch_step(next, k);
    const __m256 xa = _mm256_loadu_ps(x0 + k), xb = _mm256_loadu_ps(x1 + k);
    __m256 t = _mm256_loadu_ps(w + k);
    a0 = _mm256_fmadd_ps(t, xa, a0);
    b0 = _mm256_fmadd_ps(t, xb, b0);
    t = _mm256_loadu_ps(w1 + k);
    a1 = _mm256_fmadd_ps(t, xa, a1);
    b1 = _mm256_fmadd_ps(t, xb, b1);
    t = _mm256_loadu_ps(w2 + k);
    a2 = _mm256_fmadd_ps(t, xa, a2);
    b2 = _mm256_fmadd_ps(t, xb, b2);
    t = _mm256_loadu_ps(w3 + k);
    a3 = _mm256_fmadd_ps(t, xa, a3);
    b3 = _mm256_fmadd_ps(t, xb, b3);
  }
  y0[0] = finish(a0, w, x0, k, K);
  y0[1] = finish(a1, w1, x0, k, K);
  y0[2] = finish(a2, w2, x0, k, K);
  y0[3] = finish(a3, w3, x0, k, K);
  y1[0] = finish(b0, w, x1, k, K);
  y1[1] = finish(b1, w1, x1, k, K);
  y1[2] = finish(b2, w2, x1, k, K);
  y1[3] = finish(b3, w3, x1, k, K);
}

// Every x row against one 4-row block of weights, which stays in L1/L2 between the x rows; the first pass
// prefetches the next block (`next`, or null).
inline void block4(const float* X, int64_t M, const float* w, int64_t K, float* Y, int64_t N, const float* next) {
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) {
    two_x4(X + m * K, X + (m + 1) * K, w, K, Y + m * N, Y + (m + 1) * N, reinterpret_cast<const char*>(next));
    next = nullptr;
  }
  if (m < M) one_x4(X + m * K, w, K, Y + m * N, reinterpret_cast<const char*>(next));
}

}  // namespace

namespace llava_cpu {

at::Tensor small_gemm(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "llava_cpu::small_gemm: x [M, K] and w [N, K], got x ",
              x.sizes(), " and w ", w.sizes());
  TORCH_CHECK(x.size(1) == w.size(1), "llava_cpu::small_gemm: K differs: x ", x.sizes(), ", w ", w.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat,
              "llava_cpu::small_gemm: fp32 only, got ", x.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "llava_cpu::small_gemm: CPU tensors only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "llava_cpu::small_gemm: contiguous x and w only");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const float* X = x.data_ptr<float>();
  const float* W = w.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const int64_t blocks = N / 4;
  // The threads take chunks of 32 blocks (128 rows) from a shared counter rather than one fixed half each: on a
  // shared machine one core is often slowed for a while, and a static split waits for it (all 49 matrices of
  // the bench model: 0.96× a plain sum's read rate split in halves, 0.99× in chunks, median of 10 interleaved
  // rounds). Which thread sums a block changes nothing in its result. 16 blocks (64 rows × K floats) at least
  // per thread: a task of less than ~50 KB costs more to hand out than it saves.
  constexpr int64_t chunk = 32;
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (blocks + 15) / 16);
  at::parallel_for(0, std::max<int64_t>(threads, 1), 1, [&](int64_t, int64_t) {
    for (int64_t begin = next.fetch_add(chunk); begin < blocks; begin = next.fetch_add(chunk)) {
      const int64_t end = std::min(blocks, begin + chunk);
      for (int64_t b = begin; b < end; ++b)
        block4(X, M, W + b * 4 * K, K, Y + b * 4, N, b + 1 < end ? W + (b + 1) * 4 * K : nullptr);
    }
  });
  for (int64_t n = blocks * 4; n < N; ++n)
    for (int64_t m = 0; m < M; ++m) Y[m * N + n] = dot(W + n * K, X + m * K, K);  // one_x4's order
  return y;
}

}  // namespace llava_cpu

TORCH_LIBRARY_FRAGMENT(llava_cpu, m) { m.def("small_gemm(Tensor x, Tensor w) -> Tensor"); }

TORCH_LIBRARY_IMPL(llava_cpu, CPU, m) { m.impl("small_gemm", llava_cpu::small_gemm); }
