"""The generation runtime (engine/generate.py, engine/kv_cache.py), fp32 on the CPU.

- greedy parity with transformers' ``LlavaForConditionalGeneration.generate(do_sample=False)``;
- batch invariance (alone == in a batch of 8 == joining a running batch);
- cache correctness: every decode step's logits == a full recompute on the extended sequence;
- sampling: support and frequencies of temperature / top-k / top-p against transformers'
  warpers, repetition penalty, seeded reproducibility;
- the KV-cache allocator and input validation.
"""
import pytest
import torch
from helpers import IMAGE_SIZE, IMAGE_TOKEN, hf_model, pad, recompute_logits
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import engine
from engine.generate import GraphCaptureError, Runtime, RuntimeConfig, SamplingParams, generate, sample_tokens
from engine.kv_cache import PagedKVCache

EOS = 2


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny random checkpoint saved by transformers and loaded with engine.load (and the HF model)."""
    path = tmp_path_factory.mktemp("tiny")
    hf = hf_model()
    hf.save_pretrained(path)
    return engine.load(str(path)).eval(), hf


def mixed_prompts(seq_len, n_images, lengths, seed=0):
    """Random text prompts with n image-placeholder runs each (never containing EOS or the image id)."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for n, length in zip(n_images, lengths, strict=True):
        ids = torch.randint(3, IMAGE_TOKEN, (length,), generator=g).tolist()
        for i in range(n):
            at = min(len(ids), 1 + 4 * i)
            ids[at:at] = [IMAGE_TOKEN] * seq_len
        seqs.append([1] + ids)
    pixels = torch.randn(sum(n_images), 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    return seqs, pixels


def images_of(seqs, pixels, seq_len):
    """Per-prompt slices of ``pixels`` (placeholder runs in order)."""
    out, at = [], 0
    for s in seqs:
        n = s.count(IMAGE_TOKEN) // seq_len
        out.append(pixels[at:at + n] if n else None)
        at += n
    return out


def test_greedy_matches_transformers_generate(model):
    ours, hf = model
    s = ours.config.image_seq_len
    seqs, pixels = mixed_prompts(s, n_images=(0, 1, 2, 1, 0), lengths=(5, 17, 9, 3, 30))
    ids, mask = pad(seqs, "left")
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=32,
                          do_sample=False, eos_token_id=EOS, pad_token_id=0)[:, ids.shape[1]:].tolist()
    outs = generate(ours, seqs, images=pixels, max_new_tokens=32, stop_token_ids=[EOS])
    reasons = set()
    for out, row in zip(outs, ref, strict=True):
        expect = row[:row.index(EOS)] if EOS in row else row
        assert out.tokens == expect
        assert out.finish_reason == ("stop" if EOS in row else "length")
        reasons.add(out.finish_reason)
    # and without early stopping, every row runs the full 32 tokens
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=32,
                          min_new_tokens=32, do_sample=False, eos_token_id=EOS, pad_token_id=0)
    outs = generate(ours, seqs, images=pixels, max_new_tokens=32, stop_token_ids=[])
    assert [o.tokens for o in outs] == ref[:, ids.shape[1]:].tolist()


