"""Fused multimodal projector: Linear(W1, b1) → exact erf GELU → Linear(W2, b2), and its backward.

Letters: N projector input rows (image patches), Dv vision width, Dh hidden width, Dt text width.
Inside the GEMM kernel: C[M, Nc] = A[M, K] @ B[K, Nc] (B is a strided view, e.g. W1ᵀ).

Passes (LLaVA-1.5, ``mlp2x_gelu``):
  forward   K1: H = x @ W1ᵀ + b1, G = gelu(H)  (bias + GELU in the epilogue; writes H for backward, G)
            K2: Y = G @ W2ᵀ + b2               (bias in the epilogue)
  backward  K3: dH = (dY @ W2) ⊙ gelu'(H)      (GELU derivative in the epilogue; the same epilogue also
                re-materialises G = gelu(H) for dW2 and writes fp32 partial column sums of dH for db1)
            cuBLAS: dW2 = dYᵀ @ G, dW1 = dHᵀ @ x, dx = dH @ W1, db2 = Σ_rows dY.
Why G is recomputed rather than saved: K3 touches every H element once anyway, so gelu(H) costs one
store there, while saving G would keep an extra [N, Dh] alive between forward and backward (the whole
LLM step in training). Recomputing gelu inside dW2's operand load instead would redo erf Dt/BLOCK times
per element on CUDA cores, in the tensor-core main loop — slower than the store.
Why cuBLAS for dW2, dW1, dx: plain GEMMs whose operands are already in memory; there is no elementwise
work left to fuse, and their reduction dimension is N (the rows), where cuBLAS's split-K is hard to beat.
The ``linear`` projector (W2 None) is one GEMM with the bias in its epilogue; its backward is cuBLAS.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from llava_kernels._triton_util import store_cast
from llava_kernels.dispatch import resolve, triton_interpreting

ACT_NONE, ACT_GELU, ACT_GELU_BWD = 0, 1, 2
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _gemm_kernel(a_ptr, b_ptr, bias_ptr, c_ptr, aux_ptr, aux_out_ptr, colsum_ptr, M, N, K, M_BUCKET,
                 stride_am, stride_ak, stride_bk, stride_bn, stride_cm,
                 HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_AUX: tl.constexpr, COLSUM: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr, EVEN_K: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C = epilogue(A @ B + bias). ACT_GELU: aux_out ← pre-activation, C ← gelu. ACT_GELU_BWD: aux holds
    H, C ← acc · gelu'(H), aux_out ← gelu(H). COLSUM: colsum[pid_m, n] ← Σ of C (fp32) over the tile's rows.
    aux/aux_out/C share the row stride ``stride_cm`` and unit column stride.
    INTERP_BF16: see _INTERP_BF16_BROKEN."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped launch order: GROUP_M row-blocks in a row share the same B column-blocks in L2.
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Wrapped indices keep the main loop free of row/column masks; the stores below are masked.
    a_ptrs = a_ptr + (offs_m % M)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + (offs_n % N)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k * BLOCK_K, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < K - k * BLOCK_K, other=0.0)
        if INTERP_BF16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    offs_c = offs_m[:, None] * stride_cm + offs_n[None, :]
    if ACT == 1:
        if STORE_AUX:
            store_cast(aux_out_ptr + offs_c, acc, mask, INTERP_BF16)
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    elif ACT == 2:
        h = tl.load(aux_ptr + offs_c, mask=mask, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        acc = acc * (cdf + h * tl.exp(-0.5 * h * h) * 0.3989422804014327)  # d/dh h·Φ(h) = Φ(h) + h·φ(h)
        if STORE_AUX:
            store_cast(aux_out_ptr + offs_c, h * cdf, mask, INTERP_BF16)
    if COLSUM:
        # One partial row per row-block, summed by torch afterwards: deterministic, no atomics.
        tl.store(colsum_ptr + pid_m * N + offs_n, tl.sum(tl.where(mask, acc, 0.0), axis=0), mask=offs_n < N)
    store_cast(c_ptr + offs_c, acc, mask, INTERP_BF16)


# Every config has the same BLOCK_M, so the [cdiv(M, BLOCK_M), Nc] partial-column-sum buffer is fully
# rewritten by whichever config runs (no stale rows left by autotuning runs of another config).
_BLOCK_M = 32 if triton_interpreting() else 128


def _configs() -> list[triton.Config]:
    # Short list, valid on triton 3.6 and 3.8 (sm_90). (BLOCK_N, BLOCK_K, warps, stages).
    # (64, 64, 4, 4) is for the GELU-backward epilogue, whose live registers spill on 128-wide tiles.
    shapes = [(128, 64, 4, 4), (256, 64, 8, 3), (128, 64, 8, 3), (64, 64, 4, 4)]
    return [triton.Config({"BLOCK_M": _BLOCK_M, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                          num_warps=w, num_stages=s) for bn, bk, w, s in shapes]


def _prune(configs, nargs, **kwargs):
    """Drop configs whose pipelined tiles exceed ~200 KB of shared memory (fp32 operands); small problems
    (tests, tiny batches) take the first fitting config instead of compiling and timing all of them."""
    size = nargs["a_ptr"].element_size()
    fits = [c for c in configs if c.num_stages * size * c.kwargs["BLOCK_K"] *
            (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) <= 200 * 1024]
    return fits[:1] if nargs["M"] * nargs["N"] * nargs["K"] < 2**26 else fits


_even_k = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(_gemm_kernel)
# The triton 3.8 interpreter mishandles bf16 twice: tl.dot multiplies the raw uint16 storage, and fp32→bf16
# casts truncate instead of rounding to nearest even. Under the interpreter, bf16 tiles are upcast before
# tl.dot (the same exact products + fp32 accumulation as tensor cores) and stores round by hand
# (llava_kernels._triton_util.store_cast); on a GPU the plain cast rounds and INTERP_BF16 is off.
_INTERP_BF16_BROKEN = triton_interpreting()
if triton_interpreting():  # one small fixed config: the interpreter is slow and cannot time configs
    _gemm, _FIXED = _even_k, {"BLOCK_M": _BLOCK_M, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 4}
else:  # key on the power-of-two bucket of M so a new image count does not re-tune every batch; the
    # epilogue flags are in the key because each variant has its own best tile (register pressure).
    _key = ["M_BUCKET", "N", "K", "ACT", "HAS_BIAS", "STORE_AUX", "COLSUM"]
    _gemm, _FIXED = triton.autotune(_configs(), key=_key,
                                    prune_configs_by={"early_config_prune": _prune})(_even_k), {}


def fused_gemm(a: torch.Tensor, b: torch.Tensor, *, bias: torch.Tensor | None = None, act: int = ACT_NONE,
               aux: torch.Tensor | None = None, store_aux: bool = False, colsum: bool = False,
               out: torch.Tensor | None = None, aux_out: torch.Tensor | None = None):
    """C[M, Nc] = epilogue(a[M, K] @ b[K, Nc] + bias[Nc]), fp32 accumulation; returns (C, aux_out, colsum).

    ``b`` may be any strided view (e.g. ``w.t()``). C, aux_out have a's dtype. act=ACT_GELU with store_aux
    writes the pre-activation to aux_out; act=ACT_GELU_BWD needs ``aux`` = H [M, Nc] and, with store_aux,
    writes gelu(H) to aux_out. colsum returns Σ_rows C in fp32 [Nc]. ``out``/``aux_out`` may be
    preallocated contiguous [M, Nc] tensors (tests poison them). Internal: inputs are validated upstream.
    """
    M, K = a.shape
    Nc = b.shape[1]
    out = torch.empty((M, Nc), device=a.device, dtype=a.dtype) if out is None else out
    if store_aux and aux_out is None:
        aux_out = torch.empty_like(out)
    assert out.is_contiguous() and (aux_out is None or aux_out.is_contiguous())
    if aux is not None:
        aux = aux.contiguous()
    slabs = None
    if colsum:
        slabs = torch.empty((triton.cdiv(M, _BLOCK_M), Nc), device=a.device, dtype=torch.float32)
    if M > 0 and Nc > 0:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(Nc, meta["BLOCK_N"]),)  # noqa: E731
        _gemm[grid](a, b, out if bias is None else bias.contiguous(), out, out if aux is None else aux,
                    out if aux_out is None else aux_out, out if slabs is None else slabs,
                    M, Nc, K, triton.next_power_of_2(M), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                    out.stride(0), HAS_BIAS=bias is not None, ACT=act, STORE_AUX=store_aux, COLSUM=colsum,
                    DOT_PRECISION="ieee", INTERP_BF16=_INTERP_BF16_BROKEN and a.dtype == torch.bfloat16,
                    **_FIXED)
    return out, aux_out, (slabs.sum(0) if colsum else None)


def projector_fwd(x, w1, b1, w2=None, b2=None, *, out=None):
    """Forward launcher: returns (y [N, Dt or Dh], h [N, Dh] pre-activation saved for backward, or None
    for the linear projector). ``out`` may be a preallocated contiguous output (tests poison it)."""
    if w2 is None:
        return fused_gemm(x, w1.t(), bias=b1, out=out)[0], None
    g, h, _ = fused_gemm(x, w1.t(), bias=b1, act=ACT_GELU, store_aux=True)  # g [N, Dh], h [N, Dh]
    return fused_gemm(g, w2.t(), bias=b2, out=out)[0], h


def projector_bwd(dy, x, w1, w2, h, needs):
    """Backward launcher. ``needs`` = which of (x, w1, b1, w2, b2) want grads; returns their grads (None
    where not needed). Weight/bias grads have the parameter's dtype; bias grads are summed in fp32."""
    nx, nw1, nb1, nw2, nb2 = needs
    dx = dw1 = db1 = dw2 = db2 = None
    if w2 is None:  # linear projector: dy is dH
        dh, db1_32 = dy, (dy.sum(0, dtype=torch.float32) if nb1 else None)
    else:
        if nb2:
            db2 = dy.sum(0, dtype=torch.float32).to(dy.dtype)
        g = None
        if nx or nw1 or nb1:
            dh, g, db1_32 = fused_gemm(dy, w2, act=ACT_GELU_BWD, aux=h, store_aux=nw2, colsum=nb1)
        elif nw2:  # only the second layer trains: no dH needed, gelu(H) alone
            g = F.gelu(h)
        if nw2:
            dw2 = dy.t() @ g  # [Dt, Dh]
    if nb1:
        db1 = db1_32.to(dy.dtype)
    if nw1:
        dw1 = dh.t() @ x  # [Dh, Dv]
    if nx:
        dx = dh @ w1  # [N, Dv]
    return dx, dw1, db1, dw2, db2


class ProjectorFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        y, h = projector_fwd(x, w1, b1, w2, b2)
        ctx.save_for_backward(x, w1, w2, h)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w1, w2, h = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:5])
        return projector_bwd(dy.contiguous(), x, w1, w2, h, needs)


def _validate(x, w1, b1, w2, b2) -> None:
    def fail(msg):
        raise ValueError(f"projector: {msg}")

    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        fail(f"x must be a 2-D tensor [N, Dv], got {getattr(x, 'shape', type(x))}")
    if x.dtype not in _DTYPES:
        fail(f"x dtype {x.dtype} not supported; expected one of {_DTYPES}")
    if w2 is None and b2 is not None:
        fail("b2 given without w2 (the linear projector has one layer)")
    n, dv = x.shape
    dh = w1.shape[0] if isinstance(w1, torch.Tensor) and w1.dim() == 2 else -1
    expect = {"w1": (dh, dv), "b1": (dh,)}
    if w2 is not None:
        dt = w2.shape[0] if isinstance(w2, torch.Tensor) and w2.dim() == 2 else -1
        expect.update(w2=(dt, dh), b2=(dt,))
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if t is None:
            if name == "w1":
                fail("w1 is required")
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != expect[name] or -1 in expect[name]:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            fail(f"{name} must have shape {expect[name]} (x is [{n}, {dv}]), got {got}")
        if t.dtype != x.dtype:
            fail(f"{name} dtype {t.dtype} != x dtype {x.dtype}")
        if t.device != x.device:
            fail(f"{name} is on {t.device} but x is on {x.device}")


