"""The runtime's scheduler (engine/generate.py): chunked prefill mixed with decode under a per-step
token budget, lazy KV-block allocation, preemption by recompute; fp32 on the CPU.

The rule throughout: scheduling changes when and how tokens are computed, never which. Greedy
tokens of every request equal its batch-1 run (one request alone in a runtime without chunking,
sharing or preemption) whatever else is in the batch, and every step's logits equal a cache-free
recompute of the sequence so far (≤ 1e-5, fp32).
"""
import pytest
import torch
from helpers import IMAGE_SIZE, IMAGE_TOKEN, hf_model, recompute_logits

import engine
from engine.generate import Runtime, RuntimeConfig, SamplingParams
from engine.kv_cache import PagedKVCache

BS = 4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    hf_model().save_pretrained(path)
    return engine.load(str(path)).eval()


def workload(model, n=32, seed=0):
    """n requests (prompt, pixels, max_new_tokens): 0-2 images, ragged lengths, ragged limits."""
    s = model.config.image_seq_len
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(0, 3, (), generator=g))
        ids = [1] + torch.randint(3, IMAGE_TOKEN, (int(torch.randint(0, 40, (), generator=g)),), generator=g).tolist()
        for j in range(k):
            at = min(len(ids), 1 + 5 * j)
            ids[at:at] = [IMAGE_TOKEN] * s
        px = torch.randn(k, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g) if k else None
        out.append((ids, px, 1 + int(torch.randint(0, 16, (), generator=g))))
    return out


def per_block(model):
    return PagedKVCache.bytes_per_block(model.config.text, BS, torch.float32)


def run(rt, work, keep_logits=False):
    reqs = [rt.submit(p, pixel_values=px, keep_logits=keep_logits,
                      params=SamplingParams(max_new_tokens=n, stop_token_ids=())) for p, px, n in work]
    while rt.has_work:
        rt.step()
    assert rt.cache.free_blocks == rt.cache.num_blocks - 1    # every block released
    return reqs


@pytest.fixture(scope="module")
def alone(model):
    """Batch-1 reference: each request alone, whole-prompt prefill, ample cache, no prefix sharing."""
    rt = Runtime(model, RuntimeConfig(chunked_prefill=False, prefix_caching=False, kv_cache_bytes=1 << 22))
    return [run(rt, [w], keep_logits=True)[0] for w in workload(model)]


MODES = {
    "chunked": dict(max_step_tokens=64),
    # 13 tokens a step, 24 blocks of 4 tokens for up to 32 sequences: chunks, preemption, mixed steps
    "chunked+preempt": dict(max_step_tokens=13, kv_blocks=24),
    "whole+preempt": dict(chunked_prefill=False, kv_blocks=24),
    "chunked+preempt+prefix": dict(max_step_tokens=13, kv_blocks=24, prefix_caching=True),
}


def mode_runtime(model, name):
    kw = dict(MODES[name])
    blocks = kw.pop("kv_blocks", 512)
    kw.setdefault("prefix_caching", False)
    return Runtime(model, RuntimeConfig(max_batch=32, block_size=BS, kv_cache_bytes=(blocks + 1) * per_block(model),
                                        **kw))


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("n", [1, 7, 32])
def test_greedy_tokens_do_not_depend_on_the_batch(model, alone, n, mode):
    work = workload(model)[:n]
    rt = mode_runtime(model, mode)
    reqs = run(rt, work, keep_logits=True)
    assert [r.tokens for r in reqs] == [a.tokens for a in alone[:n]]
    for r, a in zip(reqs, alone, strict=False):
        assert (torch.stack(r.logits) - torch.stack(a.logits)).abs().max().item() <= 1e-5
    if n == 32 and "preempt" in mode:
        assert rt.preemptions > 0 and any(r.preemptions for r in reqs)