def test_batch_invariance_and_joining_a_running_batch(model):
    ours, _ = model
    s = ours.config.image_seq_len
    seqs, pixels = mixed_prompts(s, n_images=(0, 1, 2, 0, 1, 0, 2, 1), lengths=(4, 25, 8, 60, 1, 13, 30, 7),
                                 seed=3)
    per = images_of(seqs, pixels, s)
    alone = [generate(ours, [q], images=im, max_new_tokens=20, stop_token_ids=[])[0].tokens
             for q, im in zip(seqs, per, strict=True)]
    batch = generate(ours, seqs, images=pixels, max_new_tokens=20, stop_token_ids=[])
    assert [o.tokens for o in batch] == alone

    # continuous batching: half start, the rest join while the first ones are decoding; a tiny
    # block size and early finishers make the later block tables non-contiguous
    rt = Runtime(ours, RuntimeConfig(max_batch=8, block_size=4, kv_cache_bytes=1 << 22))
    reqs = []
    for i, (q, im) in enumerate(zip(seqs, per, strict=True)):
        reqs.append(rt.submit(q, pixel_values=im, params=SamplingParams(max_new_tokens=20 if i % 3 else 5)))
        if i % 2:
            rt.step()
            rt.step()
    while rt.has_work:
        rt.step()
    assert [r.tokens for r in reqs] == [a if i % 3 else a[:5] for i, a in enumerate(alone)]
    assert rt.cache.free_blocks == rt.cache.num_blocks - 1  # everything released


def test_decode_logits_equal_full_recompute(model):
    ours, _ = model
    s = ours.config.image_seq_len
    seqs, pixels = mixed_prompts(s, n_images=(1, 0, 2, 0), lengths=(6, 19, 3, 11), seed=5)
    per = images_of(seqs, pixels, s)
    free = generate(ours, seqs[:1], images=per[0], max_new_tokens=12, stop_token_ids=[])[0].tokens
    stop = free[7]                                   # makes prompt 0 stop at its first occurrence
    rt = Runtime(ours, RuntimeConfig(max_batch=4, block_size=4, kv_cache_bytes=1 << 22))
    limits = (12, 3, 9, 1)
    reqs = [rt.submit(q, pixel_values=im, keep_logits=True,
                      params=SamplingParams(max_new_tokens=n, stop_token_ids=(stop,) if i == 0 else ()))
            for i, (q, im, n) in enumerate(zip(seqs, per, limits, strict=True))]
    while rt.has_work:
        rt.step()
    assert reqs[0].finish_reason == "stop" and reqs[0].tokens == free[:free.index(stop)]
    assert [len(r.tokens) for r in reqs[1:]] == list(limits[1:])
    for r, im in zip(reqs, per, strict=True):
        got = torch.stack(r.logits)                   # one row per step (the stop step included)
        assert got.shape[0] == len(r.tokens) + (r.finish_reason == "stop")
        full = recompute_logits(ours, r.prompt, im, r.tokens)[:got.shape[0]]
        assert (got - full).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------- sampling


def sample_many(logits, n, *, temperature=1.0, top_k=0, top_p=1.0):
    """n draws from one row of logits: seeds 0..n-1 at one counter."""
    rows = logits.expand(n, -1).contiguous()
    return sample_tokens(rows, temperature=torch.full((n,), temperature), top_k=torch.full((n,), top_k),
                         top_p=torch.full((n,), top_p), seeds=torch.arange(n), counters=torch.full((n,), 7))


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.5), dict(temperature=2.0, top_k=3),
                                dict(temperature=1.0, top_p=0.6), dict(temperature=0.8, top_k=4, top_p=0.75)])
def test_sampling_support_and_frequencies_match_transformers_warpers(kw):
    logits = torch.tensor([[2.0, 1.6, 1.1, 0.7, 0.2, -0.4, -1.0, -3.0]])
    warpers = LogitsProcessorList([TemperatureLogitsWarper(kw["temperature"])])
    if kw.get("top_k"):
        warpers.append(TopKLogitsWarper(kw["top_k"]))
    if kw.get("top_p", 1.0) < 1.0:
        warpers.append(TopPLogitsWarper(kw["top_p"]))
    expect = warpers(torch.zeros(1, 1, dtype=torch.long), logits.clone()).softmax(-1)[0]
    n = 40000
    tokens = sample_many(logits, n, **kw)
    freq = torch.bincount(tokens, minlength=8).double() / n
    assert (freq[expect == 0] == 0).all()              # never outside the support
    assert (freq[expect > 10 / n] > 0).all()            # every likely token of the support occurs
    # 5 standard errors of a binomial proportion
    bound = 5 * (expect * (1 - expect) / n).sqrt() + 1e-9
    assert ((freq - expect.double()).abs() <= bound.double()).all(), (freq, expect)


