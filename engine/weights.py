"""Checkpoint import and export: one key table per layout, safetensors (and stage-1 ``.bin``).

Layouts read:
  * HF llava / llava_next directories (``config.json`` + ``model.safetensors`` or shards with
    ``model.safetensors.index.json``), with the v4 (``language_model.model.*``) and v5
    (``model.language_model.*``) key layouts, the vision tower with or without ``vision_model``;
  * original LLaVA checkpoints (``model.layers.*`` + ``model.mm_projector.*``) and stage-1
    ``mm_projector.bin`` files (read with ``weights_only=True``);
  * a CLIP directory + a LLaMA directory composed into a fresh LLaVA (new projector).
Layout written: HF llava, or llava_next for AnyRes models (v4 key names, which transformers 4.x and
5.x both load).

Tables map a source key to our parameter name; ``{}`` stands for a layer index and ``None``
marks keys we drop on purpose. Unknown or missing keys are an error that lists them.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.config import (
    LlavaConfig,
    config_from_dict,
    is_original_llava,
    read_config_json,
    text_config_from_dict,
    vision_config_from_dir,
)
from engine.io import fsync_dir, replace_dir
from engine.model import Llava

# --------------------------------------------------------------------------- key tables

VISION_TABLE = {
    "embeddings.patch_embedding.weight": "vision.patch_embed.weight",
    "embeddings.class_embedding": "vision.class_embed",
    "embeddings.position_embedding.weight": "vision.pos_embed.weight",
    "embeddings.position_ids": None,  # a buffer older transformers saved
    "pre_layrnorm.weight": "vision.pre_norm.weight",
    "pre_layrnorm.bias": "vision.pre_norm.bias",
    "encoder.layers.{}.layer_norm1.weight": "vision.layers.{}.norm1.weight",
    "encoder.layers.{}.layer_norm1.bias": "vision.layers.{}.norm1.bias",
    "encoder.layers.{}.self_attn.q_proj.weight": "vision.layers.{}.attn.q.weight",
    "encoder.layers.{}.self_attn.q_proj.bias": "vision.layers.{}.attn.q.bias",
    "encoder.layers.{}.self_attn.k_proj.weight": "vision.layers.{}.attn.k.weight",
    "encoder.layers.{}.self_attn.k_proj.bias": "vision.layers.{}.attn.k.bias",
    "encoder.layers.{}.self_attn.v_proj.weight": "vision.layers.{}.attn.v.weight",
    "encoder.layers.{}.self_attn.v_proj.bias": "vision.layers.{}.attn.v.bias",
    "encoder.layers.{}.self_attn.out_proj.weight": "vision.layers.{}.attn.o.weight",
    "encoder.layers.{}.self_attn.out_proj.bias": "vision.layers.{}.attn.o.bias",
    "encoder.layers.{}.layer_norm2.weight": "vision.layers.{}.norm2.weight",
    "encoder.layers.{}.layer_norm2.bias": "vision.layers.{}.norm2.bias",
    "encoder.layers.{}.mlp.fc1.weight": "vision.layers.{}.fc1.weight",
    "encoder.layers.{}.mlp.fc1.bias": "vision.layers.{}.fc1.bias",
    "encoder.layers.{}.mlp.fc2.weight": "vision.layers.{}.fc2.weight",
    "encoder.layers.{}.mlp.fc2.bias": "vision.layers.{}.fc2.bias",
    "post_layernorm.weight": "vision.post_norm.weight",
    "post_layernorm.bias": "vision.post_norm.bias",
}

TEXT_TABLE = {
    "embed_tokens.weight": "decoder.embed.weight",
    "layers.{}.input_layernorm.weight": "decoder.layers.{}.attn_norm.weight",
    "layers.{}.self_attn.q_proj.weight": "decoder.layers.{}.attn.q.weight",
    "layers.{}.self_attn.k_proj.weight": "decoder.layers.{}.attn.k.weight",
    "layers.{}.self_attn.v_proj.weight": "decoder.layers.{}.attn.v.weight",
    "layers.{}.self_attn.o_proj.weight": "decoder.layers.{}.attn.o.weight",
    "layers.{}.self_attn.rotary_emb.inv_freq": None,  # recomputed from rope_theta
    "layers.{}.post_attention_layernorm.weight": "decoder.layers.{}.mlp_norm.weight",
    "layers.{}.mlp.gate_proj.weight": "decoder.layers.{}.mlp.gate.weight",
    "layers.{}.mlp.up_proj.weight": "decoder.layers.{}.mlp.up.weight",
    "layers.{}.mlp.down_proj.weight": "decoder.layers.{}.mlp.down.weight",
    "norm.weight": "decoder.norm.weight",
}

HF_PROJECTOR_TABLE = {
    "linear_1.weight": "projector.linear_1.weight",
    "linear_1.bias": "projector.linear_1.bias",
    "linear_2.weight": "projector.linear_2.weight",
    "linear_2.bias": "projector.linear_2.bias",
}

# Upstream LLaVA's projector is nn.Sequential(Linear, GELU, Linear) (indices 0, 2) or one Linear.
ORIGINAL_PROJECTOR_TABLE = {
    "0.weight": "projector.linear_1.weight", "0.bias": "projector.linear_1.bias",
    "2.weight": "projector.linear_2.weight", "2.bias": "projector.linear_2.bias",
    "weight": "projector.linear_1.weight", "bias": "projector.linear_1.bias",
}


def _prefixed(prefixes: tuple[str, ...], table: dict) -> dict:
    return {p + k: v for p in prefixes for k, v in table.items()}


# One table per layout; the prefixes spell the alternatives each layout has seen.
HF_LLAVA = {
    **_prefixed(("vision_tower.vision_model.", "vision_tower.", "model.vision_tower.vision_model.",
                 "model.vision_tower."), VISION_TABLE),
    **_prefixed(("multi_modal_projector.", "model.multi_modal_projector."), HF_PROJECTOR_TABLE),
    **_prefixed(("language_model.model.", "model.language_model."), TEXT_TABLE),
    "language_model.lm_head.weight": "decoder.lm_head.weight",
    "lm_head.weight": "decoder.lm_head.weight",
    "image_newline": "image_newline",            # llava_next, v4 layout
    "model.image_newline": "image_newline",      # llava_next, v5 layout
}
ORIGINAL_LLAVA = {
    **_prefixed(("model.",), TEXT_TABLE),
    "lm_head.weight": "decoder.lm_head.weight",
    "model.image_newline": "image_newline",      # LLaVA-1.6 (anyres, spatial_unpad)
    **_prefixed(("model.mm_projector.",), ORIGINAL_PROJECTOR_TABLE),
    **_prefixed(("model.vision_tower.vision_tower.vision_model.",), VISION_TABLE),
}
CLIP_DIR = {**_prefixed(("vision_model.",), VISION_TABLE), "text_model.*": None, "visual_projection.weight": None,
            "text_projection.weight": None, "logit_scale": None}
LLAMA_DIR = {**_prefixed(("model.",), TEXT_TABLE), "lm_head.weight": "decoder.lm_head.weight"}


def _compile(table: dict) -> list[tuple[re.Pattern, str | None]]:
    out = []
    for src, dst in table.items():
        pat = re.escape(src).replace(r"\{\}", r"(\d+)").replace(r"\*", ".*")
        out.append((re.compile(pat + "$"), dst))
    return out


def rename(state: dict[str, torch.Tensor], table: dict, where: str, *,
           keep_unknown: bool = False) -> dict[str, torch.Tensor]:
    """Source keys → our names by ``table``; raises ValueError listing keys no entry matches, or
    with ``keep_unknown`` passes them through under their own names, so that ``assign_state``
    reports them together with the missing keys in one error."""
    compiled = _compile(table)
    out, unknown = {}, []
    for key, tensor in state.items():
        for pat, dst in compiled:
            m = pat.match(key)
            if m:
                if dst is not None:
                    out[dst.replace("{}", m.group(1)) if "{}" in dst else dst] = tensor
                break
        else:
            unknown.append(key)
            if keep_unknown:
                out[key] = tensor
    if unknown and not keep_unknown:
        raise ValueError(f"{where}: unexpected checkpoint keys ({len(unknown)}): {sorted(unknown)[:20]}")
    return out


# --------------------------------------------------------------------------- reading files


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one tensor lives: ``key`` of the safetensors ``file`` (read whole, or a slice of rows), with its
    shape and dtype as the file's header gives them (safetensors' names: "F32", "BF16", ...)."""
    file: str
    key: str
    shape: tuple[int, ...] = ()
    dtype: str = ""


