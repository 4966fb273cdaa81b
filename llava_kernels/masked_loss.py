"""Variable-length masked LM loss fused with the LM head: logits only for target rows, never [T, V].

Letters: T packed tokens, D model width, V vocab, B sequences, Tt target rows (targets != -100),
C rows of one chunk (C <= Tt), R rows handed to the LSE kernel.

Algorithm (the forward also computes the gradients, as Liger-Kernel does):
  1. idx[Tt] = nonzero(targets != -100). This is the op's one host sync: Tt is data-dependent and
     sizes every buffer after it (row losses, chunk count). Nothing later syncs, except the backward's
     read of grad_output (below).
  2. per chunk idx_c[C] of target rows:
       h_c[C, D]   = hidden[idx_c]                          gather (index_select)
       z[C, V]     = h_c @ Wᵀ                               cuBLAS, input dtype, fp32 accumulation
       Triton      row_loss = logsumexp(z) - z[target];  z <- (softmax(z) - onehot) * scale, in place
       dW         (+)= zᵀ @ h_c                             see "dW precision" below
       dhidden[idx_c] = z @ W                               into h_c's buffer, then index_copy_
  3. backward: hand back the stored grads, scaled in place by grad_output unless it is exactly 1.

Why the gradients are computed in the forward (and not recomputed in the backward):
  * FLOPs: forward+backward with recomputation is 8·Tt·D·V (logits twice), this is 6·Tt·D·V: 25% less.
  * Memory: what is held from forward to backward is dhidden[T, D] and dW[V, D], exactly the tensors
    backward has to produce anyway (autograd steals them into .grad without a copy; an upstream
    grad_output != 1 scales them in place, fp32 math and one rounding, never a second copy), and the
    loss is the last op of a training step, so they live only across a handful of kernels.
  * No waste when gradients are not wanted: under no_grad (eval) only the loss is computed; with a
    frozen LM head (stage 1) the dW GEMM is skipped (a third of the FLOPs), likewise dhidden.

dW precision (the H200 run of 2026-12-04, bench/results/h200/: grad_head 2.3x the bf16 reference's error
at T=4096, D=4096, V=32064, 4 chunks). dW is a sum over all Tt target rows. The reference rounds it to
bf16 once, at the end of one fp32-accumulated GEMM. Summing chunks in a bf16 dW (addmm_ per chunk)
rounds every element once per chunk, so the error grows with the chunk count. In bf16/fp16 dW is
therefore always one fp32 sum, rounded once, in whichever of two ways costs less memory:
  * one chunk holding every target row (z[Tt, V] + h_c[Tt, D]; at LLaVA's shapes 70.6 KB a row), or
  * chunks summed into an fp32 [V, D] accumulator (4·V·D bytes, 525 MB at V=32064, D=4096), copied
    into dW at the end.
  fp32 inputs keep chunk-wise addmm_ into dW (an fp32 rounding per chunk is far below the rule).
Chunk size otherwise: without dW (frozen head, no_grad) or with the accumulator, a chunk's z[C, V] +
h_c[C, D] hold at most min(max_chunk_bytes, bytes of hidden), below Liger's [C, V] chunk the size of
hidden. Measured on an H100 (bf16, D=4096, V=32064, before the buffers were preallocated and chunks
balanced): T=4096 at 50% targets 3.08 ms vs torch CE 6.30 ms, Liger 5.89 ms; T=16384 at 60% 12.9 ms vs
25.5 ms and 20.5 ms. On an H200 (bench/results/h200/masked_loss.json, before the dW precision change):
T=4096 at 50% 3.45 ms vs 5.88 and 5.72; T=16384 at 60% 13.3 ms vs 24.3 and 21.0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from llava_kernels._triton_util import store_cast
from llava_kernels.dispatch import resolve, triton_interpreting

IGNORE_INDEX = -100
_LOW_PRECISION = (torch.bfloat16, torch.float16)


@triton.jit
def _lse_loss_grad_kernel(z_ptr, tgt_ptr, scale_ptr, loss_ptr, R, V, stride_z,
                          BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, ONE_BLOCK: tl.constexpr,
                          WRITE_GRAD: tl.constexpr, ROUND_BF16: tl.constexpr):
    """Rows r of z[R, V]: loss[r] = logsumexp(z[r]) - z[r, tgt[r]]; with WRITE_GRAD, z[r] is
    overwritten by (softmax(z[r]) - onehot(tgt[r])) * scale. fp32 math whatever z's dtype.
    ROUND_BF16: bf16 z under the interpreter, whose casts truncate (see llava_kernels._triton_util)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    # Out-of-range rows re-read row R-1 (never stored) so no lane computes on -inf only (NaN).
    rows_ld = tl.minimum(rows, R - 1).to(tl.int64)
    tgt = tl.load(tgt_ptr + rows_ld)
    # With check=False a target outside [0, V) must not read out of bounds: it reads 0 instead.
    tvalid = (tgt >= 0) & (tgt < V)
    z_t = tl.load(z_ptr + rows_ld * stride_z + tgt, mask=tvalid, other=0.0).to(tl.float32)
    row_ptr = z_ptr + rows_ld[:, None] * stride_z
    cols = tl.arange(0, BLOCK_V)
    if ONE_BLOCK:
        # The whole row fits one block: read z once, write the gradient from registers.
        cmask = cols[None, :] < V
        x = tl.load(row_ptr + cols[None, :], mask=cmask, other=float("-inf")).to(tl.float32)
        m = tl.max(x, axis=1)
        e = tl.exp(x - m[:, None])
        s = tl.sum(e, axis=1)
        lse = m + tl.log(s)
        if WRITE_GRAD:
            scale = tl.load(scale_ptr)
            g = e * (scale / s)[:, None] - tl.where(cols[None, :] == tgt[:, None], scale, 0.0)
            store_cast(row_ptr + cols[None, :], g, rmask[:, None] & cmask, ROUND_BF16)
    else:
        # Online log-sum-exp over V blocks: running max m and sum s of exp(x - m).
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_R], tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cmask = (v0 + cols)[None, :] < V
            x = tl.load(row_ptr + v0 + cols[None, :], mask=cmask, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=1))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
            m = m_new
        lse = m + tl.log(s)
        if WRITE_GRAD:
            scale = tl.load(scale_ptr)
            for v0 in range(0, V, BLOCK_V):
                cmask = (v0 + cols)[None, :] < V
                x = tl.load(row_ptr + v0 + cols[None, :], mask=cmask, other=float("-inf")).to(tl.float32)
                g = tl.exp(x - lse[:, None]) * scale
                g = g - tl.where((v0 + cols)[None, :] == tgt[:, None], scale, 0.0)
                store_cast(row_ptr + v0 + cols[None, :], g, rmask[:, None] & cmask, ROUND_BF16)
    tl.store(loss_ptr + rows, lse - z_t, mask=rmask)


