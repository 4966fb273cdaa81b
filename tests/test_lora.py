"""LoRA stage 2 (engine/lora.py, ``train.stage2 --lora``, ``train.merge_lora``), fp32 on the CPU, tiny models.

- the fused q/k/v and gate/up inference GEMMs never run for PEFT-wrapped linears (they would drop the
  adapter); B = 0 at step 0 gives exactly the base model's logits;
- only adapters and the projector get gradients and AdamW state; the vision tower and base weights stay
  as they were;
- the saved adapter directory is PEFT's format with HF key names: PEFT + transformers load it and give
  our logits; ``engine.load(adapter=)`` serves it unmerged; ``train.merge_lora`` writes a merged
  checkpoint with the same logits (the fp32 rule: rel ≤ 1e-5);
- SIGKILL during a checkpoint write + ``--resume`` is bit-exact (dropout on: the RNG is restored);
  FSDP2 (gloo, 2 ranks) matches one process;
- the combinations we refuse say why.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from helpers import (
    ENV,
    KILL_DURING_SECOND_SAVE,
    REPO,
    SPEC,
    hf_model,
    load_tiny,
    metrics,
    ok,
    pad,
    perturbed_lora,
    prompts,
    rel_err,
    weights,
)
from safetensors.torch import load_file

import engine
from engine import linear as dense
from engine.lora import LoraSettings, add_lora, merge_lora
from engine.model import fused_weight
from train.checkpoint import read_model_state
from train.data import collate

COMMON = ["--device", "cpu", "--num-workers", "0", "--lr", "1e-3", "--seed", "0", "--global-batch", "2",
          "--max-tokens-per-batch", "256"]
LORA = ["--lora", "--lora-r", "4", "--lora-alpha", "8"]


def run(args: list[str], *, code: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", *args]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def stage2(assets, out: str, *extra: str) -> list[str]:
    return ["train.stage2", "--model", assets.model_dir, "--data", assets.mixed_data, "--image-folder",
            assets.image_folder, "--output", out, *COMMON, *LORA, *extra]


def logits(model, seqs, pixels):
    ids, mask = pad(seqs, "right")
    with torch.no_grad():
        return model(ids, pixels, attention_mask=mask)[mask.bool()]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    hf_model().save_pretrained(path)
    return str(path)


# --------------------------------------------------------------------------- the model


def test_fused_inference_weights_never_bypass_an_adapter(base_dir):
    """Fusing q/k/v and gate/up is a no-op on PEFT layers (their ``.weight`` is the base layer's: one GEMM
    of it would drop the adapter): fused inference equals the wrapped layers' own forward."""
    model = perturbed_lora(base_dir)
    seqs, pixels = prompts(model.config.image_seq_len)
    want = logits(model, seqs, pixels)
    model.fuse_weights()
    with torch.no_grad():
        for b in model.decoder.layers:
            assert fused_weight(b.attn.q, b.attn.k, b.attn.v) is None and fused_weight(b.mlp.gate, b.mlp.up) is None
    assert torch.equal(logits(model, seqs, pixels), want)
    base = engine.load(base_dir, dtype=torch.float32)
    base.projector.load_state_dict(model.projector.state_dict())
    assert rel_err(logits(base, seqs, pixels), want) > 1e-2       # the adapters do change the output


def test_zero_b_at_step_0_gives_exactly_the_base_logits(base_dir, monkeypatch):
    # PEFT's wrapped layers run their base layer through F.linear; the base model's plain layers would take
    # our few-row CPU GEMM, another summation order. Both on F.linear, "exactly" tests what it means: the
    # adapter adds exactly zero.
    monkeypatch.setattr(dense, "SMALL_GEMM", False)
    monkeypatch.setattr(dense, "ONEDNN", False)
    base = engine.load(base_dir, dtype=torch.float32)
    model = copy.deepcopy(base)
    add_lora(model, LoraSettings(r=8, alpha=16, dropout=0.05))
    seqs, pixels = prompts(base.config.image_seq_len)
    a = model.decoder.layers[0].attn.q.lora_A["default"].weight
    assert a.abs().sum() > 0 and len(model.lora and model.lora.targets) == 7
    for train_mode in (False, True):           # dropout on the adapter path only: still the base output
        model.train(train_mode)
        assert torch.equal(logits(model, seqs, pixels), logits(base, seqs, pixels))