def safetensors_files(path: str) -> list[str]:
    """A directory's safetensors files: the shards its index names when it has one, else all of them."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        for name in names:
            if not os.path.isfile(os.path.join(path, name)):
                raise FileNotFoundError(f"{index}: names shard {name}, which does not exist")
    else:
        names = sorted(f for f in os.listdir(path) if f.endswith(".safetensors")) if os.path.isdir(path) else []
    if not names:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    return [os.path.join(path, name) for name in names]


def _unreadable(file: str, e: Exception) -> ValueError:
    # safetensors raises its own error types for corrupt headers and data
    return ValueError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})")


def index_safetensors_dir(path: str) -> dict[str, Source]:
    """Every tensor name of a directory's safetensors files → where it lives (headers only, no data)."""
    out = {}
    for file in safetensors_files(path):
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    out[key] = Source(file, key, tuple(sl.get_shape()), sl.get_dtype())
        except Exception as e:
            raise _unreadable(file, e) from e
    return out


def read_sources(sources: dict[str, Source]) -> dict[str, torch.Tensor]:
    """The tensors ``sources`` names (same keys, same order), each file opened once."""
    by_file: dict[str, list[str]] = {}
    for name, src in sources.items():
        by_file.setdefault(src.file, []).append(name)
    got = {}
    for file, names in by_file.items():
        try:
            with safe_open(file, framework="pt") as f:
                for name in names:
                    got[name] = f.get_tensor(sources[name].key)
        except Exception as e:
            raise _unreadable(file, e) from e
    return {name: got[name] for name in sources}