@dataclass(frozen=True, kw_only=True)
class MaskedLossConfig:
    """Launch choices. None means automatic (see `_chunk_rows` and `_kernel_blocks`)."""
    chunk_rows: int | None = None          # target rows per chunk C
    max_chunk_bytes: int = 128 << 20       # bound on a chunk's z[C, V] + h_c[C, D] buffers (see _chunk_rows)
    block_v: int | None = None             # vocab columns per kernel block (power of two)
    block_r: int | None = None             # rows per kernel program (power of two)


DEFAULT_CONFIG = MaskedLossConfig()


class MaskedLossFwd(NamedTuple):
    loss: torch.Tensor                 # [] float32, normalized by num_targets
    seq_loss_sum: torch.Tensor         # [B] float32, unnormalized
    seq_count: torch.Tensor            # [B] int64
    row_index: torch.Tensor            # [Tt] int64, the target rows in increasing order
    row_loss: torch.Tensor             # [Tt] float32, CE of each target row
    grad_hidden: torch.Tensor | None   # [T, D] input dtype, for grad_output = 1
    grad_weight: torch.Tensor | None   # [V, D] input dtype, for grad_output = 1


def _chunk_rows(T: int, D: int, V: int, Tt: int, elem: int, cfg: MaskedLossConfig, *,
                exact_dw: bool = False) -> int:
    """C, the target rows per chunk. exact_dw (a bf16/fp16 dW is wanted, see "dW precision"): all Tt rows
    in one chunk when its z[Tt, V] + h_c[Tt, D] take no more memory than the fp32 dW accumulator plus an
    ordinary chunk would (or fit max_chunk_bytes). Otherwise the chunk's buffers hold at most
    min(max_chunk_bytes, bytes of hidden) and the Tt rows are split into that many chunks of equal size
    (rounded up to 16 rows when that still fits)."""
    if cfg.chunk_rows is not None:
        return cfg.chunk_rows
    row_bytes = (V + D) * elem
    c_max = max(16, min(cfg.max_chunk_bytes, T * D * elem) // row_bytes)
    if Tt == 0:
        return c_max
    if exact_dw and Tt * row_bytes <= max(cfg.max_chunk_bytes, 4 * V * D + c_max * row_bytes):
        return Tt
    c = -(-Tt // -(-Tt // c_max))                                    # ceil(Tt / number of chunks)
    return min(c_max, -(-c // 16) * 16)


def _mm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, accumulate: bool) -> None:
    """acc[M, N] fp32 (+)= a @ b for bf16/fp16 a, b, with one fp32 accumulation and no low-precision
    rounding: cuBLAS with an fp32 output on CUDA; on the CPU (tests) the fp32 product of the exact values."""
    if a.is_cuda:
        if accumulate:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        else:
            torch.mm(a, b, out_dtype=torch.float32, out=acc)
    elif accumulate:
        acc.addmm_(a.float(), b.float())
    else:
        torch.mm(a.float(), b.float(), out=acc)


def _kernel_blocks(V: int, cfg: MaskedLossConfig) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_V, num_warps): on a GPU one row per program and, up to V = 32768, the whole
    row in one block (one read of z); the interpreter prefers few programs over small blocks."""
    if triton_interpreting():
        block_r, block_v = cfg.block_r or 16, cfg.block_v or min(triton.next_power_of_2(V), 128)
    else:
        block_r = cfg.block_r or 1
        block_v = cfg.block_v or (triton.next_power_of_2(V) if V <= 32768 else 8192)
    return block_r, block_v, min(32, max(4, block_r * block_v // 1024))


def _lse_loss_grad(z: torch.Tensor, tgt: torch.Tensor, scale: torch.Tensor, loss_out: torch.Tensor, *,
                   write_grad: bool, cfg: MaskedLossConfig) -> None:
    """z[R, V] (contiguous) -> loss_out[R] float32; with write_grad z becomes the scaled dlogits."""
    R, V = z.shape
    if R == 0:
        return
    block_r, block_v, warps = _kernel_blocks(V, cfg)
    _lse_loss_grad_kernel[(triton.cdiv(R, block_r),)](
        z, tgt, scale, loss_out, R, V, z.stride(0), BLOCK_R=block_r, BLOCK_V=block_v,
        ONE_BLOCK=block_v >= V, WRITE_GRAD=write_grad,
        ROUND_BF16=triton_interpreting() and z.dtype == torch.bfloat16, num_warps=warps)


def _inv_count(num_targets, local_count: int, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    """0-dim 1/num_targets on `device` (0 when the count is 0: loss 0, zero grads); no host sync."""
    if num_targets is None:
        num_targets = local_count
    if isinstance(num_targets, torch.Tensor):
        n = num_targets.to(device=device, dtype=dtype)
        return torch.where(n > 0, 1.0 / n.clamp(min=1e-30), torch.zeros_like(n))
    return torch.full((), 1.0 / num_targets if num_targets > 0 else 0.0, device=device, dtype=dtype)


def _per_sequence(row_index: torch.Tensor, row_loss: torch.Tensor, cu_seqlens: torch.Tensor | None,
                  T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums and counts of the (sorted) target rows per sequence: segment bounds by searchsorted and
    differences of an fp64 prefix sum. On device, deterministic, no atomics."""
    dev = row_loss.device
    cu = cu_seqlens.long() if cu_seqlens is not None else torch.tensor([0, T], device=dev)
    bounds = torch.searchsorted(row_index, cu)                               # [B+1]
    csum = torch.cat([row_loss.new_zeros(1, dtype=torch.float64), row_loss.double().cumsum(0)])
    return (csum[bounds[1:]] - csum[bounds[:-1]]).float(), bounds[1:] - bounds[:-1]


def masked_loss_fwd(hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor, *,
                    cu_seqlens: torch.Tensor | None = None, num_targets=None, need_grad_hidden: bool = True,
                    need_grad_weight: bool = True, config: MaskedLossConfig = DEFAULT_CONFIG,
                    out_row_loss: torch.Tensor | None = None, out_grad_hidden: torch.Tensor | None = None,
                    out_grad_weight: torch.Tensor | None = None) -> MaskedLossFwd:
    """Loss, per-sequence sums and (for grad_output = 1) the grads; inputs already validated.

    out_* are optional destination buffers (any content; every element is written): out_row_loss
    [Tt] float32, out_grad_hidden [T, D] and out_grad_weight [V, D] in hidden's dtype.
    """
    T, D = hidden.shape
    V = head_weight.shape[0]
    dev, dt = hidden.device, hidden.dtype
    row_index = torch.nonzero(targets != IGNORE_INDEX).squeeze(1)    # the one host sync: sizes [Tt]
    Tt = row_index.numel()
    for name, buf, shape, dtype in (("out_row_loss", out_row_loss, (Tt,), torch.float32),
                                    ("out_grad_hidden", out_grad_hidden, (T, D), dt),
                                    ("out_grad_weight", out_grad_weight, (V, D), dt)):
        if buf is not None and (tuple(buf.shape) != shape or buf.dtype != dtype or buf.device != dev
                                or not buf.is_contiguous()):
            raise ValueError(f"{name}: expected a contiguous {shape} {dtype} tensor on {dev}, got "
                             f"{tuple(buf.shape)} {buf.dtype} on {buf.device}")
    row_loss = out_row_loss if out_row_loss is not None else torch.empty(Tt, device=dev, dtype=torch.float32)
    dh = dw = None
    if need_grad_hidden:
        dh = (out_grad_hidden if out_grad_hidden is not None else torch.empty_like(hidden,
              memory_format=torch.contiguous_format)).zero_()
    if need_grad_weight:
        dw = out_grad_weight if out_grad_weight is not None else torch.empty((V, D), device=dev, dtype=dt)
        if Tt == 0:
            dw.zero_()
    scale = _inv_count(num_targets, Tt, dev)
    write_grad = need_grad_hidden or need_grad_weight
    tgt_rows = targets.index_select(0, row_index)                    # [Tt] compacted targets
    exact_dw = dw is not None and dt in _LOW_PRECISION
    C = max(1, _chunk_rows(T, D, V, Tt, hidden.element_size(), config, exact_dw=exact_dw))
    # dW over several chunks in bf16/fp16: one fp32 sum, rounded once at the end (module docstring).
    acc = torch.empty((V, D), device=dev, dtype=torch.float32) if exact_dw and Tt > C else None
    # Two buffers reused by every chunk: a loop that allocated per chunk would briefly hold two.
    z_buf = torch.empty((min(C, Tt), V), device=dev, dtype=dt)
    h_buf = torch.empty((min(C, Tt), D), device=dev, dtype=dt)
    for c0 in range(0, Tt, C):
        idx_c = row_index[c0:c0 + C]
        h_c = torch.index_select(hidden, 0, idx_c, out=h_buf[:idx_c.numel()])       # [C, D]
        z = torch.mm(h_c, head_weight.t(), out=z_buf[:idx_c.numel()])             # [C, V] input dtype
        _lse_loss_grad(z, tgt_rows[c0:c0 + C], scale, row_loss[c0:c0 + C], write_grad=write_grad,
                       cfg=config)
        if acc is not None:                                          # z now holds dlogits
            _mm_fp32(acc, z.t(), h_c, accumulate=c0 > 0)
        elif dw is not None:
            if c0 == 0:
                torch.mm(z.t(), h_c, out=dw)
            else:
                dw.addmm_(z.t(), h_c)                                # fp32 dW only (exact_dw is False)
        if dh is not None:
            torch.mm(z, head_weight, out=h_c)                        # h_c is free: reuse for dh_c
            dh.index_copy_(0, idx_c, h_c)
    if acc is not None:
        dw.copy_(acc)
        del acc
    loss = row_loss.sum() * scale
    seq_sum, seq_count = _per_sequence(row_index, row_loss, cu_seqlens, T)
    return MaskedLossFwd(loss, seq_sum, seq_count, row_index, row_loss, dh, dw)


def masked_loss_bwd(grad_output: torch.Tensor, grad_hidden: torch.Tensor | None,
                    grad_weight: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Grads for an upstream grad_output (0-dim) from the forward's grads (made for grad_output = 1).

    Reads grad_output on the host (one sync). Exactly 1 (plain training): the grads as they are.
    Otherwise they are scaled IN PLACE (fp32 math, one rounding): a scaled copy would hold a second
    [V, D] (and an fp32 temporary before it). The tensors are the ones saved for backward, so a second
    backward through a retained graph fails autograd's in-place check instead of seeing scaled grads."""
    if grad_hidden is None and grad_weight is None:
        return None, None
    g = float(grad_output)
    if g != 1.0:
        for x in (grad_hidden, grad_weight):
            if x is not None:
                x.mul_(g)        # a Python float: computed in fp32 (not rounded to the tensor's dtype first)
    return grad_hidden, grad_weight


class MaskedLMLossFunction(torch.autograd.Function):
    """(hidden, head_weight, targets, cu_seqlens, num_targets, grad_enabled, config)
    -> (loss, seq_sum, seq_count);
    differentiable w.r.t. hidden and head_weight through loss only."""

    @staticmethod
    def forward(ctx, hidden, head_weight, targets, cu_seqlens, num_targets, grad_enabled,
                config=DEFAULT_CONFIG):
        # needs_input_grad ignores no_grad(), and forward runs with grad off: the caller's mode comes in.
        out = masked_loss_fwd(hidden, head_weight, targets, cu_seqlens=cu_seqlens, num_targets=num_targets,
                              need_grad_hidden=grad_enabled and ctx.needs_input_grad[0],
                              need_grad_weight=grad_enabled and ctx.needs_input_grad[1], config=config)
        ctx.save_for_backward(out.grad_hidden, out.grad_weight)
        ctx.mark_non_differentiable(out.seq_loss_sum, out.seq_count)
        return out.loss, out.seq_loss_sum, out.seq_count

    @staticmethod
    def backward(ctx, grad_loss, _grad_seq_sum, _grad_seq_count):
        dh, dw = masked_loss_bwd(grad_loss, *ctx.saved_tensors)
        return dh, dw, None, None, None, None, None


def _validate(hidden, head_weight, targets, cu_seqlens, num_targets) -> None:
    """Shapes, dtypes, devices (no data read, no sync) -> ValueError."""
    for name, x in (("hidden", hidden), ("head_weight", head_weight), ("targets", targets)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"masked_lm_loss: {name} must be a tensor, got {type(x).__name__}")
    if hidden.dim() != 2 or head_weight.dim() != 2:
        raise ValueError(f"masked_lm_loss: hidden [T, D] and head_weight [V, D] must be 2-D, got "
                         f"{tuple(hidden.shape)} and {tuple(head_weight.shape)}")
    if hidden.shape[1] != head_weight.shape[1] or head_weight.shape[0] == 0:
        raise ValueError(f"masked_lm_loss: hidden {tuple(hidden.shape)} and head_weight "
                         f"{tuple(head_weight.shape)} must share D, with V > 0")
    if not hidden.is_floating_point() or head_weight.dtype != hidden.dtype:
        raise ValueError(f"masked_lm_loss: hidden and head_weight must have one floating dtype, got "
                         f"{hidden.dtype} and {head_weight.dtype}")
    if targets.dtype != torch.int64 or targets.shape != (hidden.shape[0],):
        raise ValueError(f"masked_lm_loss: targets must be int64 [T={hidden.shape[0]}], got "
                         f"{targets.dtype} {tuple(targets.shape)}")
    devices = {hidden.device, head_weight.device, targets.device}
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 \
                or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError("masked_lm_loss: cu_seqlens must be an int32 [B+1] tensor with B >= 1, got "
                             f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens))} "
                             f"{tuple(getattr(cu_seqlens, 'shape', ()))}")
        devices.add(cu_seqlens.device)
    if len(devices) != 1:
        raise ValueError(f"masked_lm_loss: all tensors must be on one device, got "
                         f"{sorted(map(str, devices))}")
    if isinstance(num_targets, torch.Tensor):
        if num_targets.dim() != 0 or num_targets.is_complex():
            raise ValueError(f"masked_lm_loss: num_targets tensor must be 0-dim real, got "
                             f"{tuple(num_targets.shape)} {num_targets.dtype}")
    elif num_targets is not None and (isinstance(num_targets, bool) or not isinstance(num_targets, int)
                                      or num_targets < 0):
        raise ValueError(f"masked_lm_loss: num_targets must be an int >= 0, a 0-dim tensor or None, "
                         f"got {num_targets!r}")


