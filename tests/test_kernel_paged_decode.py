"""llava_kernels.paged_decode_attention: the Triton kernel (interpreter on CPU) and the gather reference
against an fp64 truth computed from each sequence's context laid out contiguously.

Odd shapes: R = 1, 3 and 4 query heads per KV head, head dims 16 and 24, block sizes 4, 5 and 16,
contexts of 1 token, exactly one block, and several splits (> 16 blocks); block tables shuffled,
with entries past a sequence's length. Cache slots no sequence may read hold NaN for the kernel:
a masked load that leaks would show.
"""
import math

import pytest
import torch
from helpers import assert_close_rule, hf_model, recompute_logits

import engine
from engine.generate import Runtime, RuntimeConfig, SamplingParams
from llava_kernels import dispatch, paged_decode_attention, paged_decode_attention_ref
from llava_kernels.paged_decode import paged_decode_fwd, split_plan

CPU = torch.device("cpu")
needs_cpu_ops = pytest.mark.skipif(not dispatch.cpu_ops_available(),
                                   reason=f"our CPU ops are not built: {dispatch.cpu_ops_error()}")


def make_case(lens, *, h, hkv, dh, bs, extra_blocks=1, dtype=torch.float32, device=CPU, seed=0):
    """(q, k_cache, v_cache, table, seq_lens, contexts): contexts[i] = (K, V) [len, Hkv, Dh] in order."""
    g = torch.Generator().manual_seed(seed)
    nb = max(math.ceil(n / bs) for n in lens) + extra_blocks    # trailing table entries past every length
    total = len(lens) * nb + 1
    perm = torch.randperm(total - 1, generator=g) + 1           # block 0 unused, as in the runtime
    table = perm[:len(lens) * nb].view(len(lens), nb)
    k_cache = torch.randn(total, bs, hkv, dh, generator=g).to(dtype)  # rounded first: the truth sees these values
    v_cache = torch.randn(total, bs, hkv, dh, generator=g).to(dtype)
    q = torch.randn(len(lens), h, dh, generator=g).to(dtype)
    contexts = [(torch.cat(list(k_cache[table[i]]))[:n].float(), torch.cat(list(v_cache[table[i]]))[:n].float())
                for i, n in enumerate(lens)]
    return (q.to(device), k_cache.to(device), v_cache.to(device), table.to(torch.int32).to(device),
            torch.tensor(lens, device=device), contexts)


def truth(q, contexts):
    out = []
    for i, (k, v) in enumerate(contexts):
        qi = q[i].double()                                       # (H, Dh)
        rep = qi.shape[0] // k.shape[1]
        k, v = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)  # (L, H, Dh)
        p = (torch.einsum("hd,lhd->hl", qi, k) / math.sqrt(qi.shape[-1])).softmax(-1)
        out.append(torch.einsum("hl,lhd->hd", p, v))
    return torch.stack(out)


