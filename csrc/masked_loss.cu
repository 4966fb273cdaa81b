// Masked LM loss kernels: per-row cross-entropy over one chunk of logits (online log-sum-exp, loss, and
// the softmax-minus-onehot gradient written in place), and the deterministic per-sequence reduction.
//
// Letters: T packed tokens, V vocab, R target rows in the chunk, B sequences.
// The logits chunk [R, V] comes from a cuBLAS GEMM in bindings.cpp (only target rows, compacted first);
// one 256-thread block owns a row: pass 1 keeps a running (max, sum of exp) per thread, merged across
// the block; pass 2 rewrites the row as (exp(x - lse) - [j == target]) * scale, scale = 1/num_targets,
// read from device memory so no host sync is needed. All arithmetic is fp32 whatever the logits dtype.
#include <math_constants.h>

#include <climits>

#include "common.cuh"

namespace llava {
namespace {

constexpr int CE_THREADS = 256;
constexpr int CE_WARPS = CE_THREADS / 32;
constexpr int64_t MAX_BLOCKS = 1 << 20;
constexpr int RED_THREADS = 256;

// Merge two (max, sum exp(x - max)) pairs; an empty pair is (-inf, 0).
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
  const float mx = fmaxf(m, m2);
  if (mx == -CUDART_INF_F) {
    m = mx;
    s = s + s2;  // both empty (0) unless a NaN is riding along in s
    return;
  }
  s = s * expf(m - mx) + s2 * expf(m2 - mx);
  m = mx;
}

// Add one value to a running (max, sum) pair. NaN logits poison s (expf(NaN) = NaN), so the loss shows it.
// Merge the running (max, sum-exp) pairs of a full warp; every lane ends with the warp's pair.
__device__ __forceinline__ void warp_lse_reduce(float& m, float& s) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, off);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, off);
    lse_merge(m, s, m2, s2);
  }
}

__device__ __forceinline__ void lse_add(float& m, float& s, float v) {
  if (v > m) {
    s = s * expf(m - v) + 1.0f;
    m = v;
  } else if (m != -CUDART_INF_F || v != v) {
    s += expf(v - m);
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(CE_THREADS)
    ce_chunk_kernel(T* __restrict__ logits, const int64_t* __restrict__ targets, const int64_t* __restrict__ rows,
                    const float* __restrict__ scale_ptr, float* __restrict__ token_loss, int64_t R, int64_t V,
                    int write_grad) {
  constexpr int W = kVec ? Vec<T>::N : 1;
  __shared__ float s_m[CE_WARPS], s_s[CE_WARPS];
  __shared__ float s_lse, s_xt;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const float scale = *scale_ptr;
  const float nan = CUDART_NAN_F;
  const int64_t nv = V / W;

  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    T* x = logits + r * V;
    const int64_t tgt = targets[r];
    const bool valid = tgt >= 0 && tgt < V;

    float m = -CUDART_INF_F, s = 0.0f;
    for (int64_t i = tid; i < nv; i += CE_THREADS) {
      if constexpr (kVec) {
        Pack16<T> p;
        p.raw = reinterpret_cast<const uint4*>(x)[i];
#pragma unroll
        for (int e = 0; e < W; ++e) lse_add(m, s, to_f32(p.v[e]));
      } else {
        lse_add(m, s, to_f32(x[i]));
      }
    }
    warp_lse_reduce(m, s);
    if (lane == 0) {
      s_m[warp] = m;
      s_s[warp] = s;
    }
    if (tid == 0) s_xt = valid ? to_f32(x[tgt]) : nan;  // read before any thread overwrites the row
    __syncthreads();
    if (warp == 0) {
      m = lane < CE_WARPS ? s_m[lane] : -CUDART_INF_F;
      s = lane < CE_WARPS ? s_s[lane] : 0.0f;
      warp_lse_reduce(m, s);
      if (lane == 0) {
        const float lse = m + logf(s);
        s_lse = lse;
        token_loss[rows[r]] = valid ? lse - s_xt : nan;
      }
    }
    __syncthreads();
    const float lse = s_lse;

    if (write_grad) {
      for (int64_t i = tid; i < nv; i += CE_THREADS) {
        if constexpr (kVec) {
          Pack16<T> p;
          p.raw = reinterpret_cast<const uint4*>(x)[i];
#pragma unroll
          for (int e = 0; e < W; ++e) {
            const int64_t j = i * W + e;
            float g = expf(to_f32(p.v[e]) - lse) * scale;
            if (j == tgt) g -= scale;
            p.v[e] = from_f32<T>(valid ? g : nan);
          }
          reinterpret_cast<uint4*>(x)[i] = p.raw;
        } else {
          float g = expf(to_f32(x[i]) - lse) * scale;
          if (i == tgt) g -= scale;
          x[i] = from_f32<T>(valid ? g : nan);
        }
      }
    }
    __syncthreads();  // shared scalars are reused by the next row
  }
}

// Block b < B sums sequence b; block B sums all T rows into the scaled loss. A fixed thread count and a
// fixed tree make every sum bit-reproducible.
__global__ void __launch_bounds__(RED_THREADS)
    loss_reduce_kernel(const float* __restrict__ token_loss, const int64_t* __restrict__ targets,
                       const int32_t* __restrict__ cu_seqlens, const float* __restrict__ scale_ptr,
                       float* __restrict__ loss, float* __restrict__ seq_sum, int64_t* __restrict__ seq_count,
                       int64_t T, int64_t B) {
  __shared__ float s_acc[RED_THREADS / 32];
  __shared__ long long s_cnt[RED_THREADS / 32];
  const int64_t b = blockIdx.x;
  int64_t lo = 0, hi = T;
  if (b < B) {
    lo = min(max(static_cast<int64_t>(cu_seqlens[b]), int64_t{0}), T);
    hi = min(max(static_cast<int64_t>(cu_seqlens[b + 1]), lo), T);
  }
  float acc = 0.0f;
  long long cnt = 0;
  for (int64_t t = lo + threadIdx.x; t < hi; t += RED_THREADS) {
    acc += token_loss[t];
    cnt += targets[t] != -100;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    acc += __shfl_xor_sync(0xffffffffu, acc, off);
    cnt += __shfl_xor_sync(0xffffffffu, cnt, off);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    s_acc[warp] = acc;
    s_cnt[warp] = cnt;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    acc = 0.0f;
    cnt = 0;
    for (int w = 0; w < RED_THREADS / 32; ++w) {
      acc += s_acc[w];
      cnt += s_cnt[w];
    }
    if (b < B) {
      seq_sum[b] = acc;
      seq_count[b] = cnt;
    } else {
      loss[0] = acc * (*scale_ptr);
    }
  }
}

}  // namespace
}  // namespace llava

