"""LoRA adapters on our ``Llava``: injected by PEFT, saved and read in PEFT's own format.

PEFT (``peft.inject_adapter_in_model``) wraps the chosen decoder linears of our model in its
``lora.Linear`` (``base_layer`` + ``lora_A``/``lora_B`` + dropout + scaling): its forward, init
(A Kaiming-uniform, B zero, so step 0 is the base model exactly), merge and dropout are PEFT's, not
ours. What PEFT cannot know is our module names, so this module holds the mapping to the names PEFT
writes for transformers' ``LlavaForConditionalGeneration``:

    adapter dir
      adapter_config.json         PEFT's LoraConfig (written by PEFT): r, lora_alpha, target_modules
                                  (a regex over the HF decoder linears), modules_to_save=[multi_modal_projector]
      adapter_model.safetensors   base_model.model.model.language_model.layers.{i}.self_attn.q_proj.lora_A.weight …
                                  base_model.model.model.multi_modal_projector.linear_{1,2}.{weight,bias}
      base_config.json            the base model's HF config.json (ours: refuse an adapter on another base)

so ``peft.PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(base), dir)`` restores
adapters and the trained projector (PEFT's ``modules_to_save`` convention), and ``engine.load(base,
adapter=dir)`` serves it unmerged. The vision tower never gets adapters.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

# our short name → (path inside a decoder block, HF path inside a LlamaDecoderLayer)
TARGETS = {"q": ("attn.q", "self_attn.q_proj"), "k": ("attn.k", "self_attn.k_proj"),
           "v": ("attn.v", "self_attn.v_proj"), "o": ("attn.o", "self_attn.o_proj"),
           "gate": ("mlp.gate", "mlp.gate_proj"), "up": ("mlp.up", "mlp.up_proj"),
           "down": ("mlp.down", "mlp.down_proj")}
HF_PREFIX = "base_model.model."          # PeftModel(LlavaForConditionalGeneration): base_model (LoraModel).model
ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_CONFIG = "adapter_config.json", "adapter_model.safetensors", "base_config.json"


@dataclass(frozen=True, kw_only=True)
class LoraSettings:
    """Upstream LLaVA's ``finetune_lora.sh`` defaults; ``targets`` are our short names (all decoder linears)."""
    r: int = 128
    alpha: float = 256.0
    dropout: float = 0.05
    targets: tuple[str, ...] = tuple(TARGETS)

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"--lora-r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"--lora-alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"--lora-targets {list(self.targets)}: {unknown or 'none given'} match no decoder "
                             f"linear; choose from {list(TARGETS)}")


def _regex(targets, *, hf: bool) -> str:
    """A PEFT ``target_modules`` regex (PEFT full-matches it against module names) for ``targets`` in the
    decoder only: the vision tower's q/k/v must not match on the HF side."""
    alts = "|".join(re.escape(TARGETS[t][1 if hf else 0]) for t in sorted(targets))
    return (r".*language_model(\.model)?\.layers\.\d+\." if hf else r"decoder\.layers\.\d+\.") + f"({alts})"


def is_lora_layer(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer
    return isinstance(module, LoraLayer)


def has_lora(model: nn.Module) -> bool:
    return any(is_lora_layer(m) for m in model.modules())


def add_lora(model: nn.Module, settings: LoraSettings, *, base: str | None = None) -> None:
    """Wrap ``settings.targets`` of every decoder layer in PEFT LoRA layers (adapter name ``default``,
    A drawn from the torch RNG, B zero) and mark trainable exactly the adapters and the projector.
    Parameter names gain ``.base_layer`` / ``.lora_A.default`` / ``.lora_B.default``. ``base``: the
    checkpoint directory of the base weights, recorded in the adapters saved from this model."""
    from peft import LoraConfig, inject_adapter_in_model
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters")
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=_regex(settings.targets, hf=False))
    try:
        inject_adapter_in_model(config, model)
    except ValueError as e:   # PEFT: "Target modules ... not found in the base model"
        raise ValueError(f"--lora-targets {list(settings.targets)} match no module of the model: {e}") from e
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("projector.") or ".lora_" in name)
    model.lora, model.lora_base = settings, base


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Our module name (``decoder.layers.{i}.attn.q``) → its PEFT LoRA layer."""
    return {name: m for name, m in model.named_modules() if is_lora_layer(m)}


# --------------------------------------------------------------------------- HF key names


def _to_v5(key: str) -> str:
    """A v4 HF llava key (what ``to_hf_state`` writes) → transformers 5's module path, which PEFT uses."""
    for old, new in (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                     ("multi_modal_projector.", "model.multi_modal_projector."),
                     ("vision_tower.", "model.vision_tower.")):
        if key.startswith(old):
            return new + key[len(old):]
    raise AssertionError(key)


