"""Multi-image prompts with a different number of rows and tiles per image, through the generation
runtime (engine/generate.py, engine/image_spans.py), fp32 on the CPU. Last, the real AnyRes model:
greedy generate equal to transformers' ``LlavaNextForConditionalGeneration.generate`` on a ragged batch
of 0, 1 and 3 images.

The runtime must not assume ``image_seq_len`` rows and one tile per image: here a model whose config
gives each image ``image_rows(h, w)`` rows and ``image_tiles(h, w)`` tiles (a stand-in with simple
arithmetic, so these tests check the runtime's bookkeeping whatever the AnyRes math is) must give,
under chunked prefill, prefix sharing and preemption, exactly the logits of a cache-free recompute.
"""
import dataclasses
import math

import pytest
import torch
from anyres_helpers import TILE, hf_next
from helpers import IMAGE_SIZE, IMAGE_TOKEN, hf_model

import engine
from engine.config import LlavaConfig
from engine.generate import Runtime, RuntimeConfig, SamplingParams, generate
from engine.kv_cache import PagedKVCache, image_digest
from engine.model import Llava, PackedAttention, pack_cu_seqlens

BS = 4


@dataclasses.dataclass(frozen=True, kw_only=True)
class VarRowsConfig(LlavaConfig):
    """rows = height // 4 (3..), tiles = 1 + (width > height): arbitrary, but different per image."""

    @property
    def anyres(self) -> bool:
        return True

    def image_rows(self, height: int, width: int) -> int:
        return height // 4

    def image_tiles(self, height: int, width: int) -> int:
        return 1 + (width > height)


class VarRowsLlava(Llava):
    """Image i's rows: its tiles' projected features, cycled to ``image_rows`` rows and scaled by the
    row index (so a row in the wrong place changes the output)."""

    def image_embeddings(self, pixel_values, image_sizes):
        cfg = self.config
        feats = self.vision(pixel_values, cfg.vision_feature_layer, cfg.vision_feature_select_strategy)
        out, t = [], 0
        for h, w in image_sizes.tolist():
            k, r = cfg.image_tiles(h, w), cfg.image_rows(h, w)
            flat = self.projector(feats[t:t + k].flatten(0, 1), self.kernel_backend)
            rows = flat.repeat(math.ceil(r / flat.shape[0]), 1)[:r]
            out.append(rows * (1 + torch.arange(r, dtype=rows.dtype)[:, None] / r))
            t += k
        assert t == pixel_values.shape[0], "tiles and image_sizes disagree"
        return torch.cat(out)

    def embed(self, input_ids, pixel_values=None, image_sizes=None):
        x = self.decoder.embed(input_ids)
        at = input_ids == self.config.image_token_id
        if pixel_values is None:
            assert not at.any()
            return x
        rows = self.image_embeddings(pixel_values, image_sizes)
        assert rows.shape[0] == int(at.sum()), "an image was split or its rows miscounted"
        x[at] = rows.to(x.dtype)
        return x


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    hf_model().save_pretrained(path)
    m = engine.load(str(path)).eval()
    cfg = m.config
    m.config = VarRowsConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})
    m.__class__ = VarRowsLlava
    return m


# three sizes: (rows, tiles) = (3, 2), (10, 1), (7, 1)
SIZES = [(12, 20), (40, 8), (28, 28)]


def text(n, seed):
    return torch.randint(3, IMAGE_TOKEN, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def images(sizes, seed):
    """(pixels [ΣK, 3, S, S], sizes [N, 2]) for images of these sizes."""
    k = sum(1 + (w > h) for h, w in sizes)
    px = torch.randn(k, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))
    return px, torch.tensor(sizes, dtype=torch.long).reshape(-1, 2)


