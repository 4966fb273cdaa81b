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
from dataclasses import dataclass

import torch
from safetensors import safe_open

from engine.config import LlavaConfig
from engine.model import Llava, Projector
from engine.weights import (
    CLIP_DIR,
    LLAMA_DIR,
    VOCAB_ROWS,
    Source,
    compose_config,
    fold_identity_projector,
    index_checkpoint,
    index_safetensors_dir,
    read_sources,
    rename,
    row_mean,
    with_image_token_row,
)


@dataclass
class MetaModel:
    """A model on the meta device, where each of its tensors comes from, and (``overrides``) small
    tensors given whole, e.g. a stage-1 projector, that replace the fresh ones."""
    model: Llava
    sources: dict[str, Source]
    seed: int
    overrides: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    stored_vocab: int | None = None   # rows the sources of VOCAB_ROWS hold when the model's vocabulary adds some


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


def meta_load(path: str, *, vision: str | None = None, kernel_backend: str | None = "torch") -> MetaModel:
    """A checkpoint directory on the meta device, like ``engine.load`` (HF llava or original LLaVA, the tower
    from ``vision`` when the checkpoint lacks it). A ``linear`` projector stored as two matrices (HF) is
    folded into one here: it is small (hidden × vision hidden), so it is read whole and kept as an override."""
    index = index_checkpoint(path, vision=vision)
    sources, config = dict(index.sources), index.config
    overrides = {}
    if config.projector_type == "linear" and "projector.linear_2.weight" in sources:
        stored = {k: sources.pop(k) for k in list(sources) if k.startswith("projector.")}
        overrides = fold_identity_projector(read_sources(stored), config)
    meta = _meta_model(config, sources, path, seed=0, kernel_backend=kernel_backend)
    missing = sorted(n for n, _ in meta.model.named_parameters()
                     if n.startswith("projector.") and n not in sources and n not in overrides)
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    meta.overrides = overrides
    if config.text.vocab_size > index.stored_vocab:
        meta.stored_vocab = index.stored_vocab
    return meta


def meta_compose(clip_dir: str, llama_dir: str, *, projector_type: str = "mlp2x_gelu",
                 image_token_id: int | None = None, vision_feature_layer: int = -2, seed: int = 0,
                 kernel_backend: str | None = "torch") -> MetaModel:
    """``engine.weights.compose`` without reading a weight: the model is on the meta device."""
    config = compose_config(clip_dir, llama_dir, projector_type=projector_type, image_token_id=image_token_id,
                            vision_feature_layer=vision_feature_layer)
    sources = rename(index_safetensors_dir(clip_dir), CLIP_DIR, clip_dir)
    sources.update(rename(index_safetensors_dir(llama_dir), LLAMA_DIR, llama_dir))
    grown = with_image_token_row(config)
    meta = _meta_model(grown, sources, f"{clip_dir} + {llama_dir}", seed=seed, kernel_backend=kernel_backend)
    if grown.text.vocab_size > config.text.vocab_size:
        meta.stored_vocab = config.text.vocab_size
    return meta


def _rows(name: str, source: Source, start: int, stop: int, full_rows: int, stored_vocab: int | None) -> torch.Tensor:
    """Rows [start, stop) of the source tensor; reads only what is needed. The vocabulary tensors of a
    model whose vocabulary adds image placeholder rows (``stored_vocab``) get those rows as ``grow_rows``
    makes them (the row mean); any other tensor must have the model's rows, or it is an error naming it."""
    with safe_open(source.file, framework="pt") as f:
        sl = f.get_slice(source.key)
        shape = sl.get_shape()
        if not shape:
            return f.get_tensor(source.key)
        n = shape[0]
        expected = stored_vocab if stored_vocab is not None and name in VOCAB_ROWS else full_rows
        if n != expected:
            raise ValueError(f"{source.file}: {source.key} ({name}) has {n} rows; the model expects {expected}")
        if full_rows == n:
            return sl[start:stop]
        parts = [sl[start:min(stop, n)]] if start < n else []
        if stop > n:
            mean = row_mean(lambda a, b: sl[a:b], n)
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
                value = _rows(name, meta.sources[name], start, stop, p.shape[0] if p.ndim else 0, meta.stored_vocab)
            else:
                value = fresh[name][start:stop] if p.ndim else fresh[name]
            if tuple(value.shape) != tuple(local.shape):
                raise ValueError(f"{name}: the source gives shape {tuple(value.shape)} for rows [{start}, {stop}) "
                                 f"but the model expects {tuple(local.shape)}")
            local.copy_(value.to(dtype))
    return model
