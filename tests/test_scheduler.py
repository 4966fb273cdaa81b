"""The runtime's scheduler (engine/scheduler.py, run by engine/generate.py's Runtime): chunked prefill
mixed with decode under a per-step token budget, lazy KV-block allocation, preemption by recompute,
prefix hits.

First through a runtime, fp32 on the CPU. The rule throughout: scheduling changes when and how
tokens are computed, never which. Greedy tokens of every request equal its batch-1 run (one request
alone in a runtime without chunking, sharing or preemption) whatever else is in the batch, and every
step's logits equal a cache-free recompute of the sequence so far (≤ 1e-5, fp32).

Then the ``Scheduler`` alone, without a model: the work lists its policy picks step by step
(admission order, budget shares, chunk ends, which sequence is preempted, which blocks are shared).
"""
import pytest
import torch
from helpers import IMAGE_SIZE, IMAGE_TOKEN, hf_model, recompute_logits

import engine
from engine.config import tiny_config
from engine.generate import Request, Runtime, RuntimeConfig, SamplingParams
from engine.kv_cache import ImageSpan, PagedKVCache
from engine.scheduler import Scheduler

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


# ---- the Scheduler alone: no model, no forward -----------------------------------------------------------

TEXT = tiny_config(num_layers=1).text


def scheduler(*, blocks=64, weights=None, **config):
    """A Scheduler over a cache of ``blocks`` usable blocks of BS tokens; prefix caching off unless asked.
    ``weights`` stands for the model's parameters (a tensor; updating it in place is a weight change)."""
    config.setdefault("prefix_caching", False)
    cache = PagedKVCache(TEXT, num_blocks=blocks + 1, block_size=BS, dtype=torch.float32,
                         device=torch.device("cpu"))
    w = torch.ones(3) if weights is None else weights
    return Scheduler(cache, RuntimeConfig(block_size=BS, **config), max_blocks_per_seq=32, parameters=lambda: [w])


def request(sched, length, *, limit=8, first=3, images=()):
    """Queue a prompt of ``length`` ids (BOS, then first, first + 1, ...); ``images``: (start, end) rows."""
    spans = [ImageSpan(a, b, bytes([j + 1]) * 32) for j, (a, b) in enumerate(images)]
    r = Request(prompt=[1] + list(range(first, first + length - 1)), pixel_values=None, params=SamplingParams(),
                limit=limit, spans=spans)
    sched.add(r)
    return r


def step(sched):
    """One ``schedule`` and what the runtime does around its forward: the work's cache positions advance,
    full blocks are registered, each row that ends its sequence samples a token, a request at its limit
    finishes. Checks on the way that blocks are taken lazily (exactly what the tokens so far need) and
    noted in the block table, and that the admitted requests are the work's newcomers."""
    running = {id(r): r.preemptions for r in sched.running}
    work, admitted = sched.schedule()                          # a running one preempted now may be readmitted
    assert admitted == [r for r, _ in work if running.get(id(r), -1) != r.preemptions]
    for r, n in work:
        assert n >= 1 and r.slot >= 0
        assert len(r.blocks) == sched.cache.blocks_for(r.cached + n)
        assert sched.block_table[r.slot, :len(r.blocks)].tolist() == r.blocks
    for r, n in work:
        r.cached += n
        if sched.config.prefix_caching:
            sched.register_full_blocks(r)
    for r, _ in work:
        if r.cached == r.seq_len:
            r.tokens.append(200 + len(r.tokens))
            if len(r.tokens) >= r.limit:
                sched.finish(r, "length")
    return work


def drain(sched, steps=500):
    for _ in range(steps):
        if not sched.has_work:
            return
        step(sched)
    raise AssertionError(f"the scheduler still has work after {steps} steps")


