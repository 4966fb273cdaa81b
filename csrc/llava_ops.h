// C interface of the CUDA kernels in csrc/*.cu: raw pointers, sizes, a dtype code and a stream.
//
// The .cu files need only the CUDA runtime (no torch, no cuBLAS headers), so they compile on any
// machine with nvcc; csrc/bindings.cpp is the only torch-facing code. Every launcher validates its
// arguments (cudaErrorInvalidValue), launches on `stream` and returns cudaGetLastError(): it never
// synchronizes. All tensors are dense row-major (contiguous); int64 sizes.
//
// Letters: T packed tokens, D model width, V vocab, M image rows / GEMM rows, N GEMM columns,
// K reduction width, R compacted target rows, B sequences.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element types of the floating tensors a launcher reads and writes.
enum LlavaDtype { LLAVA_F32 = 0, LLAVA_F16 = 1, LLAVA_BF16 = 2 };

// ---- projector.cu -------------------------------------------------------------------------
// C[M,N] = act(A[M,K] @ B[N,K]^T + bias[N]) on tensor cores (WMMA, fp32 accumulate), F16/BF16 only.
// bias may be NULL. act: 0 = none, 1 = exact erf GELU. Cpre (may be NULL) receives the
// pre-activation (A @ B^T + bias), rounded to the element type. Any M, N, K >= 1.
cudaError_t llava_gemm_bias_act(const void* A, const void* B, const void* bias, void* C, void* Cpre,
                                int64_t M, int64_t N, int64_t K, int dtype, int act, cudaStream_t stream);
// a[i] = gelu(h[i]) (exact erf), any dtype; a may alias h.
cudaError_t llava_gelu_fwd(const void* h, void* a, int64_t n, int dtype, cudaStream_t stream);
// grad[i] = grad[i] * gelu'(h[i]) in place; if a_out != NULL also a_out[i] = gelu(h[i]).
cudaError_t llava_gelu_bwd(const void* h, void* grad, void* a_out, int64_t n, int dtype, cudaStream_t stream);

// ---- scatter.cu ---------------------------------------------------------------------------
// img_idx[T] must be pre-filled with -1; sets img_idx[positions[j]] = max j over duplicates.
// Positions outside [0, T) are skipped (never written).
cudaError_t llava_mark_image_rows(const int64_t* positions, int64_t M, int32_t* img_idx, int64_t T,
                                  cudaStream_t stream);
// out[t] = img_idx[t] >= 0 ? image_rows[img_idx[t]] : embed[ids[t]]; an id outside [0, V) at a text row
// gives a NaN row (never an out-of-bounds read). Each out row written exactly once.
cudaError_t llava_scatter_rows(const int64_t* ids, const void* embed, const void* image_rows,
                               const int32_t* img_idx, void* out, int64_t T, int64_t D, int64_t V,
                               int dtype, cudaStream_t stream);
// dst[j] = src[idx[j]] for j < M; an index outside [0, nsrc) gives a zero row.
cudaError_t llava_gather_rows(const void* src, const int64_t* idx, void* dst, int64_t M, int64_t D,
                              int64_t nsrc, int dtype, cudaStream_t stream);
// keys[t] = V for image rows (img_idx[t] >= 0) and ids outside [0, V), else ids[t]: the sort keys of the
// embedding-table backward (V sorts last and is skipped).
cudaError_t llava_embed_grad_keys(const int64_t* ids, const int32_t* img_idx, int64_t* keys, int64_t T,
                                  int64_t V, cudaStream_t stream);
// For each run of equal sorted_keys[i] < V: out[key] = sum over the run, in order, of grad[perm[i]]
// (fp32 accumulation; deterministic). Rows of out with no run are not touched (pre-zero them).
cudaError_t llava_segment_sum_rows(const void* grad, const int64_t* sorted_keys, const int64_t* perm,
                                   void* out, int64_t T, int64_t D, int64_t V, int dtype,
                                   cudaStream_t stream);

// ---- masked_loss.cu -----------------------------------------------------------------------
// One chunk of R target rows: logits[R,V] (in place) -> per-row loss lse - logit[target] into
// token_loss[rows[r]], and, if write_grad, logits <- (softmax - onehot(target)) * (*scale).
// A target outside [0, V) gives a NaN loss and NaN gradient row. scale is a device float.
cudaError_t llava_ce_chunk(void* logits, const int64_t* targets, const int64_t* rows, const float* scale,
                           float* token_loss, int64_t R, int64_t V, int dtype, int write_grad,
                           cudaStream_t stream);
// Deterministic sums over token_loss[T] (0 at non-target rows): seq_sum[b] and seq_count[b] (targets
// != -100) over rows [cu_seqlens[b], cu_seqlens[b+1]) clipped to [0, T); loss[0] = (sum of all T
// rows) * (*scale).
cudaError_t llava_loss_reduce(const float* token_loss, const int64_t* targets, const int32_t* cu_seqlens,
                              const float* scale, float* loss, float* seq_sum, int64_t* seq_count,
                              int64_t T, int64_t B, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