def test_only_adapters_and_the_projector_get_gradients(base_dir):
    model = perturbed_lora(base_dir).train()
    seqs, pixels = prompts(model.config.image_seq_len)
    ids, mask = pad(seqs, "right")
    model(ids, pixels, attention_mask=mask).square().mean().backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    want = {n for n, _ in model.named_parameters() if ".lora_" in n or n.startswith("projector.")}
    assert got == want and len(want) == 2 * 7 * model.config.text.num_layers + 4
    assert {n for n, p in model.named_parameters() if p.requires_grad} == want


def test_our_adapter_loads_in_peft_and_transformers_and_merges(base_dir, tmp_path):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    from engine.lora import save_adapter
    model = perturbed_lora(base_dir)
    adapter = str(tmp_path / "adapter")
    save_adapter(model.state_dict(), model.config, model.lora, adapter, base=base_dir)
    assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors", "base_config.json"]
    keys = set(load_file(f"{adapter}/adapter_model.safetensors"))
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.multi_modal_projector.linear_2.bias" in keys
    assert not any("vision" in k for k in keys) and len(keys) == 2 * 7 * 2 + 4
    with open(f"{adapter}/adapter_config.json") as f:
        config = json.load(f)
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["modules_to_save"] == ["multi_modal_projector"] and config["base_model_name_or_path"] == base_dir

    seqs, pixels = prompts(model.config.image_seq_len)
    ours = logits(model, seqs, pixels)
    hf = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(base_dir), adapter).eval()
    ids, mask = pad(seqs, "right")
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits[mask.bool()]
    assert rel_err(ours, ref) <= 1e-5                     # two fp32 runs of one model: the fp32 rule

    served = engine.load(base_dir, adapter=adapter, dtype=torch.float32).eval()
    assert torch.equal(logits(served, seqs, pixels), ours)
    assert not any(p.requires_grad for p in served.parameters())
    assert served.lora == LoraSettings(r=4, alpha=8, dropout=0.0) and served.lora_base == base_dir
    merge_lora(served)
    assert all(type(b.attn.q) is torch.nn.Linear for b in served.decoder.layers)
    assert set(served.state_dict()) == set(engine.load(base_dir).state_dict())
    assert rel_err(logits(served, seqs, pixels), ours) <= 1e-5


def test_generation_runtime_serves_an_unmerged_adapter(base_dir, tmp_path):
    """engine.generate (KV cache, fused-weight inference path) on ``engine.load(adapter=)``: the greedy tokens
    of PEFT + transformers' generate on the same adapter, and not the base model's."""
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    from engine.lora import save_adapter
    model = perturbed_lora(base_dir)
    adapter = str(tmp_path / "adapter")
    save_adapter(model.state_dict(), model.config, model.lora, adapter, base=base_dir)
    served = engine.load(base_dir, adapter=adapter, dtype=torch.float32).eval()
    seqs, pixels = prompts(served.config.image_seq_len)
    ids, mask = pad(seqs, "left")
    hf = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(base_dir), adapter).eval()
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=12,
                          min_new_tokens=12, do_sample=False, pad_token_id=0)[:, ids.shape[1]:].tolist()
    got = [o.tokens for o in engine.generate(served, seqs, images=pixels, max_new_tokens=12, stop_token_ids=[])]
    assert got == ref
    base = [o.tokens for o in engine.generate(engine.load(base_dir), seqs, images=pixels, max_new_tokens=12,
                                              stop_token_ids=[])]
    assert base != got