def poison_unread(k_cache, v_cache, table, lens, bs):
    """NaN into every cache slot that is not part of some sequence's context."""
    keep = torch.zeros(k_cache.shape[:2], dtype=torch.bool)
    for i, n in enumerate(lens.tolist()):
        for p in range(n):
            keep[table[i, p // bs], p % bs] = True
    k_cache[~keep] = float("nan")
    v_cache[~keep] = float("nan")


SHAPES = [  # (lens, H, Hkv, Dh, Bs)
    ([1, 7, 16, 5], 4, 4, 16, 4),        # R = 1; a one-token context; exactly 4 blocks
    ([97, 3, 150], 8, 2, 16, 4),         # R = 4; 150 tokens = 38 blocks: three splits
    ([33, 1], 6, 2, 24, 5),              # R = 3, head dim and block size not powers of two
    ([300, 17, 64], 4, 2, 16, 16),       # the runtime's block size
]


@pytest.mark.parametrize("lens,h,hkv,dh,bs", SHAPES)
def test_triton_and_reference_match_fp64_truth(lens, h, hkv, dh, bs):
    q, k_cache, v_cache, table, seq_lens, contexts = make_case(lens, h=h, hkv=hkv, dh=dh, bs=bs)
    want = truth(q, contexts)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, table, seq_lens)
    assert_close_rule(ref, want, what="reference")
    poison_unread(k_cache, v_cache, table, seq_lens, bs)
    got = paged_decode_attention(q, k_cache, v_cache, table, seq_lens, backend="triton")
    assert_close_rule(got, want, what="triton")


@needs_cpu_ops
@pytest.mark.parametrize("lens,h,hkv,dh,bs", SHAPES + [([2, 40, 1, 19], 12, 12, 64, 16)])
def test_cpu_kernel_matches_fp64_truth(lens, h, hkv, dh, bs):
    """Our CPU kernel reads the blocks in place (NaN in every slot it must not read), int32 or int64 tables;
    a sequence's output is bit for bit its batch-1 output."""
    q, k_cache, v_cache, table, seq_lens, contexts = make_case(lens, h=h, hkv=hkv, dh=dh, bs=bs)
    want = truth(q, contexts)
    poison_unread(k_cache, v_cache, table, seq_lens, bs)
    got = paged_decode_attention(q, k_cache, v_cache, table, seq_lens, backend="cpu")
    assert got.dtype == torch.float32 and got.shape == q.shape
    assert_close_rule(got, want, what="cpu")
    assert torch.equal(got, paged_decode_attention(q, k_cache, v_cache, table.long(), seq_lens.int(), backend="cpu"))
    for i in range(len(lens)):
        one = paged_decode_attention(q[i:i + 1], k_cache, v_cache, table[i:i + 1], seq_lens[i:i + 1], backend="cpu")
        assert torch.equal(one, got[i:i + 1])


@needs_cpu_ops
def test_cpu_kernel_refuses_what_it_cannot_read():
    """A length past the table or a block index outside the cache is an error naming it, never a wild read;
    bf16 asked of the fp32-only kernel is refused, and automatic dispatch gives bf16 the reference."""
    q, k_cache, v_cache, table, seq_lens, _ = make_case([5, 9], h=4, hkv=2, dh=16, bs=4)
    with pytest.raises(RuntimeError, match=r"seq_lens\[1\] = 17"):
        paged_decode_attention(q, k_cache, v_cache, table, torch.tensor([5, 17]), backend="cpu")
    bad = table.clone()
    bad[0, 1] = k_cache.shape[0]
    with pytest.raises(RuntimeError, match=r"block_table\[0, 1\]"):
        paged_decode_attention(q, k_cache, v_cache, bad, seq_lens, backend="cpu")
    half = [t.bfloat16() for t in (q, k_cache, v_cache)]
    with pytest.raises(ValueError, match="fp32 only"):
        paged_decode_attention(*half, table, seq_lens, backend="cpu")
    assert torch.equal(paged_decode_attention(*half, table, seq_lens),
                       paged_decode_attention_ref(*half, table, seq_lens))


@pytest.mark.parametrize("lens,h,hkv,dh,bs", SHAPES[1:3])
def test_reference_gathers_into_a_given_workspace(lens, h, hkv, dh, bs):
    """With ``workspace`` the reference writes its gathered K/V there (stale NaNs overwritten) and returns
    exactly what it returns with fresh tensors."""
    q, k_cache, v_cache, table, seq_lens, _ = make_case(lens, h=h, hkv=hkv, dh=dh, bs=bs)
    shape = (table.numel(), bs, hkv, dh)
    ws = (torch.full(shape, float("nan")), torch.full(shape, float("nan")))
    got = paged_decode_attention(q, k_cache, v_cache, table, seq_lens, backend="torch", workspace=ws)
    assert torch.equal(got, paged_decode_attention_ref(q, k_cache, v_cache, table, seq_lens))
    blocks = table.reshape(-1).long()
    assert torch.equal(ws[0], k_cache[blocks]) and torch.equal(ws[1], v_cache[blocks])


def test_runtime_reuses_one_gather_workspace_on_the_cpu(tmp_path):
    """The CPU decode steps gather into the cache's one buffer, regrown (doubling) only when a step needs more
    blocks than it holds, never per layer or per step; the logits still equal a cache-free recompute."""
    hf_model().save_pretrained(tmp_path)
    model = engine.load(str(tmp_path)).eval()
    rt = Runtime(model, RuntimeConfig(block_size=4, kv_cache_bytes=1 << 22, decode_attention="torch"))
    reqs = [rt.submit(p, keep_logits=True, params=SamplingParams(max_new_tokens=n, stop_token_ids=()))
            for p, n in (([1, 5, 9, 33], 9), ([1] + list(range(3, 40)), 12))]
    rt.step()                                               # the prefill: no gather
    buffers = {}                                            # data_ptr -> blocks it holds
    steps = 0
    while rt.has_work:
        rt.step()
        steps += 1
        buffers[rt.cache._gather.data_ptr()] = rt.cache._gather.shape[1]
    sizes = sorted(buffers.values())
    assert steps > 8 and 1 <= len(sizes) <= 2               # 2 × 10 blocks, then one doubling for the 11th
    assert all(b >= 2 * a for a, b in zip(sizes, sizes[1:], strict=False))
    for r in reqs:
        got = torch.stack(r.logits)
        want = recompute_logits(model, r.prompt, None, r.tokens)[:got.shape[0]]
        assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("lens,bs", [([300, 17, 64], 16), ([700, 2], 4)])
@pytest.mark.parametrize("num_sms", [1, 8, 1000])
def test_split_plans_agree(lens, bs, num_sms):
    """The split count follows the SM count: one split (the kernel writes the output), a few, one per 4
    blocks (5 partials, or 44: the combine merges them 16 at a time); every plan matches the truth."""
    q, k_cache, v_cache, table, seq_lens, contexts = make_case(lens, h=4, hkv=2, dh=16, bs=bs)
    want = truth(q, contexts)
    poison_unread(k_cache, v_cache, table, seq_lens, bs)
    got = paged_decode_fwd(q, k_cache, v_cache, table, seq_lens, 16 ** -0.5, num_sms=num_sms)
    assert_close_rule(got, want, what=f"triton, {split_plan(len(lens), 2, table.shape[1], num_sms)} splits")


def test_split_plan_at_the_benchmark_shapes():
    """(splits, blocks per split) on an H200 (132 SMs) at 1024 tokens of context (64 blocks of 16)."""
    assert split_plan(1, 32, 64, 132) == (16, 4)     # batch 1, MHA: 512 programs instead of 128
    assert split_plan(1, 8, 64, 132) == (16, 4)      # batch 1, GQA 8:1: 128 programs instead of 32
    assert split_plan(32, 32, 64, 132) == (4, 16)    # batch 32: already 1024 programs per split
    assert split_plan(32, 8, 64, 132) == (4, 16)
    assert split_plan(1, 8, 2, 132) == (1, 2)        # a short context: one split, no combine
    assert split_plan(4, 8, 1000, 1) == (63, 16)     # at most 16 blocks per split


def test_bf16_within_twice_the_reference_error():
    lens, bs = [97, 3, 150, 64], 16
    q, k_cache, v_cache, table, seq_lens, contexts = make_case(lens, h=8, hkv=2, dh=32, bs=bs, dtype=torch.bfloat16)
    want = truth(q, contexts)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, table, seq_lens)
    got = paged_decode_attention(q, k_cache, v_cache, table, seq_lens, backend="triton")
    assert got.dtype == torch.bfloat16
    assert_close_rule(got.float(), want, ref.float(), floor=1e-3, what="triton bf16")
    # Many splits: the bf16 output is stored by the combine kernel instead of the split kernel.
    got = paged_decode_fwd(q, k_cache, v_cache, table, seq_lens, 32 ** -0.5, num_sms=1000)
    assert got.dtype == torch.bfloat16 and split_plan(4, 2, table.shape[1], 1000)[0] > 1
    assert_close_rule(got.float(), want, ref.float(), floor=1e-3, what="triton bf16, combine kernel")


