"""Image preprocessing for the CLIP vision tower: LLaVA-1.5 pad-to-square, or CLIP's crop.

- mode "crop": HF `CLIPImageProcessor` — resize the shortest edge to `size` (PIL bicubic, the long
  edge to int(size * long / short)), center-crop `size` x `size`, rescale by 1/255, normalize.
- mode "pad": LLaVA-1.5's `expand2square` first — paste the image centered on a square canvas
  filled with the mean colour (int(m * 255) per channel; the extra row/column of an odd difference
  goes to the bottom/right) — then the same resize + crop (a no-op crop on a square).

Images with transparency are composited onto white before anything else (what transformers'
`convert_to_rgb` does); other modes (L, P, CMYK, ...) are converted to RGB.
- AnyRes (LLaVA-1.6, `preprocess_anyres`): the base tile (the image squashed to size × size) and the
  tiles of the image resized with its aspect into the best pinpoint resolution and padded black;
  transformers' LlavaNextImageProcessor does the same.

Output: float32 `[3, size, size]` (`preprocess`), `[N, 3, size, size]` (`preprocess_batch`) or
`[K, 3, size, size]` (`preprocess_anyres`, `ImageSpec.preprocess_image`), channels in RGB order.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from engine import anyres

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MODES = ("pad", "crop")


def _to_rgb(image) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"image has zero size {image.width}x{image.height}")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def expand2square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Upstream LLaVA's expand2square: center `image` (RGB) on a square canvas of colour `fill`."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def _check(size, mode, mean, std) -> None:
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for name, v in (("mean", mean), ("std", std)):
        if len(v) != 3:
            raise ValueError(f"{name} must have 3 values (RGB), got {v!r}")
    if min(std) <= 0:
        raise ValueError(f"std must be positive, got {std!r}")


def preprocess(image: Image.Image, *, size: int = 336, mode: str = "pad",
               mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """One PIL image -> normalized float32 `[3, size, size]`.

    Raises ValueError: not a PIL image, zero width or height, size < 1, unknown mode, mean/std
    without 3 values or a non-positive std.
    """
    _check(size, mode, mean, std)
    rgb = _to_rgb(image)
    if mode == "pad":
        rgb = expand2square(rgb, tuple(int(m * 255) for m in mean))
    w, h = rgb.size
    # HF get_resize_output_image_size(default_to_square=False): short edge -> size, long edge truncated.
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        rgb = rgb.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return _normalize(np.asarray(rgb)[top:top + size, left:left + size], mean, std)


def _normalize(rgb: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (h, w, 3) -> float32 (3, h, w): rescale by 1/255 and normalize, in float64."""
    x = (rgb.astype(np.float64) / 255.0 - np.asarray(mean, dtype=np.float64)) / np.asarray(std, dtype=np.float64)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32))


