"""Prefix reuse in the generation runtime (engine/kv_cache.py, engine/scheduler.py, engine/generate.py), fp32
on the CPU.

A shared prefix must change nothing but the work done: every step's logits equal a full
recompute without any cache (≤ 1e-5), the tokens equal a runtime without prefix caching, and
the counters show how many prompt tokens were not recomputed. Also: reuse never splits an
image, a different image is a different prefix, idle prefix blocks are evicted only when the
cache needs them, and changed weights drop every prefix.
"""
import copy

import pytest
import torch
from helpers import IMAGE_SIZE, IMAGE_TOKEN, hf_model, recompute_logits

import engine
from engine.generate import Runtime, RuntimeConfig, SamplingParams
from engine.kv_cache import ImageSpan, PagedKVCache, block_keys

BS = 4  # tokens per block: small, so prompts span many blocks and boundaries fall inside images


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    hf_model().save_pretrained(path)
    return engine.load(str(path)).eval()


def runtime(model, caching=True, **kw):
    kw.setdefault("kv_cache_bytes", 1 << 22)
    return Runtime(model, RuntimeConfig(max_batch=8, block_size=BS, prefix_caching=caching, **kw))


def text(n, seed):
    """n random text ids (never EOS=2 or the image id)."""
    return torch.randint(3, IMAGE_TOKEN, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def image(seed):
    return torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def run(rt, requests, max_new_tokens=10):
    """Submit (prompt, pixels) pairs together, step to the end, return the requests (logits kept)."""
    reqs = [rt.submit(p, pixel_values=px, keep_logits=True,
                      params=SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=()))
            for p, px in requests]
    while rt.has_work:
        rt.step()
    return reqs


def assert_exact(model, reqs):
    """Every step's logits equal a cache-free recompute of prompt + tokens so far."""
    for r in reqs:
        got = torch.stack(r.logits)
        want = recompute_logits(model, r.prompt, r.pixel_values, r.tokens)[:got.shape[0]]
        assert (got - want).abs().max().item() <= 1e-5


def count_images(model):
    """A list that grows by the number of images each vision-tower call encodes."""
    calls = []
    model.vision.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    return calls


def test_shared_system_prompt_is_computed_once(model):
    s = model.config.image_seq_len
    system = [1] + text(36, seed=0)                   # 37 tokens: 9 full blocks + 1 token
    prompts = [(system + [IMAGE_TOKEN] * s + text(n, seed=n), image(n)) for n in (5, 9, 2, 13)]
    cached, plain = runtime(model), runtime(model, caching=False)
    first = run(cached, prompts[:1])
    assert cached.reused_tokens == 0 and cached.cache.cached_blocks > 0
    rest = run(cached, prompts[1:])                    # one packed prefill, all three sharing the prefix
    assert [r.reused for r in rest] == [36, 36, 36]
    assert cached.reused_tokens == 3 * 36 and cached.prompt_tokens == sum(len(p) for p, _ in prompts)
    assert_exact(model, first + rest)
    assert [r.tokens for r in first + rest] == [r.tokens for r in run(plain, prompts)]
    assert cached.cache.free_blocks == cached.cache.num_blocks - 1  # shared blocks released exactly once


def test_requests_prefilled_together_share_their_common_prefix(model):
    """A burst: four requests with one system prompt and two with one image arrive together. The
    first of each group computes the shared part; the others attend to the K/V it writes in the same
    packed prefill, and the shared image is encoded once."""
    s = model.config.image_seq_len
    system = [1] + text(36, seed=11)
    same_image = [1] + text(6, seed=12) + [IMAGE_TOKEN] * s + [5]     # image rows 7..10; 3 full blocks
    prompts = ([(system + text(n, seed=20 + n), None) for n in (3, 8, 1, 5)]
               + [(same_image + text(n, seed=30 + n), image(9)) for n in (4, 7)])
    rt = runtime(model)
    calls = count_images(model)
    try:
        reqs = run(rt, prompts)
    finally:
        model.vision._forward_hooks.clear()
    assert [r.reused for r in reqs] == [0, 36, 36, 36, 0, 12]
    assert calls == [1]                                       # the second request's image was not encoded
    assert_exact(model, reqs)
    assert [r.tokens for r in reqs] == [r.tokens for r in run(runtime(model, caching=False), prompts)]
    assert rt.cache.free_blocks == rt.cache.num_blocks - 1


def test_next_chat_turn_reuses_the_image_and_the_answer(model):
    """Turn 2 re-sends turn 1 (image, question, the generated answer): the image is not encoded again
    and the blocks decode filled are shared too."""
    s = model.config.image_seq_len
    turn1 = [1] + text(3, seed=1) + [IMAGE_TOKEN] * s + text(6, seed=2)
    px = image(7)
    rt = runtime(model)
    (r1,) = run(rt, [(turn1, px)], max_new_tokens=11)
    turn2 = turn1 + r1.tokens + text(5, seed=3)
    written = len(turn1) + len(r1.tokens) - 1          # the last sampled token never enters the cache
    calls = count_images(model)
    try:
        (r2,) = run(rt, [(turn2, px)])
    finally:
        model.vision._forward_hooks.clear()
    assert r2.reused == written // BS * BS > len(turn1)
    assert calls == []                                  # the image sits wholly inside the shared prefix
    assert_exact(model, [r2])


