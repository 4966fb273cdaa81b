"""LLaVA-1.6 (NeXT) AnyRes arithmetic: pure functions, no tower, no weights.

An image of original size (height, width) is resized (aspect kept, padded) to the best of the
``pinpoints`` (height, width) resolutions, cut into a gh × gw grid of tiles of the tower's input
size, and encoded together with a base tile (the whole image at tower size). The grid features
form a (gh·n) × (gw·n) map (n = patches per tile side); the rows and columns that only saw the
padding are cut ("unpadding"), and an ``image_newline`` row ends every remaining feature row.
The result, in the text: base rows (n²), then per feature row its columns and one newline row.

These match transformers' LlavaNext (``select_best_resolution``, ``get_anyres_image_grid_shape``,
``unpad_image``, ``pack_image_features``, the processor's ``_get_number_of_features``) exactly,
down to the float rounding: tests/test_anyres_config.py compares them on many odd sizes.

Letters: P = n² patches per tile, G = gh·gw grid tiles, D feature width.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

Pinpoints = Sequence[Sequence[int]]


def check_size(height: int, width: int) -> None:
    """ValueError unless height and width are positive ints."""
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"image {name} must be a positive int, got {v!r}")


def select_best_resolution(height: int, width: int, pinpoints: Pinpoints) -> tuple[int, int]:
    """The (height, width) in ``pinpoints`` an image of this size is resized into: the most
    effective (non-upscaled) pixels, ties broken by the least wasted area; first wins on equality."""
    check_size(height, width)
    if not pinpoints:
        raise ValueError("pinpoints is empty: there is no resolution to choose from")
    best, best_effective, best_wasted = None, 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = pw * ph - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (int(ph), int(pw)), effective, wasted
    assert best is not None
    return best


def grid_shape(height: int, width: int, pinpoints: Pinpoints, tile: int) -> tuple[int, int]:
    """(rows, columns) of tower-size tiles the best resolution is cut into (``tile`` = tower input size)."""
    h, w = select_best_resolution(height, width, pinpoints)
    return h // tile, w // tile


def num_tiles(height: int, width: int, pinpoints: Pinpoints, tile: int) -> int:
    """Tower inputs for one image: the base tile + the grid tiles."""
    gh, gw = grid_shape(height, width, pinpoints, tile)
    return 1 + gh * gw


def unpad_bounds(height: int, width: int, map_h: int, map_w: int) -> tuple[int, int, int, int]:
    """[top, bottom) × [left, right) of a map_h × map_w feature map that saw the image of original
    size (height, width) and not the padding (transformers' ``unpad_image``)."""
    check_size(height, width)
    if width / height > map_w / map_h:          # wider than the map: padding above and below
        new_h = int(round(height * (map_w / width), 7))
        pad = (map_h - new_h) // 2
        return pad, map_h - pad, 0, map_w
    new_w = int(round(width * (map_h / height), 7))
    pad = (map_w - new_w) // 2
    return 0, map_h, pad, map_w - pad


def num_rows(height: int, width: int, pinpoints: Pinpoints, tile: int, side: int) -> int:
    """Text rows of one image: base n² + unpadded grid features + one newline per feature row
    (``side`` = n = patches per tile side)."""
    gh, gw = grid_shape(height, width, pinpoints, tile)
    top, bottom, left, right = unpad_bounds(height, width, gh * side, gw * side)
    return side * side + (bottom - top) * (right - left + 1)


def pack_features(base: torch.Tensor, grid: torch.Tensor, height: int, width: int, pinpoints: Pinpoints,
                  tile: int, newline: torch.Tensor) -> torch.Tensor:
    """One image's text rows from its tile features ("spatial_unpad" merge).

    base [P, D] (the base tile), grid [G, P, D] (tiles in row-major grid order), newline [D]
    → [num_rows, D]: base rows, then the unpadded (gh·n) × (gw·n) map row by row, each row ended
    by ``newline``. Raises ValueError when G or P do not match the image's grid.
    """
    side = int(round(base.shape[0] ** 0.5))
    if side * side != base.shape[0] or grid.dim() != 3 or grid.shape[1:] != base.shape:
        raise ValueError(f"pack_features: base {tuple(base.shape)} must be [n², D] and grid {tuple(grid.shape)} "
                         f"[G, n², D]")
    gh, gw = grid_shape(height, width, pinpoints, tile)
    if grid.shape[0] != gh * gw:
        raise ValueError(f"pack_features: an image of {height}x{width} has a {gh}x{gw} tile grid but "
                         f"{grid.shape[0]} grid tiles were given")
    d = base.shape[1]
    fmap = (grid.view(gh, gw, side, side, d).permute(0, 2, 1, 3, 4)            # (gh, n, gw, n, D)
            .reshape(gh * side, gw * side, d))                                   # (gh·n, gw·n, D)
    top, bottom, left, right = unpad_bounds(height, width, gh * side, gw * side)
    fmap = fmap[top:bottom, left:right]                                          # (h', w', D)
    nl = newline.to(fmap.dtype).expand(fmap.shape[0], 1, d)                      # (h', 1, D)
    return torch.cat([base, torch.cat([fmap, nl], 1).flatten(0, 1)], 0)
