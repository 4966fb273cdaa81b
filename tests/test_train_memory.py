"""The memory plan (train/memory.py) against a measured run, and what it says for LLaVA-1.5 at scale.

- measured: the peak of live tensor bytes during a second optimizer step of the loop's own
  ``train_step`` (fp32, CPU, one process), read from the profiler's allocation events, plus the
  parameters and optimizer state alive before it; the plan must be within 5% (the issue asks 15%)
  in three regimes: activations + loss dominate, checkpointing on, and the optimizer step dominates;
- the same with FSDP2's bf16 policy on 2 gloo ranks (bf16 runs on the CPU too), each rank measuring
  its own step, within 15% (measured: ~0.5% when activations dominate, ~3-7% when the optimizer
  and reduce-scatter side does);
- a LoRA model (PEFT adapters on a frozen decoder, with and without dropout and checkpointing): within 5%
  of its measured CPU step (measured: under 1%);
- AnyRes images (the plan's worst-case tiles per micro-batch, a wide tower): within 5% of the measured
  CPU step (measured: under 0.1%), where the plan without the tiles is more than 15% short (measured: 17%,
  38%);
- LLaVA-1.5-7B / 13B on 8×80 GB: the parameter counts match the published model sizes; the plans
  with and without checkpointing, and the loop refuses a run that will not fit, naming what to change.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from helpers import ENV, REPO, ok
from torch.profiler import ProfilerActivity, profile

import engine
from engine.config import LlavaConfig, TextConfig, VisionConfig, tiny_config
from engine.model import Llava
from train.data import MicroBatch
from train.loop import LoopConfig, train, train_step
from train.memory import GiB, parameter_counts, plan_memory
from train.stage import freeze_for_stage


def measured_peak(model, tokens: int, tmp_path, images: tuple[int, tuple[int, int]] | None = None) -> int:
    """Bytes: parameters + optimizer state + the micro-batch's pixels + the peak of allocations during the
    second step. ``images``: (N, (height, width)): the micro-batch starts with N images of that size (random
    tiles), text after them; None: text only."""
    if model.lora is None:                                    # a LoRA model is frozen as it is
        freeze_for_stage(model, 2)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    g = torch.Generator().manual_seed(0)
    config = model.config
    vocab = config.text.vocab_size
    ids, targets = (torch.randint(0, vocab - 1, (tokens,), generator=g) for _ in range(2))  # no image token
    pixels = sizes = None
    if images is not None:
        n, (h, w) = images
        ids[:n * config.image_rows(h, w)] = config.image_token_id
        s = config.vision.image_size
        pixels = torch.randn(n * config.image_tiles(h, w), 3, s, s, generator=g)
        sizes = torch.tensor([[h, w]] * n)
    mb = MicroBatch(ids, targets, torch.tensor([0, tokens], dtype=torch.int32), torch.arange(tokens), tokens, pixels,
                    ["x"], sizes)
    cfg = LoopConfig(output=str(tmp_path), lr=1e-4, global_batch=1)

    def step():
        return train_step(model, opt, sched, params, [mb], tokens, cfg, contextlib.nullcontext(), torch.device("cpu"))

    step()                                                    # creates the optimizer state
    live = sum(p.numel() * p.element_size() for p in model.parameters())
    live += sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
    live += 0 if pixels is None else pixels.numel() * pixels.element_size()   # collated before the step
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    assert current <= 0.01 * peak                             # a step leaves nothing behind (grads are set to None)
    return live + peak


@pytest.mark.parametrize(("tokens", "checkpointing"), [(1024, False), (2048, True), (16, False)])
def test_plan_matches_a_measured_cpu_step(tokens, checkpointing, tmp_path):
    torch.manual_seed(0)
    config = tiny_config(vocab_size=4000, hidden_size=128, intermediate_size=344, num_heads=4, num_kv_heads=2,
                         head_dim=32, num_layers=4)
    model = Llava(config, kernel_backend="torch", attention_backend="sdpa")
    model.decoder.gradient_checkpointing = checkpointing
    got = measured_peak(model, tokens, tmp_path)
    plan = plan_memory(config, stage=2, world=1, tokens=tokens, grad_checkpointing=checkpointing,
                       precision="fp32", kv_repeated=True, fused_loss=False, foreach_optimizer=False, capacity=None,
                       tiles=0)
    assert abs(plan.peak - got) <= 0.05 * got, (plan.report(), got / 2**20)


@pytest.mark.parametrize(("vision", "act", "tokens", "checkpointing"), [(512, "quick_gelu", 1024, False),
                                                                       (256, "gelu", 2048, True)])
def test_plan_of_anyres_images_matches_a_measured_cpu_step(vision, act, tokens, checkpointing, tmp_path):
    """A micro-batch full of AnyRes images of the plan's worst case (``worst_case_images``: here 1x2 grids,
    3 tiles each), a tower wide against the decoder: the tower's forward over every tile (measured: the
    step's peak) and the projector's saved rows. The plan without the tiles is more than 15% short."""
    from train.memory import worst_case_images
    torch.manual_seed(0)
    tower = VisionConfig(hidden_size=vision, intermediate_size=4 * vision, num_layers=2, num_heads=4, image_size=28,
                         patch_size=7, hidden_act=act)                    # 16 patches a tile
    config = dataclasses.replace(
        tiny_config(vocab_size=512, hidden_size=64, intermediate_size=172, num_heads=4, num_kv_heads=2, head_dim=16),
        vision=tower, image_grid_pinpoints=((28, 56), (56, 28), (56, 56)))
    model = Llava(config, kernel_backend="torch", attention_backend="sdpa")
    model.decoder.gradient_checkpointing = checkpointing
    n, (h, w) = worst_case_images(config, tokens)
    assert (h, w) == (28, 56) and n == tokens // 52                      # 16 base rows + 4 rows of 8 + newline
    got = measured_peak(model, tokens, tmp_path, images=(n, (h, w)))
    kw = dict(stage=2, world=1, tokens=tokens, grad_checkpointing=checkpointing, precision="fp32", kv_repeated=True,
              fused_loss=False, foreach_optimizer=False, capacity=None)
    plan = plan_memory(config, **kw)
    assert plan.tiles == 3 * n and f"{n} images of 28x56 px, 3 tiles and 52 rows each" in plan.report()
    assert abs(plan.peak - got) <= 0.05 * got, (plan.report(), got / 2**20)
    assert plan_memory(config, **kw, tiles=0).peak < 0.85 * got                # what ignoring the tiles would say


@pytest.mark.parametrize(("dropout", "tokens", "checkpointing"), [(0.05, 1024, False), (0.0, 1024, False),
                                                                (0.05, 1024, True)])
def test_plan_of_a_lora_model_matches_a_measured_cpu_step(dropout, tokens, checkpointing, tmp_path):
    """PEFT adapters (r 16, every decoder linear): frozen base, adapters + projector in AdamW, the adapters'
    activations (dropout keeps its input and mask)."""
    from engine.lora import LoraSettings, add_lora
    from train.memory import plan_for_model
    torch.manual_seed(0)
    config = tiny_config(vocab_size=4000, hidden_size=128, intermediate_size=344, num_heads=4, num_kv_heads=2,
                         head_dim=32, num_layers=4)
    model = Llava(config, kernel_backend="torch", attention_backend="sdpa")
    add_lora(model, LoraSettings(r=16, alpha=32, dropout=dropout))
    model.decoder.gradient_checkpointing = checkpointing
    got = measured_peak(model, tokens, tmp_path)
    plan = plan_for_model(model, device=torch.device("cpu"), world=1, tokens=tokens,
                          grad_checkpointing=checkpointing, capacity=None, tiles=0)
    assert abs(plan.peak - got) <= 0.05 * got, (plan.report(), got / 2**20)


FSDP_MEASURE = """
import contextlib, json, sys, torch, torch.distributed as dist
from torch.profiler import profile, ProfilerActivity
from engine.config import tiny_config
from engine.model import Llava
from train.data import MicroBatch
from train.distributed import shard_model
from train.loop import LoopConfig, train_step
from train.memory import plan_memory
from train.stage import freeze_for_stage
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
config = tiny_config(vocab_size=4000, hidden_size=128, intermediate_size=344, num_heads=4, num_kv_heads=2,
                     head_dim=32, num_layers=4)
