"""Image preprocessing: parity with transformers' CLIP image processor (crop) and upstream LLaVA-1.5's
expand2square + CLIP processor (pad); the pad border and centering checked pixel by pixel."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from engine.image import CLIP_MEAN, CLIP_STD, ImageSpec, preprocess, preprocess_batch

try:   # transformers v5 without torchvision: the PIL-backed class; v4: CLIPImageProcessor is PIL-backed
    from transformers import CLIPImageProcessorPil as HFClipProcessor
except ImportError:
    from transformers import CLIPImageProcessor as HFClipProcessor

SIZES = [(500, 333), (211, 640), (337, 338), (97, 61), (1, 5)]     # (width, height), all non-square


def _hf(size):
    return HFClipProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                           do_resize=True, do_center_crop=True, resample=3, do_rescale=True,
                           rescale_factor=1 / 255, do_normalize=True, image_mean=list(CLIP_MEAN),
                           image_std=list(CLIP_STD), do_convert_rgb=True)


def _random_image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _upstream_expand2square(pil_img, background_color):
    """llava/mm_utils.py expand2square, verbatim logic."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


def _normalized(rgb_uint8):
    """uint8 (..., 3) -> normalized float64 (3, ...)."""
    x = (np.asarray(rgb_uint8, dtype=np.float64) / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    return torch.from_numpy(np.moveaxis(x, -1, 0))


@pytest.mark.parametrize("size", [224, 336])
@pytest.mark.parametrize("wh", SIZES)
def test_crop_matches_hf_clip_processor(size, wh):
    img = _random_image(*wh, seed=wh[0] * 1000 + wh[1])
    ref = _hf(size)(img, return_tensors="pt")["pixel_values"][0]
    ours = preprocess(img, size=size, mode="crop")
    assert ours.shape == (3, size, size) and ours.dtype == torch.float32
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("wh", SIZES)
def test_pad_matches_upstream_llava(wh):
    img = _random_image(*wh, seed=7 + wh[0])
    fill = tuple(int(m * 255) for m in CLIP_MEAN)
    ref = _hf(336)(_upstream_expand2square(img, fill), return_tensors="pt")["pixel_values"][0]
    ours = preprocess(img, size=336, mode="pad")
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("w,h", [(300, 101), (100, 300), (301, 300)])
def test_pad_border_is_mean_colour_and_content_is_centered(w, h):
    """With size = the long side there is no resize: the border and the content are exact."""
    img = _random_image(w, h, seed=w + h)
    side = max(w, h)
    out = preprocess(img, size=side, mode="pad").double()
    fill = _normalized(np.array([int(m * 255) for m in CLIP_MEAN], dtype=np.uint8))[:, None, None]
    top, left = (side - h) // 2, (side - w) // 2            # the odd extra row/column goes bottom/right
    content = torch.zeros(side, side, dtype=torch.bool)
    content[top:top + h, left:left + w] = True
    assert torch.allclose(out[:, content].view(3, h, w), _normalized(np.asarray(img)), atol=1e-6)
    border = out[:, ~content]
    assert border.shape[1] == side * side - w * h
    assert torch.allclose(border, fill.view(3, 1).expand_as(border), atol=1e-6)
    # and the fill is the mean colour rounded down to uint8, not the mean itself (border != 0)
    assert border.abs().min() > 1e-4


def test_pad_border_survives_resize():
    """A 400x100 image padded then resized to 224: rows well away from the content are pure fill."""
    img = _random_image(400, 100, seed=3)
    out = preprocess(img, size=224, mode="pad")
    fill = _normalized(np.array([int(m * 255) for m in CLIP_MEAN], dtype=np.uint8)).float()
    # content occupies rows 150..250 of 400 -> 84..140 of 224; bicubic reaches ~4 rows further
    for rows in (slice(0, 78), slice(147, 224)):
        band = out[:, rows]
        assert torch.allclose(band, fill[:, None, None].expand_as(band), atol=1e-6)
    assert out[:, 90:135].std() > 0.5


def test_modes_other_than_rgb():
    gray = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 60), dtype=np.uint8), mode="L")
    out = preprocess(gray, size=32, mode="crop")
    ref = preprocess(gray.convert("RGB"), size=32, mode="crop")
    assert torch.equal(out, ref)
    rgba = Image.new("RGBA", (30, 20), (10, 200, 30, 0))           # fully transparent -> white
    white = preprocess(Image.new("RGB", (30, 20), (255, 255, 255)), size=16, mode="crop")
    assert torch.equal(preprocess(rgba, size=16, mode="crop"), white)
    opaque = Image.new("RGBA", (30, 20), (10, 200, 30, 255))
    assert torch.equal(preprocess(opaque, size=16, mode="crop"),
                       preprocess(Image.new("RGB", (30, 20), (10, 200, 30)), size=16, mode="crop"))


def test_batch_and_spec(tmp_path):
    imgs = [_random_image(50, 30, seed=i) for i in range(3)]
    batch = preprocess_batch(imgs, size=24, mode="pad")
    assert batch.shape == (3, 3, 24, 24)
    for i, img in enumerate(imgs):
        assert torch.equal(batch[i], preprocess(img, size=24, mode="pad"))
    spec = ImageSpec.from_vision_config(SimpleNamespace(image_size=24), mode="crop")
    assert torch.equal(spec.preprocess_batch(imgs), preprocess_batch(imgs, size=24, mode="crop"))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": 20, "width": 20}, "size": {"shortest_edge": 20},
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    spec = ImageSpec.from_hf_dir(str(tmp_path))
    assert (spec.size, spec.mode, spec.mean) == (20, "pad", (0.5, 0.5, 0.5))
    half = (0.5, 0.5, 0.5)
    assert torch.equal(spec.preprocess(imgs[0]), preprocess(imgs[0], size=20, mean=half, std=half))


def test_bad_input(tmp_path):
    img = _random_image(10, 8, seed=0)
    with pytest.raises(ValueError, match="PIL"):
        preprocess(np.zeros((8, 10, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="zero size"):
        preprocess(Image.new("RGB", (0, 5)))
    with pytest.raises(ValueError, match="mode"):
        preprocess(img, mode="stretch")
    with pytest.raises(ValueError, match="size"):
        preprocess(img, size=0)
    with pytest.raises(ValueError, match="non-empty"):
        preprocess_batch([])
    with pytest.raises(ValueError, match="image 1"):
        preprocess_batch([img, "not an image"])
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        ImageSpec.from_hf_dir(str(tmp_path))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"crop_size": 224, "size": 256}))
    with pytest.raises(ValueError, match="shortest edge"):
        ImageSpec.from_hf_dir(str(tmp_path))