def test_chunked_prefill_equals_whole_prefill_and_runs_in_chunks(model):
    """A 3-image prompt of ~60 tokens prefilled 8 tokens a step: the same first logits and tokens as
    one whole prefill; its first token comes only after enough steps for every chunk; a chunk never
    splits an image (the budget is smaller than an image here would be split otherwise)."""
    s = model.config.image_seq_len
    g = torch.Generator().manual_seed(7)
    prompt = [1] + torch.randint(3, IMAGE_TOKEN, (40,), generator=g).tolist()
    for at in (3, 17, 30):
        prompt[at:at] = [IMAGE_TOKEN] * s
    px = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    whole = Runtime(model, RuntimeConfig(chunked_prefill=False, prefix_caching=False, kv_cache_bytes=1 << 22))
    (w,) = run(whole, [(prompt, px, 6)], keep_logits=True)
    rt = Runtime(model, RuntimeConfig(max_step_tokens=3, prefix_caching=False, kv_cache_bytes=1 << 22))
    calls = []
    hook = model.vision.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    r = rt.submit(prompt, pixel_values=px, keep_logits=True, params=SamplingParams(max_new_tokens=6,
                                                                                  stop_token_ids=()))
    steps = 0
    while not r.tokens:
        rt.step()
        steps += 1
    assert steps >= -(-(len(prompt) - 3 * s) // 3)            # text 3 tokens a step (each image at once)
    assert calls == [1, 1, 1]                                   # one image per chunk, never a split one
    while rt.has_work:
        rt.step()
    hook.remove()
    assert r.tokens == w.tokens
    assert (torch.stack(r.logits) - torch.stack(w.logits)).abs().max().item() <= 1e-5
    full = recompute_logits(model, prompt, px, r.tokens)[:len(r.tokens)]
    assert (torch.stack(r.logits) - full).abs().max().item() <= 1e-5


def test_decode_keeps_running_while_a_long_prompt_prefills(model):
    """A running stream gets a token every step while a 200-token prompt is prefilled in chunks of at
    most the budget (minus the decode row): no step stalls it."""
    rt = Runtime(model, RuntimeConfig(max_step_tokens=32, prefix_caching=False, kv_cache_bytes=1 << 22))
    short = rt.submit([1, 5, 6, 7], params=SamplingParams(max_new_tokens=30, stop_token_ids=()))
    rt.step()
    assert len(short.tokens) == 1
    long = rt.submit([1] + list(range(3, 100)) * 2 + [4], params=SamplingParams(max_new_tokens=2,
                                                                                 stop_token_ids=()))
    cached = []
    while not long.tokens:
        before = len(short.tokens)
        rt.step()
        assert len(short.tokens) == before + 1
        cached.append(long.cached)
    assert max(b - a for a, b in zip([0] + cached, cached, strict=False)) <= 31
    assert len(cached) == -(-len(long.prompt) // 31)


def test_admission_does_not_reserve_max_new_tokens(model):
    """Two requests whose prompt + max_new_tokens each need most of the cache run side by side (the
    old admission reserved it all up front and ran them one after the other)."""
    rt = Runtime(model, RuntimeConfig(block_size=BS, prefix_caching=False,
                                      kv_cache_bytes=(10 + 1) * per_block(model)))
    reqs = [rt.submit([1, 5 + i, 6, 7], params=SamplingParams(max_new_tokens=33, stop_token_ids=()))
            for i in range(2)]
    rt.step()
    assert all(len(r.tokens) == 1 for r in reqs) and len(rt.running) == 2
    while rt.has_work:
        rt.step()
    assert all(len(r.tokens) == 33 for r in reqs)
    assert rt.preemptions > 0                                   # 2 × 9 blocks do not fit in 10


def test_preemption_under_a_tiny_cache_recomputes_exactly(model):
    """A cache that holds one long request at a time: the younger ones are preempted and recomputed
    (prompt, images and generated tokens), every step's logits equal a full recompute."""
    work = [w for w in workload(model, n=12, seed=3)]
    need = max(-(-(len(p) + n - 1) // BS) for p, _, n in work)
    rt = Runtime(model, RuntimeConfig(max_batch=8, block_size=BS, max_step_tokens=16, prefix_caching=False,
                                      kv_cache_bytes=(need + 1) * per_block(model)))
    reqs = run(rt, work, keep_logits=True)
    assert rt.preemptions >= 3
    assert all(len(r.tokens) == n for r, (_, _, n) in zip(reqs, work, strict=True))
    for r, (p, px, _) in zip(reqs, work, strict=True):
        got = torch.stack(r.logits)
        assert (got - recompute_logits(model, p, px, r.tokens)[:got.shape[0]]).abs().max().item() <= 1e-5


def test_runtime_config_rejects_a_zero_budget():
    with pytest.raises(ValueError, match="max_step_tokens"):
        RuntimeConfig(max_step_tokens=0)


@pytest.mark.parametrize("chunked", [True, False])
def test_identical_requests_preempted_with_prefix_sharing(model, chunked):
    """Equal prompts under a tiny cache with prefix sharing: readmitted sequences share the blocks of
    their twins (sometimes blocks another sequence writes in the same step) and still decode exactly."""
    prompt = [1] + list(range(40, 51))
    rt = Runtime(model, RuntimeConfig(max_batch=6, block_size=BS, max_step_tokens=9, chunked_prefill=chunked,
                                      kv_cache_bytes=(12 + 1) * per_block(model)))
    reqs = run(rt, [(prompt, None, 30 + i) for i in range(6)], keep_logits=True)
    assert rt.preemptions > 0 and rt.reused_tokens > 0
    want = recompute_logits(model, prompt, None, reqs[-1].tokens)
    for r in reqs:
        assert r.tokens == reqs[-1].tokens[:len(r.tokens)]
        got = torch.stack(r.logits)
        assert (got - want[:got.shape[0]]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("chunked", [True, False])
def test_a_short_request_behind_a_long_prompt(model, chunked):
    """Submitted right after a 300-token prompt: with chunking the short request's first token comes
    in the first step, beside half a budget of the long prompt (which then gets the whole budget),
    without chunking only after all of it. Both get the tokens they get alone."""
    long_prompt = [1] + [3 + (7 * i) % 110 for i in range(299)]
    short_prompt = [1, 9, 8, 7]
    ref = Runtime(model, RuntimeConfig(chunked_prefill=False, prefix_caching=False, kv_cache_bytes=1 << 22))
    want = [r.tokens for r in run(ref, [(long_prompt, None, 3), (short_prompt, None, 3)])]
    rt = Runtime(model, RuntimeConfig(max_step_tokens=32, chunked_prefill=chunked, prefix_caching=False,
                                      kv_cache_bytes=1 << 22))
    long = rt.submit(long_prompt, params=SamplingParams(max_new_tokens=3, stop_token_ids=()))
    short = rt.submit(short_prompt, params=SamplingParams(max_new_tokens=3, stop_token_ids=()))
    while not short.tokens:
        rt.step()
    assert long.cached == (16 if chunked else len(long_prompt))
    while rt.has_work:
        rt.step()
    assert [long.tokens, short.tokens] == want
