// y[M, N] = x[M, K] · w[N, K]ᵀ in fp32 for few rows M (CPU decoding): the weights stream from DRAM once.
//
// Built on first use by llava_kernels/_cpu.py (torch.utils.cpp_extension.load, -mavx2 -mfma); the reference
// and the reasons for this kernel are in llava_kernels/small_gemm.py. Registers torch.ops.llava_cpu.small_gemm.
//
// The work (gemm_rows.h, shared with small_gemm_int8.cpp): 4-row blocks of weights taken in chunks by torch's
// threads, each block multiplied with every x row while it is in L1/L2 and the next one prefetched, so the
// weights are read from memory once whatever M is; every output element summed in one order whatever M is (a
// sequence's row does not depend on its batch). On the 2-core development machine, over the 438 MB of the bench
// model's decoder at one row, this reads at ~1.0× a plain `sum` over the same bytes; oneDNN's matmul ~0.8×,
// MKL's ~0.5×.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "gemm_rows.h"
#include "ops.h"

namespace llava_cpu {

at::Tensor small_gemm(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "llava_cpu::small_gemm: x [M, K] and w [N, K], got x ",
              x.sizes(), " and w ", w.sizes());
  TORCH_CHECK(x.size(1) == w.size(1), "llava_cpu::small_gemm: K differs: x ", x.sizes(), ", w ", w.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat,
              "llava_cpu::small_gemm: fp32 only, got ", x.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "llava_cpu::small_gemm: CPU tensors only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "llava_cpu::small_gemm: contiguous x and w only");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  rows::gemm(x.data_ptr<float>(), M, w.data_ptr<float>(), K, y.data_ptr<float>(), N, nullptr);
  return y;
}

}  // namespace llava_cpu

TORCH_LIBRARY_FRAGMENT(llava_cpu, m) { m.def("small_gemm(Tensor x, Tensor w) -> Tensor"); }

TORCH_LIBRARY_IMPL(llava_cpu, CPU, m) { m.impl("small_gemm", llava_cpu::small_gemm); }
