"""Image-token scatter: build the packed input embeddings from token ids and image feature rows.

Letters: T packed tokens, D model width, V vocab, M image rows (all images of the batch).

    out[t] = image_rows[j]             where image_positions[j] == t
           = embed_weight[input_ids[t]] otherwise

Forward is ONE pass that writes every output row exactly once: a per-row map ``row_img[T]``
(image row index j, or -1 for a text row) is built on the device without a host sync, then one
Triton kernel copies each destination row from the embedding table or from ``image_rows``.
Backward: grad image_rows = gather of grad_out at image_positions; grad embed_weight (only when
it requires grad, i.e. stage 2) = a deterministic segment sum: text rows are stably sorted by
token id and each id's rows are summed in that fixed order in fp32 (no float atomics), so the
result is bit-identical run to run; one program per vocab row writes that row exactly once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from llava_kernels import dispatch
from llava_kernels._triton_util import store_cast

# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _scatter_fwd_kernel(out_ptr, emb_ptr, img_ptr, ids_ptr, row_img_ptr, V, D,
                        stride_out, stride_emb, stride_img, BLOCK_D: tl.constexpr):
    # grid (T, cdiv(D, BLOCK_D)): one destination row block per program, written exactly once.
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    j = tl.load(row_img_ptr + t)  # image row feeding row t, or -1 for a text row
    is_img = j >= 0
    # The id is loaded only for text rows: image positions hold the image token id (maybe >= V).
    tok = tl.load(ids_ptr + t, mask=j < 0, other=0)
    # Out-of-range ids (possible only with check=False) give a NaN row, never an out-of-bounds read.
    tok_ok = (tok >= 0) & (tok < V)
    txt = tl.load(emb_ptr + tok.to(tl.int64) * stride_emb + cols, mask=cmask & (j < 0) & tok_ok,
                  other=float("nan"))
    img = tl.load(img_ptr + j.to(tl.int64) * stride_img + cols, mask=cmask & is_img)
    tl.store(out_ptr + t.to(tl.int64) * stride_out + cols, tl.where(is_img, img, txt), mask=cmask)


@triton.jit
def _gather_rows_kernel(out_ptr, src_ptr, idx_ptr, D, stride_out, stride_src, BLOCK_D: tl.constexpr):
    # out[i] = src[idx[i]]; grid (rows, cdiv(D, BLOCK_D)).
    i = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    r = tl.load(idx_ptr + i).to(tl.int64)
    x = tl.load(src_ptr + r * stride_src + cols, mask=cmask)
    tl.store(out_ptr + i.to(tl.int64) * stride_out + cols, x, mask=cmask)


@triton.jit
def _embed_grad_kernel(gw_ptr, grad_ptr, perm_ptr, bounds_ptr, D, stride_gw, stride_grad,
                       BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, OUT_BF16: tl.constexpr):
    # grid (V, cdiv(D, BLOCK_D)): program v sums in fp32 the grad rows of the text tokens with id
    # v, sorted[bounds[v]:bounds[v+1]], and writes gw[v] exactly once (zeros for an absent id: no
    # separate zero fill of the [V, D] table). Rows are loaded BLOCK_R at a time so a frequent id
    # (hundreds of rows) is not a serial chain of dependent loads; the order of the sum (a fixed
    # tree within a tile, tiles in sorted order) is the same every run.
    v = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    lo = tl.load(bounds_ptr + v)
    hi = tl.load(bounds_ptr + v + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k0 in range(lo, hi, BLOCK_R):
        ks = k0 + tl.arange(0, BLOCK_R)
        kmask = ks < hi
        r = tl.load(perm_ptr + ks, mask=kmask, other=0).to(tl.int64)
        x = tl.load(grad_ptr + r[:, None] * stride_grad + cols[None, :], mask=kmask[:, None] & cmask[None, :],
                    other=0.0)  # [BLOCK_R, BLOCK_D]
        acc += tl.sum(x.to(tl.float32), axis=0)
    # Hand rounding for bf16 on every backend (the interpreter truncates; on a GPU it gives the cast's bits).
    store_cast(gw_ptr + v.to(tl.int64) * stride_gw + cols, acc, cmask, OUT_BF16)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ScatterConfig:
    """Launch shape: ``block_d`` columns per program (power of 2), ``num_warps`` per program,
    ``block_r`` grad rows summed per step in the embedding backward (power of 2)."""
    block_d: int
    num_warps: int
    block_r: int = 8


def default_config(D: int, element_size: int) -> ScatterConfig:
    """Up to 8 KiB of a row per program, two 16-byte vectors per thread (a pure copy: no reuse).

    H100 sweep (bench/lab/scatter_configs.py, T=16384, D=4096, bf16): 4096 columns with 4 or 8
    warps reached 93% of copy bandwidth, 2048 × 8 warps 87%, 512 × 8 warps 54%.
    """
    block_d = min(triton.next_power_of_2(D), 8192 // element_size)
    return ScatterConfig(block_d=block_d, num_warps=max(1, min(8, block_d * element_size // 1024)))


def default_grad_config(D: int, element_size: int) -> ScatterConfig:
    """Embedding backward: 8 rows × up to 1024 columns per step (64 values a thread at 4 warps)."""
    block_d = min(triton.next_power_of_2(D), 1024)
    return ScatterConfig(block_d=block_d, num_warps=max(1, min(4, block_d // 256)), block_r=8)


def build_row_map(image_positions: torch.Tensor, T: int) -> torch.Tensor:
    """row_img[T] int32: j where image_positions[j] == t, else -1. On device, no host sync."""
    row_img = torch.full((T,), -1, dtype=torch.int32, device=image_positions.device)
    M = image_positions.shape[0]
    # scatter_ rather than index_put_: same kernel work, far less host overhead per call.
    row_img.scatter_(0, image_positions, torch.arange(M, dtype=torch.int32, device=image_positions.device))
    return row_img


def _rows(x: torch.Tensor) -> torch.Tensor:
    # The kernels take a row stride but need unit stride along D.
    return x if x.stride(-1) == 1 else x.contiguous()


def scatter_fwd(input_ids: torch.Tensor, embed_weight: torch.Tensor, image_rows: torch.Tensor,
                image_positions: torch.Tensor, *, out: torch.Tensor | None = None,
                row_img: torch.Tensor | None = None, config: ScatterConfig | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward copy. Inputs already validated. Returns (out[T,D], row_img[T] int32).

    ``out``, when given, must be [T, D] of the embedding dtype with unit stride along D; every row
    of it is overwritten.
    """
    T, (V, D) = input_ids.shape[0], embed_weight.shape
    embed_weight, image_rows = _rows(embed_weight), _rows(image_rows)
    if row_img is None:
        row_img = build_row_map(image_positions, T)
    if out is None:
        out = torch.empty((T, D), dtype=embed_weight.dtype, device=embed_weight.device)
    assert out.shape == (T, D) and out.stride(-1) == 1 and out.dtype == embed_weight.dtype
    if T == 0 or D == 0:
        return out, row_img
    cfg = config or default_config(D, embed_weight.element_size())
    grid = (T, triton.cdiv(D, cfg.block_d))
    _scatter_fwd_kernel[grid](out, embed_weight, image_rows, input_ids.contiguous(), row_img, V, D,
                              out.stride(0), embed_weight.stride(0), image_rows.stride(0),
                              BLOCK_D=cfg.block_d, num_warps=cfg.num_warps)
    return out, row_img


