"""Stage-2 training step at a LLaVA-1.5 shape on one GPU: ours vs transformers, same data, same run.

Letters: T packed tokens of a micro-batch, Tt its target rows, B sequences, N images, S = 576 rows
per image, P = 577 tower tokens per image, D decoder width, Dv tower width, V vocab.

Model (random weights, nothing downloaded): CLIP ViT-L/14-336 tower (frozen; features of layer -2),
mlp2x_gelu projector, a 1B-class LLaMA decoder (D 2048, 16 layers, 16 heads, 8 KV heads, FFN 5632,
V 32064). transformers' LlavaForConditionalGeneration (attn_implementation="sdpa") is built first;
our model is assigned the *same* parameter tensors (engine.weights' HF table), so one copy of the
weights serves both. Both: fp32 master weights, bf16 autocast, AdamW, grad clipping at 1.0, no
gradient checkpointing, the tower without autograd.

Data: a LLaVA-665K-like length profile, synthetic and seeded: an image sample is a 41-token prefix,
576 image rows and log-normal text (median 150 tokens, clipped to 16..1431; mean sample ≈ 825
tokens) in alternating turns of 8..64 tokens whose answer turns (≈ 40% of the text) are targets.
Image samples only: steps are single-modality (as upstream's grouping) and ≈ 94% of the mix has an
image. Samples are packed first-fit into ≤ 8192-token micro-batches (``train.data``); one optimizer
step accumulates the first MICRO of them. transformers gets the same samples per micro-batch,
right-padded to the longest with an attention mask and labels, its per-micro-batch mean loss scaled
by (targets in micro-batch / targets in step) so both optimise the same objective.

Timed call: one optimizer step (MICRO forward+backward passes, clip, AdamW). Ours runs the training
loop's own step function (``train.loop.train_step``, ``--fused``: dispatcher-chosen kernels, varlen
attention).
FLOPs (model FLOPs, the same useful work credited to both; formula in ``model_flops``): decoder
linears 6·T·P_lin + causal attention 3·Σ 2·L²·H·Dh per layer, LM head 6·Tt·D·V (only target rows
need logits), tower forward 2·P·P_lin,tower + 4·P²·Dv per used layer + patch embedding, projector
6·N·S·(Dv·D + D·D). MFU = FLOPs / step time / the bf16 dense matmul rate measured in this run (8192³).
Peak memory: CUDA bytes above what is resident before a step (weights + AdamW state), over one step.
Before anything is timed, both implementations' losses on one micro-batch must agree (bf16 tolerance).
"""
from __future__ import annotations

import contextlib
import math
import random
import statistics
import time

import pytest
import torch
from common import SMOKE, Row, bench_device, cuda_time_ms, max_memory_mb, peak_memory_mb, pick, save, sync

import llava_kernels
from engine.attention import resolve_backend
from engine.config import LlavaConfig, TextConfig, VisionConfig
from engine.conversation import IGNORE_INDEX
from engine.model import pack_cu_seqlens
from engine.weights import HF_LLAVA, assign_state, new_model, rename
from train.data import MicroBatch, Sample, pack_micro_batches, shifted_targets
from train.loop import LoopConfig, cosine_lr, micro_loss, train_step
from train.stage import freeze_for_stage

SUITE = "train_step"
MAX_TOKENS = pick(8192, 160)   # packed tokens per micro-batch
MICRO = 2                      # micro-batches accumulated per optimizer step (keeps the run short)
STEPS = pick(3, 1)             # timed steps per implementation (after one warm-up step)
POOL = pick(64, 8)             # synthetic samples packed into micro-batches
TEXT_MEDIAN = pick(150, 24)    # text tokens of a sample (log-normal median)
MATMUL_N = pick(8192, 64)      # the MFU denominator's square matmul
VOCAB, IMAGE_TOKEN = pick((32064, 32000), (128, 120))


