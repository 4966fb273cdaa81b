"""CLIP ViT vision tower that stops at the selected feature layer.

Letters: N images, P patches per image (+1 with the class token), Dv vision width,
L encoder layers, Hv heads.

Only the layers up to the deepest selected one run: with LLaVA's default layer -2 the last
encoder layer and the post-layernorm are never computed (their weights are kept so that an
exported checkpoint is complete).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import VisionConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, P, Dv)
        n, p, _ = x.shape
        q, k, v = (lin(x).view(n, p, self.num_heads, -1).transpose(1, 2) for lin in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # (N, Hv, P, Dh): full attention, no mask
        return self.o(out.transpose(1, 2).reshape(n, p, -1))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = quick_gelu if cfg.hidden_act == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.patch_embed = nn.Conv2d(cfg.num_channels, d, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embed = nn.Parameter(torch.randn(d) * d**-0.5)
        self.pos_embed = nn.Embedding(cfg.num_patches + 1, d)
        self.pre_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_layers))
        self.post_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)  # kept for export; LLaVA never uses it
        # CLIP's initialisation (std 0.02): nn.Embedding's N(0, 1) position rows would drown the patch
        # content of a randomly initialised tower (the embedded default trains with one, frozen).
        nn.init.normal_(self.patch_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed.weight, std=0.02)

    def forward(self, pixel_values: torch.Tensor, feature_layers: tuple[int, ...], strategy: str) -> torch.Tensor:
        """``pixel_values`` [N, 3, H, W] → features [N, P or P+1, Dv × len(feature_layers)].

        ``feature_layers`` index the hidden states as transformers does: 0 is the embedding
        output (after pre-LN), i the output of layer i, -1 the last layer, -2 the one before.
        ``strategy`` "default" drops the class token, "full" keeps it.
        """
        cfg = self.cfg
        if pixel_values.dim() != 4 or pixel_values.shape[1:] != (cfg.num_channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"pixel_values must be [N, {cfg.num_channels}, {cfg.image_size}, {cfg.image_size}]; "
                             f"got {tuple(pixel_values.shape)}")
        n_states = cfg.num_layers + 1
        wanted = [layer % n_states for layer in feature_layers]
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # (N, Dv, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)                                       # (N, P, Dv)
        cls = self.class_embed.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed.weight                 # (N, P+1, Dv)
        x = self.pre_norm(x)
        # Only the selected hidden states are kept: each other one would hold (N, P+1, Dv) until the
        # end (train/memory.py counts the tower's working set this way).
        states = {0: x} if 0 in wanted else {}
        for i in range(max(wanted)):
            x = self.layers[i](x)
            if i + 1 in wanted:
                states[i + 1] = x
        picked = [states[i] for i in wanted]
        if strategy == "default":
            picked = [s[:, 1:] for s in picked]
        return picked[0] if len(picked) == 1 else torch.cat(picked, dim=-1)