def test_greedy_rows_and_repetition_penalty_match_transformers():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 3
    history = torch.randint(0, 50, (6, 12), generator=g)
    seen = torch.zeros(6, 50, dtype=torch.bool).scatter_(1, history, True)
    expect = RepetitionPenaltyLogitsProcessor(1.7)(history, logits.clone()).argmax(-1)
    got = sample_tokens(logits, temperature=torch.zeros(6), top_k=torch.zeros(6, dtype=torch.long),
                        top_p=torch.ones(6), seeds=torch.arange(6), counters=torch.zeros(6, dtype=torch.long),
                        penalty=torch.full((6,), 1.7), seen=seen)
    assert torch.equal(got, expect) and not torch.equal(got, logits.argmax(-1))


def test_seeded_sampling_is_reproducible_and_batch_invariant(model):
    ours, _ = model
    seqs, pixels = mixed_prompts(ours.config.image_seq_len, n_images=(1, 0, 0), lengths=(5, 9, 14), seed=7)
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=20, stop_token_ids=[])
    a = [o.tokens for o in generate(ours, seqs, images=pixels, seed=11, **kw)]
    b = [o.tokens for o in generate(ours, seqs, images=pixels, seed=11, **kw)]
    c = [o.tokens for o in generate(ours, seqs, images=pixels, seed=12, **kw)]
    assert a == b and a != c
    assert generate(ours, seqs[:1], images=pixels, seed=11, **kw)[0].tokens == a[0]
    assert generate(ours, seqs[1:2], seed=12, **kw)[0].tokens == a[1]  # prompt i samples with seed + i


def test_stream_yields_the_same_tokens(model):
    ours, _ = model
    seqs, pixels = mixed_prompts(ours.config.image_seq_len, n_images=(0, 1), lengths=(4, 8), seed=9)
    full = generate(ours, seqs, images=pixels, max_new_tokens=10, stop_token_ids=[])
    got, ends = [[], []], {}
    for ev in generate(ours, seqs, images=pixels, max_new_tokens=10, stop_token_ids=[], stream=True):
        if ev.token is None:
            ends[ev.index] = ev.finish_reason
        else:
            assert ev.index not in ends
            got[ev.index].append(ev.token)
    assert got == [o.tokens for o in full] and ends == {0: "length", 1: "length"}
    # closing a stream early frees the runtime for the next call
    it = generate(ours, seqs, images=pixels, max_new_tokens=10, stop_token_ids=[], stream=True)
    next(it)
    it.close()
    assert generate(ours, seqs[:1], max_new_tokens=10, stop_token_ids=[])[0].tokens == full[0].tokens


# ----------------------------------------------------------------------------- cache and validation


def test_cache_budget_and_allocator():
    cfg = engine.tiny_config().text
    per = PagedKVCache.bytes_per_block(cfg, 16, torch.float32)
    assert per == 2 * cfg.num_layers * 16 * cfg.num_kv_heads * cfg.head_dim * 4
    cache = PagedKVCache.from_budget(cfg, budget_bytes=10 * per + 5, block_size=16, dtype=torch.float32,
                                     device=torch.device("cpu"))
    assert cache.num_blocks == 10 and cache.free_blocks == 9       # block 0 is reserved
    a = cache.allocate(4)
    assert 0 not in a and cache.free_blocks == 5
    with pytest.raises(ValueError, match="free blocks"):
        cache.allocate(6)
    cache.release(a)
    assert cache.free_blocks == 9
    assert cache.slots([3, 7], 14, 18) == [3 * 16 + 14, 3 * 16 + 15, 7 * 16, 7 * 16 + 1]
    with pytest.raises(ValueError, match="fewer than 2 blocks"):
        PagedKVCache.from_budget(cfg, budget_bytes=per, block_size=16, dtype=torch.float32,
                                 device=torch.device("cpu"))