def _check_values(targets, V, cu_seqlens, num_targets) -> None:
    """Data checks (they sync on CUDA) -> ValueError naming the first bad element."""
    bad = (targets >= V) | (targets < IGNORE_INDEX) | ((targets > IGNORE_INDEX) & (targets < 0))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"masked_lm_loss: targets[{i}] = {int(targets[i])} is neither {IGNORE_INDEX} "
                         f"nor in [0, {V})")
    if cu_seqlens is not None:
        cu = cu_seqlens.tolist()
        rising = all(a <= b for a, b in zip(cu[:-1], cu[1:], strict=True))
        if cu[0] != 0 or cu[-1] != targets.numel() or not rising:
            raise ValueError(f"masked_lm_loss: cu_seqlens must rise from 0 to T={targets.numel()}, got {cu}")
    if isinstance(num_targets, torch.Tensor) and bool(num_targets < 0):
        raise ValueError(f"masked_lm_loss: num_targets must be >= 0, got {num_targets.item()}")


def masked_lm_loss(hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor, *,
                   cu_seqlens: torch.Tensor | None = None, num_targets: int | torch.Tensor | None = None,
                   return_per_sequence: bool = False, backend: str | None = None, check: bool | None = None):
    """Next-token CE over the target rows of a packed batch, without a [T, V] logits tensor.

    hidden [T, D] and head_weight [V, D]: one floating dtype (float64 only on the torch backend), one
    device; targets [T] int64, -100 = ignored (already shifted: row t predicts targets[t]);
    cu_seqlens [B+1] int32 or None (B = 1). Returns the scalar float32 loss = sum of CE over target
    rows / num_targets (default the local count; 0 gives loss 0 and zero grads), or with
    return_per_sequence (loss, seq_loss_sum [B] float32 unnormalized, seq_count [B] int64).
    Differentiable w.r.t. hidden and head_weight; grads in their dtype. Shape/dtype/device errors
    raise ValueError; check (default True on CPU, False on CUDA where it would sync) also validates
    the target values, cu_seqlens and a tensor num_targets. Syncs once to count the target rows.
    """
    _validate(hidden, head_weight, targets, cu_seqlens, num_targets)
    if check is None:
        check = hidden.device.type == "cpu"
    if check:
        _check_values(targets, head_weight.shape[0], cu_seqlens, num_targets)
    which = resolve("masked_loss", hidden.device, backend)
    if which == "torch":
        return masked_lm_loss_ref(hidden, head_weight, targets, cu_seqlens=cu_seqlens,
                                  num_targets=num_targets, return_per_sequence=return_per_sequence)
    if hidden.dtype not in _LOW_PRECISION + (torch.float32,):
        raise ValueError(f"masked_lm_loss: backend {which!r} takes float32/bfloat16/float16, got "
                         f"{hidden.dtype} (use backend='torch')")
    if which == "cuda":
        from llava_kernels import _cuda
        out = _cuda.masked_lm_loss(hidden, head_weight, targets, cu_seqlens, num_targets)
    else:
        out = MaskedLMLossFunction.apply(hidden, head_weight, targets, cu_seqlens, num_targets,
                                         torch.is_grad_enabled())
    return tuple(out) if return_per_sequence else out[0]