def test_a_different_image_is_a_different_prefix(model):
    s = model.config.image_seq_len
    prompt = [1] + text(8, seed=4) + [IMAGE_TOKEN] * s + text(6, seed=5)  # image rows 9..12
    rt = runtime(model)
    run(rt, [(prompt, image(1))])
    calls = count_images(model)
    try:
        (same,) = run(rt, [(prompt, image(1))])
        (other,) = run(rt, [(prompt, image(2))])
    finally:
        model.vision._forward_hooks.clear()
    assert same.reused == (len(prompt) - 1) // BS * BS
    assert other.reused == 8                            # blocks 0-1 hold text only; block 2 holds image rows
    assert calls == [1]                                 # only the different image was encoded
    assert_exact(model, [same, other])


def test_reuse_never_splits_an_image(model):
    """The prompts agree through the image but differ right after it: the shared blocks would end
    inside the image, so reuse stops at the block boundary before it."""
    s = model.config.image_seq_len
    head = [1] + text(5, seed=6)                        # image rows 6..9: blocks 1 and 2 hold them
    a = head + [IMAGE_TOKEN] * s + [7, 8, 9, 10, 11]
    b = head + [IMAGE_TOKEN] * s + [50, 8, 9, 10, 11]   # differs at 10: block 2 differs, block 1 matches
    rt = runtime(model)
    run(rt, [(a, image(3))])
    (r,) = run(rt, [(b, image(3))])
    assert rt.cache.lookup(block_keys(b, BS, r.spans, 0, 2)) != []  # blocks 0-1 were there to share...
    assert r.reused == 4                                # ...but block 1 ends inside the image
    assert_exact(model, [r])


def test_reuse_cut_back_before_one_image_never_lands_in_an_earlier_one(model):
    """Images at rows 1..4 and 6..9: sharing blocks 0-1 would end inside the second image, and cutting
    back to block 1's start would end inside the first, so nothing is shared."""
    s = model.config.image_seq_len
    a = [1] + [IMAGE_TOKEN] * s + [5] + [IMAGE_TOKEN] * s + [7, 8, 9, 10, 11]
    b = a[:10] + [50, 8, 9, 10, 11]                     # differs at row 10
    px = torch.cat([image(3), image(4)])
    rt = runtime(model)
    run(rt, [(a, px)])
    (r,) = run(rt, [(b, px)])
    assert len(rt.cache.lookup(block_keys(b, BS, r.spans, 0, 2))) == 2  # blocks 0-1 were there to share
    assert r.reused == 0 and r.finish_reason == "length"
    assert_exact(model, [r])


def test_idle_prefix_blocks_are_evicted_only_when_needed(model):
    per_block = PagedKVCache.bytes_per_block(model.config.text, BS, torch.float32)
    rt = runtime(model, kv_cache_bytes=13 * per_block)  # 12 usable blocks
    p1 = [1] + text(30, seed=8)                          # 31 + 10 - 1 = 40 written tokens: 10 full blocks
    run(rt, [(p1, None)])
    assert rt.cache.cached_blocks == 10 and rt.cache.free_blocks == 12  # idle blocks still count as free
    (again,) = run(rt, [(p1, None)])
    assert again.reused == 28
    p2 = [1] + text(30, seed=9)                          # needs 10 blocks: evicts most of p1's
    (other,) = run(rt, [(p2, None)])
    assert other.reused == 0
    (third,) = run(rt, [(p1, None)])
    assert third.reused < 28
    assert_exact(model, [again, other, third])
    assert rt.cache.free_blocks == 12


def test_changed_weights_drop_every_prefix(model):
    m = copy.deepcopy(model)
    rt = runtime(m)
    prompt = [1] + text(21, seed=10)
    run(rt, [(prompt, None)])
    with torch.no_grad():
        m.decoder.layers[0].mlp.down.weight.mul_(1.5)    # an in-place update, as an optimizer step does
    (r,) = run(rt, [(prompt, None)])
    assert r.reused == 0
    assert_exact(m, [r])
    (r,) = run(rt, [(prompt, None)])                     # the new weights' prefix is shared again
    assert r.reused == 20


def test_allocator_refcounts_idle_and_eviction():
    cfg = engine.tiny_config().text
    cache = PagedKVCache(cfg, num_blocks=6, block_size=BS, dtype=torch.float32, device=torch.device("cpu"))
    keys = block_keys(list(range(12)), BS, [], 0, 3)
    a = cache.allocate(3)
    for b, k in zip(a, keys, strict=True):
        cache.register(b, k)
    assert cache.lookup(keys) == a and cache.lookup(block_keys([0] * 12, BS, [], 0, 3)) == [] and cache.free_blocks == 2
    cache.share(cache.lookup(keys[:2]))                  # a second sequence holds the first two
    cache.release(a)
    assert cache.free_blocks == 3                        # only the unshared third block went idle
    assert cache.idle_among(a) == 1
    cache.release(a[:2])
    assert cache.free_blocks == 5 and cache.cached_blocks == 3
    got = cache.allocate(3)                              # 2 never-used blocks, then the least recent idle
    assert sorted(got) == sorted([4, 5, a[2]])           # the sequence's last block is evicted first
    assert cache.lookup(keys) == a[:2] and cache.cached_blocks == 2
    cache.release(got)
    cache.forget_prefixes()
    assert cache.lookup(keys) == [] and cache.free_blocks == 5 and cache.cached_blocks == 0