def test_automatic_choice_and_bad_inputs():
    assert dispatch.resolve("paged_decode", CPU) == ("cpu" if dispatch.cpu_ops_available() else "torch")
    q, k_cache, v_cache, table, seq_lens, _ = make_case([5, 9], h=4, hkv=2, dh=16, bs=4)
    with pytest.raises(ValueError, match="head dim"):
        paged_decode_attention(q[..., :8], k_cache, v_cache, table, seq_lens)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        paged_decode_attention(q[:, :3], k_cache, v_cache, table, seq_lens)
    with pytest.raises(ValueError, match="block_table must be"):
        paged_decode_attention(q, k_cache, v_cache, table[:1], seq_lens)
    with pytest.raises(ValueError, match="integer"):
        paged_decode_attention(q, k_cache, v_cache, table.float(), seq_lens)
    with pytest.raises(ValueError, match="contiguous"):
        paged_decode_attention(q, k_cache.transpose(0, 1), v_cache.transpose(0, 1), table, seq_lens)

def test_triton_without_interpreter_on_cpu_is_refused(monkeypatch):
    q, k_cache, v_cache, table, seq_lens, _ = make_case([5], h=4, hkv=2, dh=16, bs=4)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="cannot run"):
        paged_decode_attention(q, k_cache, v_cache, table, seq_lens, backend="triton")