def model_config() -> LlavaConfig:
    """CLIP ViT-L/14-336 + a 1B-class LLaMA decoder; in smoke mode the same layout (GQA, quick_gelu
    tower, layer -2) at toy widths with 4 image rows."""
    vision = pick(dict(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, image_size=336),
                  dict(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=2, image_size=28))
    text = pick(dict(hidden_size=2048, intermediate_size=5632, num_layers=16, num_heads=16, num_kv_heads=8,
                     head_dim=128),
                dict(hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16))
    return LlavaConfig(
        vision=VisionConfig(patch_size=14, hidden_act="quick_gelu", **vision),
        text=TextConfig(vocab_size=VOCAB, max_position_embeddings=4096, pad_token_id=0, **text),
        projector_type="mlp2x_gelu", image_token_id=IMAGE_TOKEN, vision_feature_layer=(-2,))


def synthetic_samples(n: int, cfg: LlavaConfig, seed: int = 0) -> list[Sample]:
    """Image samples with the 665K mix's shape: BOS, a system+question prefix, the image rows, then
    alternating human/answer turns; answers (and only answers) are labelled."""
    rng = random.Random(seed)
    s = cfg.image_seq_len
    out = []
    for i in range(n):
        text = int(min(max(rng.lognormvariate(math.log(TEXT_MEDIAN), 0.8), 16), 2048 - s - 1 - 40))
        ids = [1] + [rng.randrange(3, IMAGE_TOKEN) for _ in range(40)] + [IMAGE_TOKEN] * s
        labels = [IGNORE_INDEX] * len(ids)
        answer = False
        while text > 0:
            turn = min(text, rng.randint(8, 64))
            toks = [rng.randrange(3, IMAGE_TOKEN) for _ in range(turn)]
            ids += toks
            labels += toks if answer else [IGNORE_INDEX] * turn
            answer, text = not answer, text - turn
        out.append(Sample(f"synthetic-{i}", ids, labels, images=(f"synthetic-{i}.png",)))
    return out


def micro_batch(samples: list[Sample], pixels: torch.Tensor) -> MicroBatch:
    """Pack like train.data.collate, with given pixel values instead of image files."""
    ids = sum((s.input_ids for s in samples), [])
    targets = sum((shifted_targets(s.labels) for s in samples), [])
    cu, pos, max_len = pack_cu_seqlens([s.length for s in samples])
    return MicroBatch(torch.tensor(ids), torch.tensor(targets), cu, pos, max_len, pixels,
                      [s.id for s in samples])


