"""The embedded default: everything from nothing, on a CPU, in minutes.

``python -m train.stage2 --fused`` with no model and no data:
1. writes the bundled procedural shapes dataset (train/shapes.py) and turns its captions and
   boxes into instruction data with the offline teacher (train/make_instruct.py);
2. trains a small tokenizer and builds a tiny LLaVA (CLIP-style tower, LLaMA-style decoder);
3. stage 1 (projector only, `plain` captions), then stage 2 (projector + LLM, `vicuna_v1`
   instructions + multiple-choice training questions), through the same code as real runs;
4. answers the held-out multiple-choice questions with ``engine.generate`` (greedy) and prints
   accuracy against chance (1 / number of options).

On a CPU the fused kernels fall back to the torch reference with a one-line notice (the
Triton interpreter is far too slow for training); on a GPU ``--fused`` uses them.

``--anyres``: the same run as LLaVA-1.6 (NeXT): the tower tiles each image over the grid pinpoints
(1×2, 2×1, 2×2 tiles of the tower's size, ``anyres_pinpoints``) and the images have varied sizes and
aspect ratios (``anyres_image_sizes``), so every image has its own tile grid and row count; training
takes every tile of every image of a micro-batch in one tower call, and the evaluation generates with
``image_sizes``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time

import torch
from PIL import Image

import llava_kernels
from engine.config import LlavaConfig, TextConfig, VisionConfig
from engine.conversation import generation_prompt, get_template
from engine.image import ImageSpec
from engine.io import write_text_atomic
from engine.model import Llava
from train.data import load_samples
from train.loop import LoopConfig, train


@dataclasses.dataclass(frozen=True, kw_only=True)
class DefaultSizes:
    """Sizes of the embedded default (the CI test shrinks them)."""
    num_train: int = 1500
    num_test: int = 200
    image_size: int = 32
    stage1_steps: int = 40
    stage2_epochs: int = 6
    mc_per_image: int = 3
    stage2_lr: float = 1e-3
    global_batch: int = 32
    max_tokens_per_batch: int = 4096


def anyres_pinpoints(image_size: int) -> tuple[tuple[int, int], ...]:
    """(height, width) grids of the ``--anyres`` default: 1×2, 2×1 and 2×2 tiles of the tower's size."""
    s = image_size
    return ((s, 2 * s), (2 * s, s), (2 * s, 2 * s))


