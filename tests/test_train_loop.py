"""The training loop's numerics (train/loop.py), in process, fp32 on the CPU.

- loss parity with transformers' LlavaForConditionalGeneration (padded, labels) for one stage-2
  step: same loss and the same gradients of every projector and decoder weight;
- packing: a packed batch's loss is the token-weighted mean of its samples run alone, and no
  attention crosses a sequence boundary;
- gradient accumulation: micro-batches normalised by the step's global target count add up to
  the one-batch gradient; the loop's reported loss and grad-norm do not depend on the split;
- the cosine schedule and the checkpoint-directory helpers.
"""
from __future__ import annotations

import contextlib
import json
import math
import os

import pytest
import torch
from helpers import (
    ANYRES_IMAGE_SIZES,
    ANYRES_PINPOINTS,
    IMAGE_SIZE,
    SPEC,
    assert_close_rule,
    hf_model,
    load_tiny,
    rel_err,
    write_anyres_data,
    write_multi_image_data,
)
from transformers import AutoTokenizer, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

import engine
from engine.conversation import IGNORE_INDEX
from engine.image import ImageSpec
from engine.weights import to_hf_state
from train.checkpoint import latest_checkpoint, remove_stale_temporaries
from train.data import collate
from train.loop import LoopConfig, cosine_lr, micro_loss, train
from train.stage import freeze_for_stage

NO_AUTOCAST = contextlib.nullcontext()


@pytest.fixture(scope="module")
def hf_dir(assets, tmp_path_factory):
    """A tiny HF llava (helpers.hf_model) on the tiny tokenizer's vocabulary and image token."""
    hf = hf_model(vocab=len(AutoTokenizer.from_pretrained(assets.tok_dir)), image_token=assets.image_token_id)
    assert hf.config.image_seq_length == assets.image_seq_len
    path = str(tmp_path_factory.mktemp("hf"))
    hf.save_pretrained(path)
    return path


def ours_for_training(path: str, stage: int = 2) -> engine.Llava:
    """Our model as the loop sets it up without --fused: reference kernels and attention, frozen tower."""
    model = engine.load(path, dtype=torch.float32, kernel_backend="torch")
    model.attention_backend = "sdpa"
    freeze_for_stage(model, stage)
    return model.train()


def loop_cfg(tmp, **kw) -> LoopConfig:
    kw = {"lr": 1e-3, "global_batch": 4, "seed": 0, "num_workers": 0, "progress": False, **kw}
    return LoopConfig(output=str(tmp), **kw)


def hf_module_name(v4_key: str) -> str:
    """engine.weights.to_hf_state names (checkpoint layout) → LlavaForConditionalGeneration's names."""
    for old, new in (("language_model.model.", "model.language_model."),
                     ("language_model.lm_head.", "lm_head."),
                     ("multi_modal_projector.", "model.multi_modal_projector."),
                     ("vision_tower.", "model.vision_tower."), ("image_newline", "model.image_newline")):
        if v4_key.startswith(old):
            return new + v4_key[len(old):]
    raise AssertionError(f"unexpected export key {v4_key}")


def padded_hf_batch(batch, pad_id: int):
    """Right-padded input_ids / attention_mask / labels (HF convention: labels aligned, shifted inside)."""
    width = max(s.length for s in batch)
    ids = torch.full((len(batch), width), pad_id)
    labels = torch.full((len(batch), width), IGNORE_INDEX)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, s in enumerate(batch):
        ids[i, :s.length] = torch.tensor(s.input_ids)
        labels[i, :s.length] = torch.tensor(s.labels)
        mask[i, :s.length] = 1
    return ids, mask, labels


# --------------------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("images", ["one", "several"])
def test_stage2_step_matches_transformers(assets, hf_dir, samples, tmp_path, images):
    if images == "one":
        batch = [samples[2], samples[-1], samples[5], samples[-3]]  # image, text, image, text: lengths differ
    else:   # 3 images, text, 2 images in two rounds, 1 image: one tower call over all 6, in order
        multi = {s.id: s for s in load_tiny(assets, write_multi_image_data(assets, str(tmp_path)))[0]}
        batch = [multi["multi-three"], multi["multi-text"], multi["multi-rounds"], multi["multi-string"]]
    assert len({s.length for s in batch}) > 1
    mb = collate(batch, spec=SPEC)

    hf = LlavaForConditionalGeneration.from_pretrained(hf_dir, attn_implementation="sdpa").train()
    for name, p in hf.named_parameters():
        p.requires_grad_("vision_tower" not in name)                # stage 2: the tower is frozen
    pad_id = AutoTokenizer.from_pretrained(assets.tok_dir).pad_token_id
    ids, mask, labels = padded_hf_batch(batch, pad_id=pad_id)
    ref = hf(input_ids=ids, attention_mask=mask, pixel_values=mb.pixel_values, labels=labels).loss
    ref.backward()

    ours = ours_for_training(hf_dir)
    loss, seq_sum = micro_loss(ours, mb, mb.num_targets, loop_cfg(tmp_path), NO_AUTOCAST)
    loss.backward()

    assert rel_err(loss, ref) <= 1e-5, (float(loss), float(ref))
    assert rel_err(seq_sum / mb.num_targets, ref) <= 1e-5
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert grads and all(n.startswith(("projector.", "decoder.")) for n in grads)
    assert all(p.grad is None for n, p in ours.named_parameters() if n.startswith("vision."))
    hf_params = dict(hf.named_parameters())
    compared = 0
    for key, g in to_hf_state(grads, ours.config).items():
        hf_grad = hf_params[hf_module_name(key)].grad
        assert_close_rule(g, hf_grad, what=f"grad of {key}")
        compared += 1
    assert compared == len(grads)