def gather_rows(src: torch.Tensor, idx: torch.Tensor, *, out: torch.Tensor | None = None,
                config: ScatterConfig | None = None) -> torch.Tensor:
    """out[i] = src[idx[i]] for src [R, D], idx [M] (in range); returns out [M, D]."""
    src = _rows(src)
    M, D = idx.shape[0], src.shape[1]
    if out is None:
        out = torch.empty((M, D), dtype=src.dtype, device=src.device)
    if M == 0 or D == 0:
        return out
    cfg = config or default_config(D, src.element_size())
    _gather_rows_kernel[(M, triton.cdiv(D, cfg.block_d))](out, src, idx.contiguous(), D, out.stride(0),
                                                         src.stride(0), BLOCK_D=cfg.block_d,
                                                         num_warps=cfg.num_warps)
    return out


def embed_grad(grad_out: torch.Tensor, input_ids: torch.Tensor, row_img: torch.Tensor, V: int, *,
               out: torch.Tensor | None = None, config: ScatterConfig | None = None) -> torch.Tensor:
    """Deterministic grad of the embedding table [V, D]: sum of grad_out over the text rows of each
    id, accumulated in fp32 in a fixed order. Every row of ``out`` (if given, [V, D]) is written."""
    grad_out = _rows(grad_out)
    T, D = grad_out.shape
    if out is None:
        out = torch.empty((V, D), dtype=grad_out.dtype, device=grad_out.device)
    if V == 0 or D == 0:
        return out
    # Image rows and (check=False) out-of-range ids get key V: sorted last, in no id's range.
    # int32 keys: half the radix-sort passes of int64.
    text = (row_img < 0) & (input_ids >= 0) & (input_ids < V)
    keys = torch.where(text, input_ids, V).to(torch.int32)
    keys, perm = torch.sort(keys, stable=True)  # stable: a fixed summation order per id
    # bounds[v] = first sorted row with key >= v, so id v owns sorted[bounds[v]:bounds[v+1]].
    bounds = torch.searchsorted(keys, torch.arange(V + 1, dtype=torch.int32, device=keys.device))
    cfg = config or default_grad_config(D, grad_out.element_size())
    _embed_grad_kernel[(V, triton.cdiv(D, cfg.block_d))](out, grad_out, perm, bounds, D, out.stride(0),
                                                        grad_out.stride(0), BLOCK_D=cfg.block_d,
                                                        BLOCK_R=cfg.block_r,
                                                        OUT_BF16=out.dtype == torch.bfloat16,
                                                        num_warps=cfg.num_warps)
    return out