def anyres_image_sizes(image_size: int) -> tuple[tuple[int, int], ...]:
    """(height, width) of the ``--anyres`` default's images: wide, tall, square at 1.5× and at 1×, and an
    odd 5:8 size, so the chosen grids (and the unpadded feature maps) differ."""
    s = image_size
    return ((s, 2 * s), (2 * s, s), (3 * s // 2, 3 * s // 2), (s, s), (5 * s // 4, 2 * s))


def tiny_llava(vocab_size: int, image_token_id: int, image_size: int, *, anyres: bool = False) -> LlavaConfig:
    return LlavaConfig(
        vision=VisionConfig(hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4, image_size=image_size,
                            patch_size=8),
        text=TextConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_layers=3, num_heads=4,
                        num_kv_heads=2, head_dim=32, max_position_embeddings=1024),
        projector_type="mlp2x_gelu", image_token_id=image_token_id,
        image_grid_pinpoints=anyres_pinpoints(image_size) if anyres else ())


def caption_records(captions_jsonl: str, out: str) -> str:
    """Stage-1 data as upstream's LCS-558K: the image, then one caption (`plain` template)."""
    records = []
    with open(captions_jsonl) as f:
        for line in f:
            r = json.loads(line)
            for k, cap in enumerate(r["captions"][:2]):
                records.append({"id": f"{r['id']}-cap{k}", "image": r["image"], "conversations": [
                    {"from": "human", "value": "<image>\nDescribe the image briefly."},
                    {"from": "gpt", "value": cap}]})
    write_text_atomic(out, json.dumps(records))
    return out


def mc_accuracy(model: Llava, tokenizer, records: list[dict], image_folder: str, *,
                batch: int = 64) -> tuple[float, float]:
    """Greedy answers to multiple-choice records → (accuracy, chance). Each image is preprocessed as the
    model's config says (one tile, or AnyRes tiles) and expands to ``image_rows`` of its own size."""
    from engine.generate import generate

    template = get_template("vicuna_v1")
    cfg = model.config
    spec = ImageSpec.from_config(cfg)
    correct, chance = 0, 0.0
    for k in range(0, len(records), batch):
        chunk = records[k:k + batch]
        prompts, pixels, sizes = [], [], []
        for r in chunk:
            with Image.open(os.path.join(image_folder, r["image"])) as img:
                pixels.append(spec.preprocess_image(img))                        # (K, 3, S, S)
                sizes.append((img.height, img.width))
            prompts.append(generation_prompt(tokenizer, template, r["conversations"][:1],
                                             image_token_id=cfg.image_token_id,
                                             image_seq_len=[cfg.image_rows(*sizes[-1])]))
        outs = generate(model, prompts, images=torch.cat(pixels), image_sizes=torch.tensor(sizes),
                        max_new_tokens=3, stop_token_ids=[tokenizer.eos_token_id])
        for r, out in zip(chunk, outs, strict=True):
            text = tokenizer.decode(out.tokens, skip_special_tokens=True).strip()
            options = re.findall(r"^[A-D]\. ", r["conversations"][0]["value"], flags=re.M)
            chance += 1.0 / len(options)
            correct += text[:1] == r["conversations"][1]["value"].strip()
    return correct / len(records), chance / len(records)


def run_default(*, fused: bool, output: str = "runs/default", device: str = "cpu", seed: int = 0,
                max_steps: int | None = None, sizes: DefaultSizes | None = None, anyres: bool = False) -> dict:
    """Run the whole embedded default (``anyres``: as LLaVA-1.6, see the module docstring); returns (and
    prints) the summary with the accuracy."""
    from transformers import AutoTokenizer

    from engine.tokenizer import build_tiny_tokenizer
    from train.shapes import image_blind_accuracy, make_default_instruct
    from train.stage import freeze_for_stage

    sizes = sizes or DefaultSizes()
    t0 = time.time()
    dev = torch.device(device)
    if fused and dev.type != "cuda":
        print("note: no GPU here, so --fused runs the torch reference ops (same numerics); "
              f"kernels on this device: {llava_kernels.dispatch.describe(dev)}", flush=True)
    data_dir, tok_dir = os.path.join(output, "data"), os.path.join(output, "tokenizer")
    data = make_default_instruct(data_dir, num_train=sizes.num_train, num_test=sizes.num_test,
                                 image_size=sizes.image_size, seed=seed, mc_per_image=sizes.mc_per_image,
                                 sizes=anyres_image_sizes(sizes.image_size) if anyres else ())
    stage1_data = caption_records(data["captions"], os.path.join(data_dir, "stage1.json"))
    stage2_data = os.path.join(data_dir, "stage2.json")
    with open(data["instruct"]) as f, open(data["train_mc"]) as g:
        mixed = json.load(f) + json.load(g)
    write_text_atomic(stage2_data, json.dumps(mixed))
    build_tiny_tokenizer(tok_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    torch.manual_seed(seed)
    model = Llava(tiny_llava(len(tokenizer), image_token, sizes.image_size, anyres=anyres),
                  kernel_backend=None if fused else "torch").to(dev)
    kw = dict(image_token_id=image_token, image_rows=model.config.image_rows, image_folder=data_dir,
              max_length=512)
    summary = {}
    for stage, path, template, lr, epochs, steps in (
            (1, stage1_data, "plain", 1e-3, 1, sizes.stage1_steps),
            (2, stage2_data, "vicuna_v1", sizes.stage2_lr, sizes.stage2_epochs, None)):
        samples, report = load_samples(path, tokenizer, template=template, **kw)
        freeze_for_stage(model, stage)
        limits = [x for x in (steps, max_steps) if x]   # the stage's own cap and the CLI's, if any
        loop = LoopConfig(output=os.path.join(output, f"stage{stage}"), lr=lr, global_batch=sizes.global_batch,
                          max_tokens_per_batch=sizes.max_tokens_per_batch, epochs=epochs,
                          max_steps=min(limits) if limits else None, seed=seed, fused=fused, num_workers=0)
        print(f"stage {stage}: {len(samples)} samples ({report.summary()})", flush=True)
        result = train(model, samples, loop, device=dev, tokenizer_dir=tok_dir,
                       run_config={"embedded_default": True, "stage": stage, "anyres": anyres,
                                   "sizes": dataclasses.asdict(sizes)})
        summary[f"stage{stage}_loss"] = result.last_loss
        summary[f"stage{stage}_steps"] = result.steps_done
    with open(data["test_mc"]) as f:
        test = json.load(f)
    model.eval()
    acc, chance = mc_accuracy(model, tokenizer, test, data_dir)
    with open(data["train_mc"]) as f:
        blind = image_blind_accuracy(json.load(f), test)
    summary.update(anyres=anyres, accuracy=acc, chance=chance, image_blind_best=blind, test_questions=len(test),
                   seconds=round(time.time() - t0, 1), model=os.path.join(output, "stage2", "final"))
    print(f"held-out multiple-choice accuracy: {acc:.1%} on {len(test)} questions (chance {chance:.1%}; "
          f"best answer per question without the image {blind:.1%}); {summary['seconds']} s", flush=True)
    write_text_atomic(os.path.join(output, "summary.json"), json.dumps(summary, indent=2))
    return summary