def test_invalid_inputs_raise(model):
    ours, _ = model
    s = ours.config.image_seq_len
    with pytest.raises(ValueError, match="placeholders"):
        generate(ours, [[1, 5] + [IMAGE_TOKEN] * s], images=None)
    with pytest.raises(ValueError, match="not an int"):
        generate(ours, [[1, 10_000]])
    with pytest.raises(ValueError, match="top_p"):
        generate(ours, [[1, 5]], top_p=0.0)
    with pytest.raises(ValueError, match="non-empty"):
        generate(ours, [])
    per_block = PagedKVCache.bytes_per_block(ours.config.text, 4, torch.float32)
    rt = Runtime(ours, RuntimeConfig(max_batch=2, block_size=4, kv_cache_bytes=4 * per_block))
    with pytest.raises(ValueError, match="KV-cache blocks"):
        rt.submit([1] * 10, params=SamplingParams(max_new_tokens=10))
    # a request that fits waits for blocks instead of failing
    reqs = [rt.submit([1, 5, 6], params=SamplingParams(max_new_tokens=9)) for _ in range(3)]
    while rt.has_work:
        rt.step()
    assert all(len(r.tokens) == 9 or r.finish_reason == "stop" for r in reqs)
    assert reqs[0].tokens == reqs[1].tokens == reqs[2].tokens


def test_graph_capture_failure_falls_back_to_eager(model):
    """A decode step whose CUDA-graph capture fails is run eagerly (same tokens), with a warning, and
    the runtime stops trying to capture."""
    ours, _ = model
    rt = Runtime(ours, RuntimeConfig(kv_cache_bytes=1 << 22))

    class FailingGraphs:
        def run(self, *args):
            raise GraphCaptureError("capture refused")

    rt.graphs = FailingGraphs()
    with pytest.warns(RuntimeWarning, match="without CUDA graphs"):
        out = generate(ours, [[1, 5, 6, 7]], max_new_tokens=5, stop_token_ids=[], runtime=rt)
    assert rt.graphs is None
    assert out[0].tokens == generate(ours, [[1, 5, 6, 7]], max_new_tokens=5, stop_token_ids=[])[0].tokens


@pytest.mark.gpu
def test_cuda_graph_decode_matches_eager(model):
    """Graph replay (padded batch and context buckets, continuous batching shrinking the batch) gives
    the eager step's logits and tokens; a failed capture would fall back to eager: asserted not to."""
    ours, _ = model
    gpu = ours.to("cuda")
    try:
        seqs, pixels = mixed_prompts(gpu.config.image_seq_len, n_images=(0, 1, 2), lengths=(5, 40, 9), seed=2)
        cfg = dict(kv_cache_bytes=1 << 24, block_size=4)  # small blocks: several context buckets
        eager = Runtime(gpu, RuntimeConfig(cuda_graphs=False, **cfg))
        graphs = Runtime(gpu, RuntimeConfig(cuda_graphs=True, **cfg))
        for limit in (24, 7):  # 7: a second round reuses the captured graphs
            a = generate(gpu, seqs, images=pixels, max_new_tokens=limit, stop_token_ids=[], runtime=eager,
                         output_logits=True)
            b = generate(gpu, seqs, images=pixels, max_new_tokens=limit, stop_token_ids=[], runtime=graphs,
                         output_logits=True)
            for x, y in zip(a, b, strict=True):
                torch.testing.assert_close(y.logits, x.logits, rtol=1e-4, atol=1e-4)
            assert [o.tokens for o in a] == [o.tokens for o in b]
        assert graphs.graphs is not None, "CUDA graph capture failed and the runtime fell back to eager"
        assert len(graphs.graphs.graphs) >= 2  # at least two buckets captured and replayed
    finally:
        ours.to("cpu")