def test_admission_is_fifo_into_free_slots():
    sched = scheduler(max_batch=2, max_step_tokens=64)
    a, b, c = request(sched, 5, limit=2), request(sched, 6), request(sched, 7)
    assert step(sched) == [(a, 5), (b, 6)]
    assert [a.slot, b.slot] == [0, 1] and list(sched.waiting) == [c]
    assert step(sched) == [(a, 1), (b, 1)]                     # c has no slot until a ends (this step)
    assert a.finish_reason == "length" and a.slot == -1
    assert step(sched) == [(b, 1), (c, 7)] and c.slot == 0


def test_a_request_that_does_not_fit_is_not_overtaken():
    """Without chunking b's whole prompt needs 2 blocks and 1 is free: b waits, and c (which would fit)
    waits behind it, so a long prompt is never starved by short ones."""
    sched = scheduler(blocks=4, chunked_prefill=False)
    a, b, c = request(sched, 12), request(sched, 8), request(sched, 3)
    assert step(sched) == [(a, 12)]
    assert list(sched.waiting) == [b, c]


def test_with_chunking_an_admission_is_cut_to_the_free_blocks():
    sched = scheduler(blocks=4, max_step_tokens=64)
    a, b, c = request(sched, 12), request(sched, 8), request(sched, 3)
    assert step(sched) == [(a, 12), (b, 4)]                    # 3 + 1 blocks: b gets what is left
    assert list(sched.waiting) == [c]


def test_half_the_budget_is_kept_while_requests_wait():
    sched = scheduler(max_step_tokens=32)
    long = request(sched, 200, limit=2)
    assert step(sched) == [(long, 32)]                         # alone: the whole budget
    short = request(sched, 4, limit=3)
    assert step(sched) == [(long, 16), (short, 4)]             # half of it kept for the waiting one
    assert step(sched) == [(long, 31), (short, 1)]             # nobody waits: all but the decode row
    both = scheduler(max_step_tokens=32)
    a, b = request(both, 100), request(both, 100, first=50)
    assert step(both) == [(a, 16), (b, 16)]                    # admitted with b behind it: a takes half


def test_without_chunking_whole_prompts_fill_max_prefill_tokens():
    sched = scheduler(chunked_prefill=False, max_prefill_tokens=10)
    a, b, c = request(sched, 15), request(sched, 4), request(sched, 8)
    assert step(sched) == [(a, 15)]                            # the first prefill may exceed it alone
    assert step(sched) == [(a, 1), (b, 4)]                     # c's 8 tokens exceed the 6 left
    assert list(sched.waiting) == [c]


def test_a_chunk_never_splits_an_image():
    """Image rows [10, 30) under a budget of 16: the first chunk stops before the image, the next one
    takes the whole image (20 rows, past the budget), then text again."""
    sched = scheduler(max_step_tokens=16)
    r = request(sched, 50, images=[(10, 30)])
    ends = []
    while not r.tokens:
        step(sched)
        ends.append(r.cached)
    assert ends == [10, 30, 46, 50]


def test_blocks_are_taken_as_tokens_need_them():
    """A 6-token prompt allowed 12 new tokens holds 2 blocks after its prefill, not the 5 its whole
    sequence will need; it takes one more each time decode crosses a block boundary."""
    sched = scheduler(max_step_tokens=64)
    r = request(sched, 6, limit=12)
    held = []
    while not r.finished:
        step(sched)
        held.append(len(r.blocks) if not r.finished else sched.cache.blocks_for(r.cached))
    assert held == [2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5]
    assert sched.cache.free_blocks == sched.cache.num_blocks - 1 and r.blocks == []


