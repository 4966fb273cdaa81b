"""varlen_attention: every available backend agrees with a dense block-diagonal reference."""
import math

import pytest
import torch
from helpers import assert_close_rule

from engine.attention import available_backends, resolve_backend, varlen_attention
from engine.model import pack_cu_seqlens


def dense_truth(q, k, v, lengths, causal):
    """fp64 attention with an explicit [T, T] block-diagonal (causal) mask."""
    q, k, v = q.double(), k.double(), v.double()
    t, h, dh = q.shape
    rep = h // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    allowed = seq[:, None] == seq[None, :]
    if causal:
        allowed &= torch.arange(t)[:, None] >= torch.arange(t)[None, :]
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(dh)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def make(lengths, h=4, hkv=2, dh=16, device="cpu", dtype=torch.float32):
    t = sum(lengths)
    q, k, v = (torch.randn(t, n, dh, device=device, dtype=dtype) for n in (h, hkv, hkv))
    cu, _, max_len = pack_cu_seqlens(lengths, device)
    return q, k, v, cu, max_len


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lengths", [[1], [5, 1, 9], [17, 3]])
def test_reference_matches_dense(lengths, causal):
    q, k, v, cu, max_len = make(lengths)
    out = varlen_attention(q, k, v, cu, max_len, causal, backend="sdpa")
    assert_close_rule(out, dense_truth(q, k, v, lengths, causal), what="sdpa")


def test_backend_selection_and_errors():
    assert resolve_backend(torch.device("cpu")) == "sdpa"
    assert available_backends(torch.device("cpu")) == ["sdpa"]
    with pytest.raises(ValueError, match="not available"):
        resolve_backend(torch.device("cpu"), "flash_attn")
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend(torch.device("cpu"), "magic")
    q, k, v, cu, max_len = make([3, 4])
    with pytest.raises(ValueError, match="int32"):
        varlen_attention(q, k, v, cu.long(), max_len)
    with pytest.raises(ValueError, match="multiple"):
        varlen_attention(q[:, :3], k, v, cu, max_len)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen", "xformers"])
def test_gpu_backends_match_reference(backend):
    dev = torch.device("cuda")
    if backend not in available_backends(dev):
        pytest.skip(f"{backend} is not installed on this GPU machine")
    lengths = [1, 577, 130, 1025]
    q, k, v, cu, max_len = make(lengths, h=8, hkv=2, dh=128, device=dev, dtype=torch.bfloat16)
    truth = dense_truth(q.cpu(), k.cpu(), v.cpu(), lengths, True)
    ref_lowp = varlen_attention(q, k, v, cu, max_len, backend="sdpa")
    out = varlen_attention(q, k, v, cu, max_len, backend=backend)
    assert_close_rule(out, truth, ref_lowp, floor=1e-3, what=backend)
