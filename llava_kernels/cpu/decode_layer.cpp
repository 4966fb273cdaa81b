// One decoder layer of a decode step on the CPU (fp32 activations; fp32 weights, or int8 weights with one scale a
// row when the four scales are given), as one call:
//   h = rms_norm(x) ; q, k, v = h · W_qkvᵀ ; q, k = rope(q, k) ; cache[slot] = k, v
//   x = x + paged_decode(q, cache) · W_oᵀ ; h = rms_norm(x) ; g, u = h · W_gate_upᵀ ; x = x + (silu(g) · u) · W_downᵀ
//
// Built with the other CPU ops by llava_kernels/_cpu.py; the reference and the reasons are in
// llava_kernels/decode_layer.py. Registers torch.ops.llava_cpu.decode_layer.
//
// Nothing new is computed here: each step is the op engine.model's Block runs for it in fp32 CPU inference (our
// rms_norm, small_gemm or small_gemm_int8, rope and paged_decode; ATen's index_copy_, silu, mul and add on tensors
// of the same shapes and strides), so the layer's output and cache writes equal the module path's bit for bit
// (tested, fp32 and int8).
// What goes is the Python between the ops: ~150 µs a layer of a ~1.3 ms layer in a batch-1 decode step of the
// CPU benchmark model, the whole step's gap between its weights' read time and its wall time.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>

#include "ops.h"

namespace llava_cpu {
namespace {

// x · wᵀ for fp32 weights; (x · qᵀ) · scale for int8 ones: the GEMM engine.linear runs for that weight.
at::Tensor project(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scale) {
  return scale.has_value() ? small_gemm_int8(x, w, *scale) : small_gemm(x, w);
}

}  // namespace

at::Tensor decode_layer(const at::Tensor& x, const at::Tensor& attn_norm, const at::Tensor& mlp_norm,
                        const at::Tensor& w_qkv, const at::Tensor& w_o, const at::Tensor& w_gate_up,
                        const at::Tensor& w_down, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                        at::Tensor& v_cache, const at::Tensor& block_table, const at::Tensor& seq_lens,
                        const at::Tensor& slot_mapping, int64_t num_heads, double eps, double scale,
                        const std::optional<at::Tensor>& s_qkv, const std::optional<at::Tensor>& s_o,
                        const std::optional<at::Tensor>& s_gate_up, const std::optional<at::Tensor>& s_down) {
  TORCH_CHECK(x.dim() == 2 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "llava_cpu::decode_layer: x [T, D] and k/v caches [NB, Bs, Hkv, Dh], got ", x.sizes(), ", ",
              k_cache.sizes(), ", ", v_cache.sizes());
  const int64_t T = x.size(0), D = x.size(1), H = num_heads, Hkv = k_cache.size(2), Dh = k_cache.size(3);
  TORCH_CHECK(H > 0 && H % Hkv == 0, "llava_cpu::decode_layer: ", H, " query heads for ", Hkv, " KV heads");
  TORCH_CHECK(w_qkv.dim() == 2 && w_qkv.size(0) == (H + 2 * Hkv) * Dh && w_qkv.size(1) == D,
              "llava_cpu::decode_layer: W_qkv must be [(H + 2·Hkv)·Dh, D] = [", (H + 2 * Hkv) * Dh, ", ", D,
              "], got ", w_qkv.sizes());
  TORCH_CHECK(w_o.dim() == 2 && w_o.size(0) == D && w_o.size(1) == H * Dh,
              "llava_cpu::decode_layer: W_o must be [D, H·Dh] = [", D, ", ", H * Dh, "], got ", w_o.sizes());
  TORCH_CHECK(w_gate_up.dim() == 2 && w_gate_up.size(0) % 2 == 0 && w_gate_up.size(1) == D && w_down.dim() == 2 &&
                  w_down.size(0) == D && w_down.size(1) == w_gate_up.size(0) / 2,
              "llava_cpu::decode_layer: W_gate_up [2·I, D] and W_down [D, I] with D = ", D, ", got ",
              w_gate_up.sizes(), " and ", w_down.sizes());
  const bool int8 = s_qkv.has_value();
  TORCH_CHECK(s_o.has_value() == int8 && s_gate_up.has_value() == int8 && s_down.has_value() == int8,
              "llava_cpu::decode_layer: give the scales of all four weights (int8) or of none (fp32)");
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == T && slot_mapping.scalar_type() == at::kLong,
              "llava_cpu::decode_layer: slot_mapping int64 [T = ", T, "], got ", slot_mapping.sizes(), " ",
              slot_mapping.scalar_type());

  const at::Tensor h = rms_norm(x, attn_norm, eps);                                      // (T, D)
  const at::Tensor qkv = project(h, w_qkv, s_qkv);                                           // (T, (H + 2·Hkv)·Dh)
  // RoPE once over q and k side by side; the op equals the formula the module applies to a strided view
  const at::Tensor qk = rope(qkv.narrow(1, 0, (H + Hkv) * Dh).reshape({T, H + Hkv, Dh}).contiguous(), cos, sin);
  const at::Tensor q = qk.narrow(1, 0, H), k = qk.narrow(1, H, Hkv);                   // (T, H | Hkv, Dh)
  const at::Tensor v = qkv.narrow(1, (H + Hkv) * Dh, Hkv * Dh).view({T, Hkv, Dh});
  k_cache.view({-1, Hkv, Dh}).index_copy_(0, slot_mapping, k);                            // (NB·Bs, Hkv, Dh)
  v_cache.view({-1, Hkv, Dh}).index_copy_(0, slot_mapping, v);
  const at::Tensor o = paged_decode(q.contiguous(), k_cache, v_cache, block_table, seq_lens, scale);  // (T, H, Dh)
  const at::Tensor x1 = at::add(x, project(o.view({T, H * Dh}), w_o, s_o));
  const auto gu = project(rms_norm(x1, mlp_norm, eps), w_gate_up, s_gate_up).chunk(2, -1);    // 2 × (T, I)
  return at::add(x1, project(at::mul(at::silu(gu[0]), gu[1]).contiguous(), w_down, s_down));
}

}  // namespace llava_cpu

TORCH_LIBRARY_FRAGMENT(llava_cpu, m) {
  m.def("decode_layer(Tensor x, Tensor attn_norm, Tensor mlp_norm, Tensor w_qkv, Tensor w_o, Tensor w_gate_up, "
        "Tensor w_down, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor block_table, "
        "Tensor seq_lens, Tensor slot_mapping, int num_heads, float eps, float scale, Tensor? s_qkv=None, "
        "Tensor? s_o=None, Tensor? s_gate_up=None, Tensor? s_down=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(llava_cpu, CPU, m) { m.impl("decode_layer", llava_cpu::decode_layer); }
