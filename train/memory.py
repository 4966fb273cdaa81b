"""The memory plan: what one rank will hold during a training step, before anything is allocated.

Letters: N parameter counts (all / trainable), W ranks, T tokens of one micro-batch, L decoder
layers, D width, Dq = H·Dh query width, Dkv key/value width, F MLP width, V vocab.

Per rank, in bytes (``c``: the compute dtype's size, 4 in fp32, 2 in bf16; ``r``: the residual
stream's, 4 in fp32 and under autocast, 2 under FSDP2's bf16 MixedPrecisionPolicy):

- parameters  4·N_train / W + (2 or 4)·N_frozen / W  fp32 masters; frozen weights bf16 under the policy
- gradients   4·N_train / W     only what trains
- optimizer   8·N_train / W     AdamW exp_avg + exp_avg_sq
- gathered    (W > 1) FSDP2's unsharded units, bf16 under the policy: the root unit (tower, projector, embedding, head)
              stays gathered from forward to backward, plus two decoder blocks (current + prefetch)
- weight copies  (bf16 autocast) autocast's bf16 casts of the weights, saved for backward: every
              decoder layer (one, with checkpointing) + the head
- activations saved for backward; per token and layer (``_layer_bytes``): each RMSNorm keeps its
              fp32 input, 1/rms, normalised input (r·D) plus the linear's input (c·D); attention keeps
              q, k, v and the output (k, v repeated to H heads by the reference ``sdpa`` path, which
              also keeps a copy of the output for ``o``) and the fp32 log-sum-exp; the SwiGLU MLP
              keeps gate, up, silu(gate) and the product (4·c·F). With checkpointing each layer keeps
              only its input (r·D) and one layer is recomputed at a time (``recompute``)
- loss        the masked loss: the reference (``torch``) backend builds fp32 [T, V] logits, their
              log-softmax and the per-sequence pass (3·4·T·V); the fused kernels keep their grads
              of the hidden states and the head (c·(T + V)·D)
- images      (``image_bytes``) the micro-batch's K tiles (fp32 [K, 3, S, S], alive the whole step)
              and what the projector keeps for backward over its K·P rows: its input (c·Dv, times
              the selected layers) and, for ``mlp2x_gelu``, the GELU's input (c·D; the reference
              backend also keeps its output)
- vision tower  (``vision_bytes``) the frozen tower's forward (no grad), before the projector or any
              decoder layer has kept anything: the K tiles and, per row of its K·(P+1), the widest
              point of a layer: its input and the attention's residual sum (r·Dv each), the MLP's
              Fv-wide output and activation temporaries (3 with quick_gelu, 2 with gelu; c each),
              plus any earlier selected layer when several are. The attention (at most ~8·Dv a row)
              is narrower whenever Fv >= 2·Dv, as in every CLIP. Only the selected hidden states
              are kept (engine/vision.py)
- optimizer step temps  AdamW's temporaries (``plan_memory``)
- reduce-scatter temps  (W > 1) at the end of the backward: the largest unit's unsharded gradients
              and their fp32 reduce-scatter input

Peak = parameters + optimizer + gathered + max(vision tower, images + activations + weight copies +
max(loss, recompute), gradients + max(optimizer step temps, reduce-scatter temps)): the loss's
forward and backward run with every saved activation alive; then the saved activations are freed
layer by layer as the gradients appear, so their sum peaks at one end of the backward or the other.
Not modelled: allocator fragmentation and the CUDA context (``headroom`` covers them).

K, the tiles per micro-batch, comes from the config unless given (the plan sees no image sizes):
``worst_case_images`` fills the T tokens with image rows only, T // R images of R rows each; with
AnyRes, of the pinpoint resolution whose images give the most tiles (an image of exactly that size:
1 + grid tiles, no unpadding). Images that unpad to fewer rows (far from every pinpoint's aspect) pack
more tiles than that, at the extreme (an image a pixel high keeps no grid row) 1 + grid tiles per P
rows: LLaVA-NeXT's pinpoints at 8192 tokens plan 12 tiles, such images would bring 56 (a 7B on 8 ranks,
fused kernels: the tower's forward 0.93 GiB instead of 0.20, kept 0.38 instead of 0.08, peak 57.8
instead of 57.5 GiB). Text rows bring fewer. A run without images plans K = 0.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

GiB = 2**30


@dataclass(frozen=True, kw_only=True)
class MemoryPlan:
    world: int
    tokens: int
    grad_checkpointing: bool
    compute_bytes: int
    parameters: int
    gradients: int
    optimizer: int
    gathered: int
    weight_copies: int
    activations: int
    recompute: int
    loss: int
    step_workspace: int
    reduce_scatter: int = 0
    images: int = 0
    vision: int = 0
    tiles: int = 0
    tiles_note: str = "no images"
    capacity: int | None
    headroom: float = 0.9

    @property
    def peak(self) -> int:
        # the loss's workspace is gone before checkpointing recomputes the first layer
        saved = self.images + self.activations + self.weight_copies
        transient = max(self.vision, saved + max(self.loss, self.recompute),
                        self.gradients + max(self.step_workspace, self.reduce_scatter))
        return self.parameters + self.optimizer + self.gathered + transient

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.peak <= self.headroom * self.capacity

    def report(self) -> str:
        rows = [("parameters", self.parameters), ("gradients", self.gradients), ("optimizer", self.optimizer),
                ("FSDP gathered", self.gathered), ("bf16 weight copies", self.weight_copies),
                ("images", self.images), ("vision tower fwd", self.vision),
                ("activations", self.activations), ("recomputed layer", self.recompute),
                ("loss workspace", self.loss), ("optimizer step temps", self.step_workspace),
                ("reduce-scatter temps", self.reduce_scatter),
                ("peak", self.peak)]
        head = (f"memory plan per rank ({self.world} rank{'s' if self.world > 1 else ''}, {self.tokens} tokens per "
                f"micro-batch, checkpointing {'on' if self.grad_checkpointing else 'off'}):")
        lines = [head, f"  images: {self.tiles} tower tiles per micro-batch ({self.tiles_note})"]
        lines += [f"  {name:<20} {b / GiB:9.2f} GiB" for name, b in rows]
        if self.capacity is not None:
            lines.append(f"  {'device capacity':<20} {self.capacity / GiB:9.2f} GiB "
                         f"({'fits' if self.fits else 'DOES NOT FIT'} in {self.headroom:.0%} of it)")
        return "\n".join(lines)


def parameter_counts(config, stage: int) -> dict[str, int]:
    """Exact parameter counts of ``config`` by part, from a model built on the meta device (no memory)."""
    from engine.model import Llava
    with torch.device("meta"):
        model = Llava(config)
    counts = {"all": 0, "trainable": 0, "root": 0, "root_trainable": 0, "block": 0, "largest": 0}
    for name, p in model.named_parameters():
        counts["all"] += p.numel()
        trains = name.startswith("projector.") or (stage == 2 and (name.startswith("decoder.")
                                                                   or name == "image_newline"))
        counts["trainable"] += p.numel() if trains else 0
        counts["largest"] = max(counts["largest"], p.numel() if trains else 0)
        if name.startswith("decoder.layers."):
            counts["block"] += p.numel() if name.startswith("decoder.layers.0.") else 0
        else:
            counts["root"] += p.numel()
            counts["root_trainable"] += p.numel() if trains else 0
    counts["head"] = config.text.vocab_size * config.text.hidden_size
    return counts


def _stored_bytes(p: torch.Tensor) -> int:
    """Bytes a parameter holds: its elements, or for a tensor subclass (a 4-bit NF4 weight) its inner tensors."""
    if type(p.data) is torch.Tensor:
        return p.numel() * p.element_size()
    inner, _ = p.data.__tensor_flatten__()
    return sum(_stored_bytes(getattr(p.data, name)) for name in inner)


def model_parameter_counts(model) -> dict[str, int]:
    """``parameter_counts`` of a built model as it is (what requires grad, LoRA adapters included), plus
    ``frozen_bytes``: what its frozen parameters hold (a quantized base: its packed size)."""
    counts = {"all": 0, "trainable": 0, "root": 0, "root_trainable": 0, "block": 0, "largest": 0, "frozen_bytes": 0}
    for name, p in model.named_parameters():
        n, trains = p.numel(), p.requires_grad
        counts["all"] += n
        counts["trainable"] += n if trains else 0
        counts["largest"] = max(counts["largest"], n if trains else 0)
        counts["frozen_bytes"] += 0 if trains else _stored_bytes(p)
        if name.startswith("decoder.layers."):
            counts["block"] += n if name.startswith("decoder.layers.0.") else 0
        else:
            counts["root"] += n
            counts["root_trainable"] += n if trains else 0
    counts["head"] = model.config.text.vocab_size * model.config.text.hidden_size
    return counts


def _norm_bytes(d: int, c: int, r: int) -> int:
    """One RMSNorm per token: its fp32 input (x itself when the residual is fp32, else an fp32 copy),
    1/rms, the normalised input in the residual's dtype (kept for the weight's grad) and the output
    in the compute dtype (kept by the next linear)."""
    return 4 * d + 4 + r * d + c * d


def _layer_bytes(text, c: int, r: int, kv_repeated: bool) -> int:
    """Bytes one decoder layer saves for backward per token (see the module docstring)."""
    d, f = text.hidden_size, text.intermediate_size
    dq, dkv = text.num_heads * text.head_dim, text.num_kv_heads * text.head_dim
    norms = 2 * _norm_bytes(d, c, r)
    kv = dq if kv_repeated else dkv
    attention = c * (dq + 2 * kv + dq + (dq if kv_repeated else 0)) + 4 * text.num_heads
    return norms + attention + 4 * c * f


def _lora_layer_bytes(text, lora, c: int, r: int) -> int:
    """Bytes PEFT's LoRA layers (engine/lora.py) add per token and decoder layer: every target keeps lora_A's
    output (c·rank) for lora_B; with dropout each also keeps its dropped-out input and the dropout mask
    (1 byte an element), the input being a norm's output (the residual's dtype, r) for q/k/v/gate/up and
    c-typed for o and down, plus lora_A's low-precision copy of it when those differ (autocast)."""
    d, f, dq = text.hidden_size, text.intermediate_size, text.num_heads * text.head_dim
    inputs = {"q": (d, r), "k": (d, r), "v": (d, r), "gate": (d, r), "up": (d, r), "o": (dq, c), "down": (f, c)}
    kept = 0
    if lora.dropout > 0:
        for t in lora.targets:
            width, nbytes = inputs[t]
            kept += (nbytes + 1 + (c if nbytes != c else 0)) * width
    return kept + c * lora.r * len(lora.targets)


