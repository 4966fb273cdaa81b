"""A checkpoint on the meta device, then made real a tensor (or a shard's rows) at a time.

``meta_load`` builds the model on the meta device from a checkpoint's names and headers alone
(``engine.weights.index_checkpoint``: HF llava or original LLaVA, the tower from a CLIP directory when the
checkpoint lacks it), checking every key and shape before a weight is read; ``meta_compose`` does the same
for a CLIP + LLaMA composition (stage 1's start: a new projector). ``materialize`` then allocates each
parameter on the target device (after FSDP2 sharding: only this rank's shard) and fills it from a slice of its
source tensor (``safe_open(...).get_slice``: only those rows are read, the file opened for that tensor alone).

So the host holds the model being built (nothing, when it goes to a GPU) plus one source tensor:
``engine.load`` of a 7B bf16 checkpoint onto a GPU no longer reads 14 GB into host memory first,
``engine.weights.compose`` no longer holds both source checkpoints beside the model, and a training rank
(``train.stage``, which shards the meta model with FSDP2 before materialising it) reads only its shards.
The image placeholder's extra vocabulary rows are the embedding mean (``engine.weights.row_mean``); a
``linear`` projector stored as two matrices (HF) is folded into one here (small: read whole, kept as an
override).
"""
from __future__ import annotations

import dataclasses
import sys
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
    new_model,
    read_sources,
    rename,
    row_mean,
    with_image_token_row,
)

# safetensors' header dtypes (of the floating tensors a checkpoint holds)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass
class MetaModel:
    """A model on the meta device, where each of its tensors comes from, and (``overrides``) small
    tensors given whole, e.g. a stage-1 projector, that replace the fresh ones."""
    model: Llava
    sources: dict[str, Source]
    seed: int
    overrides: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    @property
    def stored_dtype(self) -> torch.dtype:
        """The dtype the checkpoint stores its embedding in (``engine.load``'s default dtype)."""
        src = self.sources["decoder.embed.weight"]
        if src.dtype not in DTYPES:
            raise ValueError(f"{src.file}: {src.key} is stored as {src.dtype}, not a floating dtype")
        return DTYPES[src.dtype]


def meta_model(config: LlavaConfig, sources: dict[str, Source], where: str, *, seed: int,
               kernel_backend: str | None, stored_vocab: int | None = None) -> MetaModel:
    """The model on the meta device; every parameter must have a source (or be one we make fresh), of the
    parameter's shape (``VOCAB_ROWS``: ``stored_vocab`` rows, when given). Raises ValueError naming the keys."""
    if config.text.tie_word_embeddings:
        sources.pop("decoder.lm_head.weight", None)
    model = new_model(config, kernel_backend=kernel_backend)
    params = dict(model.named_parameters())
    fresh = {n for n in params if n.startswith("projector.") or n.startswith("vision.post_norm.")}
    missing = sorted(set(params) - set(sources) - fresh)
    unexpected = sorted(set(sources) - set(params))
    if missing or unexpected:
        raise ValueError(f"{where}: missing keys {missing[:20]} ({len(missing)}), unexpected keys "
                         f"{unexpected[:20]} ({len(unexpected)})")
    for name, src in sources.items():
        want = tuple(params[name].shape)
        if stored_vocab is not None and name in VOCAB_ROWS:
            want = (stored_vocab, *want[1:])
        if src.shape != want:
            raise ValueError(f"{where}: {name} has shape {src.shape} in the checkpoint ({src.file}: {src.key}) but "
                             f"the config implies {want}")
    return MetaModel(model, sources, seed)


def meta_load(path: str, *, vision: str | None = None, kernel_backend: str | None = "torch") -> MetaModel:
    """A checkpoint directory on the meta device (what ``engine.load`` reads, see the module docstring)."""
    index = index_checkpoint(path, vision=vision)
    sources, config = dict(index.sources), index.config
    overrides = {}
    if config.projector_type == "linear" and "projector.linear_2.weight" in sources:
        stored = {k: sources.pop(k) for k in list(sources) if k.startswith("projector.")}
        overrides = fold_identity_projector(read_sources(stored), config)
    grown = index.stored_vocab if config.text.vocab_size > index.stored_vocab else None
    meta = meta_model(config, sources, path, seed=0, kernel_backend=kernel_backend, stored_vocab=grown)
    missing = sorted(n for n, _ in meta.model.named_parameters()
                     if n.startswith("projector.") and n not in sources and n not in overrides)
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    meta.overrides = overrides
    return meta


