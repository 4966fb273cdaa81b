// Image-token scatter: forward row copy and the two halves of its backward.
//
// Letters: T packed tokens, D model width, V vocab, M image rows.
// Forward is one pass over the T output rows: a block copies row t from image_rows[img_idx[t]] (image
// position) or embed[ids[t]] (text), so every output row is written exactly once and input_ids at image
// positions are never read. img_idx[T] (-1 = text) is built first by a tiny marking kernel from the M
// positions. Rows move as 16-byte vectors when D and every base pointer allow it, else element by element.
// Backward: grad image_rows is a gather of grad_out rows; grad embed is a segment sum over the rows
// sorted (stably, in bindings) by token id, one block per segment summing in sorted order in fp32, so the
// result is bit-identical run to run (no atomics on floats).
#include <climits>

#include "common.cuh"

namespace llava {
namespace {

constexpr int ROW_THREADS = 128;
constexpr int64_t MAX_ROW_BLOCKS = 1 << 20;  // grid-stride over rows beyond this
constexpr int EW_THREADS = 256;

// dst[0:D] = src[0:D], or `fill` everywhere when src is null. Whole block cooperates; kVec moves 16 bytes
// per access and needs D % Vec<T>::N == 0 and 16-byte aligned row starts.
template <typename T, bool kVec>
__device__ __forceinline__ void copy_row(const T* __restrict__ src, T* __restrict__ dst, int64_t D, float fill) {
  if constexpr (kVec) {
    const int64_t n = D / Vec<T>::N;
    Pack16<T> f;
#pragma unroll
    for (int e = 0; e < Vec<T>::N; ++e) f.v[e] = from_f32<T>(fill);
    const uint4* s = reinterpret_cast<const uint4*>(src);
    uint4* d = reinterpret_cast<uint4*>(dst);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) d[i] = src != nullptr ? s[i] : f.raw;
  } else {
    const T f = from_f32<T>(fill);
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) dst[i] = src != nullptr ? src[i] : f;
  }
}

__global__ void mark_image_rows_kernel(const int64_t* __restrict__ positions, int64_t M, int32_t* img_idx,
                                       int64_t T) {
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < M;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = positions[j];
    // max over duplicates keeps the result deterministic; bad positions are dropped, never written
    if (p >= 0 && p < T) atomicMax(img_idx + p, static_cast<int32_t>(j));
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(ROW_THREADS)
    scatter_rows_kernel(const int64_t* __restrict__ ids, const T* __restrict__ embed, const T* __restrict__ image_rows,
                        const int32_t* __restrict__ img_idx, T* __restrict__ out, int64_t Tn, int64_t D, int64_t V) {
  for (int64_t t = blockIdx.x; t < Tn; t += gridDim.x) {
    const int32_t j = img_idx[t];
    const T* src = nullptr;
    if (j >= 0) {
      src = image_rows + static_cast<int64_t>(j) * D;
    } else {
      const int64_t id = ids[t];
      if (id >= 0 && id < V) src = embed + id * D;  // a bad id yields a NaN row, not an OOB read
    }
    copy_row<T, kVec>(src, out + t * D, D, __int_as_float(0x7fc00000));
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(ROW_THREADS)
    gather_rows_kernel(const T* __restrict__ src, const int64_t* __restrict__ idx, T* __restrict__ dst, int64_t M,
                       int64_t D, int64_t nsrc) {
  for (int64_t j = blockIdx.x; j < M; j += gridDim.x) {
    const int64_t i = idx[j];
    copy_row<T, kVec>(i >= 0 && i < nsrc ? src + i * D : nullptr, dst + j * D, D, 0.0f);
  }
}

__global__ void embed_grad_keys_kernel(const int64_t* __restrict__ ids, const int32_t* __restrict__ img_idx,
                                       int64_t* __restrict__ keys, int64_t T, int64_t V) {
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < T;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t k = V;  // sentinel: sorts last, skipped by the segment sum
    if (img_idx[t] < 0) {
      const int64_t id = ids[t];
      if (id >= 0 && id < V) k = id;
    }
    keys[t] = k;
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(ROW_THREADS)
    segment_sum_rows_kernel(const T* __restrict__ grad, const int64_t* __restrict__ keys,
                            const int64_t* __restrict__ perm, T* __restrict__ out, int64_t Tn, int64_t D, int64_t V) {
  constexpr int W = kVec ? Vec<T>::N : 1;
  for (int64_t i = blockIdx.x; i < Tn; i += gridDim.x) {
    const int64_t key = keys[i];
    if (key < 0 || key >= V || (i > 0 && keys[i - 1] == key)) continue;  // not the head of a live segment
    for (int64_t cv = threadIdx.x; cv < D / W; cv += blockDim.x) {
      float acc[W];
#pragma unroll
      for (int e = 0; e < W; ++e) acc[e] = 0.0f;
      for (int64_t s = i; s < Tn && keys[s] == key; ++s) {  // fixed order: sorted (stable) position
        const T* row = grad + perm[s] * D + cv * W;
        if constexpr (kVec) {
          Pack16<T> p;
          p.raw = *reinterpret_cast<const uint4*>(row);
#pragma unroll
          for (int e = 0; e < W; ++e) acc[e] += to_f32(p.v[e]);
        } else {
          acc[0] += to_f32(row[0]);
        }
      }
      T* o = out + key * D + cv * W;
      if constexpr (kVec) {
        Pack16<T> p;
#pragma unroll
        for (int e = 0; e < W; ++e) p.v[e] = from_f32<T>(acc[e]);
        *reinterpret_cast<uint4*>(o) = p.raw;
      } else {
        o[0] = from_f32<T>(acc[0]);
      }
    }
  }
}

inline unsigned row_grid(int64_t rows) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(rows, MAX_ROW_BLOCKS)));
}
inline unsigned ew_grid(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(ceil_div(n, EW_THREADS), MAX_ROW_BLOCKS)));
}

}  // namespace
}  // namespace llava

