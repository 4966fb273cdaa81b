"""Compose a fresh LLaVA (``--vision CLIP --llm LLAMA``) on the meta device; each rank then
materialises only its own shards, reading just those rows from the safetensors files.

``engine.weights.compose`` reads both checkpoints whole and builds an fp32 model on the host: for
a 7B model that is ~28 GB per process, 8× that on an 8-GPU host. Here nothing is read while the
model is built (``meta_compose``: configs and tensor *names* only), the loop shards it with FSDP2
while it is still on the meta device, and ``materialize`` allocates each parameter's local shard
on the target device and fills it from a slice of its source tensor (``safe_open(...).get_slice``:
only those rows are read). At no time does a rank hold more than its shards plus one source slice.

Same weights as ``compose`` for the tower and the LLM, the same extra image-placeholder row(s)
(the embedding mean), and the same new projector: nn.Linear's default init under ``torch.manual_seed(seed)``
applied to the projector alone, as ``compose`` draws it.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open

from engine.config import (
    LlavaConfig,
    config_from_dict,
    is_original_llava,
    read_config_json,
)
from engine.model import Llava, Projector
from engine.weights import CLIP_DIR, HF_LLAVA, LLAMA_DIR, compose_config, rename


@dataclass(frozen=True)
class Source:
    """Where one of our tensors lives: ``key`` of the safetensors ``file``."""
    file: str
    key: str


def _tensor_index(path: str) -> dict[str, Source]:
    """Every tensor name of a directory's safetensors files → its file (headers only, no data)."""
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors")) if os.path.isdir(path) else []
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    index = {}
    for name in files:
        file = os.path.join(path, name)
        with safe_open(file, framework="pt") as f:
            index.update({key: Source(file, key) for key in f.keys()})
    return index


@dataclass
class MetaModel:
    """A model on the meta device, where each of its tensors comes from, and (``overrides``) small
    tensors given whole, e.g. a stage-1 projector, that replace the fresh ones."""
    model: Llava
    sources: dict[str, Source]
    seed: int
    overrides: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


def _meta_model(config: LlavaConfig, sources: dict[str, Source], where: str, *, seed: int,
                kernel_backend: str | None) -> MetaModel:
    """The model on the meta device; every parameter must have a source (or be one we make fresh)."""
    if config.text.tie_word_embeddings:
        sources.pop("decoder.lm_head.weight", None)
    with torch.device("meta"):
        model = Llava(config, kernel_backend=kernel_backend)
    expected = {n for n, _ in model.named_parameters()}
    fresh = {n for n in expected if n.startswith("projector.") or n.startswith("vision.post_norm.")}
    missing = sorted(expected - set(sources) - fresh)
    unexpected = sorted(set(sources) - expected)
    if missing or unexpected:
        raise ValueError(f"{where}: missing keys {missing[:20]} ({len(missing)}), unexpected keys "
                         f"{unexpected[:20]} ({len(unexpected)})")
    return MetaModel(model, sources, seed)


def meta_load(path: str, *, kernel_backend: str | None = "torch") -> MetaModel | None:
    """An HF llava checkpoint directory (e.g. our stage-1 output) on the meta device, like
    ``engine.load``; None for the layouts whose import transforms whole tensors (original LLaVA
    checkpoints, a ``linear`` projector folded from two matrices): load those with ``engine.load``."""
    file, raw = read_config_json(path)
    if is_original_llava(raw):
        return None
    config = config_from_dict(raw, file)
    if config.projector_type == "linear":
        return None
    sources = rename(_tensor_index(path), HF_LLAVA, path, keep_unknown=True)
    meta = _meta_model(config, sources, path, seed=0, kernel_backend=kernel_backend)
    missing = sorted(n for n, _ in meta.model.named_parameters() if n.startswith("projector.") and n not in sources)
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    return meta


