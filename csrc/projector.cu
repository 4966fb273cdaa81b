// Fused projector kernels: a tensor-core GEMM with bias (+ exact GELU) in the epilogue, and the
// elementwise GELU forward/backward used by the fp32 path and by the backward.
//
// Letters: M GEMM rows (projector input rows N in kernels_spec), N GEMM columns (Dh or Dt), K reduction
// width (Dv or Dh). C[M,N] = act(A[M,K] @ B[N,K]^T + bias[N]): A is x (or gelu(h)), B is a weight in its
// nn.Linear layout, both K-contiguous, which is exactly WMMA's row_major A / col_major B.
//
// Tiling: a 256-thread block owns a 128x128 tile of C; 8 warps as 2 (M) x 4 (N), each a 64x32 warp tile
// of 4x2 WMMA 16x16x16 fragments with fp32 accumulators. K advances 32 at a time through a 2-stage
// cp.async pipeline (40 KB static shared memory, so no opt-in is needed); each shared row is padded by
// 16 bytes so the ldmatrix row addresses of a fragment fall in distinct banks. When K % 8 != 0 or an
// operand is not 16-byte aligned, the same kernel loads tiles with bounds-checked scalar loads instead.
// The epilogue stages each 16x16 fragment through shared memory (WMMA's register layout is opaque),
// adds the bias, writes the pre-activation (for the backward) and GELU(pre) with 16-byte stores when
// N % 8 == 0. This is mma.sync-class code (HMMA), not Hopper's wgmma: correct everywhere from sm_80,
// slower than cuBLAS on H100.
#include <mma.h>

#include <climits>

#include "common.cuh"

