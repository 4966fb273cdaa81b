// Paged decode attention on the CPU, reading the cache in place through the block table (fp32):
//   out[b, h] = softmax(scale · q[b, h] · K[b]ᵀ) · V[b] over positions p < seq_lens[b],
//   K[b][p] = k_cache[block_table[b, p / Bs], p % Bs, h / R]   (V likewise; R = H / Hkv).
//
// Built with the other CPU ops by llava_kernels/_cpu.py; the contract, the reference and the reasons are in
// llava_kernels/paged_decode.py. Registers torch.ops.llava_cpu.paged_decode.
//
// One task per (sequence, KV head) on torch's intra-op threads: the R query heads of the KV head score the
// cached rows eight positions at a time (eight FMA chains, one horizontal reduction for all eight), an exact
// two-pass softmax over the scores (max, then a vectorised exp and sum in fp32), and the weighted sum of the V
// rows with 32 output floats in registers per pass. Each output depends only on its own sequence's rows, in
// a fixed order: a sequence's result does not depend on the batch. One 12-head, 64-dim, 128-token sequence on
// the 2-core development machine: 25 µs on one thread, 15 µs on two (scalar dot products with one std::exp
// per score, the kernel before this layout: 53 and 30 µs).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <immintrin.h>
#include <vector>

#include "ops.h"
#include "simd.h"

namespace {

// e^x for x ≤ 0 (softmax exponents), eight lanes: Cephes' expf (the split x = n·ln2 + r with ln2 in two parts,
// |r| ≤ ln2/2, a degree-5 polynomial; ~1 ulp, the tests hold it to fp64 truth). Below -87.3 (e^x would be a
// denormal) and for -inf it is 0; e^0 is exactly 1.
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(two_n)));
}

// [Σ lanes of a0, …, Σ lanes of a7] in one vector, in a fixed order (pairs, then quads, then the halves).
inline __m256 hsum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6, __m256 a7) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// scale · (q · k_j) for the eight rows k[0..7] of one group of positions, as one vector.
inline __m256 scores8(const float* q, const float* const* k, int64_t Dh, float scale) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  int64_t d = 0;
  for (; d + 8 <= Dh; d += 8) {
    const __m256 qv = _mm256_loadu_ps(q + d);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(k[0] + d), qv, a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(k[1] + d), qv, a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(k[2] + d), qv, a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(k[3] + d), qv, a3);
    a4 = _mm256_fmadd_ps(_mm256_loadu_ps(k[4] + d), qv, a4);
    a5 = _mm256_fmadd_ps(_mm256_loadu_ps(k[5] + d), qv, a5);
    a6 = _mm256_fmadd_ps(_mm256_loadu_ps(k[6] + d), qv, a6);
    a7 = _mm256_fmadd_ps(_mm256_loadu_ps(k[7] + d), qv, a7);
  }
  __m256 s = hsum8(a0, a1, a2, a3, a4, a5, a6, a7);
  if (d < Dh) {  // the head dim's tail, in order, after the vector part
    alignas(32) float t[8];
    _mm256_store_ps(t, s);
    for (int j = 0; j < 8; ++j)
      for (int64_t e = d; e < Dh; ++e) t[j] += q[e] * k[j][e];
    s = _mm256_load_ps(t);
  }
  return _mm256_mul_ps(s, _mm256_set1_ps(scale));
}

// o[0, Dh) = Σ_p w[p] · v[p][0, Dh) over p < len: 32 floats of o in registers per pass over the rows.
inline void weighted_rows(const float* w, const float* const* v, int64_t len, int64_t Dh, float* o) {
  int64_t d = 0;
  for (; d + 32 <= Dh; d += 32) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t p = 0; p < len; ++p) {
      const __m256 wp = _mm256_set1_ps(w[p]);
      const float* x = v[p] + d;
      a0 = _mm256_fmadd_ps(wp, _mm256_loadu_ps(x), a0);
      a1 = _mm256_fmadd_ps(wp, _mm256_loadu_ps(x + 8), a1);
      a2 = _mm256_fmadd_ps(wp, _mm256_loadu_ps(x + 16), a2);
      a3 = _mm256_fmadd_ps(wp, _mm256_loadu_ps(x + 24), a3);
    }
    _mm256_storeu_ps(o + d, a0);
    _mm256_storeu_ps(o + d + 8, a1);
    _mm256_storeu_ps(o + d + 16, a2);
    _mm256_storeu_ps(o + d + 24, a3);
  }
  for (; d + 8 <= Dh; d += 8) {
    __m256 a = _mm256_setzero_ps();
    for (int64_t p = 0; p < len; ++p) a = _mm256_fmadd_ps(_mm256_set1_ps(w[p]), _mm256_loadu_ps(v[p] + d), a);
    _mm256_storeu_ps(o + d, a);
  }
  for (; d < Dh; ++d) {
    float a = 0.0f;
    for (int64_t p = 0; p < len; ++p) a += w[p] * v[p][d];
    o[d] = a;
  }
}