def adapter_state(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """The adapters and the projector of a LoRA model's state dict (our names) under the keys PEFT writes
    for ``LlavaForConditionalGeneration`` (see the module docstring)."""
    from engine.weights import to_hf_state
    out = {}
    for key, t in state.items():
        m = re.fullmatch(r"(.*)\.(lora_[AB])\.default\.weight", key)
        if m:
            (hf,) = to_hf_state({m.group(1) + ".weight": t}, config)     # our base weight name → HF
            out[HF_PREFIX + _to_v5(hf).removesuffix(".weight") + f".{m.group(2)}.weight"] = t.detach().contiguous()
    proj = {k: v for k, v in state.items() if k.startswith("projector.")}
    out.update({HF_PREFIX + _to_v5(k): v for k, v in to_hf_state(proj, config).items()})
    return {k: v.cpu() for k, v in out.items()}


def save_adapter(state: dict[str, torch.Tensor], config, settings: LoraSettings, out_dir: str, *,
                 base: str | None, tokenizer_dir: str | None = None, extra_files: dict[str, str] | None = None) -> None:
    """Write a LoRA model's state (our names, full tensors) as a PEFT adapter directory, atomically.
    ``base``: the base checkpoint directory (``base_model_name_or_path``)."""
    from peft import LoraConfig

    from engine.weights import atomic_dir, write_tokenizer_files
    tensors = adapter_state(state, config)
    peft_config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                             target_modules=_regex(settings.targets, hf=True),
                             modules_to_save=["multi_modal_projector"],
                             base_model_name_or_path=os.path.abspath(base) if base else None)

    def write(tmp: str) -> None:
        peft_config.save_pretrained(tmp)
        save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(tmp, BASE_CONFIG), "w") as f:
            json.dump(config.to_hf_dict(), f, indent=2)
        if tokenizer_dir:
            write_tokenizer_files(tokenizer_dir, tmp)
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)

    atomic_dir(out_dir, write)


# --------------------------------------------------------------------------- reading an adapter


def read_adapter(path: str) -> tuple[LoraSettings, dict[str, torch.Tensor], dict | None]:
    """An adapter directory → (settings, tensors under our names, the base's HF config or None).

    Accepts what PEFT writes for ``LlavaForConditionalGeneration`` (plain LoRA: no DoRA, rsLoRA, per-module
    ranks or adapter biases); anything else is a ValueError naming the field."""
    from engine.weights import HF_LLAVA, rename
    cfg_file, weights_file = os.path.join(path, ADAPTER_CONFIG), os.path.join(path, ADAPTER_WEIGHTS)
    for f in (cfg_file, weights_file):
        if not os.path.isfile(f):
            raise FileNotFoundError(f"adapter {path}: no {os.path.basename(f)}")
    with open(cfg_file) as f:
        raw = json.load(f)
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_file}: peft_type {raw.get('peft_type')!r} is not LORA")
    for field in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform",
                  "trainable_token_indices", "target_parameters"):
        if raw.get(field):
            raise ValueError(f"{cfg_file}: {field}={raw[field]!r} is not supported")
    if raw.get("bias", "none") != "none" or raw.get("lora_bias"):
        raise ValueError(f"{cfg_file}: adapter biases are not supported")
    with safe_open(weights_file, framework="pt") as f:
        hf = {k: f.get_tensor(k) for k in f.keys()}
    ours, targets, unknown = {}, set(), []
    hf_to_short = {v[1]: k for k, v in TARGETS.items()}
    for key, t in hf.items():
        k = key.removeprefix(HF_PREFIX)
        m = re.fullmatch(r"(.*\.layers\.\d+\.)((?:self_attn|mlp)\.\w+)\.(lora_[AB])\.weight", k)
        if m and m.group(2) in hf_to_short:
            (name,) = rename({m.group(1) + m.group(2) + ".weight": t}, HF_LLAVA, weights_file)
            ours[name.removesuffix(".weight") + f".{m.group(3)}.default.weight"] = t
            targets.add(hf_to_short[m.group(2)])
        elif "multi_modal_projector." in k:
            ours.update(rename({k: t}, HF_LLAVA, weights_file))
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{weights_file}: keys that are neither decoder LoRA weights nor the projector: "
                         f"{sorted(unknown)[:10]}")
    if not targets:
        raise ValueError(f"{weights_file}: holds no decoder LoRA weights")
    settings = LoraSettings(r=int(raw["r"]), alpha=float(raw["lora_alpha"]), dropout=0.0,
                            targets=tuple(t for t in TARGETS if t in targets))
    base_cfg = os.path.join(path, BASE_CONFIG)
    base = None
    if os.path.isfile(base_cfg):
        with open(base_cfg) as f:
            base = json.load(f)
    return settings, ours, base


