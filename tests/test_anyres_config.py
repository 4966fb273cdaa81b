"""AnyRes arithmetic and per-image tokenization against transformers' LlavaNext functions.

The oracle is transformers itself, called directly: ``select_best_resolution``,
``get_anyres_image_grid_shape``, ``image_size_to_num_patches``, ``unpad_image``, the model's
``pack_image_features`` and the processor's ``_get_number_of_features`` (the placeholder count HF
writes into prompts), on odd image sizes × several pinpoint grids and tower geometries.
"""
import functools
import random
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer
from transformers.image_processing_utils import select_best_resolution as hf_best
from transformers.models.llava_next.modeling_llava_next import (
    LlavaNextModel,
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

from engine import anyres
from engine.config import LlavaConfig, TextConfig, VisionConfig, tiny_config
from engine.conversation import generation_prompt, get_template, tokenize_conversation
from engine.tokenizer import build_tiny_tokenizer

# (tile = tower image_size, patch_size, pinpoints): the LLaVA-1.6 grid, tiny ones, a 1×4 strip.
GEOMETRIES = [
    (336, 14, ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))),
    (28, 14, ((28, 56), (56, 28), (56, 56), (84, 28), (28, 84))),
    (28, 7, ((28, 28), (56, 84), (84, 56), (28, 112))),
    (42, 14, ((42, 42), (84, 42), (42, 84), (126, 126), (84, 168))),
]
ODD_SIZES = [(1, 1), (1, 997), (997, 1), (3, 5), (97, 577), (577, 97), (336, 336), (337, 335), (480, 640),
             (640, 480), (1025, 1), (100, 300), (300, 100), (27, 29), (57, 85), (1000, 1001), (768, 1366)]


def _sizes(seed: int, n: int = 40):
    rng = random.Random(seed)
    return ODD_SIZES + [(rng.randint(1, 2000), rng.randint(1, 2000)) for _ in range(n)]


def _hf_processor(tile: int, patch: int, pins):
    ns = SimpleNamespace(image_processor=SimpleNamespace(image_grid_pinpoints=[list(p) for p in pins]),
                         patch_size=patch, num_additional_image_tokens=1)
    ns._get_unpadded_features = functools.partial(LlavaNextProcessor._get_unpadded_features, ns)
    return ns


def _config(tile: int, patch: int, pins) -> LlavaConfig:
    return LlavaConfig(
        vision=VisionConfig(hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, image_size=tile,
                            patch_size=patch),
        text=TextConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                        num_kv_heads=2, head_dim=4),
        image_grid_pinpoints=pins)


@pytest.mark.parametrize("geometry", range(len(GEOMETRIES)))
def test_counts_match_transformers(geometry):
    tile, patch, pins = GEOMETRIES[geometry]
    cfg = _config(tile, patch, pins)
    proc = _hf_processor(tile, patch, pins)
    pin_list = [list(p) for p in pins]
    assert cfg.anyres
    for h, w in _sizes(geometry):
        assert anyres.select_best_resolution(h, w, pins) == tuple(hf_best((h, w), pin_list)), (h, w)
        assert anyres.grid_shape(h, w, pins, tile) == tuple(get_anyres_image_grid_shape((h, w), pin_list, tile))
        assert cfg.image_tiles(h, w) == image_size_to_num_patches((h, w), pin_list, tile), (h, w)
        # HF processor: placeholders = _get_number_of_features - 1 under the "default" strategy.
        expected = LlavaNextProcessor._get_number_of_features(proc, h, w, tile, tile) - 1
        assert cfg.image_rows(h, w) == expected, (h, w, geometry)


@pytest.mark.parametrize("geometry", range(len(GEOMETRIES)))
def test_unpad_bounds_match_unpad_image(geometry):
    tile, patch, pins = GEOMETRIES[geometry]
    side = tile // patch
    for h, w in _sizes(100 + geometry, 20):
        gh, gw = anyres.grid_shape(h, w, pins, tile)
        fmap = torch.arange(gh * side * gw * side, dtype=torch.float64).view(1, gh * side, gw * side)
        top, bottom, left, right = anyres.unpad_bounds(h, w, gh * side, gw * side)
        assert torch.equal(fmap[:, top:bottom, left:right], unpad_image(fmap, (h, w))), (h, w)


@pytest.mark.parametrize("geometry", [1, 2, 3])
def test_pack_features_matches_pack_image_features(geometry):
    tile, patch, pins = GEOMETRIES[geometry]
    side, d = tile // patch, 5
    hf_self = SimpleNamespace(config=SimpleNamespace(
        vision_config=SimpleNamespace(image_size=tile, patch_size=patch),
        image_grid_pinpoints=[list(p) for p in pins]))
    cfg = _config(tile, patch, pins)
    gen = torch.Generator().manual_seed(geometry)
    newline = torch.randn(d, generator=gen)
    for h, w in _sizes(200 + geometry, 10):
        k = cfg.image_tiles(h, w)
        feats = torch.randn(k, side * side, d, generator=gen)
        (want,), lens = LlavaNextModel.pack_image_features(
            hf_self, [feats], torch.tensor([[h, w]]), "default", image_newline=newline)
        got = anyres.pack_features(feats[0], feats[1:], h, w, pins, tile, newline)
        assert got.shape == (cfg.image_rows(h, w), d) and int(lens[0]) == got.shape[0]
        assert torch.equal(got, want), (h, w)


