"""Model configuration: frozen, keyword-only dataclasses and the one loader ``from_hf``.

``from_hf(path)`` reads either an HF llava / llava_next ``config.json`` (transformers v4 and v5
spellings) or an original LLaVA ``config.json`` (a LLaMA or Mistral config with ``mm_*`` keys;
LLaVA-1.6 adds ``image_aspect_ratio: anyres`` and ``image_grid_pinpoints``). Anything we do not
implement raises ``ValueError`` naming the field, rather than silently computing something else.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from engine import anyres

# CLIP towers named by original LLaVA checkpoints (``mm_vision_tower``): their architecture is a
# public fact, so a checkpoint that names one needs no download to be configured.
KNOWN_CLIP_TOWERS = {
    "openai/clip-vit-large-patch14-336": dict(image_size=336),
    "openai/clip-vit-large-patch14": dict(image_size=224),
}
_CLIP_L14 = dict(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, patch_size=14,
                 layer_norm_eps=1e-5, hidden_act="quick_gelu")

PROJECTOR_TYPES = ("linear", "mlp2x_gelu")
MISTRAL = ("mistral", "llava_mistral")
# transformers' LlavaNextConfig default when a llava_next config.json has no image_grid_pinpoints.
LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
SELECT_STRATEGIES = ("default", "full")


@dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """CLIP ViT tower (pre-LN, class token, learned position embeddings)."""
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    def __post_init__(self):
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ValueError(f"vision_config.hidden_act={self.hidden_act!r} is not supported "
                             "(expected 'quick_gelu' or 'gelu')")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision_config.hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"vision_config.image_size={self.image_size} is not a multiple of "
                             f"patch_size={self.patch_size}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True, kw_only=True)
class TextConfig:
    """LLaMA/Vicuna decoder (RMSNorm, RoPE, GQA, SwiGLU)."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"text_config.num_attention_heads={self.num_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"text_config.head_dim={self.head_dim} must be even for RoPE")