def projector(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor | None = None,
              b2: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """LLaVA projector: y[N, Dt] = Linear(w2, b2)(gelu_erf(Linear(w1, b1)(x))); w2 None: y = x W1ᵀ + b1.

    x [N, Dv]; w1 [Dh, Dv]; b1 [Dh] or None; w2 [Dt, Dh] or None; b2 [Dt] or None (must be None if w2 is).
    All share x's dtype (float32, bfloat16, float16) and device; accumulation is fp32. Output: x's dtype.
    Differentiable w.r.t. every tensor that requires grad. Raises ValueError on bad shapes, dtypes, devices
    or an unusable ``backend`` ("torch" | "triton" | "cuda" | None = automatic), before any launch.
    """
    _validate(x, w1, b1, w2, b2)
    chosen = resolve("projector", x.device, backend)
    if chosen == "cuda":
        from llava_kernels import _cuda  # built by csrc/; imported only when dispatch says it is loaded

        return _cuda.projector(x, w1, b1, w2, b2)
    if chosen == "triton":
        return ProjectorFunction.apply(x, w1, b1, w2, b2)
    return projector_ref(x, w1, b1, w2, b2)


def projector_ref(x, w1, b1, w2=None, b2=None):
    """Pure-torch projector (test oracle and CPU path): the eager LLaVA ``mm_projector``."""
    h = F.linear(x, w1, b1)
    if w2 is None:
        return h
    return F.linear(F.gelu(h, approximate="none"), w2, b2)