using namespace llava;

extern "C" cudaError_t llava_ce_chunk(void* logits, const int64_t* targets, const int64_t* rows, const float* scale,
                                      float* token_loss, int64_t R, int64_t V, int dtype, int write_grad,
                                      cudaStream_t stream) {
  if (R < 0 || V <= 0 || (R > 0 && (logits == nullptr || targets == nullptr || rows == nullptr ||
                                    scale == nullptr || token_loss == nullptr)))
    return cudaErrorInvalidValue;
  if (R == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(std::min(R, MAX_BLOCKS));
  LLAVA_DISPATCH(dtype, {
    auto* x = static_cast<scalar_t*>(logits);
    // Vector loads need every row start 16-byte aligned: V * sizeof % 16 == 0 and an aligned base.
    const bool vec = V % Vec<scalar_t>::N == 0 && aligned16(logits);
    if (vec) {
      ce_chunk_kernel<scalar_t, true><<<grid, CE_THREADS, 0, stream>>>(x, targets, rows, scale, token_loss, R, V,
                                                                      write_grad);
    } else {
      ce_chunk_kernel<scalar_t, false><<<grid, CE_THREADS, 0, stream>>>(x, targets, rows, scale, token_loss, R, V,
                                                                       write_grad);
    }
  });
  return cudaGetLastError();
}

extern "C" cudaError_t llava_loss_reduce(const float* token_loss, const int64_t* targets, const int32_t* cu_seqlens,
                                         const float* scale, float* loss, float* seq_sum, int64_t* seq_count,
                                         int64_t T, int64_t B, cudaStream_t stream) {
  if (T < 0 || B < 0 || B >= INT_MAX || scale == nullptr || loss == nullptr ||
      (T > 0 && (token_loss == nullptr || targets == nullptr)) ||
      (B > 0 && (cu_seqlens == nullptr || seq_sum == nullptr || seq_count == nullptr)))
    return cudaErrorInvalidValue;
  loss_reduce_kernel<<<static_cast<unsigned>(B + 1), RED_THREADS, 0, stream>>>(token_loss, targets, cu_seqlens, scale,
                                                                              loss, seq_sum, seq_count, T, B);
  return cudaGetLastError();
}
