"""The training loop shared by stage 1 and stage 2.

Per optimizer step: the step's samples (``global_batch``) are packed into micro-batches; each
micro-batch runs vision (no grad) → projector → scatter → decoder → masked loss normalised by
the step's global target-token count, so accumulating micro-batches equals one big batch;
then clip, AdamW, cosine schedule. Several processes (``torchrun``) shard the model with FSDP2
(train/distributed.py: process group, sharding policy, the coordinated stop); checkpoints are
sharded ``torch.distributed.checkpoint`` directories written atomically, and ``--resume``
continues bit-for-bit from the latest one, on the same or another world size
(train/checkpoint.py). The final model is an HF llava directory.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

import llava_kernels
from engine.attention import resolve_backend
from engine.image import ImageSpec
from engine.model import nvtx_range
from train.checkpoint import (
    export_final,
    latest_checkpoint,
    remove_stale_temporaries,
    restore_checkpoint,
    save_checkpoint,
    truncate_metrics,
)
from train.data import StepDataset, count_targets, plan_steps
from train.distributed import StopFlag, agreed_stop, rank_world, shard_model, uses_mixed_precision
from train.memory import GiB, advice, choose_checkpointing, device_capacity


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """What the loop needs; the stage CLIs build it from their flags."""
    output: str
    lr: float
    global_batch: int
    max_tokens_per_batch: int = 4096
    epochs: int = 1
    max_steps: int | None = None
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    fused: bool = False
    grad_checkpointing: bool | None = None    # None: on only when the memory plan needs it
    memory_capacity_gib: float | None = None  # plan for this much device memory (default: the device's)
    nvtx: bool = False
    save_every: int | None = None
    eval_every: int | None = None
    num_workers: int = 0
    image_mode: str = "pad"
    progress: bool = True
    projector_lr: float | None = None         # the projector's own lr (upstream's mm_projector_lr); None: lr


# --------------------------------------------------------------------------- small pieces


def cosine_lr(step: int, total: int, warmup_ratio: float) -> float:
    """Multiplier of the base lr at ``step`` (0-based): linear warmup, then cosine to 0."""
    warmup = math.ceil(total * warmup_ratio)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class Progress:
    """One status line on stderr: step, loss, lr, grad-norm, tokens/s, ETA."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.t0 = total, enabled and rank_world()[0] == 0, time.time()

    def update(self, step: int, m: dict, first: int) -> None:
        if not self.enabled:
            return
        done = step + 1 - first
        eta = (time.time() - self.t0) / max(done, 1) * (self.total - step - 1)
        sys.stderr.write(f"\rstep {step + 1}/{self.total} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | "
                         f"gn {m['grad_norm']:.3f} | {m['tokens_per_s']:.0f} tok/s | ETA {int(eta) // 60:02d}:"
                         f"{int(eta) % 60:02d}   ")
        sys.stderr.flush()

    def close(self):
        if self.enabled:
            sys.stderr.write("\n")


# --------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    steps_done: int
    final_dir: str | None
    interrupted: bool
    last_loss: float | None


def micro_loss(model, mb, num_targets: int, cfg: LoopConfig, autocast):
    """Forward + masked loss of one micro-batch; returns (loss, loss-sum over its targets)."""
    with autocast:
        hidden = model.forward_packed(mb.input_ids, cu_seqlens=mb.cu_seqlens, position_ids=mb.position_ids,
                                      max_seqlen=mb.max_seqlen, pixel_values=mb.pixel_values,
                                      image_sizes=mb.image_sizes)
        kind = hidden.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype
    with nvtx_range("loss", cfg.nvtx):
        # Under autocast the residual stream, hence the final norm's output, stays fp32 (the master
        # weights' dtype): run the loss GEMMs in the autocast dtype, as an autocast F.linear would, with
        # a low-precision copy of the fp32 head (its grad flows back to the master weight).
        hidden = hidden.to(dtype)
        head = model.head_weight.to(dtype)
        loss, seq_sum, _ = llava_kernels.masked_lm_loss(hidden, head, mb.targets, cu_seqlens=mb.cu_seqlens,
                                                  num_targets=max(num_targets, 1), return_per_sequence=True,
                                                  backend=model.kernel_backend)
    return loss, seq_sum.sum()