out = []
for tokens, ckpt in ((1024, False), (2048, True), (16, False)):
    torch.manual_seed(0)
    model = Llava(config, kernel_backend="torch", attention_backend="sdpa")
    model.decoder.gradient_checkpointing = ckpt
    freeze_for_stage(model, 2)
    shard_model(model, mixed_precision=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    g = torch.Generator().manual_seed(rank)
    ids, targets = (torch.randint(0, 3999, (tokens,), generator=g) for _ in range(2))
    mb = MicroBatch(ids, targets, torch.tensor([0, tokens], dtype=torch.int32), torch.arange(tokens), tokens, None,
                    ["x"])
    cfg = LoopConfig(output=sys.argv[1], lr=1e-4, global_batch=1)
    def step():
        return train_step(model, opt, sched, params, [mb], tokens * world, cfg, contextlib.nullcontext(),
                          torch.device("cpu"))
    step()
    local = lambda t: (t.to_local() if hasattr(t, "to_local") else t).untyped_storage().nbytes()
    live = sum(local(p) for p in model.parameters())
    live += sum(local(t) for s in opt.state.values() for t in s.values() if t.ndim)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    plan = plan_memory(config, stage=2, world=world, tokens=tokens, grad_checkpointing=ckpt, precision="fsdp_bf16",
                       kv_repeated=True, fused_loss=False, foreach_optimizer=False, capacity=None, tiles=0)
    out.append({"tokens": tokens, "ckpt": ckpt, "measured": live + peak, "plan": plan.peak})
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
    json.dump(out, f)
from train.distributed import leave_distributed
leave_distributed()
"""


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_plan_matches_measured_fsdp_bf16_steps_on_two_ranks(tmp_path):
    script = tmp_path / "measure.py"
    script.write_text(FSDP_MEASURE)
    ok(subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                       str(script), str(tmp_path)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=180))
    for rank in (0, 1):
        for r in json.loads((tmp_path / f"rank{rank}.json").read_text()):
            assert abs(r["plan"] - r["measured"]) <= 0.15 * r["measured"], (rank, r)


# --------------------------------------------------------------------------- LLaVA-1.5 at scale

CLIP_L_336 = VisionConfig(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, image_size=336,
                          patch_size=14)


def llava15(hidden: int, inter: int, layers: int, heads: int) -> LlavaConfig:
    text = TextConfig(vocab_size=32064, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                      num_heads=heads, num_kv_heads=heads, head_dim=128)
    return LlavaConfig(vision=CLIP_L_336, text=text, projector_type="mlp2x_gelu", image_token_id=32000)


LLAVA_7B, LLAVA_13B = llava15(4096, 11008, 32, 32), llava15(5120, 13824, 40, 40)


def h100_plans(config, tokens: int, precision: str = "fsdp_bf16") -> dict[bool, object]:
    return {ckpt: plan_memory(config, stage=2, world=8, tokens=tokens, grad_checkpointing=ckpt, precision=precision,
                              kv_repeated=False, fused_loss=True, foreach_optimizer=True, capacity=80 * 10**9)
            for ckpt in (False, True)}


def test_llava15_parameter_counts_match_the_published_sizes():
    # Vicuna-7B 6.74e9 / 13B 13.02e9 (+ 64 image/pad rows), CLIP ViT-L/14-336 tower 0.303e9, projector 21e6 / 26e6
    for config, total in ((LLAVA_7B, 7.06e9), (LLAVA_13B, 13.35e9)):
        n = parameter_counts(config, stage=2)
        assert abs(n["all"] - total) <= 0.01 * total, n
        assert n["all"] - n["trainable"] == sum(p.numel() for p in _meta(config).vision.parameters())


def _meta(config):
    with torch.device("meta"):
        return Llava(config)


def test_llava15_plans_on_8x80gb():
    """8 ranks use FSDP2's bf16 policy. 7B: 8192 tokens per micro-batch fit without checkpointing
    (57.5 GiB), 16384 need it; 13B needs it at 8192. Autocast around FSDP (the loop before the
    policy) would not fit 7B at 8192 without checkpointing: its bf16 weight copies and fp32
    residual stream cost ~18 GiB more."""
    for name, config, tokens, fits_without in (("7B", LLAVA_7B, 8192, True), ("7B", LLAVA_7B, 16384, False),
                                               ("13B", LLAVA_13B, 8192, False)):
        plans = h100_plans(config, tokens=tokens)
        for plan in plans.values():
            print(f"LLaVA-1.5-{name}, {tokens} tokens per micro-batch\n{plan.report()}")
        off, on = plans[False], plans[True]
        assert on.activations < off.activations / 10 and on.weight_copies == off.weight_copies == 0
        assert on.parameters == off.parameters and on.optimizer == off.optimizer
        assert on.fits and off.fits == fits_without, (off.report(), on.report())
    old = h100_plans(LLAVA_7B, tokens=8192, precision="autocast")
    new = h100_plans(LLAVA_7B, tokens=8192)
    assert not old[False].fits and old[False].weight_copies > 12 * GiB
    assert old[False].peak - new[False].peak > 15 * GiB
    # sharding: parameters, gradients and optimizer state are 1/8 of one process's
    one = plan_memory(LLAVA_7B, stage=2, world=1, tokens=8192, grad_checkpointing=True, precision="fsdp_bf16",
                      kv_repeated=False, fused_loss=True, foreach_optimizer=True, capacity=None)
    eight = h100_plans(LLAVA_7B, tokens=8192)[True]
    assert eight.optimizer * 8 == one.optimizer and abs(eight.parameters * 8 - one.parameters) < 8


def test_a_run_that_does_not_fit_stops_before_training_and_says_what_to_change(assets, samples, tmp_path):
    model = engine.load(assets.model_dir, dtype=torch.float32, kernel_backend="torch")
    freeze_for_stage(model, 2)
    cfg = LoopConfig(output=str(tmp_path), lr=1e-3, global_batch=2, max_steps=1, progress=False,
                     memory_capacity_gib=1e-4, grad_checkpointing=False)
    with pytest.raises(ValueError, match="will not fit in memory") as err:
        train(model, samples[:2], cfg, device=torch.device("cpu"))
    assert "turn on --grad-checkpointing" in str(err.value) and "lower --max-tokens-per-batch" in str(err.value)
    assert "images: 1024 tower tiles per micro-batch (worst case: 1024 images of 28x28 px, 1 tile and 4 rows" \
        in str(err.value)
    assert not (tmp_path / "metrics.jsonl").exists()
    text_only = [s for s in samples if not s.images][:2]
    with pytest.raises(ValueError, match=r"images: 0 tower tiles per micro-batch \(no images\)"):
        train(model, text_only, cfg, device=torch.device("cpu"))
    # auto (None): checkpointing comes on when only it makes the plan fit
    from train.memory import plan_for_model
    kw = dict(device=torch.device("cpu"), world=1, tokens=4096)
    off = plan_for_model(model, grad_checkpointing=False, capacity=None, **kw)
    on = plan_for_model(model, grad_checkpointing=True, capacity=None, **kw)
    assert on.peak < off.peak
    budget = (on.peak + off.peak) / 2 / 0.9 / GiB
    auto = dataclasses.replace(cfg, memory_capacity_gib=budget, grad_checkpointing=None, max_tokens_per_batch=4096)
    train(model, samples[:2], auto, device=torch.device("cpu"))
    assert model.decoder.gradient_checkpointing
    model.vision.requires_grad_(True)          # a training tower's saved activations are not in the plan
    with pytest.raises(ValueError, match="the vision tower trains; the plan counts a frozen tower only"):
        plan_for_model(model, grad_checkpointing=False, capacity=None, **kw)
