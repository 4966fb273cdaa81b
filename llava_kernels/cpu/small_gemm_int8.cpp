// y[M, N] = (x[M, K] · q[N, K]ᵀ) · scale[N] for int8 weights q with one fp32 scale per output row (symmetric
// weight-only int8, torchao's Int8WeightOnlyConfig with PerRow), fp32 activations, few rows M (CPU decoding).
//
// Built with the other CPU ops by llava_kernels/_cpu.py; the reference and the reasons are in
// llava_kernels/small_gemm_int8.py. Registers torch.ops.llava_cpu.small_gemm_int8.
//
// small_gemm.cpp's work (gemm_rows.h) with a quarter of the bytes: each 8 int8 weights widened to fp32 in
// registers (exact: |q| ≤ 127), the same eight lane-wise partial sums, then one multiply by the row's scale.
// Whatever M is, an output element is summed the same way (a row does not depend on its batch).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "gemm_rows.h"
#include "ops.h"

namespace llava_cpu {

at::Tensor small_gemm_int8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && scale.dim() == 1, "llava_cpu::small_gemm_int8: x [M, K], q [N, K] ",
              "and scale [N], got ", x.sizes(), ", ", q.sizes(), " and ", scale.sizes());
  TORCH_CHECK(x.size(1) == q.size(1) && scale.size(0) == q.size(0), "llava_cpu::small_gemm_int8: shapes differ: x ",
              x.sizes(), ", q ", q.sizes(), ", scale ", scale.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && q.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat,
              "llava_cpu::small_gemm_int8: fp32 x, int8 q and fp32 scale, got ", x.scalar_type(), ", ",
              q.scalar_type(), " and ", scale.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && q.device().is_cpu() && scale.device().is_cpu(),
              "llava_cpu::small_gemm_int8: CPU tensors only");
  TORCH_CHECK(x.is_contiguous() && q.is_contiguous() && scale.is_contiguous(),
              "llava_cpu::small_gemm_int8: contiguous x, q and scale only");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  rows::gemm(x.data_ptr<float>(), M, q.data_ptr<int8_t>(), K, y.data_ptr<float>(), N, scale.data_ptr<float>());
  return y;
}

}  // namespace llava_cpu

TORCH_LIBRARY_FRAGMENT(llava_cpu, m) { m.def("small_gemm_int8(Tensor x, Tensor q, Tensor scale) -> Tensor"); }

TORCH_LIBRARY_IMPL(llava_cpu, CPU, m) { m.impl("small_gemm_int8", llava_cpu::small_gemm_int8); }