def masked_lm_loss_ref(hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor, *,
                       cu_seqlens: torch.Tensor | None = None, num_targets: int | torch.Tensor | None = None,
                       return_per_sequence: bool = False):
    """Pure torch, the test oracle and CPU path: full [T, V] logits, as HF does it (the matmul in the
    input dtype, then fp32), F.cross_entropy(reduction="sum", ignore_index=-100). Same contract as
    `masked_lm_loss` (no validation); float64 inputs stay float64 throughout."""
    logits = F.linear(hidden, head_weight)
    if logits.dtype in _LOW_PRECISION:
        logits = logits.float()                                              # [T, V] fp32
    total = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    valid = targets != IGNORE_INDEX
    loss = total * _inv_count(num_targets if num_targets is not None else valid.sum(), 0, total.device,
                              total.dtype)
    if not return_per_sequence:
        return loss
    with torch.no_grad():
        rows = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
        cu = cu_seqlens.tolist() if cu_seqlens is not None else [0, targets.numel()]
        spans = list(zip(cu[:-1], cu[1:], strict=True))
        seq_sum = torch.stack([rows[a:b].sum() for a, b in spans]).float()
        seq_count = torch.stack([valid[a:b].sum() for a, b in spans]).long()
    return loss, seq_sum, seq_count