def evaluate(model, dataset: StepDataset, cfg: LoopConfig, autocast, device) -> float:
    """Mean token loss over a held-out set (no grad)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for k in range(len(dataset)):
            _, mbs = dataset[k]
            for mb in mbs:
                n = mb.num_targets
                if n == 0 and not dist.is_initialized():   # ranks must run the same collectives
                    continue
                _, s = micro_loss(model, mb.to(device), n, cfg, autocast)
                total, count = total + float(s), count + n
    if dist.is_initialized():
        t = torch.tensor([total, count], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        total, count = t.tolist()
    return total / max(count, 1)


def train(model, samples, cfg: LoopConfig, *, device: torch.device, tokenizer_dir: str | None = None,
          eval_samples=None, image_spec: ImageSpec | None = None, run_config: dict | None = None,
          resume: bool = False) -> TrainResult:
    """Train the parameters of ``model`` that require grad on ``samples``.

    ``run_config`` (the stage's effective flags) is logged as JSON and saved with checkpoints.
    ``image_spec``: the preprocessing (default: the model's tower size and AnyRes pinpoints, ``cfg.image_mode``).
    """
    rank, world = rank_world()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    spec = image_spec or ImageSpec.from_config(model.config, mode=cfg.image_mode)
    model.nvtx = cfg.nvtx
    # One switch for every op: the model's projector/scatter and micro_loss's masked loss all read
    # model.kernel_backend (None = the dispatcher's choice, which env overrides can still steer).
    model.kernel_backend = None if cfg.fused else "torch"
    if not cfg.fused:
        model.attention_backend = "sdpa"
    # The memory plan, before sharding, optimizer state or activations exist: a run that cannot fit
    # stops here saying what to change.
    capacity = int(cfg.memory_capacity_gib * GiB) if cfg.memory_capacity_gib else device_capacity(device)
    memory = choose_checkpointing(model, requested=cfg.grad_checkpointing, device=device, world=world,
                                  tokens=cfg.max_tokens_per_batch, capacity=capacity,
                                  tiles=None if any(s.images for s in samples) else 0)
    if not memory.fits:
        raise ValueError(f"this run will not fit in memory:\n{memory.report()}\nto fit: {advice(memory)}")
    model.decoder.gradient_checkpointing = memory.grad_checkpointing
    mixed_precision = uses_mixed_precision(device, world)
    if world > 1:
        shard_model(model, mixed_precision=mixed_precision)
    params = [p for p in model.parameters() if p.requires_grad]   # after sharding: FSDP2 swaps in DTensors
    opt = torch.optim.AdamW(_param_groups(model, cfg), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)

    plans = [plan_steps(samples, global_batch=cfg.global_batch, seed=cfg.seed, epoch=e) for e in range(cfg.epochs)]
    flat = [(e, i) for e, plan in enumerate(plans) for i in range(len(plan))]
    total = min(len(flat), cfg.max_steps) if cfg.max_steps else len(flat)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, total, cfg.warmup_ratio))

    os.makedirs(cfg.output, exist_ok=True)
    if rank == 0:
        remove_stale_temporaries(cfg.output)
    metrics_path = os.path.join(cfg.output, "metrics.jsonl")
    first = 0
    ckpt = latest_checkpoint(cfg.output) if resume else None
    if ckpt:
        first = restore_checkpoint(model, opt, sched, ckpt)
        truncate_metrics(metrics_path, first)
    elif rank == 0 and os.path.exists(metrics_path):
        os.remove(metrics_path)
    if rank == 0:
        effective = {"run": run_config or {}, "loop": dataclasses.asdict(cfg), "world_size": world,
                     "device": str(device),
                     "kernels": llava_kernels.dispatch.describe(device, None if cfg.fused else "torch"),
                     "attention": resolve_backend(device, model.attention_backend),
                     "total_steps": total, "resumed_from": ckpt, "grad_checkpointing": memory.grad_checkpointing,
                     "memory_plan_gib": round(memory.peak / GiB, 3)}
        print(json.dumps({"effective_config": effective}, default=str), flush=True)
        print(memory.report(), flush=True)

    # bf16 on a GPU: FSDP2's policy with several ranks (shard_model), autocast for one process
    use_autocast = device.type == "cuda" and not mixed_precision
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_autocast else contextlib.nullcontext()
    eval_ds = None
    if eval_samples and cfg.eval_every:
        eval_steps = [list(range(k, min(k + cfg.global_batch, len(eval_samples))))
                      for k in range(0, len(eval_samples), cfg.global_batch)]
        eval_ds = StepDataset(eval_samples, eval_steps, max_tokens=cfg.max_tokens_per_batch, spec=spec,
                              rank=rank, world=world)

    progress = Progress(total, cfg.progress)
    last_loss, stopped_by, step = None, 0, first - 1
    with StopFlag() as stop:
        for epoch, (start, plan) in enumerate(zip(_epoch_starts(plans), plans, strict=True)):
            if start + len(plan) <= first or start >= total:
                continue
            ds = StepDataset(samples, plan, max_tokens=cfg.max_tokens_per_batch, spec=spec,
                             rank=rank, world=world, first_step=max(first - start, 0))
            # Worker processes decode images and pack the next steps while this one trains. Its own generator:
            # an iterator draws a seed when created, and from the global RNG that draw would shift the
            # dropout masks (LoRA) of a resumed run, which creates its iterator at another step.
            loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=cfg.num_workers,
                                                 persistent_workers=False, pin_memory=device.type == "cuda",
                                                 generator=torch.Generator().manual_seed(cfg.seed + epoch))
            t0 = time.time()
            batches = iter(loader)
            while True:
                with nvtx_range("data", cfg.nvtx):
                    item = next(batches, None)
                if item is None:
                    break
                index, mbs = item
                if start + index >= total:
                    break
                step = start + index
                m = train_step(model, opt, sched, params, mbs, count_targets(samples, plan[index]), cfg,
                                autocast, device)
                m.update(step=step + 1, epoch=epoch, time_s=time.time() - t0)
                m["tokens_per_s"] = m["tokens"] / max(m["time_s"], 1e-9)
                last_loss = m["loss"]
                if eval_ds is not None and (step + 1) % cfg.eval_every == 0:
                    model.eval()
                    m["eval_loss"] = evaluate(model, eval_ds, cfg, autocast, device)
                if rank == 0:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(m) + "\n")
                progress.update(step, m, first)
                # A signal on any rank stops all of them here, after the same step (one all-reduce).
                stopped_by = agreed_stop(stop, device)
                if stopped_by:
                    break
                if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total:
                    save_checkpoint(model, opt, sched, step + 1, cfg, run_config)
                t0 = time.time()
            del batches, loader
            if stopped_by:
                break
        progress.close()
        steps_done = step + 1
        if stopped_by:
            # Still inside StopFlag: a second signal during the save is recorded, not fatal.
            path = save_checkpoint(model, opt, sched, steps_done, cfg, run_config)
            if rank == 0:
                print(f"stopped by signal {stopped_by} after step {steps_done}; checkpoint saved in {path}",
                      flush=True)
            return TrainResult(steps_done, None, True, last_loss)
    final = export_final(model, cfg.output, tokenizer_dir, run_config)
    return TrainResult(steps_done, final, False, last_loss)


def _param_groups(model, cfg: LoopConfig) -> list[dict]:
    """What trains, in one AdamW group, or (``projector_lr``) the rest first, then the projector with its lr."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.projector_lr is None:
        return [{"params": [p for _, p in named]}]
    proj = [p for n, p in named if n.startswith("projector.")]
    return [{"params": [p for n, p in named if not n.startswith("projector.")]},
            {"params": proj, "lr": cfg.projector_lr}]


def _epoch_starts(plans) -> list[int]:
    starts, n = [], 0
    for plan in plans:
        starts.append(n)
        n += len(plan)
    return starts


def train_step(model, opt, sched, params, mbs, num_targets: int, cfg: LoopConfig, autocast, device) -> dict:
    """Accumulate the micro-batches of one step, then clip and step; returns its metrics."""
    model.train()
    # Summed on the device: a .cpu() per micro-batch would make the host wait for each backward
    # before it can launch the next micro-batch; the one sync is float(loss_sum) at the end.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    # Each rank's loss is its share of the global mean (normalised by the global target count);
    # FSDP sums the ranks' gradients (shard_model sets the divide factor to 1), so the backward
    # starts from grad_output = 1, the masked loss's fast path.
    for mb in mbs:
        mb = mb.to(device)
        loss, _ = micro_loss(model, mb, num_targets, cfg, autocast)
        loss.backward()
        loss_sum += loss.detach().double()
        tokens += int(mb.input_ids.numel()) if mb.ids else 0   # padding micro-batches are not data
    with nvtx_range("optimizer", cfg.nvtx):
        grad_norm = _clip(params, cfg.max_grad_norm)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    if dist.is_initialized():
        t = torch.stack([loss_sum, torch.tensor(float(tokens), dtype=torch.float64, device=device)])
        dist.all_reduce(t)
        loss_sum, tokens = t[0], int(t[1])
    return {"loss": float(loss_sum), "lr": lr, "tokens": tokens, "target_tokens": num_targets,
            "grad_norm": grad_norm}


def _clip(params, max_norm: float | None) -> float:
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
