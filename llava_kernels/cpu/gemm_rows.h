// The few-row GEMM both small_gemm.cpp (fp32 weights) and small_gemm_int8.cpp (int8 weights, one scale a row)
// run: y[M, N] = x[M, K] · w[N, K]ᵀ (· scale[N]), x fp32, weights of type T read once whatever M is.
//
// Layout: the N weight rows in blocks of 4; torch's intra-op threads take chunks of 32 blocks (128 rows) from a
// shared counter (a core slowed by a neighbour does not hold the other: 0.96× → 0.99× a plain sum's read rate
// over the bench model's matrices, median of 10 interleaved rounds); every x row is multiplied with a block
// while it is in L1/L2, and the first pass over a block prefetches the next one (the hardware prefetchers lose
// track of four interleaved streams: 0.88× → 1.01×, median of 12).
//
// Order of every output element, whatever M is and whichever x rows share a pass: eight lane-wise partial sums
// over k = 0, 8, 16, … (one FMA chain per lane, the weight widened to fp32 first when it is int8: exact for
// |q| ≤ 127), a fixed horizontal add, the k tail in order, then the row's scale if there is one. So a sequence's
// row does not depend on what else is in the batch (engine batch invariance).
#pragma once

#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "simd.h"

namespace llava_cpu::rows {

inline __m256 load8(const float* w) { return _mm256_loadu_ps(w); }
inline __m256 load8(const int8_t* q) {  // 8 int8 → 8 fp32, exactly
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
}
inline float at(const float* w, int64_t k) { return w[k]; }
inline float at(const int8_t* q, int64_t k) { return static_cast<float>(q[k]); }

// A dot product's end: the lane sums, the tail [k, K) in order, the row's scale (none: nullptr).
template <typename T>
inline float finish(__m256 acc, const T* w, const float* x, int64_t k, int64_t K, const float* scale) {
  float s = hsum(acc);
  for (; k < K; ++k) s += at(w, k) * x[k];
  return scale == nullptr ? s : s * *scale;
}

// At step k of a pass over a 4-row block (4 · 8 weights of T consumed a step), prefetch the cache lines of the
// next block (`next`, null at the end of a chunk) that start in the same window: the whole next block arrives
// while this one is summed. A prefetch never faults; null keeps it from fetching past the chunk.
template <typename T>
inline void prefetch_step(const char* next, int64_t k) {
  if (next == nullptr) return;
  if constexpr (sizeof(T) == 4) {  // 128 bytes a step: two lines (k is a multiple of 8)
    _mm_prefetch(next + k * 16, _MM_HINT_T0);
    _mm_prefetch(next + k * 16 + 64, _MM_HINT_T0);
  } else {                          // 32 bytes a step: a line every other step
    static_assert(sizeof(T) == 1, "fp32 or int8 weights");
    if ((k & 15) == 0) _mm_prefetch(next + k * 4, _MM_HINT_T0);
  }
}

// Four weight rows against one x row: four FMA chains in registers (named accumulators, not an array: GCC kept
// an array on the stack and stored it every iteration, at half the bandwidth).
template <typename T>
inline void one_x4(const float* x, const T* w, int64_t K, float* y, const float* scale, const char* next) {
  const T *w1 = w + K, *w2 = w1 + K, *w3 = w2 + K;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    prefetch_step<T>(next, k);
    const __m256 xv = _mm256_loadu_ps(x + k);
    a0 = _mm256_fmadd_ps(load8(w + k), xv, a0);
    a1 = _mm256_fmadd_ps(load8(w1 + k), xv, a1);
    a2 = _mm256_fmadd_ps(load8(w2 + k), xv, a2);
    a3 = _mm256_fmadd_ps(load8(w3 + k), xv, a3);
  }
  const bool s = scale != nullptr;
  y[0] = finish(a0, w, x, k, K, scale);
  y[1] = finish(a1, w1, x, k, K, s ? scale + 1 : nullptr);
  y[2] = finish(a2, w2, x, k, K, s ? scale + 2 : nullptr);
  y[3] = finish(a3, w3, x, k, K, s ? scale + 3 : nullptr);
}