def worst_case_images(config, tokens: int) -> tuple[int, tuple[int, int]]:
    """(N, (height, width)): the images the plan assumes in a micro-batch of ``tokens`` tokens holding image
    rows only (module docstring): N = tokens // rows of one image of that size, at least one (a sample longer
    than the budget gets a micro-batch alone); with AnyRes the pinpoint size whose N images have the most
    tiles (the first on a tie), else the tower's own size."""
    v = config.vision
    sizes = config.image_grid_pinpoints or ((v.image_size, v.image_size),)
    fills = [(max(1, tokens // config.image_rows(h, w)), (h, w)) for h, w in sizes]
    return max(fills, key=lambda f: f[0] * config.image_tiles(*f[1]))


def _pixel_bytes(config, tiles: int) -> int:
    """The micro-batch's tiles: fp32 [K, 3, S, S], alive for the whole micro-batch."""
    v = config.vision
    return tiles * 4 * v.num_channels * v.image_size ** 2


def image_bytes(config, tiles: int, c: int, *, fused_projector: bool) -> int:
    """What a micro-batch's ``tiles`` keep through the loss: the pixels and the projector's saved activations
    over its tiles × image_seq_len rows (module docstring)."""
    kept = config.projector_in_features
    if config.projector_type == "mlp2x_gelu":
        kept += config.text.hidden_size * (1 if fused_projector else 2)
    return _pixel_bytes(config, tiles) + tiles * config.image_seq_len * c * kept


def vision_bytes(config, tiles: int, c: int, r: int) -> int:
    """The pixels and the frozen tower's forward working set for ``tiles`` tiles (module docstring)."""
    v = config.vision
    mlp = (3 if v.hidden_act == "quick_gelu" else 2) * v.intermediate_size
    earlier = len(config.vision_feature_layer) - 1        # selected states kept while later layers run
    return _pixel_bytes(config, tiles) + tiles * (v.num_patches + 1) * (r * v.hidden_size * (2 + earlier) + c * mlp)


PRECISIONS = ("fp32", "autocast", "fsdp_bf16")


def plan_memory(config, *, stage: int, world: int, tokens: int, grad_checkpointing: bool, precision: str,
                kv_repeated: bool, fused_loss: bool, foreach_optimizer: bool, capacity: int | None,
                counts: dict[str, int] | None = None, lora=None, tiles: int | None = None,
                fused_projector: bool = False) -> MemoryPlan:
    """The plan for one rank (module docstring). ``tokens``: packed tokens per micro-batch; ``tiles``: vision
    tower inputs per micro-batch (None: the worst case of ``worst_case_images``; 0: text only).

    ``precision``: ``fp32`` (the CPU), ``autocast`` (one GPU process: fp32 weights and residual
    stream, bf16 GEMMs) or ``fsdp_bf16`` (several GPU ranks: FSDP2's MixedPrecisionPolicy, bf16
    compute and residual stream, fp32 masters for what trains, frozen weights stored in bf16).
    ``counts``: a built model's ``model_parameter_counts`` instead of the stage's (LoRA, a quantized base);
    ``lora``: its ``engine.lora.LoraSettings`` (the adapters' activations). ``fused_projector``: the
    projector runs our kernel (keeps the GELU's input only).
    """
    if world < 1 or tokens < 1:
        raise ValueError(f"plan_memory: world={world} and tokens={tokens} must be >= 1")
    if tiles is not None and tiles < 0:
        raise ValueError(f"plan_memory: tiles={tiles} must be >= 0")
    if precision not in PRECISIONS:
        raise ValueError(f"plan_memory: precision {precision!r} is not one of {PRECISIONS}")
    n = counts or parameter_counts(config, stage)
    text = config.text
    c = 4 if precision == "fp32" else 2
    r = 2 if precision == "fsdp_bf16" else 4          # the residual stream's bytes
    layers = text.num_layers
    per_layer = _layer_bytes(text, c, r, kv_repeated)
    final = _norm_bytes(text.hidden_size, c, r)
    if lora is not None:   # frozen norm weights: no normalised input kept for their grads; the adapters' own
        per_layer += _lora_layer_bytes(text, lora, c, r) - 2 * r * text.hidden_size
        final -= r * text.hidden_size
    if grad_checkpointing:
        activations, recompute = tokens * (layers * r * text.hidden_size + final), tokens * per_layer
    else:
        activations, recompute = tokens * (layers * per_layer + final), 0
    if fused_loss:
        loss = c * (tokens + text.vocab_size) * text.hidden_size
    else:
        loss = 3 * 4 * tokens * text.vocab_size
    copies = 0
    if precision == "autocast":
        copies = 2 * ((1 if grad_checkpointing else layers) * n["block"] + n["head"])
    gathered_bytes = 2 if precision == "fsdp_bf16" else 4
    gathered = gathered_bytes * (n["root"] + 2 * n["block"]) if world > 1 else 0
    frozen_bytes = 2 if precision == "fsdp_bf16" else 4
    frozen = n.get("frozen_bytes", frozen_bytes * (n["all"] - n["trainable"]))   # measured, for a built model
    # the largest unit's unsharded gradients (compute dtype) and their fp32 reduce-scatter input
    reduce_scatter = (c + 4) * max(n["root_trainable"], n["block"]) if world > 1 else 0
    # AdamW's sqrt(v)/bias-correction temporaries: per tensor (two of the largest) in the CPU's
    # single-tensor path, one of the whole shard in the foreach path (CUDA's default)
    step = 4 * n["trainable"] // world if foreach_optimizer else 2 * 4 * -(-n["largest"] // world)
    note = "given"
    if tiles is None:
        images, (h, w) = worst_case_images(config, tokens)
        k, rows = config.image_tiles(h, w), config.image_rows(h, w)
        tiles = images * k
        note = (f"worst case: {images} images of {h}x{w} px, {k} tile{'s' if k > 1 else ''} and {rows} rows each, fill "
                f"the {tokens} tokens" + ("; AnyRes images that unpad to fewer rows would pack more tiles"
                                          if config.anyres else ""))
    return MemoryPlan(world=world, tokens=tokens, grad_checkpointing=grad_checkpointing, compute_bytes=c,
                      parameters=(4 * n["trainable"] + frozen) // world,
                      gradients=4 * n["trainable"] // world,
                      optimizer=8 * n["trainable"] // world, gathered=gathered, weight_copies=copies,
                      activations=activations, recompute=recompute, loss=loss, step_workspace=step,
                      reduce_scatter=reduce_scatter,
                      images=image_bytes(config, tiles, c, fused_projector=fused_projector),
                      vision=vision_bytes(config, tiles, c, r), tiles=tiles,
                      tiles_note=note if tiles else "no images", capacity=capacity)


def advice(plan: MemoryPlan) -> str:
    """What to change when ``plan`` does not fit."""
    tips = []
    if not plan.grad_checkpointing:
        tips.append("turn on --grad-checkpointing")
    tips.append(f"lower --max-tokens-per-batch (now {plan.tokens}; gradient accumulation keeps the global batch)")
    tips.append("use more ranks (parameters, gradients and optimizer state shard over them)")
    return "; ".join(tips)


def device_capacity(device: torch.device) -> int | None:
    """Bytes the device holds: the GPU's memory, or the host's RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def plan_for_model(model, *, device: torch.device, world: int, tokens: int, grad_checkpointing: bool,
                   capacity: int | None, tiles: int | None = None) -> MemoryPlan:
    """The plan of the loop's own set-up for ``model`` (frozen parts as marked by requires_grad, its
    attention and kernel backends) on ``device``: on CUDA bf16 (FSDP2's policy with several ranks,
    autocast for one) and foreach AdamW, fp32 on the CPU. ``tiles``: as ``plan_memory``'s."""
    import llava_kernels
    from engine.attention import resolve_backend
    if any(p.requires_grad for p in model.vision.parameters()):
        raise ValueError("plan_for_model: the vision tower trains; the plan counts a frozen tower only")
    loss_backend = llava_kernels.dispatch.resolve("masked_loss", device, model.kernel_backend)
    projector_backend = llava_kernels.dispatch.resolve("projector", device, model.kernel_backend)
    decoder_trains = any(p.requires_grad for n, p in model.named_parameters() if n.startswith("decoder."))
    from train.distributed import uses_mixed_precision
    precision = "fp32" if device.type != "cuda" else (
        "fsdp_bf16" if uses_mixed_precision(device, world) else "autocast")
    return plan_memory(model.config, stage=2 if decoder_trains else 1, world=world, tokens=tokens,
                       grad_checkpointing=grad_checkpointing, precision=precision,
                       kv_repeated=resolve_backend(device, model.attention_backend) == "sdpa",
                       fused_loss=loss_backend != "torch",
                       foreach_optimizer=device.type == "cuda", capacity=capacity,
                       counts=None if model.lora is None else model_parameter_counts(model), lora=model.lora,
                       tiles=tiles, fused_projector=projector_backend != "torch")


def choose_checkpointing(model, *, requested: bool | None, **kw) -> MemoryPlan:
    """The plan with gradient checkpointing as ``requested``; None (auto): off when that fits, else on."""
    if requested is not None:
        return plan_for_model(model, grad_checkpointing=requested, **kw)
    plan = plan_for_model(model, grad_checkpointing=False, **kw)
    return plan if plan.fits else plan_for_model(model, grad_checkpointing=True, **kw)