def test_an_adapter_on_another_base_is_refused(base_dir, tmp_path):
    from engine.lora import save_adapter
    model = perturbed_lora(base_dir)
    adapter = str(tmp_path / "adapter")
    save_adapter(model.state_dict(), model.config, model.lora, adapter, base=base_dir)
    other = str(tmp_path / "other")
    hf_model(kv_heads=4).save_pretrained(other)                 # same widths, other attention layout
    with pytest.raises(ValueError, match=r"adapter .* was trained on a different base model.*num_key_value_heads"):
        engine.load(other, adapter=adapter)
    with pytest.raises(ValueError, match="match no decoder linear; choose from"):
        LoraSettings(targets=("q", "qkv_proj"))


# --------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory):
    """``--lora`` stage 2 for 6 steps (dropout 0.05, checkpoints every 2, a separate projector lr)."""
    out = str(tmp_path_factory.mktemp("lora"))
    ok(run(stage2(assets, out, "--max-steps", "6", "--save-every", "2", "--projector-lr", "2e-3")))
    return out


def test_lora_run_trains_adapters_and_projector_only(assets, trained):
    final = os.path.join(trained, "final")
    assert {"adapter_config.json", "adapter_model.safetensors", "base_config.json", "run_config.json",
            "tokenizer.json"} <= set(os.listdir(final))
    m = metrics(trained)
    assert [r["step"] for r in m] == [1, 2, 3, 4, 5, 6] and all(r["loss"] > 0 and r["grad_norm"] > 0 for r in m)
    # checkpoints hold what trains, and AdamW state exists for exactly that: adapters and the projector
    ckpt = os.path.join(trained, "checkpoints", "step-000004")
    state = read_model_state(ckpt)
    model = engine.load(assets.model_dir)
    add_lora(model, LoraSettings(r=4, alpha=8))
    assert set(state) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(state) == 2 * 7 * model.config.text.num_layers + 4
    from torch.distributed.checkpoint import FileSystemReader
    meta = FileSystemReader(ckpt).read_metadata()
    with_state = {k.removeprefix("optim.state.").removesuffix(".exp_avg") for k in meta.state_dict_metadata
                  if k.startswith("optim.state.") and k.endswith(".exp_avg")}
    assert with_state == set(state)
    lora_b = [v for k, v in state.items() if ".lora_B." in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)     # every B moved away from its zero init
    training = torch.load(os.path.join(ckpt, "training_state.pt"), weights_only=True)
    assert training["scheduler"]["base_lrs"] == [1e-3, 2e-3]       # --lr for adapters, --projector-lr
    assert training["lora"] == {"r": 4, "alpha": 8.0, "dropout": 0.05, "targets": ("q", "k", "v", "o", "gate",
                                                                                    "up", "down")}


