"""Masked LM loss fused with the LM head: forward + backward, bf16, LLaVA-1.5 shapes (D=4096, V=32064).

Letters: T packed tokens, Tt target rows (a fraction `frac` of T), D model width, V vocab.
Two families of cases: target rows spread at random over 1024-token sequences (fractions 30-60%), and
LLaVA-1.6 AnyRes batches up to T = 32k: one sequence per image (prefix, the image's 2,328..2,928 rows, a
question, a 64..320-token answer: only the answer is a target), packed until T is full, the rest one
text-only sequence whose second half is the answer; AnyRes leaves 10-20% of the rows as targets.

Implementations, each computing loss = mean CE over target rows and grads of hidden and head:
  torch  full logits [T, V] (bf16 matmul, then fp32) + F.cross_entropy(ignore_index=-100), autograd;
  triton ours, backend="triton";  cuda  ours, backend="cuda" (when the csrc op is built);
  liger  Liger-Kernel's LigerFusedLinearCrossEntropyLoss (when importable).
FLOP formula (executed work, fwd+bwd = three GEMMs of 2·rows·D·V): ours 6·Tt·D·V (logits only for target
rows); torch and liger 6·T·D·V (they run the GEMMs on every row). `extra.useful_tflops` is 6·Tt·D·V / time
for every implementation, the like-for-like rate. Each implementation's loss is checked against torch's
before it is timed. Peak memory: CUDA bytes above what was allocated
before one fwd+bwd, with the grads of hidden and head (dropped before) counted in.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from common import ANYRES_SIZES, Row, anyres_rows, bench_device, cuda_time_ms, peak_memory_mb, pick, save, sync

SUITE = "masked_loss"
D, V = pick((4096, 32064), (64, 500))          # smoke: V not a multiple of any block
SEQ = pick(1024, 64)                            # tokens per packed sequence
CASES = [(T, frac) for T in pick((4096, 8192, 16384), (128,)) for frac in (0.3, 0.5, 0.6)]
ANYRES_T = pick((8192, 16384, 32768), (256,))
PREFIX, QUESTION, ANSWER = pick((40, 24, (64, 320)), (3, 2, (2, 6)))   # text rows around each AnyRes image
_REF_MS: dict[tuple, float] = {}


def _inputs(T: int, frac: float):
    dev = bench_device()
    g = torch.Generator(device=dev).manual_seed(T)
    hidden = torch.randn(T, D, device=dev, generator=g).bfloat16().requires_grad_()
    head = (torch.randn(V, D, device=dev, generator=g) * 0.02).bfloat16().requires_grad_()
    targets = torch.full((T,), -100, device=dev, dtype=torch.int64)
    n = round(frac * T)
    rows = torch.randperm(T, device=dev, generator=g)[:n]
    targets[rows] = torch.randint(0, V, (n,), device=dev, generator=g)
    cu = torch.arange(0, T + 1, SEQ, device=dev, dtype=torch.int32)        # SEQ-token sequences
    return hidden, head, targets, cu, n


def _anyres_inputs(T: int):
    """An AnyRes packed batch (module docstring): (hidden, head, targets, cu, target rows, images)."""
    dev = bench_device()
    g = torch.Generator().manual_seed(T)
    targets = torch.full((T,), -100, dtype=torch.int64)
    lengths, at, k = [], 0, 0
    while True:
        rows = anyres_rows(*ANYRES_SIZES[k % len(ANYRES_SIZES)])
        answer = int(torch.randint(ANSWER[0], ANSWER[1] + 1, (1,), generator=g))
        n = PREFIX + rows + QUESTION + answer
        if at + n > T:
            break
        # shifted as train.data packs them: the row before each answer token predicts it, the last row nothing
        targets[at + n - answer - 1:at + n - 1] = torch.randint(0, V, (answer,), generator=g)
        lengths.append(n)
        at, k = at + n, k + 1
    if at < T:                                   # the rest: a text-only sequence, its second half answered
        half = (T - at) // 2
        targets[T - half - 1:T - 1] = torch.randint(0, V, (half,), generator=g)
        lengths.append(T - at)
    gd = torch.Generator(device=dev).manual_seed(T)
    hidden = torch.randn(T, D, device=dev, generator=gd).bfloat16().requires_grad_()
    head = (torch.randn(V, D, device=dev, generator=gd) * 0.02).bfloat16().requires_grad_()
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    return hidden, head, targets.to(dev), cu, int((targets != -100).sum()), k


def _loss_fn(impl: str, hidden, head, targets, cu):
    """A closure computing ``impl``'s scalar loss."""
    if impl == "torch":
        def loss_fn():
            return F.cross_entropy(F.linear(hidden, head).float(), targets, ignore_index=-100)
    elif impl in ("triton", "cuda"):
        from llava_kernels.masked_loss import masked_lm_loss

        def loss_fn():
            return masked_lm_loss(hidden, head, targets, cu_seqlens=cu, backend=impl, check=False)
    else:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="mean")

        def loss_fn():
            return liger(head, hidden, targets)
    return loss_fn