@pytest.mark.parametrize("backend", ["triton", pytest.param("cpu", marks=needs_cpu_ops)])
def test_runtime_decodes_through_the_kernel(tmp_path, backend):
    """The runtime with decode_attention="triton" or "cpu": every step's logits equal a cache-free recompute."""
    hf_model().save_pretrained(tmp_path)
    model = engine.load(str(tmp_path)).eval()
    rt = Runtime(model, RuntimeConfig(block_size=4, kv_cache_bytes=1 << 22, decode_attention=backend))
    reqs = [rt.submit(p, keep_logits=True, params=SamplingParams(max_new_tokens=n, stop_token_ids=()))
            for p, n in (([1, 5, 9, 33], 9), ([1] + list(range(3, 40)), 5))]
    while rt.has_work:
        rt.step()
    for r in reqs:
        got = torch.stack(r.logits)
        want = recompute_logits(model, r.prompt, None, r.tokens)[:got.shape[0]]
        assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_real_shapes_and_cuda_graph(dtype):
    """7B shapes (32 heads of 128, MHA) and a GQA 8:1 case at the runtime's block size; the kernel
    inside a captured CUDA graph replays to the same output."""
    dev = torch.device("cuda")
    for lens, h, hkv in (([1, 577, 130, 1025] * 8, 32, 32), ([700, 16, 2047], 64, 8)):
        q, k_cache, v_cache, table, seq_lens, contexts = make_case(lens, h=h, hkv=hkv, dh=128, bs=16, dtype=dtype,
                                                                   device=dev)
        want = truth(q.cpu(), contexts)
        ref = paged_decode_attention_ref(q, k_cache, v_cache, table, seq_lens).float().cpu()
        got = paged_decode_attention(q, k_cache, v_cache, table, seq_lens, backend="triton")
        assert_close_rule(got.float().cpu(), want, ref, floor=1e-3, what=f"triton {dtype} H={h} Hkv={hkv}")
    graph = torch.cuda.CUDAGraph()
    paged_decode_attention(q, k_cache, v_cache, table, seq_lens, backend="triton")  # compile outside capture
    torch.cuda.set_sync_debug_mode("error")        # the op must not sync with the host
    try:
        paged_decode_attention(q, k_cache, v_cache, table, seq_lens, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with torch.cuda.graph(graph):
        out = paged_decode_attention(q, k_cache, v_cache, table, seq_lens, backend="triton")
    graph.replay()
    torch.testing.assert_close(out, got, rtol=0, atol=0)
