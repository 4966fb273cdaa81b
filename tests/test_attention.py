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


def make_prefixed(q_lens, k_lens, h=4, hkv=2, dh=16, device="cpu", dtype=torch.float32):
    """Queries that are the last q_lens[i] positions of sequences of k_lens[i] keys (a cached prefix)."""
    q = torch.randn(sum(q_lens), h, dh, device=device, dtype=dtype)
    k, v = (torch.randn(sum(k_lens), hkv, dh, device=device, dtype=dtype) for _ in range(2))
    cu_q, _, max_q = pack_cu_seqlens(q_lens, device)
    cu_k, _, max_k = pack_cu_seqlens(k_lens, device)
    return q, k, v, cu_q, max_q, cu_k, max_k


def prefixed_truth(q, k, v, q_lens, k_lens, causal):
    """fp64, one sequence at a time: query i of Lq sits at position Lk - Lq + i."""
    out, at_q, at_k = [], 0, 0
    for lq, lk in zip(q_lens, k_lens, strict=True):
        qs, ks, vs = q[at_q:at_q + lq].double(), k[at_k:at_k + lk].double(), v[at_k:at_k + lk].double()
        rep = qs.shape[1] // ks.shape[1]
        ks, vs = ks.repeat_interleave(rep, 1), vs.repeat_interleave(rep, 1)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) / math.sqrt(qs.shape[-1])
        if causal:
            pos_q = torch.arange(lq)[:, None] + (lk - lq)
            scores = scores.masked_fill(torch.arange(lk)[None, :] > pos_q, float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs))
        at_q, at_k = at_q + lq, at_k + lk
    return torch.cat(out)


@pytest.mark.parametrize("causal", [True, False])
def test_reference_with_longer_keys_is_bottom_right_aligned(causal):
    q_lens, k_lens = [1, 5, 9, 3], [7, 5, 40, 3]  # a one-token suffix, no prefix, long prefix, equal
    q, k, v, cu_q, max_q, cu_k, max_k = make_prefixed(q_lens, k_lens)
    out = varlen_attention(q, k, v, cu_q, max_q, causal, backend="sdpa", cu_seqlens_k=cu_k, max_seqlen_k=max_k)
    assert_close_rule(out, prefixed_truth(q, k, v, q_lens, k_lens, causal), what="sdpa prefixed")
    # equal lengths through cu_seqlens_k are the plain call
    q2, k2, v2, cu, max_len = make([4, 6])
    assert torch.equal(varlen_attention(q2, k2, v2, cu, max_len, cu_seqlens_k=cu, max_seqlen_k=max_len),
                       varlen_attention(q2, k2, v2, cu, max_len))
    with pytest.raises(ValueError, match="3 queries but only 0 keys"):
        varlen_attention(q, k, v, cu_q, max_q, backend="sdpa",
                         cu_seqlens_k=pack_cu_seqlens([7, 5, 43, 0])[0], max_seqlen_k=43)
    with pytest.raises(ValueError, match="different numbers of sequences"):
        varlen_attention(q, k, v, cu_q, max_q, cu_seqlens_k=cu_k[:-1], max_seqlen_k=max_k)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen", "xformers"])
def test_gpu_backends_with_longer_keys_match_reference(backend):
    """The prefix-cache prefill: each backend must align causal masking bottom-right, as the reference."""
    dev = torch.device("cuda")
    if backend not in available_backends(dev, torch.bfloat16, 128):
        pytest.skip(f"{backend} is not installed on this GPU machine")
    q_lens, k_lens = [1, 130, 577, 64], [600, 130, 1201, 64]
    q, k, v, cu_q, max_q, cu_k, max_k = make_prefixed(q_lens, k_lens, h=8, hkv=2, dh=128, device=dev,
                                                      dtype=torch.bfloat16)
    truth = prefixed_truth(q.cpu(), k.cpu(), v.cpu(), q_lens, k_lens, True)
    kw = dict(cu_seqlens_k=cu_k, max_seqlen_k=max_k)
    ref_lowp = varlen_attention(q, k, v, cu_q, max_q, backend="sdpa", **kw)
    out = varlen_attention(q, k, v, cu_q, max_q, backend=backend, **kw)
    assert_close_rule(out, truth, ref_lowp, floor=1e-3, what=f"{backend} prefixed")


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


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen", "xformers"])
def test_gpu_backends_backward_under_autocast(backend):
    """The training path: fp32 q/k (RoPE promotes them) and bf16 v under bf16 autocast, GQA, then
    dq/dk/dv (summed over each KV group) against the fp64 truth, within 2× the SDPA path's error."""
    dev = torch.device("cuda")
    if backend not in available_backends(dev, torch.bfloat16, 128):
        pytest.skip(f"{backend} is not installed on this GPU machine")
    _check_backward_under_autocast(backend, dev)