def _step(impl: str, hidden, head, targets, cu):
    """One fwd+bwd closure; grads are dropped first so each call allocates them like a fresh step."""
    loss_fn = _loss_fn(impl, hidden, head, targets, cu)

    def step():
        hidden.grad = head.grad = None
        loss_fn().backward()
    return step


def _skip_reason(impl: str) -> str | None:
    if impl == "cuda":
        from llava_kernels.dispatch import cuda_ops_available
        return None if cuda_ops_available("masked_loss") else "csrc extension with masked_loss is not built"
    if impl == "liger":
        try:
            import liger_kernel.transformers  # noqa: F401
        except ImportError as e:
            return f"liger-kernel is not importable ({e})"
    return None


def _measure(benchmark, impl: str, key: tuple, case: str, hidden, head, targets, cu, n: int, extra: dict) -> None:
    """Validate ``impl`` against torch, time it (torch once per case as the reference), save its row."""
    with torch.no_grad():  # validated before timed (a sanity bound: tests/ hold the tolerance rule)
        want = _loss_fn("torch", hidden, head, targets, cu)().item()
        got = _loss_fn(impl, hidden, head, targets, cu)().item()
    # The mean over >= 1228 rows of ~11-nat losses: bf16 rounding moves it by ~1e-5 relative.
    assert abs(got - want) <= 1e-3 * abs(want), f"{impl}: loss {got} vs torch {want}"
    if key not in _REF_MS:
        _REF_MS[key] = cuda_time_ms(_step("torch", hidden, head, targets, cu))
    step = _step(impl, hidden, head, targets, cu)
    ms = cuda_time_ms(step)
    hidden.grad = head.grad = None
    peak = peak_memory_mb(step)
    benchmark.pedantic(lambda: (step(), sync()), rounds=pick(3, 1), warmup_rounds=pick(1, 0))
    T = targets.numel()
    rows = n if impl in ("triton", "cuda") else T
    row = Row(suite=SUITE, case=case, impl=impl, ms=ms, work=6.0 * rows * D * V, unit="TFLOP/s",
              formula=f"6*{'Tt' if rows == n else 'T'}*D*V", peak_mem_mb=peak, ref_ms=_REF_MS[key],
              extra={"target_rows": n, "useful_tflops": 6.0 * n * D * V / (ms * 1e-3) / 1e12, **extra})
    save(SUITE, [row])


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["torch", "triton", "cuda", "liger"])
@pytest.mark.parametrize("T,frac", CASES, ids=[f"T{T}-tgt{int(f * 100)}" for T, f in CASES])
def test_masked_loss_fwd_bwd(benchmark, T, frac, impl):
    reason = _skip_reason(impl)
    if reason:
        pytest.skip(reason)
    hidden, head, targets, cu, n = _inputs(T, frac)
    case = f"T={T} tgt={int(frac * 100)}% D={D} V={V} bf16 fwd+bwd"
    _measure(benchmark, impl, (T, frac), case, hidden, head, targets, cu, n, {})


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["torch", "triton", "cuda", "liger"])
@pytest.mark.parametrize("T", ANYRES_T, ids=[f"T{T}-anyres" for T in ANYRES_T])
def test_masked_loss_anyres_fwd_bwd(benchmark, T, impl):
    reason = _skip_reason(impl)
    if reason:
        pytest.skip(reason)
    hidden, head, targets, cu, n, images = _anyres_inputs(T)
    case = f"T={T} anyres {images} images tgt={100 * n / T:.1f}% D={D} V={V} bf16 fwd+bwd"
    _measure(benchmark, impl, ("anyres", T), case, hidden, head, targets, cu, n,
             {"images": images, "sequences": cu.numel() - 1})
