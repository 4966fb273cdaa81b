// torch.library registration of the llava:: CUDA ops: schemas (all in this file) and CUDA kernels.
//
// Letters: N projector rows, Dv vision width, Dh projector hidden width, Dt text width; T packed tokens,
// D model width, V vocab, M image rows, R target rows, B sequences.
//
// Our kernels (csrc/*.cu, reached through the C launchers of llava_ops.h) do the fused work; plain GEMMs
// that our kernels do not fuse go to cuBLAS through at::mm/addmm. Autograd and fake (meta) kernels are
// registered from Python (llava_kernels/_cuda.py), so this file has CUDA kernels only. Only c10/cuda headers
// are used (no ATen/cuda, which would pull in cuBLAS headers).
//
//   projector(x[N,Dv], w1[Dh,Dv], b1?, w2?[Dt,Dh], b2?) -> (out[N,Dt or Dh], h)
//       h = x @ w1^T + b1 (pre-activation, saved for the backward; [0] for the linear projector).
//       bf16/fp16: our WMMA GEMM with bias + GELU in the epilogue, twice. fp32: cuBLAS + our GELU kernel.
//   projector_backward(grad_out, x, w1, w2?, h, needs[5]) -> (dx, dw1, db1, dw2, db2)
//       needs = which of (x, w1, b1, w2, b2) want a gradient; the others come back as [0] tensors.
//   scatter_image_tokens(input_ids[T], embed[V,D], image_rows[M,D], image_positions[M]) -> [T,D]
//   scatter_image_tokens_backward(grad_out[T,D], input_ids, image_positions, num_embeddings, needs[2])
//       -> (d_embed[V,D] or [0], d_image_rows[M,D] or [0])
//   masked_lm_loss(hidden[T,D], head[V,D], targets[T], cu_seqlens?[B+1], num_targets?, needs[2])
//       -> (loss[] f32, seq_loss_sum[B] f32, seq_count[B] i64, d_hidden[T,D] or [0], d_head[V,D] or [0])
//       The gradients of `loss` (for an upstream gradient of 1) are computed in the forward, chunk by
//       chunk, so the [T,V] logits never exist and are never recomputed. Memory and chunking follow the
//       Triton path (llava_kernels/masked_loss.py, "dW precision"): two chunk buffers reused by every chunk
//       (logits z[C,V], gathered rows h[C,D], which then take the chunk's d_hidden rows); in bf16/fp16 d_head
//       is one fp32 sum rounded once (one chunk of all R rows, or an fp32 [V,D] accumulator when that costs
//       less memory).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "llava_ops.h"

namespace {

using at::Tensor;

#define LLAVA_CUDA_OK(expr)                                                                  \
  do {                                                                                      \
    const cudaError_t llava_err_ = (expr);                                                  \
    TORCH_CHECK(llava_err_ == cudaSuccess, "llava: ", #expr, " failed: ", cudaGetErrorString(llava_err_)); \
  } while (0)

// Bound on one chunk's buffers in masked_lm_loss (z[C,V] + h[C,D]), as MaskedLossConfig.max_chunk_bytes.
constexpr int64_t kMaxChunkBytes = int64_t{128} << 20;

// Rows per chunk: the rule of llava_kernels.masked_loss._chunk_rows (with its default config); keep them equal.
int64_t loss_chunk_rows(int64_t T, int64_t D, int64_t V, int64_t R, int64_t elem, bool exact_dw) {
  const int64_t row_bytes = (V + D) * elem;
  const int64_t c_max = std::max<int64_t>(16, std::min(kMaxChunkBytes, T * D * elem) / row_bytes);
  if (R == 0) return c_max;
  if (exact_dw && R * row_bytes <= std::max(kMaxChunkBytes, 4 * V * D + c_max * row_bytes)) return R;
  const int64_t n = (R + c_max - 1) / c_max;
  const int64_t c = (R + n - 1) / n;
  return std::min(c_max, (c + 15) / 16 * 16);
}

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return LLAVA_F32;
    case at::kHalf: return LLAVA_F16;
    case at::kBFloat16: return LLAVA_BF16;
    default: TORCH_CHECK(false, "llava: unsupported dtype ", t, " (expected float32, float16 or bfloat16)");
  }
  return -1;
}