namespace llava {
namespace {

using namespace nvcuda;

constexpr int BM = 128, BN = 128, BK = 32;
constexpr int LDS = BK + 8;  // shared row stride in elements: 80 bytes (16-byte multiple, bank-spread)
constexpr int THREADS = 256;
constexpr int WM = 64, WN = 32;  // warp tile
constexpr int FM = WM / 16, FN = WN / 16;
constexpr int STAGE_ELEMS = (BM + BN) * LDS;
constexpr int STAGES = 2;

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  // src_bytes = 0 zero-fills the 16 destination bytes without reading global memory.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// One operand tile [128 rows, 32 k] -> shared [128][LDS]; requires K % 8 == 0 and a 16-byte aligned base,
// so every 8-element chunk is either wholly inside [rows, K) or wholly outside (zero-filled).
template <typename T>
__device__ __forceinline__ void load_tile_async(T* s, const T* g, int64_t rows, int64_t K, int64_t r0,
                                                int64_t k0, int tid) {
#pragma unroll
  for (int i = 0; i < (BM * BK / 8) / THREADS; ++i) {
    const int c = tid + i * THREADS;
    const int r = c >> 2, kc = (c & 3) * 8;
    const int64_t gr = r0 + r, gk = k0 + kc;
    const bool ok = gr < rows && gk < K;
    cp_async16(s + r * LDS + kc, ok ? g + gr * K + gk : g, ok ? 16 : 0);
  }
}

template <typename T>
__device__ __forceinline__ void load_tile_scalar(T* s, const T* g, int64_t rows, int64_t K, int64_t r0,
                                                 int64_t k0, int tid) {
  for (int c = tid; c < BM * BK; c += THREADS) {
    const int r = c / BK, kk = c % BK;
    const int64_t gr = r0 + r, gk = k0 + kk;
    s[r * LDS + kk] = (gr < rows && gk < K) ? g[gr * K + gk] : from_f32<T>(0.0f);
  }
}

template <typename T>
__device__ __forceinline__ void mma_stage(const T* sA, const T* sB, int wm, int wn,
                                          wmma::fragment<wmma::accumulator, 16, 16, 16, float> (&acc)[FM][FN]) {
#pragma unroll
  for (int kk = 0; kk < BK; kk += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[FM];
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[FN];
#pragma unroll
    for (int i = 0; i < FM; ++i) wmma::load_matrix_sync(fa[i], sA + (wm * WM + i * 16) * LDS + kk, LDS);
#pragma unroll
    for (int j = 0; j < FN; ++j) wmma::load_matrix_sync(fb[j], sB + (wn * WN + j * 16) * LDS + kk, LDS);
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
  }
}

template <typename T, bool kAsync>
__global__ void __launch_bounds__(THREADS, 2)
    gemm_bias_act_kernel(const T* __restrict__ A, const T* __restrict__ B, const T* __restrict__ bias,
                         T* __restrict__ C, T* __restrict__ Cpre, int64_t M, int64_t N, int64_t K, int act,
                         bool vec_out) {
  __shared__ __align__(128) T smem[STAGES * STAGE_ELEMS];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int wm = warp >> 2, wn = warp & 3;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM, n0 = static_cast<int64_t>(blockIdx.x) * BN;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FM][FN];
#pragma unroll
  for (int i = 0; i < FM; ++i)
#pragma unroll
    for (int j = 0; j < FN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  const int64_t KT = (K + BK - 1) / BK;
  if constexpr (kAsync) {
    load_tile_async(smem, A, M, K, m0, 0, tid);
    load_tile_async(smem + BM * LDS, B, N, K, n0, 0, tid);
    cp_async_commit();
    for (int64_t kt = 0; kt < KT; ++kt) {
      if (kt + 1 < KT) {  // prefetch the next k-slab into the other stage while this one computes
        T* s = smem + ((kt + 1) & 1) * STAGE_ELEMS;
        load_tile_async(s, A, M, K, m0, (kt + 1) * BK, tid);
        load_tile_async(s + BM * LDS, B, N, K, n0, (kt + 1) * BK, tid);
      }
      cp_async_commit();  // possibly empty group: keeps "wait until 1 pending" uniform
      cp_async_wait<1>();
      __syncthreads();
      const T* s = smem + (kt & 1) * STAGE_ELEMS;
      mma_stage<T>(s, s + BM * LDS, wm, wn, acc);
      __syncthreads();  // the next iteration's prefetch overwrites this stage
    }
    cp_async_wait<0>();
  } else {
    for (int64_t kt = 0; kt < KT; ++kt) {
      load_tile_scalar(smem, A, M, K, m0, kt * BK, tid);
      load_tile_scalar(smem + BM * LDS, B, N, K, n0, kt * BK, tid);
      __syncthreads();
      mma_stage<T>(smem, smem + BM * LDS, wm, wn, acc);
      __syncthreads();
    }
  }

  // Epilogue: each warp stages one 16x16 fragment at a time in its own 1 KB of the (now idle) pipeline
  // buffers; lane handles row lane/2, columns (lane%2)*8 .. +8.
  float* scratch = reinterpret_cast<float*>(smem) + warp * 256;
  const int r = lane >> 1, c = (lane & 1) * 8;
#pragma unroll
  for (int i = 0; i < FM; ++i) {
#pragma unroll
    for (int j = 0; j < FN; ++j) {
      wmma::store_matrix_sync(scratch, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      const int64_t gm = m0 + wm * WM + i * 16 + r;
      const int64_t gn = n0 + wn * WN + j * 16 + c;
      if (gm < M && gn < N) {
        Pack16<T> out, pre;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          float x = scratch[r * 16 + c + e];
          if (bias != nullptr && gn + e < N) x += to_f32(bias[gn + e]);
          pre.v[e] = from_f32<T>(x);
          out.v[e] = from_f32<T>(act ? gelu_erf(x) : x);
        }
        T* crow = C + gm * N + gn;
        T* prow = Cpre != nullptr ? Cpre + gm * N + gn : nullptr;
        if (vec_out && gn + 8 <= N) {
          *reinterpret_cast<uint4*>(crow) = out.raw;
          if (prow != nullptr) *reinterpret_cast<uint4*>(prow) = pre.raw;
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            if (gn + e < N) {
              crow[e] = out.v[e];
              if (prow != nullptr) prow[e] = pre.v[e];
            }
          }
        }
      }
      __syncwarp();  // scratch is rewritten by the next fragment
    }
  }
}

template <typename T>
cudaError_t launch_gemm(const void* A, const void* B, const void* bias, void* C, void* Cpre, int64_t M,
                        int64_t N, int64_t K, int act, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(N, BN)), static_cast<unsigned>(ceil_div(M, BM)));
  const bool async = K % 8 == 0 && aligned16(A) && aligned16(B);
  const bool vec_out = N % 8 == 0 && aligned16(C) && (Cpre == nullptr || aligned16(Cpre));
  const T* a = static_cast<const T*>(A);
  const T* b = static_cast<const T*>(B);
  const T* bs = static_cast<const T*>(bias);
  T* c = static_cast<T*>(C);
  T* cp = static_cast<T*>(Cpre);
  if (async) {
    gemm_bias_act_kernel<T, true><<<grid, THREADS, 0, stream>>>(a, b, bs, c, cp, M, N, K, act, vec_out);
  } else {
    gemm_bias_act_kernel<T, false><<<grid, THREADS, 0, stream>>>(a, b, bs, c, cp, M, N, K, act, vec_out);
  }
  return cudaGetLastError();
}

// ---- elementwise GELU ------------------------------------------------------------------------

constexpr int EW_THREADS = 256;
constexpr int64_t EW_MAX_BLOCKS = 8192;  // grid-stride beyond this: enough to fill any current GPU