@dataclass(frozen=True, kw_only=True)
class LlavaConfig:
    vision: VisionConfig
    text: TextConfig
    projector_type: str = "mlp2x_gelu"
    projector_bias: bool = True
    image_token_id: int = 32000
    vision_feature_layer: tuple[int, ...] = (-2,)
    vision_feature_select_strategy: str = "default"
    # LLaVA-1.6 AnyRes: (height, width) resolutions an image may be tiled to; () = LLaVA-1.5 (one tile).
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()

    def __post_init__(self):
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector type {self.projector_type!r} is not supported (expected one of "
                             f"{PROJECTOR_TYPES})")
        if self.vision_feature_select_strategy not in SELECT_STRATEGIES:
            raise ValueError(f"vision_feature_select_strategy={self.vision_feature_select_strategy!r} is not "
                             f"supported (expected one of {SELECT_STRATEGIES})")
        n = self.vision.num_layers
        for layer in self.vision_feature_layer:
            if not -(n + 1) <= layer <= n:
                raise ValueError(f"vision_feature_layer={layer} is out of range for a {n}-layer vision tower")
        self._check_pinpoints()

    def _check_pinpoints(self) -> None:
        pins, tile = self.image_grid_pinpoints, self.vision.image_size
        if not isinstance(pins, tuple) or not all(
                isinstance(p, tuple) and len(p) == 2 and all(type(v) is int and v > 0 for v in p) for p in pins):
            raise ValueError(f"image_grid_pinpoints={pins!r} must be a tuple of (height, width) int pairs")
        bad = [p for p in pins if p[0] % tile or p[1] % tile]
        if bad:
            raise ValueError(f"image_grid_pinpoints {bad} are not multiples of the vision tower's image_size={tile}")
        if pins and self.vision_feature_select_strategy != "default":
            raise ValueError(f"image_grid_pinpoints (AnyRes) needs vision_feature_select_strategy='default', got "
                             f"{self.vision_feature_select_strategy!r} (the tile grid has no room for a CLS row)")

    @property
    def image_seq_len(self) -> int:
        """Rows each image contributes to the text sequence (576 for ViT-L/14 at 336 px)."""
        return self.vision.num_patches + (1 if self.vision_feature_select_strategy == "full" else 0)

    @property
    def anyres(self) -> bool:
        """LLaVA-1.6 AnyRes: images are tiled (see engine/anyres.py) and the model has ``image_newline``."""
        return bool(self.image_grid_pinpoints)

    def image_rows(self, height: int, width: int) -> int:
        """Placeholder rows one image of this original size expands to in the text: image_seq_len
        without AnyRes; with it the base tile, the unpadded grid and one newline row per grid row."""
        if not self.anyres:
            anyres.check_size(height, width)
            return self.image_seq_len
        v = self.vision
        return anyres.num_rows(height, width, self.image_grid_pinpoints, v.image_size, v.image_size // v.patch_size)

    def image_tiles(self, height: int, width: int) -> int:
        """Vision-tower inputs for one image of this original size: 1, or 1 base + grid tiles (AnyRes)."""
        if not self.anyres:
            anyres.check_size(height, width)
            return 1
        return anyres.num_tiles(height, width, self.image_grid_pinpoints, self.vision.image_size)

    @property
    def vision_layers_needed(self) -> int:
        """How many encoder layers must run: later layers are never computed."""
        n = self.vision.num_layers
        return max(layer % (n + 1) for layer in self.vision_feature_layer)

    @property
    def projector_in_features(self) -> int:
        return self.vision.hidden_size * len(self.vision_feature_layer)

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF ``LlavaConfig`` dict, ``LlavaNextConfig`` when AnyRes (transformers loads it unchanged).
        A ``linear`` projector is written as linear_1 + identity activation + identity linear_2 (see
        engine/weights.py)."""
        v, t = self.vision, self.text
        layer = self.vision_feature_layer
        anyres_keys = {"image_grid_pinpoints": [list(p) for p in self.image_grid_pinpoints]} if self.anyres else {}
        return {
            "architectures": ["LlavaNextForConditionalGeneration" if self.anyres else "LlavaForConditionalGeneration"],
            "model_type": "llava_next" if self.anyres else "llava",
            **anyres_keys,
            "image_token_index": self.image_token_id,
            "image_seq_length": self.image_seq_len,
            "projector_hidden_act": "gelu" if self.projector_type == "mlp2x_gelu" else "linear",
            "multimodal_projector_bias": self.projector_bias or self.projector_type == "linear",
            "vision_feature_layer": layer[0] if len(layer) == 1 else list(layer),
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "tie_word_embeddings": t.tie_word_embeddings,
            "vision_config": {
                "model_type": "clip_vision_model", "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_layers,
                "num_attention_heads": v.num_heads, "image_size": v.image_size, "patch_size": v.patch_size,
                "num_channels": v.num_channels, "layer_norm_eps": v.layer_norm_eps, "hidden_act": v.hidden_act,
            },
            "text_config": {
                "model_type": "llama", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
                "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads,
                "head_dim": t.head_dim, "rope_theta": t.rope_theta,
                "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
                "rms_norm_eps": t.rms_norm_eps, "max_position_embeddings": t.max_position_embeddings,
                "tie_word_embeddings": t.tie_word_embeddings, "hidden_act": "silu",
                "attention_bias": False, "mlp_bias": False, "bos_token_id": t.bos_token_id,
                "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id,
            },
        }

    def replace(self, **changes) -> LlavaConfig:
        """A copy with some fields changed (e.g. the ``--vision-feature-layer`` ablation)."""
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------- loading


def _require(d: dict, key: str, where: str):
    if key not in d:
        raise ValueError(f"{where}: required field {key!r} is missing")
    return d[key]


def _expect(d: dict, key: str, allowed: tuple, where: str, default=None):
    value = d.get(key, default)
    if value not in allowed:
        raise ValueError(f"{where}: {key}={value!r} is not supported (expected one of {allowed})")
    return value


def _rope_theta(d: dict, where: str) -> float:
    """v4 writes ``rope_theta`` (+ ``rope_scaling``); v5 writes ``rope_parameters``."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"{where}: rope_parameters.rope_type={rope_type!r} is not supported (only 'default')")
    if scaling:
        raise ValueError(f"{where}: rope_scaling={scaling!r} is not supported")
    return float(params.get("rope_theta", d.get("rope_theta", 10000.0)))


def text_config_from_dict(d: dict, where: str = "text_config") -> TextConfig:
    """A LLaMA ``config.json`` dict (or an HF llava ``text_config``) → TextConfig.

    Mistral (``mistral``, upstream's ``llava_mistral``) is LLaMA when its sliding window covers every
    position (``sliding_window`` null or ≥ max_position_embeddings); another window is a ValueError.
    """
    kind = _expect(d, "model_type", ("llama", "llava_llama", "mistral", "llava_mistral", None), where,
                   default="llama")
    if kind in MISTRAL:
        # transformers' MistralConfig defaults: sliding_window 4096, max_position_embeddings 131072.
        window, positions = d.get("sliding_window", 4096), d.get("max_position_embeddings", 4096 * 32)
        if window is not None and window < positions:
            raise ValueError(f"{where}: model_type={kind!r} with sliding_window={window} < max_position_embeddings="
                             f"{positions} is not supported (only a window covering every position, or null, "
                             f"which makes Mistral a LLaMA)")
    _expect(d, "hidden_act", ("silu",), where, default="silu")
    _expect(d, "attention_bias", (False,), where, default=False)
    _expect(d, "mlp_bias", (False,), where, default=False)
    if d.get("pretraining_tp", 1) != 1:
        raise ValueError(f"{where}: pretraining_tp={d['pretraining_tp']} is not supported (expected 1)")
    hidden = int(_require(d, "hidden_size", where))
    heads = int(_require(d, "num_attention_heads", where))
    eos = d.get("eos_token_id", 2)
    if isinstance(eos, list):
        eos = eos[0]
    return TextConfig(
        vocab_size=int(_require(d, "vocab_size", where)), hidden_size=hidden,
        intermediate_size=int(_require(d, "intermediate_size", where)),
        num_layers=int(_require(d, "num_hidden_layers", where)), num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=int(d.get("head_dim") or hidden // heads), rope_theta=_rope_theta(d, where),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(d.get("max_position_embeddings", 4096 * 32 if kind in MISTRAL else 4096)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        bos_token_id=d.get("bos_token_id", 1), eos_token_id=eos, pad_token_id=d.get("pad_token_id"),
    )


def vision_config_from_dict(d: dict, where: str = "vision_config") -> VisionConfig:
    """A CLIP vision config dict (``clip_vision_model``, or a full ``clip`` config) → VisionConfig."""
    if d.get("model_type") == "clip":
        d = _require(d, "vision_config", where)
        where = f"{where}.vision_config"
    _expect(d, "model_type", ("clip_vision_model", None), where, default="clip_vision_model")
    return VisionConfig(
        hidden_size=int(d.get("hidden_size", 768)), intermediate_size=int(d.get("intermediate_size", 3072)),
        num_layers=int(d.get("num_hidden_layers", 12)), num_heads=int(d.get("num_attention_heads", 12)),
        image_size=int(d.get("image_size", 224)), patch_size=int(d.get("patch_size", 32)),
        num_channels=int(d.get("num_channels", 3)), layer_norm_eps=float(d.get("layer_norm_eps", 1e-5)),
        hidden_act=str(d.get("hidden_act", "quick_gelu")),
    )


def _feature_layers(value, where: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise ValueError(f"{where}: vision_feature_layer={value!r} must be an int or a non-empty list of ints")


def _pinpoints(value, where: str, *, swap: bool = False) -> tuple[tuple[int, int], ...]:
    """A JSON list of [a, b] pairs → ((height, width), ...); ``swap``: the pairs are (width, height)."""
    if not isinstance(value, list) or not value or not all(
            isinstance(p, list) and len(p) == 2 and all(type(v) is int for v in p) for p in value):
        raise ValueError(f"{where}: image_grid_pinpoints={value!r} must be a non-empty list of [int, int] pairs")
    return tuple((b, a) if swap else (a, b) for a, b in value)


# transformers' LlamaConfig / MistralConfig defaults. A transformers-4.x ``text_config`` holds only the
# fields that differ from them (llava-hf's llava-v1.6-mistral-7b-hf has no hidden_size), so the
# missing ones are these; other keys keep text_config_from_dict's defaults.
_HF_TEXT_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096 * 32,
                    sliding_window=4096),
}


def _from_hf_llava(d: dict, where: str) -> LlavaConfig:
    act = _expect(d, "projector_hidden_act", ("gelu", "linear"), where, default="gelu")
    strategy = _expect(d, "vision_feature_select_strategy", SELECT_STRATEGIES, where, default="default")
    text_d = dict(_require(d, "text_config", where))
    text_d = {**_HF_TEXT_DEFAULTS.get(text_d.get("model_type", "llama"), {}), **text_d}
    # The top-level flag wins over the text config's (transformers does the same).
    tie = bool(d.get("tie_word_embeddings", False) or text_d.get("tie_word_embeddings", False))
    text_d["tie_word_embeddings"] = tie
    image_token = d.get("image_token_index", d.get("image_token_id"))
    if image_token is None:
        raise ValueError(f"{where}: neither image_token_index nor image_token_id is set")
    return LlavaConfig(
        vision=vision_config_from_dict(_require(d, "vision_config", where), f"{where}: vision_config"),
        text=text_config_from_dict(text_d, f"{where}: text_config"),
        # An identity activation means two stacked linears: the weight loader folds them into one.
        projector_type="mlp2x_gelu" if act == "gelu" else "linear",
        projector_bias=bool(d.get("multimodal_projector_bias", True)),
        image_token_id=int(image_token),
        vision_feature_layer=_feature_layers(d.get("vision_feature_layer", -2), where),
        vision_feature_select_strategy=strategy,
        image_grid_pinpoints=(_pinpoints(d.get("image_grid_pinpoints") or [list(p) for p in LLAVA_NEXT_PINPOINTS],
                                         where) if d.get("model_type") == "llava_next" else ()),
    )


def _from_original_llava(d: dict, where: str, vision: VisionConfig | None) -> LlavaConfig:
    tower = _require(d, "mm_vision_tower", where)
    if vision is None:
        if os.path.isfile(os.path.join(str(tower), "config.json")):
            vision = vision_config_from_dir(str(tower))
        elif tower in KNOWN_CLIP_TOWERS:
            vision = VisionConfig(**_CLIP_L14, **KNOWN_CLIP_TOWERS[tower])
        else:
            raise ValueError(f"{where}: mm_vision_tower={tower!r} is neither a local CLIP directory nor one of "
                             f"{sorted(KNOWN_CLIP_TOWERS)}; pass the tower's config explicitly")
    if d.get("mm_use_im_start_end", False):
        raise ValueError(f"{where}: mm_use_im_start_end=True is not supported")
    select = _expect(d, "mm_vision_select_feature", ("patch", "cls_patch"), where, default="patch")
    projector = _expect(d, "mm_projector_type", PROJECTOR_TYPES, where, default="linear")
    mm_hidden = d.get("mm_hidden_size", vision.hidden_size)
    if mm_hidden != vision.hidden_size:
        raise ValueError(f"{where}: mm_hidden_size={mm_hidden} does not match the vision tower's hidden_size="
                         f"{vision.hidden_size}")
    aspect = d.get("image_aspect_ratio")
    if isinstance(aspect, str) and aspect.startswith("anyres") and aspect != "anyres":
        raise ValueError(f"{where}: image_aspect_ratio={aspect!r} is not supported (only 'anyres', 'pad')")
    pinpoints = ()
    if aspect == "anyres":
        _expect(d, "mm_patch_merge_type", ("spatial_unpad",), where, default="flat")
        # Upstream LLaVA-1.6 reads each pinpoint as (width, height) (mm_utils.select_best_resolution);
        # transformers' llava_next as (height, width): swapped here so the grid is upstream's.
        pinpoints = _pinpoints(d.get("image_grid_pinpoints"), where, swap=True)
    text = text_config_from_dict(d, where)
    return LlavaConfig(
        vision=vision, text=text, projector_type=projector, projector_bias=True,
        # Upstream splices images at a sentinel id (-200) that is not in the vocabulary; we give the
        # placeholder the first id past the vocabulary instead: the scatter never reads its embedding.
        image_token_id=int(d.get("image_token_index", text.vocab_size)),
        vision_feature_layer=(int(d.get("mm_vision_select_layer", -2)),),
        vision_feature_select_strategy="default" if select == "patch" else "full",
        image_grid_pinpoints=pinpoints,
    )


def config_from_dict(d: dict, where: str = "config.json", *, vision: VisionConfig | None = None) -> LlavaConfig:
    """Either layout of LLaVA config dict → LlavaConfig (see module docstring)."""
    if is_original_llava(d) or d.get("model_type") in ("llava", "llava_next"):
        try:
            return _from_original_llava(d, where, vision) if is_original_llava(d) else _from_hf_llava(d, where)
        except ValueError as err:  # the dataclasses' own checks do not know the file: name it
            if str(err).startswith(where):
                raise
            raise ValueError(f"{where}: {err}") from None
    raise ValueError(f"{where}: model_type={d.get('model_type')!r} is neither an HF llava / llava_next config "
                     "nor an original LLaVA config (no mm_vision_tower)")


def is_original_llava(d: dict) -> bool:
    """Whether a config dict is an original LLaVA one (a LLaMA config with ``mm_*`` keys)."""
    return "mm_vision_tower" in d or "mm_projector_type" in d


def read_config_json(path: str) -> tuple[str, dict]:
    """``(file, dict)`` of ``path/config.json`` (or of ``path`` itself when it is a file).

    Raises FileNotFoundError when there is no such file, ValueError when it is not valid JSON.
    """
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no config.json at {path}")
    try:
        with open(file) as f:
            return file, json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e


def vision_config_from_dir(path: str) -> VisionConfig:
    """A CLIP directory's (or ``config.json`` file's) vision config (see ``read_config_json``)."""
    file, d = read_config_json(path)
    return vision_config_from_dict(d, file)


def from_hf(path: str, *, vision: VisionConfig | None = None) -> LlavaConfig:
    """Read ``path/config.json`` (or ``path`` itself when it is a file)."""
    file, d = read_config_json(path)
    return config_from_dict(d, file, vision=vision)


def tiny_config(*, vocab_size: int = 256, image_size: int = 28, patch_size: int = 14,
                projector_type: str = "mlp2x_gelu", image_token_id: int | None = None, **text) -> LlavaConfig:
    """A tiny random-initialisable LLaVA for tests and the embedded default (no download)."""
    text_kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=16, max_position_embeddings=2048)
    text_kw.update(text)
    return LlavaConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                            image_size=image_size, patch_size=patch_size),
        text=TextConfig(**text_kw), projector_type=projector_type,
        image_token_id=vocab_size - 1 if image_token_id is None else image_token_id,
    )