def hf_llava_next(vocab: int, image_token: int, path: str) -> str:
    """A random tiny LlavaNextForConditionalGeneration on the assets' tower shape (28 px, patch 14) with small
    pinpoints, its norms, biases, class embedding and image_newline perturbed; saved to ``path``."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(0)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=IMAGE_SIZE, patch_size=14, hidden_act="quick_gelu")
    tc = LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, rope_theta=500.0, rms_norm_eps=1e-5)
    cfg = LlavaNextConfig(vision_config=vc, text_config=tc, image_token_index=image_token, vision_feature_layer=-2,
                          vision_feature_select_strategy="default", image_grid_pinpoints=ANYRES_PINPOINTS)
    model = LlavaNextForConditionalGeneration(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "class_embedding" in name or "image_newline" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return path


def test_anyres_stages_train_image_newline_in_stage_2_only(assets, tmp_path):
    """Upstream LLaVA-NeXT: stage 1 (tune_mm_mlp_adapter) trains the projector alone; stage 2 also the
    decoder and image_newline; the tower never."""
    path = hf_llava_next(len(AutoTokenizer.from_pretrained(assets.tok_dir)), assets.image_token_id,
                         str(tmp_path / "hf_next"))
    for stage, newline in ((1, False), (2, True)):
        model = ours_for_training(path, stage)
        assert model.image_newline.requires_grad is newline, stage
        assert all(p.requires_grad for p in model.projector.parameters())
        assert all(p.requires_grad is (stage == 2) for p in model.decoder.parameters())
        assert not any(p.requires_grad for p in model.vision.parameters())


def test_anyres_stage2_step_matches_transformers_llava_next(assets, tmp_path):
    """AnyRes training through the packed path: records with 0-2 images of different sizes and aspect ratios,
    every tile of every image in one pixel tensor, ``image_sizes`` through the loop's forward; loss and every
    trainable gradient (projector, image_newline, decoder) equal transformers' LlavaNext on the padded batch."""
    tok = AutoTokenizer.from_pretrained(assets.tok_dir)
    path = hf_llava_next(len(tok), assets.image_token_id, str(tmp_path / "hf_next"))
    ours = ours_for_training(path)
    cfg = ours.config
    assert cfg.anyres and ours.image_newline.requires_grad
    data = write_anyres_data(str(tmp_path))
    batch, report = load_tiny(assets, data, image_folder=str(tmp_path), image_rows=cfg.image_rows)
    assert len(batch) == 4 and not report.skipped
    sizes = [(h, w) for h, w in ANYRES_IMAGE_SIZES]
    assert len({cfg.image_rows(h, w) for h, w in sizes}) == len(sizes)    # every image a different run length
    mb = collate(batch, spec=ImageSpec.from_config(cfg))
    tiles = [cfg.image_tiles(h, w) for h, w in sizes]
    assert mb.image_sizes.tolist() == [list(s) for s in sizes] and mb.pixel_values.shape[0] == sum(tiles)

    hf = LlavaNextForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa").train()
    for name, p in hf.named_parameters():
        p.requires_grad_("vision_tower" not in name)
    ids, mask, labels = padded_hf_batch(batch, pad_id=tok.pad_token_id)
    per_image = torch.zeros(len(sizes), max(tiles), 3, IMAGE_SIZE, IMAGE_SIZE)   # HF: [N, K_max, 3, S, S]
    for i, t in enumerate(mb.pixel_values.split(tiles)):
        per_image[i, :len(t)] = t
    ref = hf(input_ids=ids, attention_mask=mask, pixel_values=per_image, image_sizes=mb.image_sizes,
             labels=labels).loss
    ref.backward()

    loss, _ = micro_loss(ours, mb, mb.num_targets, loop_cfg(tmp_path), NO_AUTOCAST)
    loss.backward()
    assert rel_err(loss, ref) <= 1e-5, (float(loss), float(ref))
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert "image_newline" in grads and all(g is not None for g in grads.values())
    hf_params = dict(hf.named_parameters())
    for key, g in to_hf_state(grads, cfg).items():
        assert_close_rule(g, hf_params[hf_module_name(key)].grad, what=f"grad of {key}")


