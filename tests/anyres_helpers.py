"""Tiny random transformers LlavaNext models and AnyRes prompts for the tests/test_anyres_*.py files."""
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    MistralConfig,
)

VOCAB, IMAGE_TOKEN, TILE = 120, 119, 28          # tile 28 px, patch 7 → 4×4 patches per tile
GRIDS = {
    "next": [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]],   # LLaVA-1.6's grid at 1/12 scale
    "wide": [[28, 28], [56, 84], [84, 56], [28, 112]],
    "one": [[56, 56]],
}
# (height, width): landscape, portrait, tiny, a 1-pixel strip, exactly a pinpoint, primes.
SIZES = [(37, 91), (91, 37), (5, 3), (1, 200), (56, 56), (97, 61), (13, 300)]


def hf_next(*, grid="next", text="llama", layer=-2, seed=0, pinpoints=None, patch=7):
    """A random tiny LlavaNextForConditionalGeneration (eval) with its norms, biases, class
    embedding and image_newline perturbed, so that every weight matters. ``pinpoints`` (else
    GRIDS[grid]) and ``patch`` (the tile stays TILE px) choose the tiling."""
    torch.manual_seed(seed)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=TILE, patch_size=patch, hidden_act="quick_gelu")
    common = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rope_theta=500.0, rms_norm_eps=1e-5, max_position_embeddings=1024)
    tc = LlamaConfig(**common) if text == "llama" else MistralConfig(**common, sliding_window=None)
    cfg = LlavaNextConfig(vision_config=vc, text_config=tc, image_token_index=IMAGE_TOKEN, vision_feature_layer=layer,
                          vision_feature_select_strategy="default", image_grid_pinpoints=pinpoints or GRIDS[grid])
    model = LlavaNextForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "class_embedding" in name or "image_newline" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def make_prompts(cfg, n_images=(0, 1, 2), lengths=(7, 12, 9), seed=1):
    """Sequences with image placeholder runs of cfg.image_rows(h, w) each, tiles [ΣK, 3, S, S], sizes [N, 2]."""
    g = torch.Generator().manual_seed(seed)
    seqs, sizes = [], []
    k = 0
    for n, length in zip(n_images, lengths, strict=True):
        ids = torch.randint(0, IMAGE_TOKEN, (length,), generator=g).tolist()
        for i in range(n):
            h, w = SIZES[(k + seed) % len(SIZES)]
            k += 1
            sizes.append((h, w))
            at = min(len(ids), 1 + i * 3)
            ids[at:at] = [IMAGE_TOKEN] * cfg.image_rows(h, w)
        seqs.append(ids)
    tiles = sum(cfg.image_tiles(h, w) for h, w in sizes)
    pixels = torch.randn(tiles, 3, TILE, TILE, generator=g)
    return seqs, pixels, torch.tensor(sizes, dtype=torch.long).view(-1, 2)
