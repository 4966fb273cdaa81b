"""AnyRes preprocessing: equal to transformers' LlavaNext image processor (PIL backend).

Odd image sizes (1-pixel strips, primes, portrait/landscape, exact pinpoints), several pinpoint grids
(the LLaVA-1.6 one at 336 px and tiny ones), RGBA/grayscale inputs; the tile count equals
``LlavaConfig.image_tiles``; ``from_hf_dir`` reads a llava_next ``preprocessor_config.json``.
Our pipeline normalizes in float64, HF's in float32: both round to float32, so they agree to a few ulps.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from engine.config import LlavaConfig, TextConfig, VisionConfig
from engine.image import CLIP_MEAN, CLIP_STD, ImageSpec, preprocess_anyres

ATOL = 1e-6     # |values| ≤ ~2.2: a few float32 ulps
LLAVA16 = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
GRIDS = [
    (28, ((28, 56), (56, 28), (56, 56), (84, 28), (28, 84))),
    (28, ((28, 28), (56, 84), (84, 56), (28, 112))),
    (42, ((42, 42), (84, 42), (42, 84), (126, 126), (84, 168))),
]
SIZES = [(1, 1), (1, 97), (97, 1), (3, 5), (37, 91), (91, 37), (28, 56), (56, 56), (57, 85), (113, 29),
         (200, 199), (13, 300)]          # (height, width)


def _hf(size, pins, mean=CLIP_MEAN, std=CLIP_STD):
    return LlavaNextImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                      image_grid_pinpoints=[list(p) for p in pins], image_mean=list(mean),
                                      image_std=list(std), resample=3, do_pad=False)


def _image(h, w, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
    channels = 4 if mode == "RGBA" else 3
    return Image.fromarray(rng.integers(0, 256, (h, w, channels), dtype=np.uint8), mode)


def _config(size, pins):
    return LlavaConfig(
        vision=VisionConfig(hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, image_size=size,
                            patch_size=14),
        text=TextConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                        num_kv_heads=2, head_dim=4),
        image_grid_pinpoints=pins)


@pytest.mark.parametrize("grid", range(len(GRIDS)))
def test_equal_to_transformers(grid):
    size, pins = GRIDS[grid]
    hf, spec, cfg = _hf(size, pins), ImageSpec.from_config(_config(size, pins)), _config(size, pins)
    assert spec.pinpoints == pins and spec.size == size
    rng = np.random.default_rng(grid)
    for i, (h, w) in enumerate(SIZES + [tuple(int(v) for v in rng.integers(1, 400, 2)) for _ in range(12)]):
        img = _image(h, w, seed=grid * 100 + i)
        want = hf(images=[img], return_tensors="pt")
        got = spec.preprocess_image(img)
        assert got.dtype == torch.float32 and got.shape == (cfg.image_tiles(h, w), 3, size, size), (h, w)
        assert want["image_sizes"].tolist() == [[h, w]]
        assert (got - want["pixel_values"][0]).abs().max().item() <= ATOL, (h, w)


@pytest.mark.parametrize("hw", [(480, 640), (333, 1001), (700, 300), (336, 336)])
def test_equal_to_transformers_llava16_geometry(hw):
    h, w = hw
    img = _image(h, w, seed=h)
    want = _hf(336, LLAVA16)(images=[img], return_tensors="pt")["pixel_values"][0]
    got = preprocess_anyres(img, size=336, pinpoints=LLAVA16)
    assert got.shape == want.shape and (got - want).abs().max().item() <= ATOL


@pytest.mark.parametrize("mode", ["RGBA", "L"])
def test_other_modes_and_mean_std(mode):
    size, pins = GRIDS[0]
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    img = _image(45, 70, seed=7, mode=mode)
    want = _hf(size, pins, mean, std)(images=[img], return_tensors="pt")["pixel_values"][0]
    got = ImageSpec(size=size, pinpoints=pins, mean=mean, std=std).preprocess_image(img)
    assert got.shape == want.shape and (got - want).abs().max().item() <= ATOL


def test_tiles_content():
    """The padding is black (normalized -mean/std) and the base tile is the squashed image."""
    size, pins = 28, ((28, 56),)
    img = _image(10, 56, seed=3)                       # fits 28×56 exactly in width: 28 rows → 5 + pad
    out = preprocess_anyres(img, size=size, pinpoints=pins)
    assert out.shape == (3, 3, 28, 28)
    black = (-torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)).view(3, 1, 1)
    grid = torch.cat([out[1], out[2]], dim=2)          # (3, 28, 56)
    new_h = 10                                         # ceil(10 * 56/56), pasted at (28 - 10) // 2 = 9
    assert torch.allclose(grid[:, :9], black.expand(3, 9, 56), atol=ATOL)
    assert torch.allclose(grid[:, 9 + new_h:], black.expand(3, 28 - 9 - new_h, 56), atol=ATOL)
    assert not torch.allclose(grid[:, 9:9 + new_h], black.expand(3, new_h, 56), atol=0.1)


def test_not_anyres_is_preprocess():
    spec = ImageSpec(size=28)
    img = _image(31, 47, seed=5)
    assert torch.equal(spec.preprocess_image(img), spec.preprocess(img)[None])


def test_from_hf_dir_reads_llava_next(tmp_path):
    size, pins = GRIDS[2]
    _hf(size, pins, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)).save_pretrained(tmp_path)
    spec = ImageSpec.from_hf_dir(str(tmp_path))
    assert spec.pinpoints == pins and spec.size == size and spec.mean == (0.5, 0.5, 0.5)
    cfg = json.loads((tmp_path / "preprocessor_config.json").read_text())
    cfg["image_grid_pinpoints"] = [[42, 50]]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"preprocessor_config.json: pinpoints \[\(42, 50\)\] are not multiples"):
        ImageSpec.from_hf_dir(str(tmp_path))
    cfg["image_grid_pinpoints"] = [42, 84]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="must be a list of"):
        ImageSpec.from_hf_dir(str(tmp_path))


def test_bad_input():
    with pytest.raises(ValueError, match="tuple of"):
        ImageSpec(size=28, pinpoints=[(28, 56)])
    with pytest.raises(ValueError, match="not multiples of the tile size 28"):
        ImageSpec(size=28, pinpoints=((28, 30),))
    with pytest.raises(ValueError, match="expected a PIL.Image.Image"):
        ImageSpec(size=28, pinpoints=((28, 56),)).preprocess_image(np.zeros((5, 5, 3), np.uint8))
    with pytest.raises(ValueError, match="non-empty pinpoints"):
        preprocess_anyres(_image(5, 5, 0), size=28, pinpoints=())
