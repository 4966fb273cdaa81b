// The entry points of our CPU ops, for the ops that compose them (decode_layer.cpp); each is defined, with its
// checks and its reasons, in the .cpp file of its name and registered there as torch.ops.llava_cpu.<name>.
#pragma once

#include <ATen/core/Tensor.h>

namespace llava_cpu {

at::Tensor small_gemm(const at::Tensor& x, const at::Tensor& w);                       // x [M, K] · w [N, K]ᵀ
at::Tensor small_gemm_int8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale);  // · scale [N]
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);             // x [..., D], w [D]
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);    // x [T, heads, Dh]
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_table, const at::Tensor& seq_lens, double scale);

}  // namespace llava_cpu
