"""The per-op backend choice: argument > per-op env var > global env var > automatic."""
import pytest
import torch

from llava_kernels import dispatch

CPU = torch.device("cpu")


def test_cpu_auto_is_the_reference_or_our_cpu_kernel():
    """On the CPU: our kernel for the ops that have one (when built), the reference for the rest."""
    want = {op: "cpu" if op in dispatch.CPU_OPS and dispatch.cpu_ops_available() else "torch" for op in dispatch.OPS}
    assert dispatch.describe(CPU) == want
    with pytest.raises(ValueError, match="has no CPU kernel"):
        dispatch.resolve("projector", CPU, "cpu")
    with pytest.raises(ValueError, match="not on the CPU"):
        dispatch.resolve("paged_decode", torch.device("meta"), "cpu")


def test_cpu_kernel_switched_off_gives_the_reference(monkeypatch):
    monkeypatch.setattr(dispatch, "cpu_ops_available", lambda: False)
    assert dispatch.describe(CPU) == {op: "torch" for op in dispatch.OPS}
    with pytest.raises(ValueError, match="not built"):
        dispatch.resolve("paged_decode", CPU, "cpu")


def test_overrides_in_order(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("LLAVA_KERNEL_BACKEND", "triton")
    assert dispatch.resolve("scatter", CPU) == "triton"
    monkeypatch.setenv("LLAVA_KERNEL_BACKEND_SCATTER", "torch")
    assert dispatch.resolve("scatter", CPU) == "torch"
    assert dispatch.resolve("masked_loss", CPU) == "triton"
    assert dispatch.resolve("scatter", CPU, "triton") == "triton"


def test_impossible_requests_raise(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        dispatch.resolve("projector", CPU, "triton")
    with pytest.raises(ValueError, match="not on a CUDA device"):
        dispatch.resolve("projector", CPU, "cuda")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        dispatch.resolve("projector", CPU, "fast")


def test_auto_order_covers_every_op():
    assert set(dispatch.AUTO_ORDER) == set(dispatch.OPS)
    assert all(order[-1] == "torch" for order in dispatch.AUTO_ORDER.values())