def prompt_with(sizes, seed, gaps=(2, 3, 1, 4)):
    """BOS, text, then each image's rows separated by text (the last two images adjacent when gaps
    has a 0)."""
    ids = [1] + text(3, seed)
    for j, (h, _) in enumerate(sizes):
        ids += [IMAGE_TOKEN] * (h // 4) + text(gaps[j % len(gaps)], seed + j + 1)
    return ids


def recompute(model, prompt, pixels, sizes, tokens):
    """Logits after prompt + tokens[:j] for every j, by a cache-free packed forward."""
    with torch.no_grad():
        x = torch.cat([model.embed(torch.tensor(prompt), pixels, sizes),
                       model.decoder.embed(torch.tensor(tokens, dtype=torch.long))])
        lens = [len(prompt) + j for j in range(len(tokens) + 1)]
        cu, pos, max_len = pack_cu_seqlens(lens)
        hidden = model.decoder(torch.cat([x[:n] for n in lens]), pos, PackedAttention(cu, max_len))
        return model.logits(hidden[cu[1:].long() - 1])


def run(rt, work, max_new_tokens=8):
    reqs = [rt.submit(p, pixel_values=px, image_sizes=sz, keep_logits=True,
                      params=SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=()))
            for p, px, sz in work]
    while rt.has_work:
        rt.step()
    return reqs


def assert_exact(model, reqs):
    for r in reqs:
        assert r.finish_reason == "length", r.error
        got = torch.stack(r.logits)
        want = recompute(model, r.prompt, r.pixel_values, r.image_sizes, r.tokens)[:got.shape[0]]
        assert (got - want).abs().max().item() <= 1e-5


def workload():
    """Prompts with 0, 1 and 3 images of different rows and tiles (two with adjacent images)."""
    work = []
    for i, sizes in enumerate([[], SIZES[1:2], SIZES, SIZES[::-1], [SIZES[2], SIZES[0]]]):
        gaps = (2, 0, 3) if i == 3 else (2, 3, 1)
        p = prompt_with(sizes, seed=10 * i, gaps=gaps) + text(5 + 3 * i, seed=100 + i)
        px, sz = images(sizes, seed=i) if sizes else (None, None)
        work.append((p, px, sz))
    return work


@pytest.mark.parametrize("chunked,step", [(True, 6), (True, 64), (False, 64)])
def test_variable_rows_chunked_prefill_equals_a_full_recompute(model, chunked, step):
    """Chunks of 6 tokens: smaller than a 7- or 10-row image, so chunks stop before an image and an
    image longer than the budget runs whole (the fake embed fails if one is ever split)."""
    calls = []
    hook = model.vision.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    try:
        rt = Runtime(model, RuntimeConfig(max_batch=8, block_size=BS, kv_cache_bytes=1 << 22,
                                          chunked_prefill=chunked, max_step_tokens=step, prefix_caching=False))
        reqs = run(rt, workload())
    finally:
        hook.remove()
    assert_exact(model, reqs)
    assert sum(calls) == sum(0 if px is None else px.shape[0] for _, px, _ in workload())  # each tile once


def test_generate_splits_a_ragged_batch_by_rows_and_tiles(model):
    work = workload()
    prompts = [p for p, _, _ in work]
    pixels = torch.cat([px for _, px, _ in work if px is not None])
    sizes = torch.cat([sz for _, _, sz in work if sz is not None])
    outs = generate(model, prompts, images=pixels, image_sizes=sizes, max_new_tokens=6, stop_token_ids=[],
                    output_logits=True)
    for o, (p, px, sz) in zip(outs, work, strict=True):
        assert o.tokens == recompute(model, p, px, sz, o.tokens).argmax(-1)[:-1].tolist()
    alone = [generate(model, [p], images=px, image_sizes=sz, max_new_tokens=6, stop_token_ids=[])[0].tokens
             for p, px, sz in work]
    assert [o.tokens for o in outs] == alone