cudaStream_t stream_of(const Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.get_device()).stream(); }

void check_cuda(const Tensor& t, const char* name, const Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), "llava: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == ref.device(), "llava: ", name, " is on ", t.device(), ", expected ", ref.device());
}

Tensor empty0(const Tensor& like) { return at::empty({0}, like.options()); }

// ---- projector ------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> projector_cuda(const Tensor& x, const Tensor& w1, const std::optional<Tensor>& b1,
                                          const std::optional<Tensor>& w2, const std::optional<Tensor>& b2) {
  TORCH_CHECK(x.dim() == 2 && w1.dim() == 2 && x.size(1) == w1.size(1), "llava::projector: x ", x.sizes(),
              " and w1 ", w1.sizes(), " must be [N,Dv] and [Dh,Dv]");
  TORCH_CHECK(x.size(1) > 0 && w1.size(0) > 0, "llava::projector: empty reduction or output width");
  check_cuda(x, "x", x);
  check_cuda(w1, "w1", x);
  const auto dt = x.scalar_type();
  const int code = dtype_code(dt);
  TORCH_CHECK(w1.scalar_type() == dt, "llava::projector: w1 dtype ", w1.scalar_type(), " != x dtype ", dt);
  const int64_t N = x.size(0), Dv = x.size(1), Dh = w1.size(0);
  const bool has_b1 = b1.has_value() && b1->defined();
  const bool has_w2 = w2.has_value() && w2->defined();
  const bool has_b2 = b2.has_value() && b2->defined();
  if (has_b1) {
    check_cuda(*b1, "b1", x);
    TORCH_CHECK(b1->dim() == 1 && b1->size(0) == Dh && b1->scalar_type() == dt, "llava::projector: b1 must be [Dh]");
  }
  TORCH_CHECK(has_w2 || !has_b2, "llava::projector: b2 given without w2");
  int64_t Dt = Dh;
  if (has_w2) {
    check_cuda(*w2, "w2", x);
    TORCH_CHECK(w2->dim() == 2 && w2->size(1) == Dh && w2->size(0) > 0 && w2->scalar_type() == dt,
                "llava::projector: w2 ", w2->sizes(), " must be [Dt,Dh] with Dh = ", Dh);
    Dt = w2->size(0);
    if (has_b2) {
      check_cuda(*b2, "b2", x);
      TORCH_CHECK(b2->dim() == 1 && b2->size(0) == Dt && b2->scalar_type() == dt, "llava::projector: b2 must be [Dt]");
    }
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = stream_of(x);
  const Tensor xc = x.contiguous(), w1c = w1.contiguous();
  const Tensor b1c = has_b1 ? b1->contiguous() : Tensor();
  const Tensor w2c = has_w2 ? w2->contiguous() : Tensor();
  const Tensor b2c = has_b2 ? b2->contiguous() : Tensor();

  if (dt == at::kFloat) {  // no fp32 tensor-core path of ours: cuBLAS GEMMs, our GELU in between
    Tensor h = has_b1 ? at::addmm(b1c, xc, w1c.t()) : at::mm(xc, w1c.t());
    if (!has_w2) return {h, empty0(x)};
    Tensor a = at::empty_like(h);
    LLAVA_CUDA_OK(llava_gelu_fwd(h.data_ptr(), a.data_ptr(), h.numel(), code, stream));
    Tensor out = has_b2 ? at::addmm(b2c, a, w2c.t()) : at::mm(a, w2c.t());
    return {out, h};
  }
  const void* b1p = has_b1 ? b1c.data_ptr() : nullptr;
  if (!has_w2) {
    Tensor out = at::empty({N, Dh}, x.options());
    LLAVA_CUDA_OK(llava_gemm_bias_act(xc.data_ptr(), w1c.data_ptr(), b1p, out.data_ptr(), nullptr, N, Dh, Dv, code,
                                      /*act=*/0, stream));
    return {out, empty0(x)};
  }
  Tensor h = at::empty({N, Dh}, x.options());
  Tensor a = at::empty({N, Dh}, x.options());
  LLAVA_CUDA_OK(llava_gemm_bias_act(xc.data_ptr(), w1c.data_ptr(), b1p, a.data_ptr(), h.data_ptr(), N, Dh, Dv, code,
                                    /*act=*/1, stream));
  Tensor out = at::empty({N, Dt}, x.options());
  LLAVA_CUDA_OK(llava_gemm_bias_act(a.data_ptr(), w2c.data_ptr(), has_b2 ? b2c.data_ptr() : nullptr, out.data_ptr(),
                                    nullptr, N, Dt, Dh, code, /*act=*/0, stream));
  return {out, h};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> projector_backward_cuda(
    const Tensor& grad_out, const Tensor& x, const Tensor& w1, const std::optional<Tensor>& w2, const Tensor& h,
    c10::List<bool> needs) {
  TORCH_CHECK(needs.size() == 5, "llava::projector_backward: needs must have 5 entries (x, w1, b1, w2, b2)");
  const bool need_x = needs.get(0), need_w1 = needs.get(1), need_b1 = needs.get(2), need_w2 = needs.get(3),
             need_b2 = needs.get(4);
  const bool has_w2 = w2.has_value() && w2->defined();
  check_cuda(grad_out, "grad_out", x);
  const int64_t N = x.size(0), Dh = w1.size(0);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == N && grad_out.scalar_type() == x.scalar_type(),
              "llava::projector_backward: grad_out ", grad_out.sizes(), " does not match x ", x.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = stream_of(x);
  const Tensor g = grad_out.contiguous();
  Tensor dh, dw2 = empty0(x), db2 = empty0(x);
  if (has_w2) {
    TORCH_CHECK(h.dim() == 2 && h.size(0) == N && h.size(1) == Dh, "llava::projector_backward: h must be [N,Dh]");
    const Tensor hc = h.contiguous();
    dh = at::mm(g, w2->contiguous());  // d gelu(h)
    Tensor a = need_w2 ? at::empty_like(hc) : Tensor();
    LLAVA_CUDA_OK(llava_gelu_bwd(hc.data_ptr(), dh.data_ptr(), need_w2 ? a.data_ptr() : nullptr, dh.numel(),
                                 dtype_code(x.scalar_type()), stream));
    if (need_w2) dw2 = at::mm(g.t(), a);
    if (need_b2) db2 = g.sum(0);
  } else {
    dh = g;
  }
  Tensor dx = need_x ? at::mm(dh, w1.contiguous()) : empty0(x);
  Tensor dw1 = need_w1 ? at::mm(dh.t(), x.contiguous()) : empty0(x);
  Tensor db1 = need_b1 ? dh.sum(0) : empty0(x);
  return {dx, dw1, db1, dw2, db2};
}

// ---- scatter_image_tokens ------------------------------------------------------------------------------

// img_idx[t] = j if image_positions[j] == t (largest j on duplicates), else -1.
Tensor image_row_index(const Tensor& positions, int64_t T, cudaStream_t stream) {
  Tensor img_idx = at::full({T}, -1, positions.options().dtype(at::kInt));
  LLAVA_CUDA_OK(llava_mark_image_rows(positions.data_ptr<int64_t>(), positions.numel(), img_idx.data_ptr<int32_t>(),
                                      T, stream));
  return img_idx;
}

void check_ids_positions(const Tensor& ids, const Tensor& positions, const Tensor& ref, const char* op) {
  check_cuda(ids, "input_ids", ref);
  check_cuda(positions, "image_positions", ref);
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong, op, ": input_ids must be int64 [T]");
  TORCH_CHECK(positions.dim() == 1 && positions.scalar_type() == at::kLong, op, ": image_positions must be int64 [M]");
  TORCH_CHECK(positions.numel() <= INT32_MAX, op, ": too many image rows");
}

Tensor scatter_cuda(const Tensor& input_ids, const Tensor& embed_weight, const Tensor& image_rows,
                    const Tensor& image_positions) {
  constexpr const char* op = "llava::scatter_image_tokens";
  check_cuda(embed_weight, "embed_weight", embed_weight);
  check_cuda(image_rows, "image_rows", embed_weight);
  check_ids_positions(input_ids, image_positions, embed_weight, op);
  TORCH_CHECK(embed_weight.dim() == 2 && image_rows.dim() == 2 && image_rows.size(1) == embed_weight.size(1) &&
                  image_rows.size(0) == image_positions.size(0),
              op, ": embed_weight ", embed_weight.sizes(), ", image_rows ", image_rows.sizes(), " and image_positions ",
              image_positions.sizes(), " must be [V,D], [M,D], [M]");
  TORCH_CHECK(image_rows.scalar_type() == embed_weight.scalar_type(), op, ": image_rows dtype ",
              image_rows.scalar_type(), " != embed_weight dtype ", embed_weight.scalar_type());
  const int code = dtype_code(embed_weight.scalar_type());
  const int64_t T = input_ids.numel(), V = embed_weight.size(0), D = embed_weight.size(1), M = image_rows.size(0);
  const c10::cuda::CUDAGuard guard(embed_weight.device());
  const cudaStream_t stream = stream_of(embed_weight);
  const Tensor ids = input_ids.contiguous(), pos = image_positions.contiguous();
  const Tensor emb = embed_weight.contiguous(), img = image_rows.contiguous();
  const Tensor img_idx = image_row_index(pos, T, stream);
  Tensor out = at::empty({T, D}, embed_weight.options());
  LLAVA_CUDA_OK(llava_scatter_rows(ids.data_ptr<int64_t>(), emb.data_ptr(), M > 0 ? img.data_ptr() : nullptr,
                                   img_idx.data_ptr<int32_t>(), out.data_ptr(), T, D, V, code, stream));
  return out;
}

std::tuple<Tensor, Tensor> scatter_backward_cuda(const Tensor& grad_out, const Tensor& input_ids,
                                                 const Tensor& image_positions, c10::SymInt num_embeddings,
                                                 c10::List<bool> needs) {
  constexpr const char* op = "llava::scatter_image_tokens_backward";
  TORCH_CHECK(needs.size() == 2, op, ": needs must have 2 entries (embed_weight, image_rows)");
  check_cuda(grad_out, "grad_out", grad_out);
  check_ids_positions(input_ids, image_positions, grad_out, op);
  const int64_t T = input_ids.numel(), V = num_embeddings.expect_int(), M = image_positions.numel();
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == T, op, ": grad_out ", grad_out.sizes(), " must be [T,D]");
  const int64_t D = grad_out.size(1);
  const int code = dtype_code(grad_out.scalar_type());
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const cudaStream_t stream = stream_of(grad_out);
  const Tensor g = grad_out.contiguous(), ids = input_ids.contiguous(), pos = image_positions.contiguous();
  Tensor d_image = empty0(grad_out), d_embed = empty0(grad_out);
  if (needs.get(1)) {
    d_image = at::empty({M, D}, grad_out.options());
    LLAVA_CUDA_OK(llava_gather_rows(g.data_ptr(), pos.data_ptr<int64_t>(), d_image.data_ptr(), M, D, T, code, stream));
  }
  if (needs.get(0)) {
    const Tensor img_idx = image_row_index(pos, T, stream);
    Tensor keys = at::empty({T}, ids.options());
    LLAVA_CUDA_OK(llava_embed_grad_keys(ids.data_ptr<int64_t>(), img_idx.data_ptr<int32_t>(), keys.data_ptr<int64_t>(),
                                        T, V, stream));
    // Stable sort: equal ids keep token order, so each segment is summed in the same order every run.
    auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    const Tensor sorted_keys = std::get<0>(sorted), perm = std::get<1>(sorted);
    d_embed = at::zeros({V, D}, grad_out.options());
    LLAVA_CUDA_OK(llava_segment_sum_rows(g.data_ptr(), sorted_keys.data_ptr<int64_t>(), perm.data_ptr<int64_t>(),
                                         d_embed.data_ptr(), T, D, V, code, stream));
  }
  return {d_embed, d_image};
}

