"""Command line of both training stages: flags → typed config → model, data → the loop.

Stage 1 (feature alignment): vision tower and LLM frozen, only the projector trains, `plain`
template. Stage 2 (end-to-end): vision tower frozen, projector + LLM train, `vicuna_v1`.
With no model and no data, stage 2 runs the embedded default (see train/default.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass

import torch

import engine
from engine.config import read_config_json
from engine.lora import TARGETS, LoraSettings, add_lora, quantize_base_nf4
from engine.meta import materialize, meta_compose, meta_load
from engine.weights import read_projector
from train.data import load_samples
from train.distributed import leave_distributed, rank_world, setup_distributed, shard_model, uses_mixed_precision
from train.loop import LoopConfig, train

# (lr, global batch, epochs): LLaVA-1.5 defaults and, with --paper, the paper's.
DEFAULTS = {1: {"1.5": (1e-3, 256, 1), "paper": (2e-3, 128, 1)},
            2: {"1.5": (2e-5, 128, 1), "paper": (2e-5, 32, 3)}}
# --lora: upstream's scripts/v1_5/finetune_lora.sh (learning_rate 2e-4, mm_projector_lr 2e-5; batch 128, 1 epoch)
LORA_LR, LORA_PROJECTOR_LR = 2e-4, 2e-5


@dataclass(frozen=True, kw_only=True)
class StageConfig:
    stage: int
    model: str | None
    vision: str | None
    llm: str | None
    init: str | None
    data: str | None
    image_folder: str | None
    eval_data: str | None
    output: str
    template: str
    lr: float
    global_batch: int
    max_tokens_per_batch: int
    epochs: int
    max_steps: int | None
    max_length: int
    truncate: bool
    on_bad_record: str
    fused: bool
    resume: bool
    seed: int
    device: str
    grad_checkpointing: bool | None
    memory_capacity_gib: float | None
    max_grad_norm: float | None
    nvtx: bool
    save_every: int | None
    eval_every: int | None
    num_workers: int
    vision_feature_layer: int | None
    answer_first: bool
    lora: LoraSettings | None = None   # --lora / --qlora: PEFT adapters on the decoder linears (engine/lora.py)
    qlora: bool = False                # the frozen base in 4-bit NF4 (CUDA only)
    projector_lr: float | None = None


def parser(stage: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m train.stage{stage}", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="starting checkpoint: HF llava dir, original LLaVA dir, or our stage-1 output")
    p.add_argument("--vision", help="CLIP directory (compose with --llm, or the tower of an original checkpoint)")
    p.add_argument("--llm", help="LLaMA/Vicuna directory (compose with --vision into a fresh LLaVA)")
    if stage == 2:
        p.add_argument("--init", help="stage-1 result: our stage-1 output dir, mm_projector.bin, or a full LLaVA")
    p.add_argument("--data", help="LLaVA JSON or JSONL")
    p.add_argument("--image-folder")
    p.add_argument("--eval-data", help="held-out LLaVA JSON for --eval-every")
    p.add_argument("--output", default=f"runs/stage{stage}")
    p.add_argument("--template", default="plain" if stage == 1 else "vicuna_v1")
    p.add_argument("--paper", action="store_true", help="the paper's lr / batch / epochs instead of LLaVA-1.5's")
    p.add_argument("--lr", type=float)
    p.add_argument("--global-batch", type=int, help="samples per optimizer step (all ranks, all micro-batches)")
    p.add_argument("--max-tokens-per-batch", type=int, default=8192, help="packed tokens per micro-batch")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--truncate", action="store_true", help="truncate over-long samples instead of dropping them")
    p.add_argument("--on-bad-record", choices=("error", "skip"), default="error")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction,
                   help="fused kernels + varlen flash attention (default: on for stage 1 on a GPU)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction,
                   help="recompute each decoder layer in the backward (default: only when the memory plan needs it)")
    p.add_argument("--memory-capacity-gib", type=float,
                   help="plan for this much memory per rank instead of the device's own (a shared or smaller GPU)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--nvtx", action="store_true")
    p.add_argument("--save-every", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--vision-feature-layer", type=int, choices=(-2, -1), help="ablation: feature layer")
    p.add_argument("--answer-first", action="store_true", help="ablation: answer before the reasoning")
    lora = p.add_argument_group("LoRA (stage 2; upstream LLaVA's finetune_lora.sh defaults)")
    lora.add_argument("--lora", action="store_true",
                      help="train LoRA adapters + the projector, the LLM frozen (default lr 2e-4, projector 2e-5)")
    lora.add_argument("--qlora", action="store_true", help="--lora on a 4-bit NF4 frozen base (CUDA)")
    lora.add_argument("--lora-r", type=int, default=128)
    lora.add_argument("--lora-alpha", type=float, default=256.0)
    lora.add_argument("--lora-dropout", type=float, default=0.05)
    lora.add_argument("--lora-targets", default=",".join(TARGETS),
                      help=f"comma-separated decoder linears to adapt, of {','.join(TARGETS)}")
    lora.add_argument("--projector-lr", type=float,
                      help="the projector's lr (upstream's mm_projector_lr; default: --lr, with --lora 2e-5)")
    if stage == 2:
        p.add_argument("--anyres", action="store_true",
                       help="embedded default only: run it as LLaVA-1.6 AnyRes (grid pinpoints, varied image sizes); "
                            "a LLaVA-NeXT --model is AnyRes by its own config")
    return p


def default_fused(stage: int, device: str) -> bool:
    """Stage 1 runs the fused path by default on a GPU: only the projector trains, so the step is
    dominated by the frozen LLM's forward/backward through the masked loss, which the fused loss
    (no [T, V] logits) and varlen flash attention make cheaper; the CPU keeps the reference path."""
    return stage == 1 and torch.device(device).type == "cuda"


def lora_from_args(args: argparse.Namespace, stage: int) -> LoraSettings | None:
    """The adapter settings of ``--lora``/``--qlora`` (None without them); errors for what cannot combine."""
    if not (args.lora or args.qlora):
        return None
    if stage != 2:
        raise ValueError("--lora/--qlora apply to stage 2: stage 1 trains only the projector")
    if args.qlora and not torch.cuda.is_available():
        raise ValueError("--qlora needs a CUDA device (its 4-bit NF4 base runs there); none is available. "
                         "Use --lora for a full-precision frozen base")
    if args.qlora and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--qlora runs in one process on one GPU (sharding a 4-bit base with FSDP2 is not "
                         "supported here); use --lora with several ranks")
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    return LoraSettings(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=targets)


def config_from_args(args: argparse.Namespace, stage: int) -> StageConfig:
    lora = lora_from_args(args, stage)
    lr, batch, epochs = DEFAULTS[stage]["paper" if args.paper else "1.5"]
    lr = LORA_LR if lora else lr
    projector_lr = LORA_PROJECTOR_LR if lora and args.projector_lr is None else args.projector_lr
    return StageConfig(
        stage=stage, model=args.model, vision=args.vision, llm=args.llm, init=getattr(args, "init", None),
        data=args.data, image_folder=args.image_folder, eval_data=args.eval_data, output=args.output,
        template=args.template, lr=args.lr or lr, global_batch=args.global_batch or batch,
        max_tokens_per_batch=args.max_tokens_per_batch, epochs=args.epochs or epochs, max_steps=args.max_steps,
        max_length=args.max_length, truncate=args.truncate, on_bad_record=args.on_bad_record,
        fused=default_fused(stage, args.device) if args.fused is None else args.fused,
        resume=args.resume, seed=args.seed, device=args.device, grad_checkpointing=args.grad_checkpointing,
        memory_capacity_gib=args.memory_capacity_gib,
        max_grad_norm=args.max_grad_norm or None, nvtx=args.nvtx, save_every=args.save_every,
        eval_every=args.eval_every, num_workers=args.num_workers, vision_feature_layer=args.vision_feature_layer,
        answer_first=args.answer_first, lora=lora, qlora=args.qlora, projector_lr=projector_lr)


def _checkpoint_dir(path: str) -> str:
    """Our stage outputs keep the model in ``final/``; accept either the run dir or the model dir."""
    if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(
            os.path.join(path, "final", "config.json")):
        return os.path.join(path, "final")
    return path


def build_model(cfg: StageConfig, device: torch.device | None = None) -> tuple[engine.Llava, str]:
    """The starting model (frozen for the stage) and the directory its tokenizer comes from.

    Composed from ``--vision`` + ``--llm``, or read from a checkpoint directory (``--model``, ``--init``
    with a full LLaVA; HF llava or original LLaVA, whose tower ``--vision`` gives when it lacks one), it is
    built on the meta device, sharded first when there are several ranks, and each rank materialises
    only its shards on ``device`` (engine/meta.py): no rank ever holds the whole model on the host.
    """
    backend = None if cfg.fused else "torch"
    device = device or torch.device(cfg.device)
    init = cfg.init
    if init and not init.endswith(".bin") and not os.path.isfile(os.path.join(init, "mm_projector.bin")):
        source, init = _checkpoint_dir(init), None   # a full LLaVA (or our stage-1 output) to start from
    elif cfg.model:
        source = _checkpoint_dir(cfg.model)
    elif cfg.vision and cfg.llm:
        source = None
    else:
        raise ValueError("give --model DIR, or --vision DIR with --llm DIR")
    if cfg.lora is not None:
        _check_lora_base(cfg, source)
    if source is None:
        meta = meta_compose(cfg.vision, cfg.llm, seed=cfg.seed, kernel_backend=backend)
    else:
        meta = meta_load(source, vision=cfg.vision, kernel_backend=backend)
    tok = source or cfg.llm
    if init:                                      # an upstream stage-1 projector replaces the fresh one
        meta.overrides = read_projector(init)
    if cfg.vision_feature_layer is not None:
        meta.model.config = meta.model.config.replace(vision_feature_layer=(cfg.vision_feature_layer,))
    freeze_for_stage(meta.model, cfg.stage)
    if cfg.lora is not None:       # adapters are added to real weights; the loop shards the wrapped model
        model = materialize(meta, device=device)
        with_lora(model, cfg, source)
        return model, tok
    world = rank_world()[1]
    if world > 1:
        shard_model(meta.model, mixed_precision=uses_mixed_precision(device, world))
    return materialize(meta, device=device), tok


def _check_lora_base(cfg: StageConfig, source: str | None) -> None:
    """An adapter is only usable on the checkpoint it was trained on: that must be one directory, and a
    --model that --init (a full checkpoint, the actual base) would replace must at least match it."""
    if source is None:
        raise ValueError("--lora needs its base as one checkpoint directory (--model, or a full --init): an "
                         "adapter on a model composed from --vision + --llm could not be loaded again; run "
                         "stage 1 first and pass its output")
    if cfg.model and _checkpoint_dir(cfg.model) != source:
        a, b = (read_config_json(d)[1] for d in (_checkpoint_dir(cfg.model), source))
        skip = ("dtype", "torch_dtype", "transformers_version", "architectures")
        diff = sorted(k for k in set(a) | set(b) if k not in skip and a.get(k) != b.get(k))
        if diff:
            raise ValueError(f"--lora: --init {source} (the adapters' base) and --model {cfg.model} have different "
                             f"configs ({diff}); give one of them, or an --init of the same model")


def with_lora(model: engine.Llava, cfg: StageConfig, base: str) -> None:
    """PEFT LoRA adapters on the frozen decoder (A drawn under --seed: every rank draws the same), the
    projector fully trained, the vision tower frozen; ``--qlora``: the decoder linears' base weights in
    4-bit NF4 (torchao), quantized on the GPU."""
    torch.manual_seed(cfg.seed)
    add_lora(model, cfg.lora, base=base)
    if cfg.qlora:
        model.to(cfg.device)
        quantize_base_nf4(model)


def freeze_for_stage(model: engine.Llava, stage: int) -> None:
    """Stage 1: only the projector trains. Stage 2: projector + LLM and, with AnyRes, the ``image_newline``
    row; the vision tower never does. As upstream LLaVA-NeXT: its stage 1 (``tune_mm_mlp_adapter``) trains
    the mm_projector alone, its stage 2 everything outside the tower."""
    for name, p in model.named_parameters():
        if name.startswith("projector."):
            p.requires_grad_(True)
        elif name.startswith("decoder.") or name == "image_newline":
            p.requires_grad_(stage == 2)
        else:
            p.requires_grad_(False)


def loop_config(cfg: StageConfig) -> LoopConfig:
    return LoopConfig(output=cfg.output, lr=cfg.lr, global_batch=cfg.global_batch,
                      max_tokens_per_batch=cfg.max_tokens_per_batch, epochs=cfg.epochs, max_steps=cfg.max_steps,
                      max_grad_norm=cfg.max_grad_norm, seed=cfg.seed, fused=cfg.fused,
                      grad_checkpointing=cfg.grad_checkpointing, memory_capacity_gib=cfg.memory_capacity_gib,
                      nvtx=cfg.nvtx, save_every=cfg.save_every,
                      eval_every=cfg.eval_every, num_workers=cfg.num_workers, projector_lr=cfg.projector_lr)


def run_stage(cfg: StageConfig):
    """Load, freeze, read data, train. Returns the loop's TrainResult."""
    from transformers import AutoTokenizer

    if not cfg.data:
        raise ValueError("--data is required (the embedded default runs only with no --model/--data at all)")
    device = torch.device(cfg.device)
    setup_distributed(device)
    model, tok_dir = build_model(cfg, device)
    model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    kw = dict(template=cfg.template, image_token_id=model.config.image_token_id,
              image_rows=model.config.image_rows, image_folder=cfg.image_folder, max_length=cfg.max_length,
              truncate=cfg.truncate, on_bad_record=cfg.on_bad_record, answer_first=cfg.answer_first)
    samples, report = load_samples(cfg.data, tokenizer, **kw)
    eval_samples = load_samples(cfg.eval_data, tokenizer, **kw)[0] if cfg.eval_data else None
    if not samples:
        raise ValueError(f"{cfg.data}: no trainable samples ({report.summary()})")
    result = train(model, samples, loop_config(cfg), device=device, tokenizer_dir=tok_dir, eval_samples=eval_samples,
                   run_config=dataclasses.asdict(cfg), resume=cfg.resume)
    print(f"data: {len(samples)} samples; {report.summary()}", flush=True)
    for rid, why in list(report.skipped.items())[:20]:
        print(f"  skipped {rid}: {why}", flush=True)
    return result


def main(stage: int, argv: list[str] | None = None) -> None:
    args = parser(stage).parse_args(argv)
    if stage == 2 and not any((args.model, args.data, args.init, args.vision, args.llm)):
        from train.default import run_default
        default_out = "runs/default-anyres" if args.anyres else "runs/default"
        run_default(fused=bool(args.fused), output=args.output if args.output != "runs/stage2" else default_out,
                    device=args.device, seed=args.seed, max_steps=args.max_steps, anyres=args.anyres)
        return
    if getattr(args, "anyres", False):
        raise ValueError("--anyres applies to the embedded default only (no --model/--data/--init/--vision/--llm); "
                         "a LLaVA-NeXT checkpoint is AnyRes by its config (image_grid_pinpoints)")
    try:
        run_stage(config_from_args(args, stage))
    except BaseException:
        # Leave the process group explicitly: exiting with it alive can abort a rank at shutdown.
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        raise
    if torch.distributed.is_initialized():
        leave_distributed()  # and, after a clean run, without the teardown that could still abort a rank