def scatter_bwd(grad_out: torch.Tensor, input_ids: torch.Tensor, image_positions: torch.Tensor,
                row_img: torch.Tensor, V: int, *, need_embed: bool, need_image: bool,
                config: ScatterConfig | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Returns (grad embed_weight [V, D] or None, grad image_rows [M, D] or None)."""
    g_img = gather_rows(grad_out, image_positions, config=config) if need_image else None
    g_emb = embed_grad(grad_out, input_ids, row_img, V, config=config) if need_embed else None
    return g_emb, g_img


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------


class ScatterImageTokensFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_ids, embed_weight, image_rows, image_positions):
        out, row_img = scatter_fwd(input_ids, embed_weight, image_rows, image_positions)
        ctx.save_for_backward(input_ids, image_positions, row_img)
        ctx.V = embed_weight.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        input_ids, image_positions, row_img = ctx.saved_tensors
        g_emb, g_img = scatter_bwd(grad_out, input_ids, image_positions, row_img, ctx.V,
                                   need_embed=ctx.needs_input_grad[1], need_image=ctx.needs_input_grad[2])
        return None, g_emb, g_img, None


class ScatterImageGradOnlyFunction(torch.autograd.Function):
    """A kernel's forward with the frozen-table backward (stage 1: only the image rows get grads), which
    is one gather of grad rows: torch's gather did it fastest on an H200 (bench/results/h200/scatter.json,
    "bwd1": torch 0.04-0.07 ms, Triton 0.08-0.16, CUDA 0.06-0.11), while the kernels' forwards are
    1.1-5.9x torch's. `forward_fn(input_ids, embed_weight, image_rows, image_positions)` runs with grad off."""

    @staticmethod
    def forward(ctx, forward_fn, input_ids, embed_weight, image_rows, image_positions):
        ctx.save_for_backward(image_positions)
        return forward_fn(input_ids, embed_weight, image_rows, image_positions)

    @staticmethod
    def backward(ctx, grad_out):
        (image_positions,) = ctx.saved_tensors
        return None, None, None, grad_out.index_select(0, image_positions), None


def _triton_forward(input_ids, embed_weight, image_rows, image_positions):
    return scatter_fwd(input_ids, embed_weight, image_rows, image_positions)[0]


# ---------------------------------------------------------------------------------------------
# Public op
# ---------------------------------------------------------------------------------------------


def _validate_shapes(input_ids, embed_weight, image_rows, image_positions) -> None:
    tensors = {"input_ids": input_ids, "embed_weight": embed_weight, "image_rows": image_rows,
               "image_positions": image_positions}
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"scatter_image_tokens: {name} must be a torch.Tensor, got {type(x).__name__}")
    devices = {name: x.device for name, x in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"scatter_image_tokens: all tensors must be on one device, got {devices}")
    for name in ("input_ids", "image_positions"):
        x = tensors[name]
        if x.dim() != 1 or x.dtype != torch.int64:
            raise ValueError(f"scatter_image_tokens: {name} must be 1-D int64, got shape {tuple(x.shape)} "
                             f"dtype {x.dtype}")
    if embed_weight.dim() != 2 or not embed_weight.is_floating_point():
        raise ValueError(f"scatter_image_tokens: embed_weight must be a 2-D floating tensor [V, D], got "
                         f"shape {tuple(embed_weight.shape)} dtype {embed_weight.dtype}")
    D = embed_weight.shape[1]
    if image_rows.dim() != 2 or image_rows.shape[1] != D:
        raise ValueError(f"scatter_image_tokens: image_rows must be [M, {D}] (D of embed_weight), got "
                         f"{tuple(image_rows.shape)}")
    if image_rows.dtype != embed_weight.dtype:
        raise ValueError(f"scatter_image_tokens: image_rows dtype {image_rows.dtype} != embed_weight dtype "
                         f"{embed_weight.dtype}")
    M, T = image_rows.shape[0], input_ids.shape[0]
    if image_positions.shape[0] != M:
        raise ValueError(f"scatter_image_tokens: image_positions has {image_positions.shape[0]} entries "
                         f"but image_rows has {M} rows")
    if M > T:
        raise ValueError(f"scatter_image_tokens: {M} image rows do not fit in {T} packed tokens")