def test_preemption_takes_the_youngest():
    """5 blocks, three 4-token prompts (1 block each): at the first decode each needs a second block;
    a and b get them and c, the youngest, is preempted, then readmitted in the same step to recompute
    the 4 prompt tokens the one free block holds."""
    sched = scheduler(blocks=5, max_step_tokens=64)
    a, b, c = (request(sched, 4, limit=17, first=f) for f in (3, 30, 60))
    assert step(sched) == [(a, 4), (b, 4), (c, 4)]
    assert step(sched) == [(a, 1), (b, 1), (c, 4)]
    assert [a.preemptions, b.preemptions, c.preemptions] == [0, 0, 1] and sched.preemptions == 1
    assert c.tokens == [200] and c.cached == 4 and c.decoding   # its sampled token runs next, as a decode row
    drain(sched)
    assert [len(r.tokens) for r in (a, b, c)] == [17, 17, 17]


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_preemption_never_takes_the_oldest(prefix_caching):
    """A random workload on a cache that holds about one sequence: every step the preempted sequences
    are the youngest running ones, never the oldest, and every request finishes with its blocks and
    slot returned."""
    g = torch.Generator().manual_seed(1)
    sched = scheduler(blocks=12, max_batch=6, max_step_tokens=13, prefix_caching=prefix_caching)
    reqs = []
    for i in range(14):
        length = int(torch.randint(2, 30, (), generator=g))
        limit = int(torch.randint(1, 49 - length, (), generator=g))   # fits the cache alone: ≤ 12 blocks
        reqs.append(request(sched, length, limit=limit, first=3 if i % 2 else 40))
    for _ in range(2000):
        if not sched.has_work:
            break
        before = sorted(sched.running, key=lambda r: r.arrival)
        counts = [r.preemptions for r in before]
        step(sched)
        taken = [r for r, k in zip(before, counts, strict=True) if r.preemptions > k]
        assert taken == before[len(before) - len(taken):]
        assert not taken or taken[0] is not before[0]
    assert sched.preemptions > 0
    assert all(len(r.tokens) == r.limit for r in reqs)
    assert sched.cache.free_blocks == sched.cache.num_blocks - 1 and len(sched.free_slots) == 6


def test_prefix_hits_are_whole_blocks_before_the_last_token_and_any_image():
    w = torch.ones(3)
    sched = scheduler(prefix_caching=True, max_step_tokens=64, weights=w)
    a = request(sched, 10, limit=1)
    step(sched)                                                # a's 2 full blocks registered, then idle
    kept = a.keys[:2]
    b = request(sched, 10, limit=1)
    assert step(sched) == [(b, 2)] and b.reused == 8 and b.keys[:2] == kept
    c = request(sched, 8, limit=1)                             # its last token runs: 1 block of 2 shared
    assert step(sched) == [(c, 4)] and c.reused == 4
    d = request(sched, 14, limit=1, first=70, images=[(6, 13)])
    assert step(sched) == [(d, 14)]
    e = request(sched, 14, limit=1, first=70, images=[(6, 13)])  # 3 blocks match; the image cuts them to 1
    assert step(sched) == [(e, 10)] and e.reused == 4
    assert sched.reused_tokens == 8 + 4 + 4 and sched.prompt_tokens == 10 + 10 + 8 + 14 + 14
    w.add_(0)                                                  # an in-place update: the shared K/V is stale
    f = request(sched, 10, limit=1)
    assert step(sched) == [(f, 10)] and f.reused == 0


def test_requests_admitted_together_share_the_blocks_the_first_writes():
    sched = scheduler(prefix_caching=True, max_step_tokens=64)
    a, b = request(sched, 10), request(sched, 10)
    assert step(sched) == [(a, 10), (b, 2)]
    assert b.blocks[:2] == a.blocks[:2] and b.reused == 8


def test_cancel_and_finish_give_back_slots_and_blocks():
    sched = scheduler(max_batch=2, max_step_tokens=64)
    a, b, c = request(sched, 9), request(sched, 5), request(sched, 3)
    step(sched)
    sched.cancel(c, "cancelled")                               # still waiting
    sched.cancel(a, "cancelled")                               # running, 3 blocks
    assert (c.finish_reason, a.finish_reason) == ("cancelled", "cancelled")
    assert not sched.waiting and sched.running == [b] and a.slot == -1 and a.blocks == []
    assert sched.cache.free_blocks == sched.cache.num_blocks - 1 - len(b.blocks)
    sched.cancel(a, "error")                                   # already ended: unchanged
    assert a.finish_reason == "cancelled"