def row_mean(read, n: int) -> torch.Tensor:
    """The mean of a tensor's ``n`` rows, given ``read(a, b)`` → rows [a, b): summed in fp64 4096 rows at a
    time (bounded memory when ``read`` slices a file), returned in the rows' dtype. The new embedding row
    of an image placeholder (``engine.meta.read_rows`` reads it for each rank's rows alike)."""
    total, dtype = None, None
    for a in range(0, n, 4096):
        rows = read(a, min(a + 4096, n))
        dtype = rows.dtype
        part = rows.double().sum(0)
        total = part if total is None else total + part
    return (total / n).to(dtype)


def read_projector_bin(file: str) -> dict[str, torch.Tensor]:
    """A stage-1 ``mm_projector.bin`` (a plain state dict; never unpickles code)."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{file}: not a readable projector checkpoint ({type(e).__name__}: {e})") from e


def fold_identity_projector(state: dict, config: LlavaConfig) -> dict:
    """An HF checkpoint with ``projector_hidden_act: linear`` holds two stacked linears; our
    ``linear`` projector is their product (exact for the identity second matrix we export)."""
    w2 = state.pop("projector.linear_2.weight", None)
    b2 = state.pop("projector.linear_2.bias", None)
    if w2 is None:
        return state
    w1, b1 = state["projector.linear_1.weight"], state.get("projector.linear_1.bias")
    dtype = w1.dtype
    state["projector.linear_1.weight"] = (w2.double() @ w1.double()).to(dtype)
    if config.projector_bias:
        b = torch.zeros(w2.shape[0], dtype=torch.float64) if b1 is None else w2.double() @ b1.double()
        state["projector.linear_1.bias"] = (b + (0 if b2 is None else b2.double())).to(dtype)
    return state


# --------------------------------------------------------------------------- building a model


def assign_state(model: Llava, state: dict[str, torch.Tensor], where: str, *, dtype=None, device=None) -> Llava:
    """Load ``state`` (our names) into a model built on the meta device; strict on keys and shapes."""
    expected = dict(model.state_dict())
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{where}: missing keys {missing[:20]} ({len(missing)}), unexpected keys "
                         f"{unexpected[:20]} ({len(unexpected)})")
    for key, ref in expected.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise ValueError(f"{where}: {key} has shape {tuple(state[key].shape)} in the checkpoint but the "
                             f"config implies {tuple(ref.shape)}")
    if dtype is None:
        dtype = state["decoder.embed.weight"].dtype
    fixed = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)  # device None: stay put
             for k, v in state.items()}
    model.load_state_dict(fixed, strict=True, assign=True)
    return model


def new_model(config: LlavaConfig, **kw) -> Llava:
    with torch.device("meta"):
        return Llava(config, **kw)


def load(path: str, *, device=None, dtype: torch.dtype | None = None, vision: str | None = None,
         kernel_backend: str | None = "torch", adapter: str | None = None,
         quantize: str | None = None) -> Llava:
    """Load a LLaVA checkpoint directory (HF llava or original LLaVA layout).

    ``vision``: a CLIP directory, required for original LLaVA checkpoints whose tower weights
    are not inside the checkpoint. ``dtype`` None: the checkpoint's (its embedding's). ``adapter``: a PEFT
    LoRA adapter directory trained on this base (engine/lora.py), applied unmerged. ``quantize``: "int8",
    "int8+head" or "int4" quantizes the decoder's linears (weights only, see ``engine.quantize``) once on
    ``device``. Keys and shapes are checked from the files' headers before a weight is read; then the model
    is built on ``device`` a tensor at a time (``engine.meta``): the host holds the model being built (nothing
    for a GPU) plus one checkpoint tensor, never the whole checkpoint. Raises FileNotFoundError / ValueError
    naming the file or key.
    """
    check_adapter(path, adapter, quantize)
    from engine.meta import materialize, meta_load  # engine.meta builds on this module
    meta = meta_load(path, vision=vision, kernel_backend=kernel_backend)
    model = materialize(meta, device=device or "cpu", dtype=dtype or meta.stored_dtype)
    if adapter is not None:
        from engine.lora import apply_adapter
        apply_adapter(model, adapter, base=path)
    if quantize is not None:
        from engine.quantize import quantize_model
        quantize_model(model, quantize)
    return model


def check_adapter(path: str, adapter: str | None, quantize: str | None) -> None:
    """What ``load(path, adapter=, quantize=)`` refuses before reading anything, also run by the serving and
    chat command lines on their flags: ValueError for an adapter with quantization (PEFT would wrap torchao
    tensors it was not tested with; merging first gives one plain model), FileNotFoundError for an adapter
    directory that does not exist."""
    if adapter is None:
        return
    if quantize is not None:
        raise ValueError(f"an adapter (adapter= / --adapter {adapter}) with quantize={quantize!r} is not supported; "
                         f"merge the adapter first (python -m train.merge_lora --base {path} --adapter {adapter} "
                         f"--output MERGED), then load MERGED quantized (--model MERGED --quantize {quantize})")
    if not os.path.isdir(adapter):
        raise FileNotFoundError(f"adapter directory {adapter} does not exist")


# The tensors whose rows an out-of-vocabulary image placeholder id extends (see ``with_image_token_row``).
VOCAB_ROWS = ("decoder.embed.weight", "decoder.lm_head.weight")


@dataclasses.dataclass(frozen=True)
class CheckpointIndex:
    """A checkpoint directory read as far as its headers: where each of our tensors lives, the model's
    config, and how many rows the stored ``VOCAB_ROWS`` tensors have (fewer than the config's vocabulary
    when the image placeholder's rows are to be added)."""
    sources: dict[str, Source]
    config: LlavaConfig
    stored_vocab: int


def index_checkpoint(path: str, *, vision: str | None = None) -> CheckpointIndex:
    """The layout decisions of loading ``path`` (HF llava or original LLaVA, the tower from ``vision``
    when the checkpoint lacks it), taken on names and headers alone: what ``engine.meta.meta_load`` builds on the
    meta device and ``load`` then reads a tensor (or a training rank a shard) at a time."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    vision_cfg = vision_config_from_dir(vision) if vision else None
    file, raw = read_config_json(path)  # raises FileNotFoundError / ValueError naming the file
    config = config_from_dict(raw, file, vision=vision_cfg)
    sources = index_safetensors_dir(path)
    stored_vocab = config.text.vocab_size
    if is_original_llava(raw):
        sources = rename(sources, ORIGINAL_LLAVA, path, keep_unknown=True)
        if not any(k.startswith("vision.") for k in sources):
            if not vision:
                raise ValueError(f"{path}: an original LLaVA checkpoint without vision-tower weights; pass the "
                                 f"CLIP directory for {raw['mm_vision_tower']!r} as vision=")
            sources.update(rename(index_safetensors_dir(vision), CLIP_DIR, vision))
        config = with_image_token_row(config)
    else:
        sources = rename(sources, HF_LLAVA, path, keep_unknown=True)
    return CheckpointIndex(sources, config, stored_vocab)


def with_image_token_row(config: LlavaConfig) -> LlavaConfig:
    """``config`` with a vocabulary that holds an out-of-vocabulary image placeholder id: the rows added
    to ``VOCAB_ROWS`` are the mean embedding (``row_mean``), so that exported checkpoints index the id
    safely in transformers; our scatter never reads that row."""
    v = config.text.vocab_size
    if config.image_token_id < v:
        return config
    return config.replace(text=dataclasses.replace(config.text, vocab_size=config.image_token_id + 1))


def compose_config(clip_dir: str, llama_dir: str, *, projector_type: str = "mlp2x_gelu",
                   image_token_id: int | None = None, vision_feature_layer: int = -2) -> LlavaConfig:
    """The config ``compose`` builds from a CLIP and a LLaMA/Vicuna directory (before the image token's
    embedding row is added, when ``image_token_id`` is past the vocabulary)."""
    llama_file, llama_raw = read_config_json(llama_dir)
    text = text_config_from_dict(llama_raw, llama_file)
    return LlavaConfig(vision=vision_config_from_dir(clip_dir), text=text, projector_type=projector_type,
                       image_token_id=text.vocab_size if image_token_id is None else image_token_id,
                       vision_feature_layer=(vision_feature_layer,))


def compose(clip_dir: str, llama_dir: str, *, projector_type: str = "mlp2x_gelu", image_token_id: int | None = None,
            vision_feature_layer: int = -2, dtype=None, device=None, seed: int = 0,
            kernel_backend: str | None = "torch") -> Llava:
    """A fresh LLaVA from a CLIP directory and a LLaMA/Vicuna directory (stage-1 start), built a tensor at a time
    (``engine.meta.meta_compose``, then ``materialize``).

    The projector is newly initialised: nn.Linear's default init under ``torch.manual_seed(seed)``, the
    projector alone. The image placeholder gets id ``image_token_id`` (default: the first id past the
    vocabulary, with a new embedding row, the mean of the others). ``dtype`` None: the LLM checkpoint's.
    """
    from engine.meta import materialize, meta_compose  # engine.meta builds on this module
    meta = meta_compose(clip_dir, llama_dir, projector_type=projector_type, image_token_id=image_token_id,
                        vision_feature_layer=vision_feature_layer, seed=seed, kernel_backend=kernel_backend)
    return materialize(meta, device=device or "cpu", dtype=dtype or meta.stored_dtype)


def projector_file(source: str) -> str:
    """The ``mm_projector.bin`` that ``source`` names (the file, or a directory holding one)."""
    file = os.path.join(source, "mm_projector.bin") if os.path.isdir(source) else source
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no mm_projector.bin at {source}")
    return file


def read_projector(source: str) -> dict[str, torch.Tensor]:
    """A stage-1 ``mm_projector.bin`` (or a directory holding one) under our names (``projector.*``)."""
    file = projector_file(source)
    return rename(read_projector_bin(file), _prefixed(("", "model.mm_projector."), ORIGINAL_PROJECTOR_TABLE), file)


def load_projector(model: Llava, source: str) -> None:
    """Copy projector weights into ``model`` from a stage-1 ``mm_projector.bin`` or a directory
    holding one (upstream's stage-1 output). Shapes are checked against the model."""
    file = projector_file(source)
    state = read_projector(source)
    own = model.projector.state_dict()
    state = {k[len("projector."):]: v for k, v in state.items()}
    if set(state) != set(own):
        raise ValueError(f"{file}: projector keys {sorted(state)} do not match the model's {sorted(own)}")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise ValueError(f"{file}: {k} has shape {tuple(v.shape)} but the model expects {tuple(own[k].shape)}")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


# --------------------------------------------------------------------------- export


def to_hf_state(state: dict[str, torch.Tensor], config: LlavaConfig) -> dict[str, torch.Tensor]:
    """Our state dict → HF llava keys (v4 names). A ``linear`` projector becomes linear_1 plus an
    identity linear_2 (the config says ``projector_hidden_act: linear``)."""
    inverse = {}
    for table, prefix in ((VISION_TABLE, "vision_tower.vision_model."), (TEXT_TABLE, "language_model.model."),
                          (HF_PROJECTOR_TABLE, "multi_modal_projector.")):
        for src, dst in table.items():
            if dst is not None:
                inverse[dst] = prefix + src
    inverse["decoder.lm_head.weight"] = "language_model.lm_head.weight"
    inverse["image_newline"] = "image_newline"      # llava_next (v4 name)
    out = {k: v.detach().contiguous() for k, v in rename(state, inverse, "export").items()}
    if config.projector_type == "linear":
        w = state["projector.linear_1.weight"]
        d = w.shape[0]
        out["multi_modal_projector.linear_2.weight"] = torch.eye(d, dtype=w.dtype)
        out["multi_modal_projector.linear_2.bias"] = torch.zeros(d, dtype=w.dtype)
        out.setdefault("multi_modal_projector.linear_1.bias", torch.zeros(d, dtype=w.dtype))
    return {k: v.cpu() for k, v in out.items()}


def atomic_dir(out_dir: str, write) -> None:
    """Write a directory atomically: ``write(tmp)`` fills a sibling temporary directory, every
    file is fsynced, then it is renamed over ``out_dir``. A crash leaves the old directory (or
    none), never a half-written one."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make the published checkpoint private
        write(tmp)
        for name in os.listdir(tmp):
            full = os.path.join(tmp, name)
            if os.path.isfile(full):
                with open(full, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_tokenizer_files(tokenizer_dir: str, out_dir: str) -> None:
    """Copy the tokenizer files of ``tokenizer_dir`` into ``out_dir``."""
    for name in os.listdir(tokenizer_dir):
        if name.startswith(("tokenizer", "special_tokens", "added_tokens")) or name.endswith(".model"):
            shutil.copy(os.path.join(tokenizer_dir, name), out_dir)


def export_hf(model: Llava, out_dir: str, **kw) -> None:
    """Write ``model`` as an HF llava checkpoint directory (see ``write_hf_checkpoint``)."""
    from engine.quantize import is_quantized
    if is_quantized(model):  # its state dict holds torchao tensors, not the checkpoint's weights
        raise ValueError(f"export_hf({out_dir}): the model's decoder is quantized; export the full-precision model "
                         f"(and quantize when loading: engine.load(path, quantize=...))")
    write_hf_checkpoint(model.state_dict(), model.config, out_dir, **kw)


def write_hf_checkpoint(state: dict[str, torch.Tensor], config: LlavaConfig, out_dir: str, *,
                        tokenizer_dir: str | None = None, max_shard_bytes: int = 4 * 2**30,
                        extra_files: dict[str, str] | None = None, extra_write=None) -> None:
    """Write a state dict (our names) as an HF llava checkpoint directory, atomically:
    ``config.json``, safetensors (sharded with an index above ``max_shard_bytes``), the tokenizer
    files from ``tokenizer_dir`` when given, ``extra_files`` (name → text), and whatever
    ``extra_write(tmp_dir)`` adds (e.g. the training state) inside the same atomic rename."""
    dtype = state["decoder.embed.weight"].dtype
    state = to_hf_state(state, config)
    hf_config = config.to_hf_dict()
    hf_config["torch_dtype"] = hf_config["dtype"] = str(dtype).removeprefix("torch.")

    def write(tmp: str) -> None:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        shards, current, size = [], {}, 0
        for key in sorted(state):
            nbytes = state[key].numel() * state[key].element_size()
            if current and size + nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[key] = state[key]
            size += nbytes
        shards.append(current)
        if len(shards) == 1:
            save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        if tokenizer_dir:
            write_tokenizer_files(tokenizer_dir, tmp)
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        if extra_write is not None:
            extra_write(tmp)

    atomic_dir(out_dir, write)