# --------------------------------------------------------------------------- packing


def test_packed_loss_is_token_weighted_mean_of_samples(assets, samples, tmp_path):
    model = ours_for_training(assets.model_dir)
    batch = [samples[0], samples[-2], samples[3], samples[7]]
    cfg = loop_cfg(tmp_path)
    with torch.no_grad():
        mb = collate(batch, spec=SPEC)
        packed, _ = micro_loss(model, mb, mb.num_targets, cfg, NO_AUTOCAST)
        total, count = torch.zeros((), dtype=torch.float64), 0
        for s in batch:
            one = collate([s], spec=SPEC)
            alone, _ = micro_loss(model, one, one.num_targets, cfg, NO_AUTOCAST)
            total += alone.double() * one.num_targets
            count += one.num_targets
    assert count == mb.num_targets
    assert rel_err(packed, total / count) <= 1e-6


def test_no_attention_across_sequence_boundaries(assets, samples):
    model = ours_for_training(assets.model_dir).eval()
    batch = [samples[0], samples[4], samples[-1]]                    # the middle one is changed below
    mb = collate(batch, spec=SPEC)

    def logits(batch, ids=None, pixels=None):
        ids = batch.input_ids if ids is None else ids
        pixels = batch.pixel_values if pixels is None else pixels
        with torch.no_grad():
            hidden = model.forward_packed(ids, cu_seqlens=batch.cu_seqlens, position_ids=batch.position_ids,
                                          max_seqlen=batch.max_seqlen, pixel_values=pixels)
            return model.logits(hidden)

    base = logits(mb)
    a, b = mb.cu_seqlens[1].item(), mb.cu_seqlens[2].item()
    ids = mb.input_ids.clone()
    text = (ids[a:b] != assets.image_token_id).nonzero().flatten() + a
    g = torch.Generator().manual_seed(1)
    ids[text] = torch.randint(3, assets.image_token_id, (len(text),), generator=g)
    pixels = mb.pixel_values.clone()
    pixels[1] = torch.randn_like(pixels[1])                          # the middle sequence's image
    changed = logits(mb, ids, pixels)
    assert not torch.allclose(changed[a:b], base[a:b])
    assert torch.equal(changed[:a], base[:a]) and torch.equal(changed[b:], base[b:])
    # And each sequence's rows equal the sequence run on its own.
    for k, s in enumerate(batch):
        lo, hi = mb.cu_seqlens[k].item(), mb.cu_seqlens[k + 1].item()
        alone = logits(collate([s], spec=SPEC))
        assert rel_err(base[lo:hi], alone) <= 1e-6


# --------------------------------------------------------------------------- gradient accumulation


def test_accumulated_micro_batches_equal_one_batch(assets, samples, tmp_path):
    batch = [samples[i] for i in (0, 1, 2, 3, 4, 5, 6, 7)]
    cfg = loop_cfg(tmp_path)
    n = sum(collate([s], spec=SPEC).num_targets for s in batch)

    def grads(groups):
        model = ours_for_training(assets.model_dir)
        total = 0.0
        for g in groups:
            loss, _ = micro_loss(model, collate(g, spec=SPEC), n, cfg, NO_AUTOCAST)
            loss.backward()
            total += float(loss.detach())
        return total, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    one_loss, one = grads([batch])
    four_loss, four = grads([batch[0:2], batch[2:4], batch[4:6], batch[6:8]])
    assert abs(four_loss - one_loss) <= 1e-6 * abs(one_loss)
    assert one.keys() == four.keys() and any(k.startswith("projector.") for k in one)
    for k in one:
        assert rel_err(four[k], one[k]) <= 1e-6, k