// ---- masked_lm_loss -------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> masked_lm_loss_cuda(
    const Tensor& hidden, const Tensor& head_weight, const Tensor& targets, const std::optional<Tensor>& cu_seqlens,
    const std::optional<Tensor>& num_targets, c10::List<bool> needs) {
  constexpr const char* op = "llava::masked_lm_loss";
  TORCH_CHECK(needs.size() == 2, op, ": needs must have 2 entries (hidden, head_weight)");
  const bool need_dh = needs.get(0), need_dw = needs.get(1);
  check_cuda(hidden, "hidden", hidden);
  check_cuda(head_weight, "head_weight", hidden);
  check_cuda(targets, "targets", hidden);
  TORCH_CHECK(hidden.dim() == 2 && head_weight.dim() == 2 && head_weight.size(1) == hidden.size(1) &&
                  head_weight.size(0) > 0,
              op, ": hidden ", hidden.sizes(), " and head_weight ", head_weight.sizes(), " must be [T,D] and [V,D]");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0) && targets.scalar_type() == at::kLong, op,
              ": targets must be int64 [T]");
  TORCH_CHECK(head_weight.scalar_type() == hidden.scalar_type(), op, ": head_weight dtype ", head_weight.scalar_type(),
              " != hidden dtype ", hidden.scalar_type());
  const auto dt = hidden.scalar_type();
  const int code = dtype_code(dt);
  const int64_t T = hidden.size(0), D = hidden.size(1), V = head_weight.size(0);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const cudaStream_t stream = stream_of(hidden);
  const auto f32 = hidden.options().dtype(at::kFloat);

  Tensor cu;
  if (cu_seqlens.has_value() && cu_seqlens->defined()) {
    check_cuda(*cu_seqlens, "cu_seqlens", hidden);
    TORCH_CHECK(cu_seqlens->dim() == 1 && cu_seqlens->numel() >= 2 && cu_seqlens->scalar_type() == at::kInt, op,
                ": cu_seqlens must be int32 [B+1] with B >= 1");
    cu = cu_seqlens->contiguous();
  } else {
    cu = at::zeros({2}, hidden.options().dtype(at::kInt));
    cu.select(0, 1).fill_(T);
  }
  const int64_t B = cu.numel() - 1;

  const Tensor tg = targets.contiguous();
  const Tensor rows = at::nonzero(tg != -100).view({-1});  // the one host sync: R sizes the compaction
  const int64_t R = rows.size(0);

  Tensor n;  // normalizer, kept on the device
  if (num_targets.has_value() && num_targets->defined()) {
    TORCH_CHECK(num_targets->numel() == 1, op, ": num_targets must hold one number");
    n = num_targets->to(hidden.device(), at::kFloat).reshape({});
  } else {
    n = at::full({}, static_cast<double>(R), f32);
  }
  // scale = 1/n, or 0 when n == 0 (zero loss and zero grads, never NaN)
  const Tensor scale = at::where(n > 0, n.reciprocal(), at::zeros_like(n)).contiguous();

  Tensor token_loss = at::zeros({T}, f32);  // the reduction sums all T rows: non-target rows stay 0
  Tensor d_hidden = need_dh ? at::zeros({T, D}, hidden.options()) : empty0(hidden);
  Tensor d_head = need_dw ? (R > 0 ? at::empty({V, D}, hidden.options()) : at::zeros({V, D}, hidden.options()))
                          : empty0(hidden);
  if (R > 0) {
    const Tensor W = head_weight.contiguous();
    const Tensor tg_c = tg.index_select(0, rows);  // [R] compacted targets
    const bool exact_dw = need_dw && dt != at::kFloat;
    const int64_t chunk = loss_chunk_rows(T, D, V, R, hidden.element_size(), exact_dw);
    // bf16/fp16 d_head over several chunks: one fp32 sum, rounded once at the end (an addmm_ per chunk into
    // a bf16 d_head rounds every element once per chunk: 2.3x the reference's error at 4 chunks on an H200).
    Tensor acc = exact_dw && R > chunk ? at::empty({V, D}, f32) : Tensor();
    const int64_t cbuf = std::min(chunk, R);
    Tensor z_buf = at::empty({cbuf, V}, hidden.options());
    Tensor h_buf = at::empty({cbuf, D}, hidden.options());
    for (int64_t r0 = 0; r0 < R; r0 += chunk) {
      const int64_t nr = std::min(chunk, R - r0);
      const Tensor rows_c = rows.narrow(0, r0, nr);
      Tensor hc = h_buf.narrow(0, 0, nr);
      Tensor z = z_buf.narrow(0, 0, nr);
      at::index_select_out(hc, hidden, 0, rows_c);  // [nr, D] this chunk's target rows
      at::mm_out(z, hc, W.t());                      // [nr, V] logits
      LLAVA_CUDA_OK(llava_ce_chunk(z.data_ptr(), tg_c.narrow(0, r0, nr).data_ptr<int64_t>(),
                                   rows_c.data_ptr<int64_t>(), scale.data_ptr<float>(), token_loss.data_ptr<float>(),
                                   nr, V, code, /*write_grad=*/need_dh || need_dw, stream));
      // z now holds d loss / d logits for these rows
      if (acc.defined()) {
        if (r0 == 0) {
          at::mm_out(acc, z.t(), hc, at::kFloat);
        } else {
          at::addmm_out(acc, acc, z.t(), hc, at::kFloat);
        }
      } else if (need_dw) {
        if (r0 == 0) {
          at::mm_out(d_head, z.t(), hc);
        } else {
          d_head.addmm_(z.t(), hc);  // fp32 inputs only (exact_dw is false)
        }
      }
      if (need_dh) {
        at::mm_out(hc, z, W);  // hc is free: its buffer takes the chunk's d_hidden rows
        d_hidden.index_copy_(0, rows_c, hc);
      }
    }
    if (acc.defined()) d_head.copy_(acc);
  }
  Tensor loss = at::empty({}, f32);
  Tensor seq_sum = at::empty({B}, f32);
  Tensor seq_count = at::empty({B}, hidden.options().dtype(at::kLong));
  LLAVA_CUDA_OK(llava_loss_reduce(token_loss.data_ptr<float>(), tg.data_ptr<int64_t>(), cu.data_ptr<int32_t>(),
                                  scale.data_ptr<float>(), loss.data_ptr<float>(), seq_sum.data_ptr<float>(),
                                  seq_count.data_ptr<int64_t>(), T, B, stream));
  return {loss, seq_sum, seq_count, d_hidden, d_head};
}

}  // namespace

TORCH_LIBRARY(llava, m) {
  m.def("projector(Tensor x, Tensor w1, Tensor? b1, Tensor? w2, Tensor? b2) -> (Tensor, Tensor)");
  m.def("projector_backward(Tensor grad_out, Tensor x, Tensor w1, Tensor? w2, Tensor h, bool[] needs) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("scatter_image_tokens(Tensor input_ids, Tensor embed_weight, Tensor image_rows, Tensor image_positions) "
        "-> Tensor");
  m.def("scatter_image_tokens_backward(Tensor grad_out, Tensor input_ids, Tensor image_positions, "
        "SymInt num_embeddings, bool[] needs) -> (Tensor, Tensor)");
  m.def("masked_lm_loss(Tensor hidden, Tensor head_weight, Tensor targets, Tensor? cu_seqlens, "
        "Tensor? num_targets, bool[] needs) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(llava, CUDA, m) {
  m.impl("projector", &projector_cuda);
  m.impl("projector_backward", &projector_backward_cuda);
  m.impl("scatter_image_tokens", &scatter_cuda);
  m.impl("scatter_image_tokens_backward", &scatter_backward_cuda);
  m.impl("masked_lm_loss", &masked_lm_loss_cuda);
}
