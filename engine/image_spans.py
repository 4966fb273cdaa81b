"""Where each image of a prompt lives: its placeholder rows and its vision-tower tiles (multi-image,
AnyRes), for the generation runtime (engine/generate.py): ``Runtime.submit`` and ``generate``.

Letters: N images of one prompt (or of a batch), K_i tiles of image i (1 without AnyRes),
R_i placeholder rows image i expands to (``LlavaConfig.image_rows``; ``image_seq_len`` without
AnyRes), S tile side.

Image i's rows are the i-th run of R_i placeholder ids (images in order), and its pixels are
tiles [ΣK_<i, ΣK_≤i) of the prompt's ``pixel_values [ΣK, 3, S, S]``. R_i and K_i follow from the
image's original (height, width) alone (``image_sizes``), so they are known before the tower runs.
"""
from __future__ import annotations

import torch

from engine.kv_cache import ImageSpan, image_digest


def check_sizes(cfg, image_sizes, n_tiles: int | None, where: str) -> list[tuple[int, int]] | None:
    """``image_sizes`` [N, 2] (height, width) as a list of int pairs, or None when not given (then every
    image is one tile of ``image_seq_len`` rows; an error for an AnyRes model). ValueError naming
    ``where`` for a bad shape or value."""
    if image_sizes is None:
        if cfg.anyres and n_tiles:
            raise ValueError(f"{where}: image_sizes [N, 2] (height, width of each image) is required for an "
                             "AnyRes model")
        return None
    sizes = torch.as_tensor(image_sizes)
    if sizes.dim() != 2 or sizes.shape[1] != 2 or sizes.is_floating_point() or sizes.is_complex():
        raise ValueError(f"{where}: image_sizes must be an integer [N, 2] tensor of (height, width); got "
                         f"{tuple(sizes.shape)} {sizes.dtype}")
    out = [(int(h), int(w)) for h, w in sizes.tolist()]
    bad = next((i for i, (h, w) in enumerate(out) if h < 1 or w < 1), None)
    if bad is not None:
        raise ValueError(f"{where}: image_sizes[{bad}] = {out[bad]} is not a positive (height, width)")
    return out


def layout(cfg, n_tiles: int, sizes: list[tuple[int, int]] | None) -> tuple[list[int], list[int]]:
    """(rows R_i, tiles K_i) per image: from ``sizes``, or ``n_tiles`` images of one tile each."""
    if sizes is None:
        return [cfg.image_seq_len] * n_tiles, [1] * n_tiles
    return [cfg.image_rows(h, w) for h, w in sizes], [cfg.image_tiles(h, w) for h, w in sizes]


def find_spans(prompt: list[int], image_token_id: int, rows: list[int], where: str) -> list[tuple[int, int]]:
    """[start, end) of each image's rows: the placeholders in order, R_i at a time, each image's rows
    one unbroken run. ValueError naming ``where`` when the counts or the runs disagree."""
    at = [i for i, t in enumerate(prompt) if t == image_token_id]
    if len(at) != sum(rows):
        raise ValueError(f"{where} has {len(at)} image placeholders but its {len(rows)} images take "
                         f"{sum(rows)} rows ({', '.join(map(str, rows)) or 'none'})")
    spans, k = [], 0
    for j, n in enumerate(rows):
        start, end = at[k], at[k + n - 1] + 1
        if end - start != n:
            raise ValueError(f"{where}: image {j}'s {n} placeholder rows are not one unbroken run "
                             f"(tokens {start}..{end - 1} hold other ids)")
        spans.append((start, end))
        k += n
    return spans


def image_spans(cfg, prompt: list[int], pixel_values: torch.Tensor | None, sizes: list[tuple[int, int]] | None,
                *, digests: bool, where: str = "the prompt") -> list[ImageSpan]:
    """The prompt's ``ImageSpan``s (rows, tiles and, with ``digests``, a digest of tiles + size), validated:
    the tile count of ``pixel_values`` [ΣK, 3, S, S] and the placeholder runs must match the images."""
    n_px = 0 if pixel_values is None else pixel_values.shape[0]
    if sizes is not None and not sizes and n_px:
        raise ValueError(f"{where}: {n_px} image tiles were given with an empty image_sizes")
    rows, tiles = layout(cfg, n_px, sizes)
    if sum(tiles) != n_px:
        raise ValueError(f"{where}: its {len(tiles)} images of sizes {sizes} take {sum(tiles)} tiles "
                         f"({', '.join(map(str, tiles))}) but pixel_values holds {n_px}")
    spans, t = [], 0
    for j, (start, end) in enumerate(find_spans(prompt, cfg.image_token_id, rows, where)):
        size = None if sizes is None else sizes[j]
        digest = image_digest(pixel_values[t:t + tiles[j]], size) if digests else b""
        spans.append(ImageSpan(start, end, digest, t, t + tiles[j], size))
        t += tiles[j]
    return spans


def split_per_prompt(cfg, prompts: list[list[int]], images: torch.Tensor | None,
                     image_sizes) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Cut a batch's ``images`` [ΣK, 3, S, S] and ``image_sizes`` [N, 2] into each prompt's (pixels,
    sizes): a prompt takes the next images until their rows cover its placeholders."""
    if images is not None and images.dim() != 4:
        raise ValueError(f"images must be a [N, 3, H, W] tensor; got shape {tuple(images.shape)}")
    n_px = 0 if images is None else images.shape[0]
    sizes = check_sizes(cfg, image_sizes, n_px, "generate")
    rows, tiles = layout(cfg, n_px, sizes)
    if sum(tiles) != n_px:
        raise ValueError(f"the {len(tiles)} images of image_sizes take {sum(tiles)} tiles but images holds {n_px}")
    out, img, tile = [], 0, 0
    for i, p in enumerate(prompts):
        need = sum(t == cfg.image_token_id for t in p)
        first, first_tile, got = img, tile, 0
        while got < need and img < len(rows):
            got += rows[img]
            tile += tiles[img]
            img += 1
        if got != need:
            left = f"image {img - 1} ends at {got} rows" if got > need else "no images are left"
            raise ValueError(f"prompt {i}'s {need} image placeholders are not covered by the images given "
                             f"({left}; rows per image: {rows})")
        if img == first:
            out.append((None, None))
        else:
            out.append((images[first_tile:tile],
                        None if sizes is None else torch.tensor(sizes[first:img], dtype=torch.long)))
    if img != len(rows):
        raise ValueError(f"the prompts hold {img} images' placeholders but {len(rows)} images were given")
    return out