def test_trained_adapter_in_peft_and_merge_lora_cli(assets, trained, tmp_path):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration
    final = os.path.join(trained, "final")
    sample = load_tiny(assets, assets.image_data)[0][0]
    mb = collate([sample], spec=SPEC)
    served = engine.load(assets.model_dir, adapter=final, dtype=torch.float32).eval()
    hf = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(assets.model_dir), final).eval()
    with torch.no_grad():
        ours = served(mb.input_ids[None], mb.pixel_values)
        ref = hf(input_ids=mb.input_ids[None], pixel_values=mb.pixel_values).logits
    assert rel_err(ours, ref) <= 1e-5

    merged = str(tmp_path / "merged")
    ok(run(["train.merge_lora", "--base", assets.model_dir, "--adapter", final, "--output", merged]))
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    got = engine.load(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        assert rel_err(got(mb.input_ids[None], mb.pixel_values), ours) <= 1e-5
        plain = LlavaForConditionalGeneration.from_pretrained(merged).eval()
        assert rel_err(plain(input_ids=mb.input_ids[None], pixel_values=mb.pixel_values).logits, ours) <= 1e-5


def test_sigkill_mid_checkpoint_then_resume_is_bitwise_with_adapters(assets, trained, tmp_path):
    out = str(tmp_path / "killed")
    args = stage2(assets, out, "--max-steps", "6", "--save-every", "2", "--projector-lr", "2e-3")
    killed = run(args[1:], code=KILL_DURING_SECOND_SAVE)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert sorted(n for n in os.listdir(os.path.join(out, "checkpoints")) if not n.startswith(".")) == ["step-000002"]
    resumed = ok(run([*args, "--resume"]))
    assert json.loads(resumed.stdout.splitlines()[0])["effective_config"]["resumed_from"].endswith("step-000002")
    assert [(m["loss"], m["lr"], m["grad_norm"]) for m in metrics(out)] == \
        [(m["loss"], m["lr"], m["grad_norm"]) for m in metrics(trained)]
    a, b = weights(os.path.join(trained, "final")), weights(os.path.join(out, "final"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_fsdp2_two_ranks_match_one_process_with_adapters(assets, tmp_path):
    """Dropout 0: the two layouts draw different dropout masks (each rank its own micro-batches)."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    extra = ("--max-steps", "3", "--global-batch", "3", "--lora-dropout", "0")
    ok(run(stage2(assets, one, *extra)))
    ok(run(["torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", *stage2(assets, two, *extra)]))
    a, b = metrics(one), metrics(two)
    assert [m["step"] for m in b] == [1, 2, 3]
    for x, y in zip(a, b, strict=True):
        assert x["tokens"] == y["tokens"] and abs(x["loss"] - y["loss"]) <= 1e-5 * abs(x["loss"]), (x, y)
        assert abs(x["grad_norm"] - y["grad_norm"]) <= 1e-5 * x["grad_norm"], (x, y)
    w1, w2 = weights(os.path.join(one, "final")), weights(os.path.join(two, "final"))
    assert w1.keys() == w2.keys() and len(w1) == 2 * 7 * 2 + 4
    for k in w1:
        assert rel_err(w2[k], w1[k]) <= 1e-5, k


# --------------------------------------------------------------------------- refused combinations


def test_lora_flags_default_to_upstreams_finetune_lora_sh():
    from train.stage import config_from_args, parser
    cfg = config_from_args(parser(2).parse_args(["--model", "M", "--data", "D", "--lora"]), 2)
    assert cfg.lora == LoraSettings(r=128, alpha=256.0, dropout=0.05,
                                    targets=("q", "k", "v", "o", "gate", "up", "down"))
    assert (cfg.lr, cfg.projector_lr, cfg.global_batch, cfg.epochs, cfg.qlora) == (2e-4, 2e-5, 128, 1, False)
    cfg = config_from_args(parser(2).parse_args(["--model", "M", "--data", "D"]), 2)
    assert (cfg.lora, cfg.lr, cfg.projector_lr) == (None, 2e-5, None)          # full stage 2 unchanged


def test_refused_combinations_fail_before_any_work(assets, tmp_path):
    """In process (``main`` raises; ``engine.cli.run_main`` turns a ValueError into exit status 2)."""
    from train.stage import main

    def fails(stage, args, message):
        out = str(tmp_path / f"run{len(os.listdir(tmp_path))}")
        args[args.index("--output") + 1] = out
        with pytest.raises(ValueError, match=message):
            main(stage, args)
        assert not os.path.exists(out)                          # nothing was written: it stopped first

    base = stage2(assets, "OUT")[1:]
    if not torch.cuda.is_available():
        fails(2, [*base, "--qlora"], "--qlora needs a CUDA device")
    fails(1, base, "--lora/--qlora apply to stage 2")
    fails(2, [*base, "--lora-targets", "q,wq"], re.escape("['wq'] match no decoder linear"))
    clip, llama = str(tmp_path / "clip"), str(tmp_path / "llama")
    fails(2, ["--vision", clip, "--llm", llama, *base[base.index("--data"):]],
          "--lora needs its base as one checkpoint directory")
    other = str(tmp_path / "other")                              # a full checkpoint of another config
    cfg = engine.tiny_config(vocab_size=engine.load(assets.model_dir).config.text.vocab_size + 1)
    engine.export_hf(engine.Llava(cfg), other)
    fails(2, [*base, "--init", other], re.escape(f"--lora: --init {other} (the adapters' base) and --model"))


def test_resuming_across_lora_settings_is_refused(assets, trained, tmp_path):
    from train.stage import main
    out = str(tmp_path / "copy")
    shutil.copytree(trained, out)
    full = ["--model", assets.model_dir, "--data", assets.mixed_data, "--image-folder", assets.image_folder,
            "--output", out, *COMMON, "--max-steps", "6", "--resume"]
    with pytest.raises(ValueError, match=r"written by a run with LoRA settings \{'r': 4.*but this run has None"):
        main(2, full)
    with pytest.raises(ValueError, match=r"LoRA settings .*'r': 4.* but this run has .*'r': 8"):
        main(2, [*full, *LORA, "--lora-r", "8"])


# --------------------------------------------------------------------------- QLoRA's 4-bit base (CPU)


def test_nf4_base_runs_on_the_cpu_trains_only_adapters_and_matches_its_dequantized_weights(base_dir):
    """The ``--qlora`` model (the CLI itself needs CUDA): torchao NF4 decoder weights under PEFT adapters.
    Tiny widths need small NF4 blocks (16, scales per 8 blocks; the CLI uses QLoRA's 64 / 256)."""
    from engine.lora import quantize_base_nf4
    from train.memory import model_parameter_counts
    model = perturbed_lora(base_dir)
    fp32 = copy.deepcopy(model)
    dense = model_parameter_counts(model)["frozen_bytes"]
    assert quantize_base_nf4(model, block_size=16, scaler_block_size=8) == 7 * model.config.text.num_layers
    # 4-bit decoder linears: frozen bytes drop by the linears' fp32 size less their 4-bit codes and scales
    linears = sum(p.numel() for n, p in fp32.named_parameters() if ".base_layer." in n)
    assert dense - model_parameter_counts(model)["frozen_bytes"] >= 4 * linears - linears // 2 - linears // 8
    seqs, pixels = prompts(model.config.image_seq_len)
    got = logits(model, seqs, pixels)
    # the oracle: the same model with each NF4 weight dequantized into a plain fp32 weight
    dequant = copy.deepcopy(fp32)
    for m, q in zip(lora_layers_of(dequant).values(), lora_layers_of(model).values(), strict=True):
        m.get_base_layer().weight.data = q.get_base_layer().weight.get_original_weight().float()
    assert rel_err(got, logits(dequant, seqs, pixels)) <= 1e-5
    # and the 4-bit model against the fp32 one: NF4's weight error (~0.1 relative) sets the bound
    w_err = max(rel_err(q.get_base_layer().weight.get_original_weight(), m.get_base_layer().weight)
                for m, q in zip(lora_layers_of(fp32).values(), lora_layers_of(model).values(), strict=True))
    assert 0.02 < w_err < 0.15 and rel_err(got, logits(fp32, seqs, pixels)) <= 2 * w_err
    # a training step: gradients and updates reach only adapters and the projector
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {n: value(p) for n, p in model.named_parameters() if not p.requires_grad}
    ids, mask = pad(seqs, "right")
    model(ids, pixels, attention_mask=mask).square().mean().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == \
        {n for n, _ in model.named_parameters() if ".lora_" in n or n.startswith("projector.")}
    opt.step()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(value(p), before[n]), n


def value(p):
    """A plain copy of a parameter's values (an NF4 weight dequantized: torchao's clone re-quantizes it
    with its default block sizes)."""
    return (p.get_original_weight() if hasattr(p, "get_original_weight") else p.detach()).clone()


def lora_layers_of(model):
    from engine.lora import lora_layers
    return lora_layers(model)