def test_prefix_reuse_with_variable_rows_and_tile_digests(model):
    """The same 3-image prompt again shares its blocks (images inside skip the tower); a different
    size with the same pixels, or a different tile, is a different prefix."""
    p = prompt_with(SIZES, seed=3) + text(8, 7)     # the last image ends before the last full blocks
    px, sz = images(SIZES, seed=3)
    calls = []
    model.vision.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    rt = Runtime(model, RuntimeConfig(max_batch=8, block_size=BS, kv_cache_bytes=1 << 22, max_step_tokens=16))
    (a,) = run(rt, [(p + text(4, 1), px, sz)])
    assert calls and sum(calls) == 4
    calls.clear()
    (b,) = run(rt, [(p + text(5, 2), px, sz)])
    assert b.reused >= len(p) - BS and calls == []  # all three images were inside the shared prefix
    px2 = px.clone()
    px2[1] += 1                                       # the first image's second tile
    (c,) = run(rt, [(p + text(4, 1), px2, sz)])
    first = b.spans[0].start
    assert c.reused <= first and sum(calls) == 4
    assert_exact(model, [a, b, c])
    assert image_digest(px[:2], (12, 20)) != image_digest(px[:2], (12, 21))  # the size is in the digest
    assert image_digest(px[:2], (12, 20)) != image_digest(px[:1], (12, 20))


def test_preemption_with_variable_rows_recomputes_exactly(model):
    work = workload() * 2
    need = max(-(-(len(p) + 8 - 1) // BS) for p, _, _ in work)
    per_block = PagedKVCache.bytes_per_block(model.config.text, BS, torch.float32)
    rt = Runtime(model, RuntimeConfig(max_batch=8, block_size=BS, max_step_tokens=12, prefix_caching=False,
                                      kv_cache_bytes=(need + 2) * per_block))
    reqs = run(rt, work)
    assert rt.preemptions >= 2
    assert_exact(model, reqs)


def test_bad_images_get_clear_errors(model):
    p = prompt_with(SIZES, seed=4)
    px, sz = images(SIZES, seed=4)
    with pytest.raises(ValueError, match="image_sizes .* is required"):
        generate(model, [p], images=px)
    with pytest.raises(ValueError, match=r"prompt 0's 20 image placeholders are not covered"):
        generate(model, [p], images=px[:3], image_sizes=sz[:2])   # more placeholders than images
    with pytest.raises(ValueError, match="take 4 tiles but images holds 3"):
        generate(model, [p], images=px[:3], image_sizes=sz)
    with pytest.raises(ValueError, match="hold 2 images' placeholders but 3 images were given"):
        generate(model, [prompt_with(SIZES[:2], seed=4)], images=px, image_sizes=sz)
    with pytest.raises(ValueError, match=r"image_sizes\[1\]"):
        generate(model, [p], images=px, image_sizes=torch.tensor([[12, 20], [0, 8], [28, 28]]))
    rt = Runtime(model, RuntimeConfig(max_batch=2, block_size=BS, kv_cache_bytes=1 << 22))
    broken = list(p)
    broken[broken.index(IMAGE_TOKEN) + 1] = 5                      # the first image's run is cut
    with pytest.raises(ValueError, match="image 0's 3 placeholder rows are not one unbroken run"):
        rt.submit(broken + [IMAGE_TOKEN], pixel_values=px, image_sizes=sz)
    with pytest.raises(ValueError, match="3 images take 20 rows"):
        rt.submit(p + [IMAGE_TOKEN], pixel_values=px, image_sizes=sz)
    # an image too large for the context: named, with its size
    big = (4 * 600, 8)
    huge = [1] + [IMAGE_TOKEN] * 600 + [5]
    small = Runtime(model, RuntimeConfig(max_batch=2, block_size=BS, kv_cache_bytes=1 << 22, max_seq_len=512))
    with pytest.raises(ValueError, match=r"image 0 of 2400x8 pixels expands to 600 placeholder rows; the context "
                                         r"length is 512"):
        small.submit(huge, pixel_values=images([big], seed=1)[0], image_sizes=torch.tensor([big]))
    assert not small.has_work and not rt.has_work


# ---- the real AnyRes model against transformers' LlavaNext -----------------------------------------------

PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 84]]
assert TILE == IMAGE_SIZE  # the pixels below are IMAGE_SIZE tiles of anyres_helpers' tower
NEXT_SIZES = [(30, 60), (84, 84), (20, 90), (50, 40)]   # (rows, tiles) = (32, 10), (46, 10), (18, 10), (24, 5)