def meta_compose(clip_dir: str, llama_dir: str, *, projector_type: str = "mlp2x_gelu",
                 image_token_id: int | None = None, vision_feature_layer: int = -2, seed: int = 0,
                 kernel_backend: str | None = "torch") -> MetaModel:
    """``engine.weights.compose`` without reading a weight: the model is on the meta device."""
    config = compose_config(clip_dir, llama_dir, projector_type=projector_type, image_token_id=image_token_id,
                            vision_feature_layer=vision_feature_layer)
    text = config.text
    sources = rename(_tensor_index(clip_dir), CLIP_DIR, clip_dir)
    sources.update(rename(_tensor_index(llama_dir), LLAMA_DIR, llama_dir))
    if config.image_token_id >= text.vocab_size:   # as engine.weights._add_image_token_row
        config = config.replace(text=dataclasses.replace(text, vocab_size=config.image_token_id + 1))
    return _meta_model(config, sources, f"{clip_dir} + {llama_dir}", seed=seed, kernel_backend=kernel_backend)


def _rows(source: Source, start: int, stop: int, full_rows: int) -> torch.Tensor:
    """Rows [start, stop) of the source tensor, its first dimension extended to ``full_rows`` with
    copies of its row mean (the image placeholder rows, as ``compose``); reads only what is needed."""
    with safe_open(source.file, framework="pt") as f:
        sl = f.get_slice(source.key)
        shape = sl.get_shape()
        if not shape:
            return f.get_tensor(source.key)
        n = shape[0]
        if full_rows == n:
            return sl[start:stop]
        parts = [sl[start:min(stop, n)]] if start < n else []
        if stop > n:
            mean = torch.zeros(shape[1:], dtype=torch.float64)
            for a in range(0, n, 4096):                                      # bounded reads
                mean += sl[a:min(a + 4096, n)].double().sum(0)
            mean = (mean / n).to(sl[0:1].dtype)
            parts.append(mean.expand(stop - max(start, n), *mean.shape))
        return torch.cat(parts)


def _fresh(meta: MetaModel) -> dict[str, torch.Tensor]:
    """The tensors no checkpoint holds: the new projector (seeded) and an identity tower post-norm."""
    torch.manual_seed(meta.seed)
    state = {f"projector.{k}": v for k, v in Projector(meta.model.config).state_dict().items()}
    d = meta.model.config.vision.hidden_size
    state.update({"vision.post_norm.weight": torch.ones(d), "vision.post_norm.bias": torch.zeros(d)})
    state.update(meta.overrides)
    return state


def _local_rows(p) -> tuple[int, int]:
    """The rows [start, stop) of parameter ``p`` this rank holds: all of them, or FSDP2's Shard(0)
    chunk (torch.chunk's split: ceil(n / W) rows a rank, the last ones shorter or empty)."""
    from torch.distributed.tensor import DTensor, Shard
    n = p.shape[0] if p.ndim else 0
    if not isinstance(p, DTensor):
        return 0, n
    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise ValueError(f"materialize: expected FSDP2's Shard(0) on a 1-D mesh, got {p.placements}")
    chunk = -(-n // p.device_mesh.size())
    rank = p.device_mesh.get_local_rank()
    return min(rank * chunk, n), min((rank + 1) * chunk, n)


def materialize(meta: MetaModel, *, device: torch.device, dtype: torch.dtype = torch.float32) -> Llava:
    """Allocate the model's parameters on ``device`` (after FSDP2 sharding: only this rank's shards)
    and fill them from their sources. Returns the model, now real."""
    from torch.distributed.tensor import DTensor
    model = meta.model
    model.to_empty(device=device)
    fresh = _fresh(meta)
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            start, stop = _local_rows(p)
            if name in meta.sources and name not in meta.overrides:
                value = _rows(meta.sources[name], start, stop, p.shape[0] if p.ndim else 0)
            else:
                value = fresh[name][start:stop] if p.ndim else fresh[name]
            if tuple(value.shape) != tuple(local.shape):
                raise ValueError(f"{name}: the source gives shape {tuple(value.shape)} for rows [{start}, {stop}) "
                                 f"but the model expects {tuple(local.shape)}")
            local.copy_(value.to(dtype))
    return model