def padded(mb: MicroBatch, samples: list[Sample]) -> dict:
    """The same sequences right-padded for transformers (labels aligned: it shifts them itself)."""
    width = max(s.length for s in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(samples):
        ids[i, :s.length] = torch.tensor(s.input_ids)
        labels[i, :s.length] = torch.tensor(s.labels)
        mask[i, :s.length] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": mb.pixel_values}


def model_flops(cfg: LlavaConfig, seqlens: list[int], n_targets: int, n_images: int) -> float:
    """Useful FLOPs of one step (fwd+bwd = 3× fwd for trained parts; the frozen tower forward only)."""
    t, v = cfg.text, cfg.vision
    d, dh, f = t.hidden_size, t.head_dim, t.intermediate_size
    lin = 2 * (d * t.num_heads * dh + 2 * d * t.num_kv_heads * dh + t.num_heads * dh * d + 3 * d * f)
    attn = sum(2 * 2 * (L * L / 2) * t.num_heads * dh for L in seqlens)        # QKᵀ and PV, causal half
    decoder = 3 * t.num_layers * (lin * sum(seqlens) + attn)
    head = 3 * 2 * d * t.vocab_size * n_targets
    p, dv = v.num_patches + 1, v.hidden_size
    tower_layer = 2 * p * (4 * dv * dv + 2 * dv * v.intermediate_size) + 2 * 2 * p * p * dv
    patch_embed = 2 * v.num_patches * v.num_channels * v.patch_size ** 2 * dv
    tower = n_images * (cfg.vision_layers_needed * tower_layer + patch_embed)
    projector = 3 * 2 * n_images * cfg.image_seq_len * (cfg.projector_in_features * d + d * d)
    return decoder + head + tower + projector


def matmul_tflops() -> float:
    """Measured dense bf16 matmul rate (MATMUL_N³ = 8192³), the MFU denominator."""
    a = torch.randn(MATMUL_N, MATMUL_N, device=bench_device(), dtype=torch.bfloat16)
    b = torch.randn(MATMUL_N, MATMUL_N, device=bench_device(), dtype=torch.bfloat16)
    ms = cuda_time_ms(lambda: a @ b, warmup=25, rep=100)
    return 2 * MATMUL_N ** 3 / (ms * 1e-3) / 1e12


def wall_ms(fn, steps: int) -> float:
    """Median wall time of ``fn()`` over ``steps`` calls, synchronised (a step syncs on the host anyway)."""
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_transformers(hf, batches: list[dict], shares: list[float], autocast) -> tuple[float, float, float]:
    """(median ms, peak MB above resident, absolute peak MB) of transformers' optimizer step."""
    params = [p for p in hf.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-5, weight_decay=0.0)

    def step():
        for batch, share in zip(batches, shares, strict=True):
            with autocast:
                loss = hf(**batch).loss                            # mean over this micro-batch's targets
            (loss * share).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()                                                         # warm-up (and AdamW state)
    ms = wall_ms(step, STEPS)
    peak = peak_memory_mb(step)
    return ms, peak, max_memory_mb()


def time_ours(model, mbs: list[MicroBatch], n_targets: int, cfg: LoopConfig, autocast, benchmark):
    """(median ms, peak MB above resident, absolute peak MB) of the training loop's optimizer step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, 1000, cfg.warmup_ratio))

    def step():
        train_step(model, opt, sched, params, mbs, n_targets, cfg, autocast, mbs[0].input_ids.device)

    step()                                                         # warm-up: kernel compilation, AdamW state
    ms = wall_ms(step, STEPS)
    peak = peak_memory_mb(step)
    abs_peak = max_memory_mb()
    benchmark.pedantic(step, rounds=STEPS, warmup_rounds=0)
    return ms, peak, abs_peak


@pytest.mark.gpu
def test_stage2_step_llava15_1b(benchmark, tmp_path):
    if not SMOKE:
        total = torch.cuda.get_device_properties(0).total_memory
        if total < 60 * 2**30 or not torch.cuda.is_bf16_supported():
            pytest.skip(f"needs a bf16 GPU with ≥ 60 GiB (this one: {total / 2**30:.0f} GiB)")
    from transformers import LlavaConfig as HFLlavaConfig
    from transformers import LlavaForConditionalGeneration

    t_start = time.time()
    cfg = model_config()
    dev = torch.device(bench_device())
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16)
    peak_tflops = matmul_tflops()

    # ---- data: the first MICRO first-fit micro-batches of 64 synthetic image samples
    pool = synthetic_samples(POOL, cfg)
    groups = [[pool[i] for i in b] for b in pack_micro_batches([s.length for s in pool], MAX_TOKENS)[:MICRO]]
    g = torch.Generator().manual_seed(0)
    px = cfg.vision.image_size
    mbs = [micro_batch(grp, torch.randn(len(grp), 3, px, px, generator=g)) for grp in groups]
    hf_batches = [{k: v.to(dev) for k, v in padded(mb, grp).items()}
                  for mb, grp in zip(mbs, groups, strict=True)]
    dev_mbs = [mb.to(dev) for mb in mbs]
    n_targets = sum(mb.num_targets for mb in mbs)
    tokens = sum(int(mb.input_ids.numel()) for mb in mbs)
    seqlens = [s.length for grp in groups for s in grp]
    flops = model_flops(cfg, seqlens, n_targets, len(seqlens))
    common = {"tokens": tokens, "target_tokens": n_targets, "sequences": len(seqlens),
              "matmul_tflops_bf16": peak_tflops}
    case = f"{pick('llava15-1b', 'tiny')} S={cfg.image_seq_len} {MICRO}x{MAX_TOKENS}tok bf16-autocast stage2 step"
    formula = "6*T*P_lin + 3*sum(2*L^2*H*Dh)*layers + 6*Tt*D*V + tower fwd + 6*N*S*(Dv*D+D*D)"

    # ---- models: transformers' first; ours is assigned the same parameter tensors
    with torch.device(dev):
        hf = LlavaForConditionalGeneration._from_config(HFLlavaConfig.from_dict(cfg.to_hf_dict()),
                                                        attn_implementation="sdpa").float().train()
    assert hf.config._attn_implementation == "sdpa"
    state = rename(hf.state_dict(), HF_LLAVA, "transformers model")
    ours = assign_state(new_model(cfg, kernel_backend=None), state, "transformers model", dtype=torch.float32,
                        device=dev)
    del state
    freeze_for_stage(ours, 2)
    for name, p in hf.named_parameters():
        p.requires_grad_("vision_tower" not in name)
    loop_cfg = LoopConfig(output=str(tmp_path), lr=2e-5, global_batch=len(seqlens), fused=True,
                          progress=False)

    # ---- correctness before speed: one micro-batch (its own target count), transformers in fp32
    with torch.no_grad():
        ref = float(hf(**hf_batches[0]).loss)
        mine = float(micro_loss(ours, dev_mbs[0], mbs[0].num_targets, loop_cfg, autocast)[0])
    assert math.isfinite(mine) and abs(mine - ref) <= 2e-2 * abs(ref), (mine, ref)

    shares = [mb.num_targets / n_targets for mb in mbs]
    hf_ms, hf_peak, hf_abs = time_transformers(hf, hf_batches, shares, autocast)
    for p in hf.parameters():
        p.grad = None
    torch.cuda.empty_cache()
    ms, peak, abs_peak = time_ours(ours, dev_mbs, n_targets, loop_cfg, autocast, benchmark)

    def mfu(step_ms: float) -> float:
        return flops / (step_ms * 1e-3) / 1e12 / peak_tflops

    padded_tokens = sum(b["input_ids"].numel() for b in hf_batches)
    rows = [
        Row(suite=SUITE, case=case, impl="transformers", ms=hf_ms, work=flops, unit="TFLOP/s",
            formula=formula, peak_mem_mb=hf_peak,
            extra={**common, "padded_tokens": padded_tokens, "tokens_per_s": tokens / (hf_ms * 1e-3),
                   "mfu": mfu(hf_ms), "abs_peak_mem_mb": hf_abs, "loss_check": ref}),
        Row(suite=SUITE, case=case, impl="ours", ms=ms, work=flops, unit="TFLOP/s", formula=formula,
            peak_mem_mb=peak, ref_ms=hf_ms,
            extra={**common, "tokens_per_s": tokens / (ms * 1e-3), "mfu": mfu(ms),
                   "abs_peak_mem_mb": abs_peak, "mem_vs_transformers": peak / hf_peak if hf_peak else None,
                   "loss_check": mine,
                   "kernels": llava_kernels.dispatch.describe(dev),
                   "attention": resolve_backend(dev, None, torch.bfloat16, cfg.text.head_dim),
                   "seconds_total": round(time.time() - t_start, 1)}),
    ]
    save(SUITE, rows)


# --------------------------------------------------------------------------- QLoRA: peak memory at 7B

QLORA_TOKENS = pick(2048, 160)                 # one packed micro-batch: one image sample of this length
NF4_BLOCKS = pick((64, 256), (16, 8))          # QLoRA's NF4 block / scaler-block sizes (tiny widths: smaller)


def qlora_config() -> LlavaConfig:
    """LLaVA-1.5-7B's shape (CLIP ViT-L/14-336 + Vicuna-7B: D 4096, 32 layers, 32 heads, FFN 11008, V 32064);
    the 1B case's toy layout in smoke mode."""
    if SMOKE:
        return model_config()
    return LlavaConfig(
        vision=VisionConfig(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, image_size=336,
                            patch_size=14, hidden_act="quick_gelu"),
        text=TextConfig(vocab_size=VOCAB, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                        num_kv_heads=32, head_dim=128, max_position_embeddings=4096, pad_token_id=0),
        projector_type="mlp2x_gelu", image_token_id=IMAGE_TOKEN, vision_feature_layer=(-2,))


@pytest.mark.gpu
def test_stage2_qlora_step_7b_peak_memory(benchmark, tmp_path):
    """``train.stage2 --qlora``'s model (fp32 load, PEFT LoRA r 128 / alpha 256 on every decoder linear, the
    decoder linears' base in torchao NF4, projector trained, tower frozen) at LLaVA-1.5-7B's shape: one
    optimizer step (bf16 autocast, gradient checkpointing, AdamW) on a 2048-token micro-batch. Goal: the
    absolute peak (weights + adapters + AdamW state + activations; no CUDA context) fits in 24 GiB.
    Needs CUDA (``--qlora`` is CUDA-only): without it the gpu mark skips it (BENCH_SMOKE=1 runs the code on
    the CPU at toy widths)."""
    from engine.lora import LoraSettings, add_lora, quantize_base_nf4
    t_start = time.time()
    cfg = qlora_config()
    dev = torch.device(bench_device())
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    torch.manual_seed(0)
    model = new_model(cfg, kernel_backend=None)
    model.to_empty(device=dev)
    with torch.no_grad():                      # random weights: a memory/step measurement, not a model
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    freeze_for_stage(model, 2)
    add_lora(model, LoraSettings(r=pick(128, 8), alpha=pick(256.0, 16.0), dropout=0.05))
    n_quantized = quantize_base_nf4(model, block_size=NF4_BLOCKS[0], scaler_block_size=NF4_BLOCKS[1])
    model.decoder.gradient_checkpointing = True
    adapters = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)

    sample = synthetic_samples(1, cfg)[0]      # one image sample cut to QLORA_TOKENS: image rows + text
    ids = (sample.input_ids + [5] * QLORA_TOKENS)[:QLORA_TOKENS]
    labels = (sample.labels + [5] * QLORA_TOKENS)[:QLORA_TOKENS]
    one = Sample("qlora", ids, labels, images=("qlora.png",))
    px = cfg.vision.image_size
    mb = micro_batch([one], torch.randn(1, 3, px, px, generator=torch.Generator().manual_seed(0))).to(dev)
    loop_cfg = LoopConfig(output=str(tmp_path), lr=2e-4, global_batch=1, fused=True, progress=False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=loop_cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    losses = []

    def step():
        losses.append(train_step(model, opt, sched, params, [mb], mb.num_targets, loop_cfg, autocast, dev)["loss"])

    step()                                     # warm-up: kernels, AdamW state
    assert all(math.isfinite(x) for x in losses), losses
    sync()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() / 2**20 if dev.type == "cuda" and not SMOKE else None
    ms = wall_ms(step, STEPS)
    abs_peak = max_memory_mb()
    benchmark.pedantic(step, rounds=1, warmup_rounds=0)
    case = f"{pick('llava15-7b', 'tiny')} qlora-nf4 r{pick(128, 8)} 1x{QLORA_TOKENS}tok ckpt bf16-autocast step"
    row = Row(suite=SUITE, case=case, impl="ours", ms=ms, unit="TFLOP/s", work=0.0,
              formula="a memory case (no FLOP rate): torch.cuda.max_memory_allocated over the timed steps",
              peak_mem_mb=None if abs_peak is None or resident is None else abs_peak - resident,
              extra={"abs_peak_mem_mb": abs_peak, "resident_mb": resident,
                     "fits_24gib": None if abs_peak is None else abs_peak < 24 * 1024,
                     "tokens": QLORA_TOKENS, "tokens_per_s": QLORA_TOKENS / (ms * 1e-3),
                     "adapter_params": adapters, "trained_params": trained, "nf4_linears": n_quantized,
                     "nf4_blocks": list(NF4_BLOCKS), "loss": losses[-1],
                     "seconds_total": round(time.time() - t_start, 1)})
    save(SUITE, [row])