def test_not_anyres_is_llava_15():
    cfg = tiny_config()
    assert not cfg.anyres and cfg.image_grid_pinpoints == ()
    assert cfg.image_rows(97, 577) == cfg.image_seq_len and cfg.image_tiles(97, 577) == 1


def test_bad_config_and_sizes():
    tile, patch, pins = GEOMETRIES[1]
    with pytest.raises(ValueError, match="not multiples of the vision tower's image_size=28"):
        _config(tile, patch, ((28, 56), (30, 28)))
    with pytest.raises(ValueError, match="must be a tuple of"):
        _config(tile, patch, [(28, 56)])
    with pytest.raises(ValueError, match="must be a tuple of"):
        _config(tile, patch, ((28, 56, 84),))
    with pytest.raises(ValueError, match="vision_feature_select_strategy='default'"):
        _config(tile, patch, pins).replace(vision_feature_select_strategy="full")
    cfg = _config(tile, patch, pins)
    for bad in ((0, 5), (5, -1), (2.5, 3), (True, 3)):
        with pytest.raises(ValueError, match="must be a positive int"):
            cfg.image_rows(*bad)
        with pytest.raises(ValueError, match="must be a positive int"):
            cfg.image_tiles(*bad)
    with pytest.raises(ValueError, match="must be a positive int"):
        tiny_config().image_rows(0, 3)
    with pytest.raises(ValueError, match="2x2 tile grid but 3 grid tiles"):
        anyres.pack_features(torch.zeros(4, 3), torch.zeros(3, 4, 3), 56, 56, pins, tile, torch.zeros(3))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return AutoTokenizer.from_pretrained(build_tiny_tokenizer(str(tmp_path_factory.mktemp("tok"))))


def test_rows_per_image_tokenization(tok):
    image_id = tok.convert_tokens_to_ids("<image>")
    conv = [{"from": "human", "value": "<image> first <image> and second?"}, {"from": "gpt", "value": "Two."}]
    vicuna = get_template("vicuna_v1")
    out = tokenize_conversation(tok, vicuna, conv, image_token_id=image_id, image_seq_len=[3, 7])
    same = tokenize_conversation(tok, vicuna, conv, image_token_id=image_id, image_seq_len=5)
    # Two runs of 3 and 7 placeholders, separated by the "\n" between the markers; the rest unchanged.
    is_img = [t == image_id for t in out.input_ids]
    runs = []
    for i, flag in enumerate(is_img):
        if flag and (i == 0 or not is_img[i - 1]):
            runs.append(1)
        elif flag:
            runs[-1] += 1
    assert runs == [3, 7] and out.num_images == 2
    assert [t for t in out.input_ids if t != image_id] == [t for t in same.input_ids if t != image_id]
    assert len(out.input_ids) == len(same.input_ids) and len(out.labels) == len(out.input_ids)
    assert all(lab == -100 for lab, flag in zip(out.labels, is_img, strict=True) if flag)
    prompt = generation_prompt(tok, vicuna, conv[:1], image_token_id=image_id, image_seq_len=(3, 7))
    assert prompt == out.input_ids[:len(prompt)]


def test_rows_per_image_errors(tok):
    image_id = tok.convert_tokens_to_ids("<image>")
    conv = [{"from": "human", "value": "<image> first <image> and second?"}, {"from": "gpt", "value": "Two."}]
    vicuna = get_template("vicuna_v1")
    with pytest.raises(ValueError, match="rows for 3 images but the conversation has 2"):
        tokenize_conversation(tok, vicuna, conv, image_token_id=image_id, image_seq_len=[3, 7, 1])
    with pytest.raises(ValueError, match="rows for 1 images but the conversation has 2"):
        generation_prompt(tok, vicuna, conv[:1], image_token_id=image_id, image_seq_len=[3])
    with pytest.raises(ValueError, match=r"image_seq_len\[1\] must be a positive int"):
        tokenize_conversation(tok, vicuna, conv, image_token_id=image_id, image_seq_len=[3, 0])
    with pytest.raises(ValueError, match="positive int or a sequence"):
        tokenize_conversation(tok, vicuna, conv, image_token_id=image_id, image_seq_len="35")
    no_image = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "Hello."}]
    assert tokenize_conversation(tok, vicuna, no_image, image_token_id=image_id, image_seq_len=[]).num_images == 0
