// The AVX2 reductions our CPU ops share: one fixed summation order, so every op that sums through here gives
// a row the same bits whatever else is in its batch.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace llava_cpu {

// The eight lanes of v in a fixed order: (lo + hi), then pairwise.
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

// A dot product's end: the lane sums of acc (the products of a, b over [0, k) in eight partial sums), then
// the tail [k, n) in order.
inline float finish(__m256 acc, const float* a, const float* b, int64_t k, int64_t n) {
  float s = hsum(acc);
  for (; k < n; ++k) s += a[k] * b[k];
  return s;
}

// a · b over n floats: eight lane-wise FMA partial sums over k = 0, 8, 16, …, then finish.
inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc);
  return finish(acc, a, b, k, n);
}

}  // namespace llava_cpu