def _check_values(input_ids, V, image_positions) -> None:
    # Forces a host sync: only run when asked (default on CPU tensors).
    T = input_ids.shape[0]
    bad = ((image_positions < 0) | (image_positions >= T)).nonzero()
    if bad.numel():
        j = int(bad[0])
        raise ValueError(f"scatter_image_tokens: image_positions[{j}] = {int(image_positions[j])} is outside "
                         f"[0, {T})")
    order = torch.argsort(image_positions, stable=True)
    sp = image_positions[order]
    dup = (sp[1:] == sp[:-1]).nonzero()
    if dup.numel():
        k = int(dup[0])
        a, b = sorted((int(order[k]), int(order[k + 1])))
        raise ValueError(f"scatter_image_tokens: image_positions[{a}] and image_positions[{b}] are both "
                         f"{int(sp[k])} (duplicate destination row)")
    text = torch.ones(T, dtype=torch.bool, device=input_ids.device)
    text[image_positions] = False
    bad = (text & ((input_ids < 0) | (input_ids >= V))).nonzero()
    if bad.numel():
        t = int(bad[0])
        raise ValueError(f"scatter_image_tokens: input_ids[{t}] = {int(input_ids[t])} (a text row) is "
                         f"outside [0, {V})")


def scatter_image_tokens(input_ids: torch.Tensor, embed_weight: torch.Tensor, image_rows: torch.Tensor,
                         image_positions: torch.Tensor, *, backend: str | None = None,
                         check: bool | None = None) -> torch.Tensor:
    """Packed input embeddings with image feature rows written at their placeholder positions.

    Args:
        input_ids: [T] int64 token ids; entries at image positions are never read (may be >= V).
        embed_weight: [V, D] floating embedding table.
        image_rows: [M, D] image feature rows, same dtype and device as embed_weight.
        image_positions: [M] int64 destination row of each image row.
        backend: "torch" | "triton" | "cuda" | None (automatic, see llava_kernels.dispatch).
        check: validate values (positions in [0, T) and distinct, text ids in [0, V)); None means
            True for CPU tensors, False for CUDA (the check syncs with the host). Unchecked bad
            values are undefined behaviour (the Triton path gives NaN rows for bad text ids).

    Returns [T, D] in embed_weight's dtype; differentiable w.r.t. embed_weight and image_rows
    (embedding grads are summed deterministically). Raises ValueError on shape, dtype or device
    mismatches (always, before any launch) and on bad values when checking.
    """
    _validate_shapes(input_ids, embed_weight, image_rows, image_positions)
    if check is None:
        check = input_ids.device.type == "cpu"
    if check:
        _check_values(input_ids, embed_weight.shape[0], image_positions)
    impl = dispatch.resolve("scatter", input_ids.device, backend)
    if impl == "torch":
        return scatter_image_tokens_ref(input_ids, embed_weight, image_rows, image_positions)
    if impl == "cuda":
        from llava_kernels import _cuda
        forward_fn = _cuda.scatter_image_tokens
    else:
        forward_fn = _triton_forward
    grad_on = torch.is_grad_enabled()
    if grad_on and image_rows.requires_grad and not embed_weight.requires_grad:
        # Frozen table (stage 1): the backward is one gather, which torch does fastest.
        return ScatterImageGradOnlyFunction.apply(forward_fn, input_ids, embed_weight, image_rows, image_positions)
    if impl == "cuda":
        return forward_fn(input_ids, embed_weight, image_rows, image_positions)
    return ScatterImageTokensFunction.apply(input_ids, embed_weight, image_rows, image_positions)


def scatter_image_tokens_ref(input_ids: torch.Tensor, embed_weight: torch.Tensor, image_rows: torch.Tensor,
                             image_positions: torch.Tensor) -> torch.Tensor:
    """Pure-torch oracle and CPU path: embedding lookup of the text rows, then index_put of the images.

    Same contract as ``scatter_image_tokens`` (no validation here). Positions must be distinct.
    """
    is_img = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    is_img[image_positions] = True
    ids = input_ids.masked_fill(is_img, 0)  # the image token id may be >= V: never used as an index
    out = torch.nn.functional.embedding(ids, embed_weight)  # [T, D]
    return out.index_put((image_positions,), image_rows)