template <typename T, bool kVec>
__global__ void __launch_bounds__(EW_THREADS) gelu_fwd_kernel(const T* h, T* a, int64_t n_items) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_items;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if constexpr (kVec) {
      Pack16<T> in, out;
      in.raw = reinterpret_cast<const uint4*>(h)[i];
#pragma unroll
      for (int e = 0; e < Vec<T>::N; ++e) out.v[e] = from_f32<T>(gelu_erf(to_f32(in.v[e])));
      reinterpret_cast<uint4*>(a)[i] = out.raw;
    } else {
      a[i] = from_f32<T>(gelu_erf(to_f32(h[i])));
    }
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(EW_THREADS) gelu_bwd_kernel(const T* h, T* grad, T* a_out, int64_t n_items) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_items;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if constexpr (kVec) {
      Pack16<T> hv, gv, av;
      hv.raw = reinterpret_cast<const uint4*>(h)[i];
      gv.raw = reinterpret_cast<const uint4*>(grad)[i];
#pragma unroll
      for (int e = 0; e < Vec<T>::N; ++e) {
        const float x = to_f32(hv.v[e]);
        gv.v[e] = from_f32<T>(to_f32(gv.v[e]) * gelu_erf_grad(x));
        av.v[e] = from_f32<T>(gelu_erf(x));
      }
      reinterpret_cast<uint4*>(grad)[i] = gv.raw;
      if (a_out != nullptr) reinterpret_cast<uint4*>(a_out)[i] = av.raw;
    } else {
      const float x = to_f32(h[i]);
      grad[i] = from_f32<T>(to_f32(grad[i]) * gelu_erf_grad(x));
      if (a_out != nullptr) a_out[i] = from_f32<T>(gelu_erf(x));
    }
  }
}

inline dim3 ew_grid(int64_t items) {
  return dim3(static_cast<unsigned>(std::max<int64_t>(1, std::min(ceil_div(items, EW_THREADS), EW_MAX_BLOCKS))));
}

}  // namespace
}  // namespace llava

using namespace llava;

extern "C" cudaError_t llava_gemm_bias_act(const void* A, const void* B, const void* bias, void* C, void* Cpre,
                                           int64_t M, int64_t N, int64_t K, int dtype, int act,
                                           cudaStream_t stream) {
  // Sizes first, pointers after the empty-output return: torch gives numel-0 tensors a null data_ptr, so
  // an N = 0 projector call (no image rows) must succeed with null pointers.
  if (M < 0 || N < 0 || K <= 0 || (act != 0 && act != 1)) return cudaErrorInvalidValue;
  if (M == 0 || N == 0) return cudaSuccess;
  if (A == nullptr || B == nullptr || C == nullptr) return cudaErrorInvalidValue;
  if (ceil_div(M, BM) > 65535 || ceil_div(N, BN) > INT_MAX) return cudaErrorInvalidValue;
  switch (dtype) {
    case LLAVA_F16: return launch_gemm<__half>(A, B, bias, C, Cpre, M, N, K, act, stream);
    case LLAVA_BF16: return launch_gemm<__nv_bfloat16>(A, B, bias, C, Cpre, M, N, K, act, stream);
    default: return cudaErrorInvalidValue;  // fp32 goes through cuBLAS in bindings.cpp (no fp32 WMMA)
  }
}

extern "C" cudaError_t llava_gelu_fwd(const void* h, void* a, int64_t n, int dtype, cudaStream_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;  // before the pointer check: empty tensors have null data pointers
  if (h == nullptr || a == nullptr) return cudaErrorInvalidValue;
  LLAVA_DISPATCH(dtype, {
    const bool vec = n % Vec<scalar_t>::N == 0 && aligned16(h) && aligned16(a);
    const auto* hp = static_cast<const scalar_t*>(h);
    auto* ap = static_cast<scalar_t*>(a);
    if (vec) {
      const int64_t items = n / Vec<scalar_t>::N;
      gelu_fwd_kernel<scalar_t, true><<<ew_grid(items), EW_THREADS, 0, stream>>>(hp, ap, items);
    } else {
      gelu_fwd_kernel<scalar_t, false><<<ew_grid(n), EW_THREADS, 0, stream>>>(hp, ap, n);
    }
  });
  return cudaGetLastError();
}

extern "C" cudaError_t llava_gelu_bwd(const void* h, void* grad, void* a_out, int64_t n, int dtype,
                                      cudaStream_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;  // before the pointer check: empty tensors have null data pointers
  if (h == nullptr || grad == nullptr) return cudaErrorInvalidValue;
  LLAVA_DISPATCH(dtype, {
    const bool vec = n % Vec<scalar_t>::N == 0 && aligned16(h) && aligned16(grad) &&
                     (a_out == nullptr || aligned16(a_out));
    const auto* hp = static_cast<const scalar_t*>(h);
    auto* gp = static_cast<scalar_t*>(grad);
    auto* ap = static_cast<scalar_t*>(a_out);
    if (vec) {
      const int64_t items = n / Vec<scalar_t>::N;
      gelu_bwd_kernel<scalar_t, true><<<ew_grid(items), EW_THREADS, 0, stream>>>(hp, gp, ap, items);
    } else {
      gelu_bwd_kernel<scalar_t, false><<<ew_grid(n), EW_THREADS, 0, stream>>>(hp, gp, ap, n);
    }
  });
  return cudaGetLastError();
}