using namespace llava;

extern "C" cudaError_t llava_mark_image_rows(const int64_t* positions, int64_t M, int32_t* img_idx, int64_t T,
                                             cudaStream_t stream) {
  // Pointers are checked after the empty-size return in every launcher here: torch gives numel-0
  // tensors a null data_ptr (e.g. T = 0, or D = 0), and those calls must be no-ops, not errors.
  if (M < 0 || T < 0 || M > INT_MAX) return cudaErrorInvalidValue;
  if (M == 0 || T == 0) return cudaSuccess;
  if (positions == nullptr || img_idx == nullptr) return cudaErrorInvalidValue;
  mark_image_rows_kernel<<<ew_grid(M), EW_THREADS, 0, stream>>>(positions, M, img_idx, T);
  return cudaGetLastError();
}

extern "C" cudaError_t llava_scatter_rows(const int64_t* ids, const void* embed, const void* image_rows,
                                          const int32_t* img_idx, void* out, int64_t T, int64_t D, int64_t V,
                                          int dtype, cudaStream_t stream) {
  if (T < 0 || D < 0 || V < 0) return cudaErrorInvalidValue;
  if (T == 0 || D == 0) return cudaSuccess;
  // embed may be null only for an empty table (V = 0: every text row is then a NaN row)
  if (ids == nullptr || (V > 0 && embed == nullptr) || img_idx == nullptr || out == nullptr)
    return cudaErrorInvalidValue;
  LLAVA_DISPATCH(dtype, {
    const auto* e = static_cast<const scalar_t*>(embed);
    const auto* im = static_cast<const scalar_t*>(image_rows);
    auto* o = static_cast<scalar_t*>(out);
    const bool vec = D % Vec<scalar_t>::N == 0 && aligned16(embed) && aligned16(out) &&
                     (image_rows == nullptr || aligned16(image_rows));
    if (vec) {
      scatter_rows_kernel<scalar_t, true><<<row_grid(T), ROW_THREADS, 0, stream>>>(ids, e, im, img_idx, o, T, D, V);
    } else {
      scatter_rows_kernel<scalar_t, false><<<row_grid(T), ROW_THREADS, 0, stream>>>(ids, e, im, img_idx, o, T, D, V);
    }
  });
  return cudaGetLastError();
}

extern "C" cudaError_t llava_gather_rows(const void* src, const int64_t* idx, void* dst, int64_t M, int64_t D,
                                         int64_t nsrc, int dtype, cudaStream_t stream) {
  if (M < 0 || D < 0 || nsrc < 0) return cudaErrorInvalidValue;
  if (M == 0 || D == 0) return cudaSuccess;
  if (idx == nullptr || dst == nullptr || (nsrc > 0 && src == nullptr)) return cudaErrorInvalidValue;
  LLAVA_DISPATCH(dtype, {
    const auto* s = static_cast<const scalar_t*>(src);
    auto* d = static_cast<scalar_t*>(dst);
    const bool vec = D % Vec<scalar_t>::N == 0 && aligned16(dst) && (src == nullptr || aligned16(src));
    if (vec) {
      gather_rows_kernel<scalar_t, true><<<row_grid(M), ROW_THREADS, 0, stream>>>(s, idx, d, M, D, nsrc);
    } else {
      gather_rows_kernel<scalar_t, false><<<row_grid(M), ROW_THREADS, 0, stream>>>(s, idx, d, M, D, nsrc);
    }
  });
  return cudaGetLastError();
}

extern "C" cudaError_t llava_embed_grad_keys(const int64_t* ids, const int32_t* img_idx, int64_t* keys, int64_t T,
                                             int64_t V, cudaStream_t stream) {
  if (T < 0 || V < 0) return cudaErrorInvalidValue;
  if (T == 0) return cudaSuccess;
  if (ids == nullptr || img_idx == nullptr || keys == nullptr) return cudaErrorInvalidValue;
  embed_grad_keys_kernel<<<ew_grid(T), EW_THREADS, 0, stream>>>(ids, img_idx, keys, T, V);
  return cudaGetLastError();
}

extern "C" cudaError_t llava_segment_sum_rows(const void* grad, const int64_t* sorted_keys, const int64_t* perm,
                                              void* out, int64_t T, int64_t D, int64_t V, int dtype,
                                              cudaStream_t stream) {
  if (T < 0 || D < 0 || V < 0) return cudaErrorInvalidValue;
  if (T == 0 || D == 0 || V == 0) return cudaSuccess;  // V = 0: every key is the skipped sentinel
  if (grad == nullptr || sorted_keys == nullptr || perm == nullptr || out == nullptr) return cudaErrorInvalidValue;
  LLAVA_DISPATCH(dtype, {
    const auto* g = static_cast<const scalar_t*>(grad);
    auto* o = static_cast<scalar_t*>(out);
    const bool vec = D % Vec<scalar_t>::N == 0 && aligned16(grad) && aligned16(out);
    if (vec) {
      segment_sum_rows_kernel<scalar_t, true><<<row_grid(T), ROW_THREADS, 0, stream>>>(g, sorted_keys, perm, o, T, D, V);
    } else {
      segment_sum_rows_kernel<scalar_t, false><<<row_grid(T), ROW_THREADS, 0, stream>>>(g, sorted_keys, perm, o, T, D, V);
    }
  });
  return cudaGetLastError();
}
