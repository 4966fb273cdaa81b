"""The stage CLIs end to end, as subprocesses (``python -m train.stage1/2``) on tiny data, fp32 CPU.

- stage 1 → stage 2 (``--init``): metrics.jsonl holds step/loss/lr/tokens per optimizer step;
  the final directory loads with engine.load and in transformers (same logits); stage 1 changes
  only the projector and stage 2 never the vision tower (parameter hashes);
- resume: a run SIGKILLed while writing its second checkpoint, resumed with --resume, ends with
  the same weights (bitwise) and the same loss curve as an uninterrupted run; no checkpoint
  directory is ever half-written and the killed write's temporary directory is cleaned up;
- SIGTERM saves a checkpoint and exits cleanly;
- bad data: an error names the record and the file, and what was written before it survives;
  ``--on-bad-record skip`` counts and names what it skipped.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import (
    ENV,
    KILL_DURING_SECOND_SAVE,
    REPO,
    SPEC,
    load_tiny,
    metrics,
    ok,
    rel_err,
    weights,
    write_bad_data,
)
from transformers import AutoTokenizer, LlavaForConditionalGeneration

import engine
from train.checkpoint import read_model_state
from train.data import collate, plan_steps

COMMON = ["--device", "cpu", "--num-workers", "0", "--lr", "1e-3", "--seed", "0"]


def run(args: list[str], *, timeout: float = 120, code: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", *args]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def complete_lines(path: str) -> int:
    """Newline-terminated lines so far (a line being written may be partial)."""
    with open(path) as f:
        return f.read().count("\n")


def param_hashes(path: str) -> dict[str, str]:
    model = engine.load(path, dtype=torch.float32)
    return {n: hashlib.sha256(p.detach().numpy().tobytes()).hexdigest() for n, p in model.named_parameters()}


def assert_no_partial_checkpoints(out: str) -> None:
    for d in glob.glob(os.path.join(out, "checkpoints", "step-*")):
        assert {".metadata", "__0_0.distcp", "rng-00000.pt", "training_state.pt"} <= set(os.listdir(d)), d
    hidden = glob.glob(os.path.join(out, "**", ".*"), recursive=True)
    leftovers = [p for p in hidden if ".tmp-" in p or ".old-" in p]
    assert not leftovers, leftovers


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
    """The reference stage-2 run: 6 steps, checkpoints every 2."""
    out = str(tmp_path_factory.mktemp("uninterrupted"))
    ok(run(["train.stage2", *resume_args(assets, out)]))
    return out


def resume_args(assets, out: str) -> list[str]:
    return ["--model", assets.model_dir, "--data", assets.mixed_data, "--image-folder", assets.image_folder,
            "--output", out, "--save-every", "2", "--max-steps", "6", "--global-batch", "2",
            "--max-tokens-per-batch", "256", *COMMON]


# --------------------------------------------------------------------------- end to end


def test_stage1_then_stage2_cli(assets, tmp_path):
    s1, s2 = str(tmp_path / "stage1"), str(tmp_path / "stage2")
    p1 = ok(run(["train.stage1", "--model", assets.model_dir, "--data", assets.image_data, "--image-folder",
                 assets.image_folder, "--output", s1, "--max-steps", "3", "--global-batch", "4", *COMMON]))
    p2 = ok(run(["train.stage2", "--init", s1, "--data", assets.mixed_data, "--image-folder",
                 assets.image_folder, "--output", s2, "--max-steps", "3", "--global-batch", "4",
                 "--max-tokens-per-batch", "300", "--device", "cpu", "--num-workers", "2", "--lr", "1e-3"]))
    for p, template in ((p1, "plain"), (p2, "vicuna_v1")):
        effective = json.loads(p.stdout.splitlines()[0])["effective_config"]
        assert effective["run"]["template"] == template and effective["total_steps"] == 3

    # metrics.jsonl: one line per optimizer step; tokens = the packed tokens of that step's samples.
    for out, data, template in ((s1, assets.image_data, "plain"), (s2, assets.mixed_data, "vicuna_v1")):
        samples = load_tiny(assets, data, template=template)[0]
        plan = plan_steps(samples, global_batch=4, seed=0, epoch=0)
        lines = metrics(out)
        assert [m["step"] for m in lines] == [1, 2, 3]
        for m, step in zip(lines, plan, strict=False):
            assert m["tokens"] == sum(samples[i].length for i in step)
            assert m["loss"] > 0 and m["lr"] > 0 and m["grad_norm"] > 0 and m["target_tokens"] > 0
        assert_no_partial_checkpoints(out)

    # Freezing, by hashing every parameter before and after each stage.
    start, after1, after2 = (param_hashes(p) for p in (assets.model_dir, f"{s1}/final", f"{s2}/final"))
    changed1 = {n for n in start if start[n] != after1[n]}
    assert changed1 == {n for n in start if n.startswith("projector.")}
    changed2 = {n for n in start if after1[n] != after2[n]}
    assert not any(n.startswith("vision.") for n in changed2)
    assert {n for n in start if n.startswith("projector.")} <= changed2
    assert any(n.startswith("decoder.layers.") for n in changed2) and "decoder.lm_head.weight" in changed2

    # The final directory loads in our engine and in transformers, with the same logits.
    ours = engine.load(f"{s2}/final", dtype=torch.float32).eval()
    hf = LlavaForConditionalGeneration.from_pretrained(f"{s2}/final").eval()
    tok = AutoTokenizer.from_pretrained(f"{s2}/final")
    assert tok.convert_tokens_to_ids("<image>") == assets.image_token_id
    sample = load_tiny(assets, assets.image_data)[0][0]
    mb = collate([sample], spec=SPEC)
    with torch.no_grad():
        got = ours(mb.input_ids[None], mb.pixel_values)
        ref = hf(input_ids=mb.input_ids[None], pixel_values=mb.pixel_values).logits
    assert rel_err(got, ref) <= 1e-5  # two fp32 runs of one model: the fp32 rule


# --------------------------------------------------------------------------- resume and signals


def test_sigkill_mid_checkpoint_then_resume_is_bitwise(assets, uninterrupted, tmp_path):
    out = str(tmp_path / "killed")
    args = resume_args(assets, out)
    killed = run(args, code=KILL_DURING_SECOND_SAVE)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ck = os.path.join(out, "checkpoints")
    entries = sorted(os.listdir(ck))                                 # the killed write left its temp dir
    assert entries[0].startswith(".step-000004.tmp-") and entries[1:] == ["step-000002"]
    assert os.path.isfile(os.path.join(ck, "step-000002", "training_state.pt"))
    assert not os.path.exists(os.path.join(ck, "step-000004"))
    assert not os.path.exists(os.path.join(out, "final"))
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]

    resumed = ok(run(["train.stage2", *args, "--resume"]))
    effective = json.loads(resumed.stdout.splitlines()[0])["effective_config"]
    assert effective["resumed_from"] == os.path.join(ck, "step-000002")
    assert_no_partial_checkpoints(out)                               # the killed write's temp dir is gone
    assert sorted(os.listdir(ck)) == ["step-000002", "step-000004"]
    ref, got = metrics(uninterrupted), metrics(out)
    assert [m["step"] for m in got] == [1, 2, 3, 4, 5, 6]
    assert [(m["loss"], m["lr"], m["tokens"], m["grad_norm"]) for m in got] == \
        [(m["loss"], m["lr"], m["tokens"], m["grad_norm"]) for m in ref]
    a, b = weights(os.path.join(uninterrupted, "final")), weights(os.path.join(out, "final"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The intermediate checkpoints match too (the resumed run rewrote step 4 from the same state).
    for step in ("step-000002", "step-000004"):
        x, y = read_model_state(os.path.join(uninterrupted, "checkpoints", step)), read_model_state(
            os.path.join(ck, step))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(assets, tmp_path):
    out = str(tmp_path / "term")
    cmd = [sys.executable, "-m", "train.stage2", "--model", assets.model_dir, "--data", assets.mixed_data,
           "--image-folder", assets.image_folder, "--output", out, "--max-steps", "500", "--epochs", "100",
           "--global-batch", "2", *COMMON]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        path = os.path.join(out, "metrics.jsonl")
        while not (os.path.exists(path) and complete_lines(path) >= 2):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "the run wrote no metrics in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    done = len(metrics(out))
    assert 2 <= done < 500 and f"stopped by signal {int(signal.SIGTERM)} after step {done}" in stdout
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == [f"step-{done:06d}"]
    ckpt = os.path.join(out, "checkpoints", f"step-{done:06d}")
    state = torch.load(os.path.join(ckpt, "training_state.pt"), weights_only=True)
    assert state["step"] == done and state["world_size"] == 1
    keys = dcp.FileSystemReader(ckpt).read_metadata().state_dict_metadata
    assert any(k.startswith("optim.state.") and k.endswith(".exp_avg") for k in keys)
    assert not os.path.exists(os.path.join(out, "final"))
    assert_no_partial_checkpoints(out)


# --------------------------------------------------------------------------- bad data


def test_undecodable_image_stops_the_run_naming_it_and_keeps_what_was_written(assets, tmp_path):
    """The third step's image is truncated (its header still reads, so loading accepts it)."""
    folder = str(tmp_path / "images")
    shutil.copytree(assets.image_folder, folder)
    samples = load_tiny(assets, assets.mixed_data)[0]
    plan = plan_steps(samples, global_batch=1, seed=0, epoch=0)
    victim = next(samples[s[0]] for s in plan[2:] if samples[s[0]].images)
    victim_step = next(k for k, s in enumerate(plan) if samples[s[0]] is victim)
    path = os.path.join(folder, os.path.relpath(victim.images[0], assets.image_folder))
    with open(path, "rb") as f:
        payload = f.read()
    with open(path, "wb") as f:
        f.write(payload[:len(payload) // 2])
    out = str(tmp_path / "run")
    p = run(["train.stage2", "--model", assets.model_dir, "--data", assets.mixed_data, "--image-folder",
             folder, "--output", out, "--save-every", "1", "--global-batch", "1", *COMMON])
    assert p.returncode != 0
    assert f"record {victim.id}: cannot read image {path}" in p.stderr
    assert [m["step"] for m in metrics(out)] == list(range(1, victim_step + 1))
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == [f"step-{k:06d}" for k in
                                                                   range(1, victim_step + 1)]
    assert_no_partial_checkpoints(out)


def test_bad_records_error_or_skip_through_the_cli(assets, tmp_path):
    data, names = write_bad_data(assets, str(tmp_path))
    base = ["train.stage2", "--model", assets.model_dir, "--data", data, "--image-folder",
            assets.image_folder, "--max-steps", "1", "--global-batch", "2", *COMMON]
    p = run([*base, "--output", str(tmp_path / "error")])
    assert p.returncode != 0
    assert f"{data}: record bad-missing: image file {names['bad-missing']} does not exist" in p.stderr
    p = ok(run([*base, "--output", str(tmp_path / "skip"), "--on-bad-record", "skip"]))
    assert "data: 3 samples; 4 bad records skipped" in p.stdout
    for rid in names:
        assert f"skipped {rid}: " in p.stdout
    assert len(metrics(str(tmp_path / "skip"))) == 1
