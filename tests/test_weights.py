"""Checkpoint layouts (HF v4/v5 keys, original LLaVA, CLIP + LLaMA composition, stage-1
projector) and the errors bad checkpoints must raise."""
import json
import os

import pytest
import torch
from helpers import IMAGE_SIZE, VOCAB, hf_model, pad, prompts, rel_err, write_original_llava
from safetensors.torch import load_file, save_file

import engine
from engine import weights


@pytest.fixture
def hf_dir(tmp_path):
    model = hf_model()
    model.save_pretrained(tmp_path / "hf")
    return model, str(tmp_path / "hf")


def logits(model, seqs, pixels):
    ids, mask = pad(seqs, "right")
    with torch.no_grad():
        return model(ids, pixels, attention_mask=mask)[mask.bool()]


def rewrite(path, fn):
    file = os.path.join(path, "model.safetensors")
    save_file(fn(load_file(file)), file)


def test_v5_key_layout_loads_identically(hf_dir, tmp_path):
    """``model.language_model.*`` / ``model.vision_tower.*`` / top-level ``lm_head`` (v5 spelling)."""
    _, path = hf_dir
    ref = engine.load(path)

    def to_v5(state):
        out = {}
        for k, v in state.items():
            k = k.replace("language_model.model.", "model.language_model.").replace("language_model.lm_head.",
                                                                                  "lm_head.")
            k = k.replace("multi_modal_projector.", "model.multi_modal_projector.")
            k = k.replace("vision_tower.", "model.vision_tower.vision_model.") if k.startswith("vision_tower.") else k
            out[k] = v
        return out

    rewrite(path, to_v5)
    seqs, pixels = prompts(ref.config.image_seq_len)
    assert torch.equal(logits(engine.load(path), seqs, pixels), logits(ref, seqs, pixels))


def test_missing_and_unexpected_keys_are_listed(hf_dir):
    _, path = hf_dir

    def damage(state):
        state.pop("language_model.model.layers.1.mlp.up_proj.weight")
        state["language_model.model.layers.0.self_attn.mystery.weight"] = torch.zeros(2)
        return state

    rewrite(path, damage)
    with pytest.raises(ValueError, match=r"missing keys.*decoder\.layers\.1\.mlp\.up\.weight.*unexpected keys.*"
                                         r"language_model\.model\.layers\.0\.self_attn\.mystery\.weight"):
        engine.load(path)


def test_missing_key_is_named(hf_dir):
    _, path = hf_dir
    rewrite(path, lambda s: {k: v for k, v in s.items() if "layers.1.mlp.up_proj" not in k})
    with pytest.raises(ValueError, match=r"decoder\.layers\.1\.mlp\.up\.weight"):
        engine.load(path)


def test_shape_mismatch_names_key_and_both_shapes(hf_dir):
    _, path = hf_dir
    key = "language_model.model.layers.0.self_attn.k_proj.weight"
    rewrite(path, lambda s: {**s, key: torch.zeros(8, 48)})
    with pytest.raises(ValueError, match=r"decoder\.layers\.0\.attn\.k\.weight.*\(8, 48\).*\(24, 48\)"):
        engine.load(path)


def test_corrupt_safetensors_names_the_file(hf_dir):
    _, path = hf_dir
    file = os.path.join(path, "model.safetensors")
    with open(file, "r+b") as f:
        f.write(b"\xff" * 64)
    with pytest.raises(ValueError, match="model.safetensors"):
        engine.load(path)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(FileNotFoundError):
        engine.load(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        engine.load(str(tmp_path / "empty"))


def test_image_count_mismatch_reports_both_counts(hf_dir):
    _, path = hf_dir
    model = engine.load(path)
    seqs, pixels = prompts(model.config.image_seq_len)   # 3 images in the prompts
    ids, mask = pad(seqs, "right")
    with pytest.raises(ValueError, match=r"12 image placeholder tokens.*2 images were given"):
        model(ids, pixels[:2], attention_mask=mask)


def test_original_llava_layout_and_stage1_projector(hf_dir, tmp_path):
    hf, path = hf_dir
    ours = engine.load(path)
    orig_dir, clip_dir, orig_state = write_original_llava(tmp_path, ours)
    loaded = engine.load(orig_dir, vision=clip_dir)
    seqs, pixels = prompts(ours.config.image_seq_len)
    assert rel_err(logits(loaded, seqs, pixels), logits(ours, seqs, pixels)) == 0.0

    # A stage-1 mm_projector.bin replaces only the projector.
    proj = {k: torch.randn_like(v) for k, v in orig_state.items() if "mm_projector" in k}
    torch.save(proj, tmp_path / "mm_projector.bin")
    weights.load_projector(loaded, str(tmp_path / "mm_projector.bin"))
    assert torch.equal(loaded.projector.linear_2.weight, proj["model.mm_projector.2.weight"])
    with pytest.raises(ValueError, match="mm_projector.bin"):
        bad = dict(proj)
        bad["model.mm_projector.0.weight"] = torch.zeros(3, 3)
        torch.save(bad, tmp_path / "mm_projector.bin")
        weights.load_projector(loaded, str(tmp_path / "mm_projector.bin"))


def test_compose_clip_and_llama(hf_dir, tmp_path):
    hf, path = hf_dir
    ours = engine.load(path)
    _, clip_dir, orig_state = write_original_llava(tmp_path, ours)
    llama = tmp_path / "llama"
    llama.mkdir()
    save_file({k: v for k, v in orig_state.items() if "mm_projector" not in k}, str(llama / "model.safetensors"))
    text = ours.config.to_hf_dict()["text_config"]
    with open(llama / "config.json", "w") as f:
        json.dump(text, f)
    fresh = weights.compose(clip_dir, str(llama))
    assert fresh.config.image_token_id == VOCAB and fresh.config.text.vocab_size == VOCAB + 1
    assert torch.equal(fresh.decoder.layers[1].mlp.down.weight, ours.decoder.layers[1].mlp.down.weight)
    assert torch.equal(fresh.vision.layers[0].fc1.weight, ours.vision.layers[0].fc1.weight)
    ids = torch.tensor([[1, 2] + [VOCAB] * fresh.config.image_seq_len + [3]])
    out = fresh(ids, torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    assert out.shape == (1, ids.shape[1], VOCAB + 1) and torch.isfinite(out).all()


def test_export_is_atomic(hf_dir, tmp_path, monkeypatch):
    """A failure while writing leaves the previous export intact and no temporary directory."""
    _, path = hf_dir
    model = engine.load(path)
    out = tmp_path / "exp"
    engine.export_hf(model, str(out))
    before = load_file(str(out / "model.safetensors"))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(weights, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        engine.export_hf(model, str(out))
    after = load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(os.listdir(tmp_path)) == ["exp", "hf"]