@pytest.fixture(scope="module")
def next_models(tmp_path_factory):
    path = tmp_path_factory.mktemp("next")
    hf = hf_next(pinpoints=PINPOINTS, patch=14)   # 2×2 patches of 14 px per 28-px tile
    hf.save_pretrained(path)
    return engine.load(str(path)).eval(), hf


def next_batch(cfg, counts, seed=0):
    """Prompts with counts[i] images each (sizes cycling through NEXT_SIZES, text between them)."""
    g = torch.Generator().manual_seed(seed)
    prompts, sizes, k = [], [], 0
    for i, n in enumerate(counts):
        ids = [1] + torch.randint(3, IMAGE_TOKEN, (2 + i,), generator=g).tolist()
        for _ in range(n):
            h, w = NEXT_SIZES[k % len(NEXT_SIZES)]
            k += 1
            ids += [IMAGE_TOKEN] * cfg.image_rows(h, w) + torch.randint(3, IMAGE_TOKEN, (2,), generator=g).tolist()
            sizes.append((h, w))
        prompts.append(ids)
    tiles = sum(cfg.image_tiles(h, w) for h, w in sizes)
    return prompts, torch.randn(tiles, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g), torch.tensor(sizes)


def test_greedy_matches_transformers_llava_next_on_a_ragged_batch(next_models):
    """0, 1 and 3 AnyRes images per prompt (different rows and tiles), left-padded for transformers."""
    from helpers import pad

    ours, hf = next_models
    assert ours.config.anyres
    prompts, pixels, sizes = next_batch(ours.config, (0, 1, 3, 0))
    ids, mask = pad(prompts, "left")
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes,
                          max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    outs = generate(ours, prompts, images=pixels, image_sizes=sizes, max_new_tokens=16, stop_token_ids=[])
    assert [o.tokens for o in outs] == ref[:, ids.shape[1]:].tolist()
    # the same under small chunks (an image never split) and prefix sharing of a repeated prompt
    rt = Runtime(ours, RuntimeConfig(max_batch=4, block_size=BS, kv_cache_bytes=1 << 22, max_step_tokens=24))
    again = generate(ours, prompts + prompts[2:3], images=torch.cat([pixels, pixels[10:]]),
                     image_sizes=torch.cat([sizes, sizes[1:]]), max_new_tokens=16, stop_token_ids=[], runtime=rt)
    assert [o.tokens for o in again] == ref[:, ids.shape[1]:].tolist() + [outs[2].tokens]
    assert rt.reused_tokens > 0


def test_real_anyres_model_under_chunks_sharing_and_preemption_equals_a_full_recompute(next_models):
    ours, _ = next_models
    prompts, pixels, sizes = next_batch(ours.config, (3, 1, 0, 3), seed=1)
    per, t, k = [], 0, 0
    for p in prompts:   # each prompt's own tiles and sizes
        n = 0
        while sum(ours.config.image_rows(*sizes[k + j].tolist()) for j in range(n)) < p.count(IMAGE_TOKEN):
            n += 1
        kt = sum(ours.config.image_tiles(*s.tolist()) for s in sizes[k:k + n])
        per.append((pixels[t:t + kt], sizes[k:k + n]) if n else (None, None))
        t, k = t + kt, k + n
    work = [(p, px, sz) for p, (px, sz) in zip(prompts, per, strict=True)]
    work += [work[0]]                                  # the same 3-image prompt again: a shared prefix
    need = max(-(-(len(p) + 8 - 1) // BS) for p, _, _ in work)
    per_block = PagedKVCache.bytes_per_block(ours.config.text, BS, torch.float32)
    rt = Runtime(ours, RuntimeConfig(max_batch=4, block_size=BS, max_step_tokens=20,
                                     kv_cache_bytes=(need + 8) * per_block))
    reqs = run(rt, work)
    assert rt.preemptions >= 1 and rt.reused_tokens > 0
    assert_exact(ours, reqs)
