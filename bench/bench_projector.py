"""Fused projector vs torch eager (F.linear → F.gelu → F.linear + autograd) at LLaVA-1.5 shapes.

N = 576 patches × {1, 4, 16} images, Dv=1024 → Dh=4096 → Dt=4096, bf16. The vision features do not
require grad (the tower is frozen in both LLaVA stages), so fwd+bwd computes dW1, db1, dW2, db2 only.
FLOPs: fwd = 2·N·(Dv·Dh + Dh·Dt); fwd+bwd counted as 3× fwd (the convention; without dx the backward
really does 2·N·(2·Dh·Dt + Dv·Dh), slightly under 2× fwd).
"""
import pytest
import torch
from common import SMOKE, Row, bench_device, cuda_time_ms, peak_memory_mb, pick, save, sync

from llava_kernels.dispatch import cuda_ops_available
from llava_kernels.projector import projector, projector_ref

DV, DH, DT = pick((1024, 4096, 4096), (32, 80, 48))
ROWS_PER_IMAGE = pick(576, 7)
FORMULA = "fwd 2*N*(Dv*Dh + Dh*Dt); fwd+bwd 3x fwd"


def _impls():
    impls = {"torch": projector_ref,
             "triton": lambda *a: projector(*a, backend="triton")}
    if cuda_ops_available("projector"):
        impls["cuda"] = lambda *a: projector(*a, backend="cuda")
    return impls


def _step(fn, x, params, dy, mode):
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(x, *params)
        return run

    def run():
        for p in params:
            p.grad = None
        fn(x, *params).backward(dy)
    return run


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("images", [1, 4, 16])
def test_projector(benchmark, images, mode):
    n = ROWS_PER_IMAGE * images
    dev = bench_device()
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(n, DV, device=dev, generator=g).bfloat16()
    params = [(torch.randn(*s, device=dev, generator=g) * k).bfloat16().requires_grad_()
              for s, k in (((DH, DV), DV**-0.5), ((DH,), 0.1), ((DT, DH), DH**-0.5), ((DT,), 0.1))]
    dy = torch.randn(n, DT, device=dev, generator=g).bfloat16()
    flops = 2 * n * (DV * DH + DH * DT) * (1 if mode == "fwd" else 3)

    impls = _impls()
    with torch.no_grad():  # validated before timed
        want = projector_ref(x, *params).float()
        for name, fn in impls.items():
            err = ((fn(x, *params).float() - want).norm() / want.norm()).item()
            assert err < 1e-2, f"{name}: relative error {err:.2e} vs eager"

    case = f"{mode} N={n} {DV}->{DH}->{DT} bf16"
    rows, ref_ms = [], None
    for name, fn in impls.items():
        run = _step(fn, x, params, dy, mode)
        ms = cuda_time_ms(run, warmup=10, rep=50)
        ref_ms = ms if name == "torch" else ref_ms
        rows.append(Row("projector", case, name, ms, work=flops, unit="TFLOP/s", formula=FORMULA,
                        peak_mem_mb=peak_memory_mb(run), ref_ms=None if name == "torch" else ref_ms,
                        extra={"N": n, "mode": mode}))
    save("projector", rows)

    ours = _step(impls["triton"], x, params, dy, mode)
    if SMOKE:
        benchmark.pedantic(lambda: (ours(), sync()), rounds=1)
    else:
        benchmark(lambda: (ours(), sync()))
