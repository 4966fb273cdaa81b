"""The embedded default (README's first command), shortened: every stage runs through the real code."""
import json
import os

import pytest
from PIL import Image

import engine
from engine.anyres import grid_shape
from train import stage
from train.default import DefaultSizes, anyres_pinpoints, run_default

TINY = DefaultSizes(num_train=24, num_test=8, image_size=32, stage1_steps=2, stage2_epochs=1, mc_per_image=2,
                    global_batch=8, max_tokens_per_batch=1024)


def test_shortened_default_runs_end_to_end(tmp_path):
    out = str(tmp_path / "default")
    summary = run_default(fused=True, output=out, max_steps=3, sizes=TINY)
    assert summary["stage1_steps"] == 2 and summary["stage2_steps"] == 3
    assert 0.0 <= summary["accuracy"] <= 1.0 and summary["test_questions"] == 8
    assert 0.25 <= summary["chance"] <= 1 / 3  # 3 or 4 options per question
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["accuracy"] == summary["accuracy"]
    for s in (1, 2):
        with open(os.path.join(out, f"stage{s}", "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
        assert all(r["loss"] > 0 and r["tokens"] > 0 for r in rows)
    model = engine.load(summary["model"])          # the trained model is a normal checkpoint
    assert model.config.image_seq_len == 16


def test_anyres_default_runs_end_to_end(tmp_path):
    """``--anyres``: images of varied sizes tile over three grids; stage 2 trains through the AnyRes path
    (several tiles per image, image_newline), the evaluation generates with image_sizes, and the result is a
    LLaVA-NeXT checkpoint."""
    out = str(tmp_path / "default")
    summary = run_default(fused=False, output=out, max_steps=2, sizes=TINY, anyres=True)
    assert summary["anyres"] is True and summary["stage2_steps"] == 2 and summary["test_questions"] == 8
    assert 0.0 <= summary["accuracy"] <= 1.0
    with open(os.path.join(out, "data", "train_mc.json")) as f:
        images = {r["image"] for r in json.load(f)}
    grids = set()
    for name in images:
        with Image.open(os.path.join(out, "data", name)) as img:
            grids.add(grid_shape(img.height, img.width, anyres_pinpoints(TINY.image_size), TINY.image_size))
    assert grids == {(1, 2), (2, 1), (2, 2)}
    with open(os.path.join(out, "stage2", "metrics.jsonl")) as f:
        assert all(json.loads(line)["loss"] > 0 for line in f)
    model = engine.load(summary["model"])
    assert model.config.image_grid_pinpoints == anyres_pinpoints(TINY.image_size)
    assert model.image_newline is not None


def test_no_arguments_means_the_embedded_default(monkeypatch):
    seen = {}
    monkeypatch.setattr("train.default.run_default", lambda **kw: seen.update(kw))
    stage.main(2, ["--fused", "--device", "cpu"])
    assert seen["fused"] is True and seen["output"] == "runs/default" and seen["device"] == "cpu"
    assert seen["anyres"] is False
    stage.main(2, ["--anyres"])
    assert seen["anyres"] is True and seen["output"] == "runs/default-anyres"
    with pytest.raises(ValueError, match="--anyres applies to the embedded default only"):
        stage.main(2, ["--anyres", "--data", "x.json", "--model", "m"])