def test_loop_step_does_not_depend_on_the_micro_batch_split(assets, samples, tmp_path):
    """One optimizer step of 4 samples as 1 micro-batch and as 4: same loss, grad-norm and weights."""
    image_samples = [s for s in samples if s.images][:4]
    runs = {}
    for name, budget in (("one", 100_000), ("four", 1)):             # budget 1: one sample per micro-batch
        model = ours_for_training(assets.model_dir)
        cfg = loop_cfg(tmp_path / name, max_tokens_per_batch=budget, max_steps=1)
        result = train(model, image_samples, cfg, device=torch.device("cpu"), tokenizer_dir=assets.tok_dir)
        with open(tmp_path / name / "metrics.jsonl") as f:
            (metrics,) = [json.loads(line) for line in f]
        runs[name] = (metrics, dict(model.named_parameters()), result)
    (m1, p1, r1), (m4, p4, _) = runs["one"], runs["four"]
    assert m1["step"] == m4["step"] == 1 and m1["target_tokens"] == m4["target_tokens"] > 0
    assert m1["tokens"] == m4["tokens"] == sum(s.length for s in image_samples)
    assert abs(m1["loss"] - m4["loss"]) <= 1e-6 * m1["loss"] and abs(r1.last_loss - m1["loss"]) == 0
    assert abs(m1["grad_norm"] - m4["grad_norm"]) <= 1e-6 * m1["grad_norm"]
    for k in p1:
        assert rel_err(p4[k], p1[k]) <= 1e-6, k


def test_loop_trains_on_multi_image_records(assets, tmp_path):
    """Two optimizer steps over records with 1-3 images each (several per micro-batch) run, and the
    images reach the loss: the projector gets a gradient and the loss is finite."""
    data = write_multi_image_data(assets, str(tmp_path))
    multi = [s for s in load_tiny(assets, data)[0] if s.images]
    assert sum(len(s.images) for s in multi) > len(multi)
    model = ours_for_training(assets.model_dir)
    before = model.projector.linear_1.weight.detach().clone()
    cfg = loop_cfg(tmp_path / "run", global_batch=3, max_steps=2)
    result = train(model, multi, cfg, device=torch.device("cpu"), tokenizer_dir=assets.tok_dir)
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert result.steps_done == 2 and [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    assert sum(r["tokens"] for r in rows) == sum(s.length for s in multi)   # 3 + 2 samples: all of them
    assert not torch.equal(model.projector.linear_1.weight, before)


# --------------------------------------------------------------------------- schedule and checkpoint helpers


def test_cosine_schedule_with_warmup():
    total = 100
    lrs = [cosine_lr(s, total, 0.03) for s in range(total)]
    assert lrs[:3] == [1 / 3, 2 / 3, 1.0]                          # ceil(3%·100) = 3 warmup steps
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:], strict=False))   # then non-increasing
    assert lrs[-1] < 1e-3 and abs(lrs[3 + 48] - 0.5) < 0.02        # to ~0, half-way at the middle
    assert cosine_lr(0, 1, 0.03) == 1.0


def test_latest_checkpoint_sees_only_complete_directories(tmp_path):
    ck = tmp_path / "checkpoints"
    for name, complete in (("step-000002", True), ("step-000004", True), ("step-000006", False)):
        (ck / name).mkdir(parents=True)
        if complete:
            (ck / name / "training_state.pt").write_bytes(b"x")
    (ck / ".step-000008.tmp-abc").mkdir()
    (ck / ".step-000008.tmp-abc" / "training_state.pt").write_bytes(b"x")
    (tmp_path / ".final.tmp-xyz").mkdir()
    assert latest_checkpoint(str(tmp_path)) == str(ck / "step-000004")
    remove_stale_temporaries(str(tmp_path))
    assert sorted(os.listdir(ck)) == ["step-000002", "step-000004", "step-000006"]
    assert not (tmp_path / ".final.tmp-xyz").exists()
    assert latest_checkpoint(str(tmp_path / "nothing")) is None


# --------------------------------------------------------------------------- --fused vs the reference path


def test_fused_kernels_give_the_reference_loss_curve(assets, samples, tmp_path, monkeypatch):
    """--fused runs the Triton projector, scatter and masked loss (the interpreter here) in the same
    loop; three optimizer steps follow the reference path's loss curve and end at the same weights."""
    monkeypatch.setenv("LLAVA_KERNEL_BACKEND", "triton")   # what --fused picks on a GPU, forced on CPU
    from llava_kernels import dispatch
    assert set(dispatch.describe(torch.device("cpu")).values()) == {"triton"}
    image_samples = [s for s in samples if s.images][:6]
    curves, weights = {}, {}
    for fused in (False, True):
        model = ours_for_training(assets.model_dir)
        cfg = loop_cfg(tmp_path / str(fused), max_steps=3, fused=fused, global_batch=2)
        train(model, image_samples, cfg, device=torch.device("cpu"), tokenizer_dir=assets.tok_dir)
        with open(tmp_path / str(fused) / "metrics.jsonl") as f:
            curves[fused] = [json.loads(line)["loss"] for line in f]
        weights[fused] = {k: p.detach().clone() for k, p in model.named_parameters()}
    assert len(curves[True]) == len(curves[False]) == 3
    for a, b in zip(curves[True], curves[False], strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (curves[True], curves[False])
    for k, w in weights[False].items():
        assert rel_err(weights[True][k], w) <= 1e-5, k