_DTYPE_KEYS = ("dtype", "torch_dtype", "transformers_version")


def check_base(model, base: dict | None, where: str) -> None:
    """Raise ValueError when the adapter was trained on a base whose config differs from ``model``'s."""
    if base is None:
        return
    have = {k: v for k, v in model.config.to_hf_dict().items() if k not in _DTYPE_KEYS}
    want = {k: v for k, v in base.items() if k not in _DTYPE_KEYS}
    if have != want:
        diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        raise ValueError(f"adapter {where} was trained on a different base model: config fields {diff} differ "
                         f"(adapter's {[want.get(k) for k in diff]}, the loaded base's {[have.get(k) for k in diff]})")


def apply_adapter(model, path: str, *, base: str | None = None) -> None:
    """Add the adapter directory ``path`` to ``model`` (a loaded base, from directory ``base``), unmerged,
    in the model's dtype, frozen."""
    from engine.weights import fold_identity_projector
    settings, state, base_config = read_adapter(path)
    check_base(model, base_config, path)
    add_lora(model, settings, base=base)
    if model.config.projector_type == "linear":
        state = fold_identity_projector(state, model.config)
    own = model.state_dict()
    expected = {k for k in own if ".lora_" in k} | {k for k in own if k.startswith("projector.")}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"adapter {path}: missing {missing[:10]} ({len(missing)}), unexpected {unexpected[:10]} "
                         f"({len(unexpected)}) for the loaded base")
    with torch.no_grad():
        for k, v in state.items():
            if v.shape != own[k].shape:
                raise ValueError(f"adapter {path}: {k} has shape {tuple(v.shape)}, the base implies "
                                 f"{tuple(own[k].shape)}")
            own[k].copy_(v)
    model.requires_grad_(False)


def merge_lora(model) -> None:
    """Fold every adapter into its base weight (PEFT's merge) and put the plain ``nn.Linear`` back:
    the model's state dict is the base layout again."""
    for name, layer in lora_layers(model).items():
        layer.merge(safe_merge=True)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.get_base_layer())
    model.lora = model.lora_base = None


# --------------------------------------------------------------------------- QLoRA: a 4-bit NF4 base


def _to_nf4():
    """torchao's NF4 constructor (the module moved between torchao releases)."""
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    except ImportError:
        from torchao.dtypes.nf4tensor import to_nf4
    return to_nf4


def quantize_base_nf4(model, *, dtype: torch.dtype = torch.bfloat16, block_size: int = 64,
                      scaler_block_size: int = 256) -> int:
    """QLoRA's frozen base: the weight of every decoder linear (q, k, v, o, gate, up, down; the ones LoRA
    wraps are their base layers) becomes a torchao ``NF4Tensor`` (4-bit NormalFloat, per-``block_size``
    scales, double-quantized per ``scaler_block_size``), quantized from ``dtype``. The linear modules stay
    ``nn.Linear``: ``F.linear`` on an NF4 weight dequantizes it to the input's dtype (in a backward too),
    and NF4 weights never require grad. Returns the number of weights quantized. The embedding, head,
    norms, projector and vision tower keep their dtype (QLoRA quantizes the LLM's linears)."""
    to_nf4 = _to_nf4()
    n = 0
    for layer in model.decoder.layers:
        for path, _ in TARGETS.values():
            linear = layer.get_submodule(path)
            linear = linear.get_base_layer() if is_lora_layer(linear) else linear
            w = linear.weight
            if w.requires_grad:
                raise ValueError(f"quantize_base_nf4: {path} of layer {layer.index} trains; only a frozen base "
                                 f"is quantized (add the adapters first)")
            if w.numel() % (block_size * scaler_block_size):
                raise ValueError(f"quantize_base_nf4: {path} weight {tuple(w.shape)} is not a multiple of "
                                 f"block_size × scaler_block_size = {block_size * scaler_block_size} elements")
            linear.weight = nn.Parameter(to_nf4(w.detach().to(dtype), block_size, scaler_block_size),
                                         requires_grad=False)
            n += 1
    return n
