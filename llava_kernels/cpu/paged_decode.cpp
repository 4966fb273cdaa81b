// Paged decode attention on the CPU, reading the cache in place through the block table (fp32):
//   out[b, h] = softmax(scale · q[b, h] · K[b]ᵀ) · V[b] over positions p < seq_lens[b],
//   K[b][p] = k_cache[block_table[b, p / Bs], p % Bs, h / R]   (V likewise; R = H / Hkv).
//
// Built with the other CPU ops by llava_kernels/_cpu.py; the contract, the reference and the reasons are in
// llava_kernels/paged_decode.py. Registers torch.ops.llava_cpu.paged_decode.
//
// One task per (sequence, KV head) on torch's intra-op threads: the R query heads of the KV head score every
// cached row (one read of K), an exact two-pass softmax over the scores (max, then exp and sum in fp32), and
// one read of V accumulates the R outputs. Each output depends only on its own sequence's rows, in a fixed
// order: a sequence's result does not depend on the batch.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <immintrin.h>
#include <vector>

#include "simd.h"

namespace {

using llava_cpu::dot;

inline void axpy(float a, const float* x, float* y, int64_t n) {  // y += a · x
  const __m256 av = _mm256_set1_ps(a);
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) _mm256_storeu_ps(y + k, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + k), _mm256_loadu_ps(y + k)));
  for (; k < n; ++k) y[k] += a * x[k];
}

void run(const float* Q, const float* Kc, const float* Vc, const int64_t* table, const int64_t* lens, float* O, int64_t B,
         int64_t H, int64_t Hkv, int64_t Dh, int64_t Bs, int64_t nb, int64_t NB, float scale) {
  const int64_t R = H / Hkv, row = Hkv * Dh;  // row: one cached token's floats of all KV heads
  int64_t ctx = nb * Bs;
  // ~32k multiply-adds a task at least before a second thread is woken (batch 1, short contexts: inline).
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(ctx * Dh * R, 1));
  at::parallel_for(0, B * Hkv, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / Hkv, g = t % Hkv;
      const int64_t len = lens[b];
      TORCH_CHECK(len >= 1 && len <= ctx, "llava_cpu::paged_decode: seq_lens[", b, "] = ", len,
                  " is outside [1, nb·Bs = ", ctx, "]");
      scores.assign(R * len, 0.0f);
      const float* q = Q + (b * H + g * R) * Dh;
      float* o = O + (b * H + g * R) * Dh;
      for (int64_t p = 0; p < len; ++p) {  // scores [R, len]
        const int64_t blk = table[b * nb + p / Bs];
        TORCH_CHECK(blk >= 0 && blk < NB, "llava_cpu::paged_decode: block_table[", b, ", ", p / Bs, "] = ", blk,
                    " is outside the cache's ", NB, " blocks");
        const float* k = Kc + (blk * Bs + p % Bs) * row + g * Dh;
        for (int64_t r = 0; r < R; ++r) scores[r * len + p] = scale * dot(q + r * Dh, k, Dh);
      }
      for (int64_t r = 0; r < R; ++r) {  // exact softmax weights, normalised before V
        float* s = scores.data() + r * len;
        const float m = *std::max_element(s, s + len);
        float sum = 0.0f;
        for (int64_t p = 0; p < len; ++p) sum += (s[p] = std::exp(s[p] - m));
        const float inv = 1.0f / sum;
        for (int64_t p = 0; p < len; ++p) s[p] *= inv;
        std::fill(o + r * Dh, o + (r + 1) * Dh, 0.0f);
      }
      for (int64_t p = 0; p < len; ++p) {
        const float* v = Vc + (table[b * nb + p / Bs] * Bs + p % Bs) * row + g * Dh;
        for (int64_t r = 0; r < R; ++r) axpy(scores[r * len + p], v, o + r * Dh, Dh);
      }
    }
  });
}

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

}  // namespace

TORCH_LIBRARY_FRAGMENT(llava_cpu, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seq_lens, float scale) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(llava_cpu, CPU, m) { m.impl("paged_decode", paged_decode); }