def _check_backward_under_autocast(backend, dev):
    lengths = [3, 577, 200]
    q, k, v, cu, max_len = make(lengths, h=8, hkv=2, dh=128, device=dev)
    dy = torch.randn_like(q)

    def grads(fn, device, low=False):
        leaves = [t.detach().to(device).requires_grad_() for t in (q, k, v)]
        qq, kk, vv = leaves
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=low):
            out = fn(qq, kk, vv.bfloat16() if low else vv)
        (out.double() * dy.to(device).double()).sum().backward()
        return [out] + [t.grad for t in leaves]

    truth = grads(lambda a, b, c: dense_truth(a, b, c, lengths, True), "cpu")
    ref = grads(lambda a, b, c: varlen_attention(a, b, c, cu, max_len, backend="sdpa"), dev, low=True)
    got = grads(lambda a, b, c: varlen_attention(a, b, c, cu, max_len, backend=backend), dev, low=True)
    assert got[0].dtype == torch.bfloat16
    for name, g, r, t in zip(("out", "dq", "dk", "dv"), got, ref, truth, strict=True):
        assert_close_rule(g, t, r, floor=1e-3, what=f"{backend} {name}")


def test_auto_skips_flash_backends_for_inputs_they_cannot_take():
    """FA2-based backends take only fp16/bf16 and head dims multiple of 8 up to 256: ``auto`` must fall
    back (the fp32 GPU runtime test and odd tiny models) and an explicit choice must say why."""
    cuda = torch.device("cuda")  # only the probes run: no device is touched
    if not any(b in available_backends(cuda) for b in ("flash_attn", "torch_varlen")):
        pytest.skip("neither flash_attn nor torch.nn.attention.varlen is importable")
    assert available_backends(cuda, torch.float32)[0] in ("xformers", "sdpa")
    assert available_backends(cuda, torch.bfloat16, 4)[0] in ("xformers", "sdpa")
    assert available_backends(cuda, torch.bfloat16, 128)[0] in ("flash_attn", "torch_varlen")
    with pytest.raises(ValueError, match="float32"):
        resolve_backend(cuda, available_backends(cuda)[0], torch.float32, 128)


@pytest.mark.parametrize("version", ["2.10", "2.11", "2.12"])
def test_torch_varlen_call_per_signature(monkeypatch, version):
    """The varlen_attn shim: causal as ``is_causal`` (2.10) or the exact tuple ``window_size=(-1, 0)``
    (2.11+), scale folded into q where there is no ``scale``, GQA repeated unless ``enable_gqa``."""
    import engine.attention as A

    seen = {}

    def fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, **kw):
        seen.update(kw, k=key)
        if not kw.get("enable_gqa"):
            assert key.shape[1] == query.shape[1], "2.10/2.11 need K/V repeated to H heads"
        causal = kw["is_causal"] if version == "2.10" else kw["window_size"] == (-1, 0)
        return A.varlen_attention_ref(query, key, value, cu_seq_q, causal, scale=kw.get("scale"))

    sigs = {"2.10": "is_causal=False, return_aux=None",
            "2.11": "*, return_aux=None, scale=None, window_size=(-1, -1)",
            "2.12": "*, return_aux=None, scale=None, window_size=(-1, -1), enable_gqa=False"}
    ns = {}
    exec(f"def sig(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, {sigs[version]}): pass", ns)
    fake.__signature__ = __import__("inspect").signature(ns["sig"])
    monkeypatch.setattr(A, "_torch_varlen", lambda: fake)
    A._torch_varlen_params.cache_clear()
    try:
        q, k, v, cu, max_len = make([5, 1, 9], h=4, hkv=2, dh=16)
        for causal in (True, False):
            out = A._torch_varlen_call(q, k, v, cu, max_len, causal, 0.3)
            truth = dense_truth(q * (0.3 * 16 ** 0.5), k, v, [5, 1, 9], causal)
            assert_close_rule(out, truth, what=f"{version} causal={causal}")
            assert seen["k"].shape[1] == (2 if version == "2.12" else 4)
            assert ("scale" in seen) == (version != "2.10")
    finally:
        A._torch_varlen_params.cache_clear()


def test_autocast_casts_mixed_dtypes_and_mismatch_raises():
    """q/k leave RoPE in fp32 under autocast while v is bf16: attention runs in the autocast dtype;
    outside autocast mixed dtypes are an error, not a silent promotion."""
    q, k, v, cu, max_len = make([3, 4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = varlen_attention(q, k, v.bfloat16(), cu, max_len)
    assert out.dtype == torch.bfloat16
    want = varlen_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu, max_len)
    assert torch.equal(out, want)
    with pytest.raises(ValueError, match="one dtype"):
        varlen_attention(q, k, v.bfloat16(), cu, max_len)