def meta_compose(clip_dir: str, llama_dir: str, *, projector_type: str = "mlp2x_gelu",
                 image_token_id: int | None = None, vision_feature_layer: int = -2, seed: int = 0,
                 kernel_backend: str | None = "torch") -> MetaModel:
    """A fresh LLaVA from a CLIP directory and a LLaMA/Vicuna directory on the meta device (``engine.weights.compose``
    materialises it): the tower and the LLM from their files, a new projector drawn under ``seed``, the image
    placeholder's row(s) the embedding mean."""
    config = compose_config(clip_dir, llama_dir, projector_type=projector_type, image_token_id=image_token_id,
                            vision_feature_layer=vision_feature_layer)
    sources = rename(index_safetensors_dir(clip_dir), CLIP_DIR, clip_dir)
    sources.update(rename(index_safetensors_dir(llama_dir), LLAMA_DIR, llama_dir))
    grown = with_image_token_row(config)
    stored = config.text.vocab_size if grown.text.vocab_size > config.text.vocab_size else None
    return meta_model(grown, sources, f"{clip_dir} + {llama_dir}", seed=seed, kernel_backend=kernel_backend,
                      stored_vocab=stored)


def read_rows(source: Source, start: int, stop: int, full_rows: int) -> torch.Tensor:
    """Rows [start, stop) of the source tensor, its first dimension extended to ``full_rows`` with copies of its
    row mean (``row_mean``: an image placeholder's vocabulary rows); reads only what is needed. ``meta_model``
    has checked every source's shape against its parameter, so only a vocabulary tensor ever has fewer rows."""
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
            mean = row_mean(lambda a, b: sl[a:b], n)
            parts.append(mean.expand(stop - max(start, n), *mean.shape))
        return torch.cat(parts)


def _fresh(meta: MetaModel, names: set[str]) -> dict[str, torch.Tensor]:
    """The tensors no checkpoint holds, of ``names``: the new projector (seeded: nn.Linear's default init under
    ``torch.manual_seed(seed)`` applied to the projector alone, as ``engine.weights.compose`` draws it), an
    identity tower post-norm; ``overrides`` replace them."""
    state = dict(meta.overrides)
    if any(n.startswith("projector.") and n not in state for n in names):
        torch.manual_seed(meta.seed)
        state.update({f"projector.{k}": v for k, v in Projector(meta.model.config).state_dict().items()
                      if f"projector.{k}" not in state})
    d = meta.model.config.vision.hidden_size
    state.setdefault("vision.post_norm.weight", torch.ones(d))
    state.setdefault("vision.post_norm.bias", torch.zeros(d))
    return state


def _dtensor_type():
    """DTensor's class when torch.distributed.tensor is loaded (FSDP2 has sharded something), else None: no
    parameter can be one then, and a plain load neither imports it nor needs torch.distributed at all."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def _local_rows(p, dtensor) -> tuple[int, int]:
    """The rows [start, stop) of parameter ``p`` this rank holds: all of them, or FSDP2's Shard(0)
    chunk (torch.chunk's split: ceil(n / W) rows a rank, the last ones shorter or empty)."""
    n = p.shape[0] if p.ndim else 0
    if dtensor is None or not isinstance(p, dtensor):
        return 0, n
    from torch.distributed.tensor import Shard
    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise ValueError(f"materialize: expected FSDP2's Shard(0) on a 1-D mesh, got {p.placements}")
    chunk = -(-n // p.device_mesh.size())
    rank = p.device_mesh.get_local_rank()
    return min(rank * chunk, n), min((rank + 1) * chunk, n)


def materialize(meta: MetaModel, *, device: torch.device | str, dtype: torch.dtype = torch.float32) -> Llava:
    """Allocate the model's parameters on ``device`` in ``dtype`` (after FSDP2 sharding: only this rank's shards)
    and fill them from their sources, one tensor at a time. Returns the model, now real."""
    dtensor = _dtensor_type()
    model = meta.model
    if any(p.dtype != dtype for p in model.parameters()):
        if dtensor is not None and any(isinstance(p, dtensor) for p in model.parameters()):
            raise ValueError(f"materialize: the model was sharded on the meta device in "
                             f"{next(model.parameters()).dtype}; shard it in {dtype} (its parameters' dtype is "
                             f"what the shards are allocated in)")
        model.to(dtype)                            # still on the meta device: no memory, the dtype allocated below
    model.to_empty(device=device)
    params = dict(model.named_parameters())
    fresh = _fresh(meta, {n for n in params if n not in meta.sources or n in meta.overrides})
    with torch.no_grad():
        for name, p in params.items():
            local = p.to_local() if dtensor is not None and isinstance(p, dtensor) else p
            start, stop = _local_rows(p, dtensor)
            if name in meta.sources and name not in meta.overrides:
                value = read_rows(meta.sources[name], start, stop, p.shape[0] if p.ndim else 0)
            else:
                value = fresh[name][start:stop] if p.ndim else fresh[name]
            if tuple(value.shape) != tuple(local.shape):
                raise ValueError(f"{name}: the source gives shape {tuple(value.shape)} for rows [{start}, {stop}) "
                                 f"but the model expects {tuple(local.shape)}")
            local.copy_(value.to(dtype))
    return model