def test_block_keys_chain_tokens_and_images():
    tokens = list(range(20, 32))
    img = ImageSpan(5, 7, b"x" * 32)
    plain = block_keys(tokens, BS, [], 0, 3)
    with_img = block_keys(tokens, BS, [img], 0, 3)
    assert plain[0] == with_img[0] and plain[1] != with_img[1] and plain[2] != with_img[2]  # chained
    assert block_keys(tokens, BS, [img._replace(digest=b"y" * 32)], 0, 3)[1] != with_img[1]
    assert block_keys([99] + tokens[1:], BS, [], 0, 3)[2] != plain[2]
    assert block_keys(tokens, BS, [], 1, 3, parent=plain[0]) == plain[1:]


@pytest.mark.gpu
def test_gpu_bf16_prefix_prefill_matches_a_cold_prefill():
    """On CUDA in bf16 (head dim 16: the FlashAttention backends take it), the prefill that attends to
    a shared prefix gives the first logits of a cold prefill, within 2× the cold run's own error
    against an fp32 CPU recompute."""
    from helpers import assert_close_rule

    torch.manual_seed(0)
    cpu = engine.Llava(engine.tiny_config(vocab_size=256)).eval()
    gpu = copy.deepcopy(cpu).to("cuda", torch.bfloat16)
    image_id, s = cpu.config.image_token_id, cpu.config.image_seq_len
    system = [1] + torch.randint(3, image_id, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    prompts = [(system + [image_id] * s + text(n, seed=n), image(n)) for n in (3, 17, 40)]
    cached, cold = (Runtime(gpu, RuntimeConfig(block_size=16, kv_cache_bytes=1 << 26, prefix_caching=c))
                    for c in (True, False))
    run(cached, prompts[:1], max_new_tokens=1)
    got = run(cached, [(p, px.cuda()) for p, px in prompts[1:]], max_new_tokens=1)
    ref = run(cold, [(p, px.cuda()) for p, px in prompts[1:]], max_new_tokens=1)
    assert [r.reused for r in got] == [192, 192]
    for g, r, (p, px) in zip(got, ref, prompts[1:], strict=True):
        truth = recompute_logits(cpu, p, px, [])[0]
        assert_close_rule(g.logits[0].float().cpu(), truth, r.logits[0].float().cpu(), floor=1e-3,
                          what=f"prefix prefill, {len(p)} tokens")


def test_random_workload_matches_a_runtime_without_sharing(model):
    """A stress run: prompts built from a few shared system prompts, images drawn from a small pool,
    random lengths and limits, submissions spread over the steps, and a cache small enough that idle
    prefixes are evicted. Every request's tokens equal those of a runtime without prefix sharing,
    and at the end every block is free again."""
    s = model.config.image_seq_len
    rng = torch.Generator().manual_seed(42)

    def pick(n):
        return int(torch.randint(0, n, (), generator=rng))

    systems = [[1] + text(n, seed=100 + n) for n in (9, 14, 23)]
    pool = [image(200 + i) for i in range(3)]
    work = []
    for i in range(24):
        prompt, px = list(systems[pick(3)]), []
        for _ in range(pick(3)):                    # 0-2 images, each after some text
            prompt += text(1 + pick(5), seed=300 + len(work) * 7 + len(px)) + [IMAGE_TOKEN] * s
            px.append(pool[pick(3)])
        prompt += text(1 + pick(9), seed=400 + i)
        work.append((prompt, torch.cat(px) if px else None, 1 + pick(12), pick(3)))  # ..., limit, arrival step
    per_block = PagedKVCache.bytes_per_block(model.config.text, BS, torch.float32)

    def drive(caching):
        rt = runtime(model, caching, kv_cache_bytes=40 * per_block)
        reqs, step = [None] * len(work), 0
        while any(r is None or not r.finished for r in reqs):
            for i, (prompt, px, limit, arrival) in enumerate(work):
                if reqs[i] is None and arrival <= step and i <= 4 * step:
                    reqs[i] = rt.submit(prompt, pixel_values=px,
                                        params=SamplingParams(max_new_tokens=limit, stop_token_ids=()))
            rt.step()
            step += 1
        assert rt.cache.free_blocks == rt.cache.num_blocks - 1
        return [r.tokens for r in reqs], rt

    shared, rt = drive(True)
    plain, _ = drive(False)
    assert shared == plain
    assert rt.reused_tokens > 0 and rt.cache.cached_blocks > 0