// Four weight rows against two x rows: each weight load feeds two FMAs; per element the order of one_x4.
template <typename T>
inline void two_x4(const float* x0, const float* x1, const T* w, int64_t K, float* y0, float* y1, const float* scale,
                   const char* next) {
  const T *w1 = w + K, *w2 = w1 + K, *w3 = w2 + K;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    prefetch_step<T>(next, k);
    const __m256 xa = _mm256_loadu_ps(x0 + k), xb = _mm256_loadu_ps(x1 + k);
    __m256 t = load8(w + k);
    a0 = _mm256_fmadd_ps(t, xa, a0);
    b0 = _mm256_fmadd_ps(t, xb, b0);
    t = load8(w1 + k);
    a1 = _mm256_fmadd_ps(t, xa, a1);
    b1 = _mm256_fmadd_ps(t, xb, b1);
    t = load8(w2 + k);
    a2 = _mm256_fmadd_ps(t, xa, a2);
    b2 = _mm256_fmadd_ps(t, xb, b2);
    t = load8(w3 + k);
    a3 = _mm256_fmadd_ps(t, xa, a3);
    b3 = _mm256_fmadd_ps(t, xb, b3);
  }
  const bool s = scale != nullptr;
  y0[0] = finish(a0, w, x0, k, K, scale);
  y0[1] = finish(a1, w1, x0, k, K, s ? scale + 1 : nullptr);
  y0[2] = finish(a2, w2, x0, k, K, s ? scale + 2 : nullptr);
  y0[3] = finish(a3, w3, x0, k, K, s ? scale + 3 : nullptr);
  y1[0] = finish(b0, w, x1, k, K, scale);
  y1[1] = finish(b1, w1, x1, k, K, s ? scale + 1 : nullptr);
  y1[2] = finish(b2, w2, x1, k, K, s ? scale + 2 : nullptr);
  y1[3] = finish(b3, w3, x1, k, K, s ? scale + 3 : nullptr);
}

// Every x row against one 4-row block, which stays in L1/L2 between the x rows; the first pass prefetches `next`.
template <typename T>
inline void block4(const float* X, int64_t M, const T* w, int64_t K, float* Y, int64_t N, const float* scale,
                   const T* next) {
  const char* pf = reinterpret_cast<const char*>(next);
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) {
    two_x4(X + m * K, X + (m + 1) * K, w, K, Y + m * N, Y + (m + 1) * N, scale, pf);
    pf = nullptr;
  }
  if (m < M) one_x4(X + m * K, w, K, Y + m * N, scale, pf);
}

// Y[M, N] = X[M, K] · W[N, K]ᵀ (· S[N] when S is not null).
template <typename T>
void gemm(const float* X, int64_t M, const T* W, int64_t K, float* Y, int64_t N, const float* S) {
  const int64_t blocks = N / 4;
  constexpr int64_t chunk = 32;
  std::atomic<int64_t> next{0};
  // 16 blocks (64 rows × K weights) at least per thread: a smaller task costs more to hand out than it saves
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (blocks + 15) / 16);
  at::parallel_for(0, std::max<int64_t>(threads, 1), 1, [&](int64_t, int64_t) {
    for (int64_t begin = next.fetch_add(chunk); begin < blocks; begin = next.fetch_add(chunk)) {
      const int64_t end = std::min(blocks, begin + chunk);
      for (int64_t b = begin; b < end; ++b)
        block4(X, M, W + b * 4 * K, K, Y + b * 4, N, S == nullptr ? nullptr : S + b * 4,
               b + 1 < end ? W + (b + 1) * 4 * K : nullptr);
    }
  });
  for (int64_t n = blocks * 4; n < N; ++n)  // the last N % 4 rows, one at a time in one_x4's order
    for (int64_t m = 0; m < M; ++m) {
      __m256 acc = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k + 8 <= K; k += 8) acc = _mm256_fmadd_ps(load8(W + n * K + k), _mm256_loadu_ps(X + m * K + k), acc);
      Y[m * N + n] = finish(acc, W + n * K, X + m * K, k, K, S == nullptr ? nullptr : S + n);
    }
}

}  // namespace llava_cpu::rows
