"""torch.library.opcheck on our CPU ops (llava_kernels/cpu/*.cpp): schemas (decode_layer's cache mutation
declared), the fake kernels registered by llava_kernels/_cpu.py (shapes for FakeTensor and torch.compile), and
the ops under AOT dispatch, on odd sizes."""
import pytest
import torch
from test_decode_layer import layer_case
from test_kernel_paged_decode import make_case

from llava_kernels import _cpu

pytestmark = pytest.mark.skipif(not _cpu.available(), reason=f"the CPU ops are not built: {_cpu.load_error()}")


def test_opcheck_every_cpu_op():
    ops = torch.ops.llava_cpu
    g = torch.Generator().manual_seed(0)
    torch.library.opcheck(ops.small_gemm, (torch.randn(3, 13, generator=g), torch.randn(9, 13, generator=g)))
    torch.library.opcheck(ops.rms_norm, (torch.randn(2, 5, 11, generator=g), torch.randn(11, generator=g), 1e-6))
    torch.library.opcheck(ops.rope, (torch.randn(3, 4, 10, generator=g), torch.randn(3, 10, generator=g),
                                     torch.randn(3, 10, generator=g)))
    q, k_cache, v_cache, table, seq_lens, _ = make_case([5, 17, 2], h=6, hkv=2, dh=12, bs=4)
    torch.library.opcheck(ops.paged_decode, (q, k_cache, v_cache, table, seq_lens, 0.3))
    case = layer_case(3)
    torch.library.opcheck(ops.decode_layer, tuple(case.values()))


def test_fake_kernels_give_the_shapes():
    with torch.device("meta"):
        x, w = torch.empty(4, 16), torch.empty(24, 16)
        assert torch.ops.llava_cpu.small_gemm(x, w).shape == (4, 24)
        assert torch.ops.llava_cpu.rms_norm(x, torch.empty(16), 1e-5).shape == (4, 16)
    case = {k: v.to("meta") if torch.is_tensor(v) else v for k, v in layer_case(2).items()}
    assert torch.ops.llava_cpu.decode_layer(*case.values()).shape == case["x"].shape
