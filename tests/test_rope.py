"""The CPU RoPE op (llava_kernels/cpu/rope.cpp) against its reference, llava_kernels.rope.rope_ref (the formula
engine.model.apply_rope runs elsewhere): equal bit for bit (the same three roundings per element, never an FMA),
on odd head dims and strided cos/sin."""
import pytest
import torch

import engine.model as em
from llava_kernels import _cpu
from llava_kernels import rope as rope_op

needs_kernel = pytest.mark.skipif(not _cpu.available(), reason=f"the CPU ops are not built: {_cpu.load_error()}")


def formula(x, cos, sin):
    with torch.enable_grad():          # grad mode on: apply_rope takes the torch formula
        return em.apply_rope(x, cos, sin).detach()


@needs_kernel
@pytest.mark.parametrize("t,heads,dh", [(1, 24, 64), (3, 5, 6), (7, 2, 18), (2, 1, 128)])
def test_rope_op_equals_the_formula_bit_for_bit(t, heads, dh):
    torch.manual_seed(dh)
    table = em.RopeTable(dh, 10000.0, 64)
    pos = torch.randint(0, 64, (t,))
    cos, sin = table(pos, torch.float32)               # views of one [T, 2, Dh] gather: strided rows
    x = torch.randn(t, heads, dh) * 4
    with torch.no_grad():
        ours = em.apply_rope(x, cos, sin)
    assert torch.equal(ours, formula(x, cos, sin)) and torch.equal(ours, rope_op.rope_ref(x, cos, sin))
    assert torch.equal(ours, rope_op.rope(x, cos.contiguous(), sin.contiguous()))


@needs_kernel
def test_rope_op_refuses_bad_shapes():
    x, cs = torch.randn(2, 3, 8), torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="Dh even"):
        _cpu.ops().rope(x, cs[:, :6], cs[:, :6])
    with pytest.raises(RuntimeError, match="fp32 only"):
        _cpu.ops().rope(x.double(), cs.double(), cs.double())
    with pytest.raises(RuntimeError, match="contiguous"):
        _cpu.ops().rope(x.transpose(0, 1).contiguous().transpose(0, 1), cs, cs)


def test_rope_keeps_the_formula_in_training_and_bf16():
    torch.manual_seed(0)
    table = em.RopeTable(16, 10000.0, 32)
    cos, sin = table(torch.arange(4), torch.bfloat16)
    x = torch.randn(4, 2, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(em.apply_rope(x, cos, sin), formula(x, cos, sin))