void run(const float* Q, const float* Kc, const float* Vc, const int64_t* table, const int64_t* lens, float* O, int64_t B,
         int64_t H, int64_t Hkv, int64_t Dh, int64_t Bs, int64_t nb, int64_t NB, float scale) {
  const int64_t R = H / Hkv, row = Hkv * Dh;  // row: one cached token's floats of all KV heads
  int64_t ctx = nb * Bs;
  // ~32k multiply-adds a task at least before a second thread is woken (batch 1, short contexts: inline).
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(ctx * Dh * R, 1));
  at::parallel_for(0, B * Hkv, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;                  // [R, len rounded up to 8]
    std::vector<const float*> krow, vrow;       // the cached rows of this KV head, by position
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / Hkv, g = t % Hkv;
      const int64_t len = lens[b];
      TORCH_CHECK(len >= 1 && len <= ctx, "llava_cpu::paged_decode: seq_lens[", b, "] = ", len,
                  " is outside [1, nb·Bs = ", ctx, "]");
      const int64_t len8 = (len + 7) / 8 * 8;
      krow.resize(len8);
      vrow.resize(len);
      for (int64_t p = 0; p < len; ++p) {
        const int64_t blk = table[b * nb + p / Bs];
        TORCH_CHECK(blk >= 0 && blk < NB, "llava_cpu::paged_decode: block_table[", b, ", ", p / Bs, "] = ", blk,
                    " is outside the cache's ", NB, " blocks");
        const int64_t at = (blk * Bs + p % Bs) * row + g * Dh;
        krow[p] = Kc + at;
        vrow[p] = Vc + at;
      }
      for (int64_t p = len; p < len8; ++p) krow[p] = krow[0];  // a group's spare lanes read a real row, then -inf
      scores.resize(R * len8);
      const float* q = Q + (b * H + g * R) * Dh;
      float* o = O + (b * H + g * R) * Dh;
      for (int64_t p = 0; p < len8; p += 8)  // scores [R, len8]
        for (int64_t r = 0; r < R; ++r)
          _mm256_storeu_ps(scores.data() + r * len8 + p, scores8(q + r * Dh, krow.data() + p, Dh, scale));
      for (int64_t r = 0; r < R; ++r) {  // exact softmax weights, normalised before V, eight lanes at a time
        float* s = scores.data() + r * len8;
        std::fill(s + len, s + len8, -INFINITY);
        __m256 mv = _mm256_loadu_ps(s);
        for (int64_t p = 8; p < len8; p += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + p));
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, mv);
        const __m256 m = _mm256_set1_ps(*std::max_element(lanes, lanes + 8));
        __m256 sum = _mm256_setzero_ps();
        for (int64_t p = 0; p < len8; p += 8) {
          const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + p), m));
          _mm256_storeu_ps(s + p, e);
          sum = _mm256_add_ps(sum, e);
        }
        const __m256 inv = _mm256_set1_ps(1.0f / llava_cpu::hsum(sum));
        for (int64_t p = 0; p < len8; p += 8) _mm256_storeu_ps(s + p, _mm256_mul_ps(_mm256_loadu_ps(s + p), inv));
        weighted_rows(s, vrow.data(), len, Dh, o + r * Dh);
      }
    }
  });
}

}  // namespace

namespace llava_cpu {

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_table, const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "llava_cpu::paged_decode: q [B, H, Dh] and k/v caches [NB, Bs, Hkv, Dh], got ", q.sizes(), ", ",
              k_cache.sizes(), ", ", v_cache.sizes());
  const int64_t B = q.size(0), H = q.size(1), Dh = q.size(2);
  const int64_t NB = k_cache.size(0), Bs = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == Dh && Hkv > 0 && H % Hkv == 0, "llava_cpu::paged_decode: q ", q.sizes(),
              " does not fit the cache ", k_cache.sizes());
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == B && seq_lens.dim() == 1 && seq_lens.size(0) == B,
              "llava_cpu::paged_decode: block_table [B, nb] and seq_lens [B], got ", block_table.sizes(), ", ",
              seq_lens.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat &&
                  v_cache.scalar_type() == at::kFloat, "llava_cpu::paged_decode: fp32 q and caches only");
  TORCH_CHECK((block_table.scalar_type() == at::kInt || block_table.scalar_type() == at::kLong) &&
                  (seq_lens.scalar_type() == at::kInt || seq_lens.scalar_type() == at::kLong),
              "llava_cpu::paged_decode: block_table and seq_lens must be int32 or int64");
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu() &&
                  block_table.device().is_cpu() && seq_lens.device().is_cpu(),
              "llava_cpu::paged_decode: CPU tensors only");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "llava_cpu::paged_decode: contiguous q and caches only");
  const at::Tensor table = block_table.to(at::kLong).contiguous(), lens = seq_lens.to(at::kLong).contiguous();
  at::Tensor out = at::empty({B, H, Dh}, q.options());
  const int64_t nb = block_table.size(1);
  if (B == 0 || H == 0) return out;
  run(q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), table.data_ptr<int64_t>(),
      lens.data_ptr<int64_t>(), out.data_ptr<float>(), B, H, Hkv, Dh, Bs, nb, NB, static_cast<float>(scale));
  return out;
}

}  // namespace llava_cpu

TORCH_LIBRARY_FRAGMENT(llava_cpu, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seq_lens, float scale) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(llava_cpu, CPU, m) { m.impl("paged_decode", llava_cpu::paged_decode); }