def resize_and_pad(image: Image.Image, height: int, width: int) -> Image.Image:
    """AnyRes: resize an RGB image into height × width keeping its aspect (the fitting side exactly,
    the other side ceil'ed), bicubic, then center it on a black canvas (odd remainder bottom/right)."""
    w, h = image.size
    scale_w, scale_h = width / w, height / h
    # h * (width / w), not h * width / w: the float rounding decides the ceil (700 * (336 / 300) = 784.0000001).
    if scale_w < scale_h:
        new_w, new_h = width, min(math.ceil(h * scale_w), height)
    else:
        new_w, new_h = min(math.ceil(w * scale_h), width), height
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    canvas.paste(image, ((width - new_w) // 2, (height - new_h) // 2))
    return canvas


def preprocess_anyres(image: Image.Image, *, size: int, pinpoints: anyres.Pinpoints,
                      mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """One PIL image -> float32 `[K, 3, size, size]`, K = 1 + gh·gw: the whole image squashed to
    size × size (bicubic), then the tiles of `resize_and_pad` to the best of `pinpoints`, row-major.

    Equal to transformers' LlavaNextImageProcessor (PIL backend) with size shortest_edge = crop = size.
    Raises ValueError: not a PIL image, zero size, empty pinpoints (and as `preprocess`).
    """
    _check(size, "crop", mean, std)
    if not pinpoints:
        raise ValueError("preprocess_anyres needs non-empty pinpoints")
    rgb = _to_rgb(image)
    best_h, best_w = anyres.select_best_resolution(rgb.height, rgb.width, pinpoints)
    base = rgb if rgb.size == (size, size) else rgb.resize((size, size), resample=Image.Resampling.BICUBIC)
    grid = np.asarray(resize_and_pad(rgb, best_h, best_w))                        # (best_h, best_w, 3)
    tiles = [np.asarray(base)] + [grid[i:i + size, j:j + size]
                                  for i in range(0, best_h, size) for j in range(0, best_w, size)]
    return torch.stack([_normalize(t, mean, std) for t in tiles])


def preprocess_batch(images: Sequence[Image.Image], *, size: int = 336, mode: str = "pad",
                     mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """A non-empty list of PIL images -> float32 `[N, 3, size, size]` (ValueError naming the bad index)."""
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError("preprocess_batch expects a non-empty list of PIL images")
    out = []
    for i, image in enumerate(images):
        try:
            out.append(preprocess(image, size=size, mode=mode, mean=mean, std=std))
        except ValueError as err:
            raise ValueError(f"image {i}: {err}") from None
    return torch.stack(out)


@dataclass(frozen=True, kw_only=True)
class ImageSpec:
    """Preprocessing settings of one checkpoint; `preprocess` / `preprocess_batch` with them bound."""
    size: int = 336
    mode: str = "pad"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    # AnyRes (LLaVA-1.6) (height, width) resolutions; () = one tile per image (LLaVA-1.5, `mode` applies).
    pinpoints: tuple[tuple[int, int], ...] = ()

    def __post_init__(self):
        _check(self.size, self.mode, self.mean, self.std)
        pins = self.pinpoints
        if not isinstance(pins, tuple) or not all(
                isinstance(p, tuple) and len(p) == 2 and all(type(v) is int and v > 0 for v in p) for p in pins):
            raise ValueError(f"pinpoints={pins!r} must be a tuple of (height, width) int pairs")
        bad = [p for p in pins if p[0] % self.size or p[1] % self.size]
        if bad:
            raise ValueError(f"pinpoints {bad} are not multiples of the tile size {self.size}")

    @classmethod
    def from_config(cls, config, *, mode: str = "pad") -> ImageSpec:
        """The spec of an ``engine.config.LlavaConfig``: tower image size, its pinpoints (CLIP mean/std)."""
        return cls(size=config.vision.image_size, mode=mode, pinpoints=config.image_grid_pinpoints)

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        """One PIL image -> float32 `[K, 3, size, size]`: K = 1 + grid tiles with pinpoints (see
        `preprocess_anyres`), else K = 1 and equal to ``preprocess(image)[None]``."""
        if not self.pinpoints:
            return self.preprocess(image)[None]
        return preprocess_anyres(image, size=self.size, pinpoints=self.pinpoints, mean=self.mean, std=self.std)

    @classmethod
    def from_vision_config(cls, vision_config, *, mode: str = "pad") -> ImageSpec:
        """Size from the vision tower config's `image_size` (CLIP mean/std)."""
        size = vision_config.image_size
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"vision config image_size must be a positive int, got {size!r}")
        return cls(size=size, mode=mode)

    @classmethod
    def from_hf_dir(cls, path: str, *, mode: str = "pad") -> ImageSpec:
        """Read a checkpoint's `preprocessor_config.json` (crop_size, size.shortest_edge, mean, std and,
        for LLaVA-NeXT, image_grid_pinpoints)."""
        file = os.path.join(path, "preprocessor_config.json")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no preprocessor_config.json in {path}")
        with open(file, encoding="utf-8") as f:
            cfg = json.load(f)
        crop, short = cfg.get("crop_size"), cfg.get("size")
        if isinstance(crop, dict):
            crop = crop.get("height") if crop.get("height") == crop.get("width") else None
        short = short.get("shortest_edge") if isinstance(short, dict) else short
        if not isinstance(crop, int) or (short is not None and short != crop):
            raise ValueError(f"{file}: only square crops equal to the shortest edge are supported "
                             f"(crop_size={cfg.get('crop_size')!r}, size={cfg.get('size')!r})")
        mean, std = cfg.get("image_mean", CLIP_MEAN), cfg.get("image_std", CLIP_STD)
        pins = cfg.get("image_grid_pinpoints") or []
        if not isinstance(pins, list) or not all(isinstance(p, list) and len(p) == 2 for p in pins):
            raise ValueError(f"{file}: image_grid_pinpoints={pins!r} must be a list of [height, width] pairs")
        try:
            return cls(size=crop, mode=mode, mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
                       pinpoints=tuple(tuple(p) for p in pins))
        except ValueError as err:
            raise ValueError(f"{file}: {err}") from None

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return preprocess(image, size=self.size, mode=self.mode, mean=self.mean, std=self.std)

    def preprocess_batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return preprocess_batch(images, size=self.size, mode=self.mode, mean=self.mean, std=self.std)
