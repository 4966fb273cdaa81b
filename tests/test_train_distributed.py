"""``torchrun --nproc_per_node 2 -m train.stage2`` (FSDP2, gloo, CPU) against one process.

The global batch (3) does not split evenly over the 2 ranks, and image and text-only steps
alternate, so the run exercises the padding micro-batches that keep the ranks' collectives
matched. Same loss curve, learning rates, token counts and grad-norms (FSDP must sum, not
average, the ranks' gradients: the loss is already normalised by the global target count),
and the same final weights.

Stopping and resuming: SIGTERM delivered to ONE rank mid-epoch stops both after the same step
with one consistent sharded checkpoint and exit 0, and the resumed run's losses and weights are
the uninterrupted run's bit for bit. A checkpoint of 2 ranks resumes on 1 and one of 1 rank on 2
(DCP reshards), continuing the same loss curve within fp32 tolerance.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from helpers import ENV, REPO, metrics, ok, rel_err, weights

# train.stage2 under torchrun, where rank 1 (only) sends itself SIGTERM right after its third
# optimizer step: the signal reaches one rank, mid-epoch, while rank 0 knows nothing of it.
# It also records the upstream gradient each masked loss receives (FSDP sums the ranks' gradients,
# so nothing may scale the loss: grad_output must be exactly 1, the masked loss's fast path).
SIGTERM_RANK1_AFTER_STEP_3 = """
import atexit, json, os, signal, sys
import llava_kernels
import train.loop
grads = []
real_loss = llava_kernels.masked_lm_loss
def masked_lm_loss(*args, **kw):
    out = real_loss(*args, **kw)
    loss = out[0] if isinstance(out, tuple) else out
    if loss.requires_grad:
        loss.register_hook(lambda g: grads.append(float(g)))
    return out
llava_kernels.masked_lm_loss = masked_lm_loss
def dump():
    with open(sys.argv[1] + ".grad_output.rank" + os.environ["RANK"], "w") as f:
        json.dump(grads, f)
atexit.register(dump)
real = train.loop.train_step
calls = [0]
def train_step(*args, **kw):
    out = real(*args, **kw)
    calls[0] += 1
    if calls[0] == 3 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGTERM)
    return out
train.loop.train_step = train_step
from train.stage import main
main(2, sys.argv[2:])
"""

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")


def args(assets, out: str) -> list[str]:
    return ["-m", "train.stage2", "--model", assets.model_dir, "--data", assets.mixed_data, "--image-folder",
            assets.image_folder, "--output", out, "--global-batch", "3", "--max-tokens-per-batch", "256",
            "--max-steps", "4", "--save-every", "2", "--device", "cpu", "--num-workers", "0", "--lr", "1e-3"]


def torchrun(assets, out: str, *extra: str, script: str | None = None) -> subprocess.CompletedProcess:
    """2 ranks of train.stage2 (or of ``script``, a file that runs it) with ``args`` + ``extra``."""
    target = [script, out, *args(assets, out)[2:]] if script else args(assets, out)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *target, *extra]
    return ok(subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240))


def metrics_so_far(path: str) -> list[str]:
    """The complete lines of a metrics file being written."""
    with open(path) as f:
        return f.read().split("\n")[:-1]


def single_process(assets, out: str, *extra: str) -> subprocess.CompletedProcess:
    return ok(subprocess.run([sys.executable, *args(assets, out), *extra], cwd=REPO, env=ENV, capture_output=True,
                             text=True, timeout=240))


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    single, two = str(tmp_path_factory.mktemp("single")), str(tmp_path_factory.mktemp("two"))
    single_process(assets, single)
    torchrun(assets, two)
    return single, two


def test_two_processes_give_the_single_process_loss_curve(runs):
    single, two = (metrics(out) for out in runs)
    assert [m["step"] for m in two] == [m["step"] for m in single] == [1, 2, 3, 4]
    for a, b in zip(single, two, strict=True):
        assert b["lr"] == a["lr"] and b["tokens"] == a["tokens"] and b["target_tokens"] == a["target_tokens"]
        assert abs(b["loss"] - a["loss"]) <= 1e-5 * abs(a["loss"]), (a, b)
        assert abs(b["grad_norm"] - a["grad_norm"]) <= 1e-5 * a["grad_norm"], (a, b)
    w1, w2 = (weights(os.path.join(out, "final")) for out in runs)
    assert w1.keys() == w2.keys()
    for k in w1:
        assert rel_err(w2[k], w1[k]) <= 1e-5, k


def test_sigterm_to_one_rank_stops_both_with_one_checkpoint_and_resumes_bitwise(assets, runs, tmp_path):
    _, two = runs
    out = str(tmp_path / "stopped")
    script = str(tmp_path / "sigterm_rank1.py")
    with open(script, "w") as f:
        f.write(SIGTERM_RANK1_AFTER_STEP_3)
    p = torchrun(assets, out, "--save-every", "100", script=script)      # exit 0: both ranks exited 0
    assert "stopped by signal 15 after step 3" in p.stdout                # printed by rank 0: the ranks agreed
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]
    assert not os.path.exists(os.path.join(out, "final"))
    ck = os.path.join(out, "checkpoints")
    assert os.listdir(ck) == ["step-000003"]                              # one checkpoint, no temporaries
    files = set(os.listdir(os.path.join(ck, "step-000003")))
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "rng-00000.pt", "rng-00001.pt", "training_state.pt"} <= files
    state = torch.load(os.path.join(ck, "step-000003", "training_state.pt"), weights_only=True)
    assert state["step"] == 3 and state["world_size"] == 2
    for rank in (0, 1):                       # every backward started from grad_output = 1 (no world-size scaling)
        with open(f"{out}.grad_output.rank{rank}") as f:
            seen = json.load(f)
        assert len(seen) >= 3 and set(seen) == {1.0}, seen

    p = torchrun(assets, out, "--resume")
    assert "step-000003" in p.stdout.splitlines()[0]                     # effective config: resumed_from
    assert [(m["step"], m["loss"], m["grad_norm"]) for m in metrics(out)] == \
        [(m["step"], m["loss"], m["grad_norm"]) for m in metrics(two)]
    a, b = weights(os.path.join(two, "final")), weights(os.path.join(out, "final"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_to_torchrun_stops_every_rank_with_one_checkpoint_within_the_grace_period(assets, tmp_path):
    """A scheduler's SIGTERM goes to torchrun, which forwards it to every worker and SIGKILLs those
    still alive after its grace period (30 s): the workers must agree, save and exit before that."""
    out = str(tmp_path / "term")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "train.stage2", "--model", assets.model_dir, "--data", assets.mixed_data, "--image-folder",
           assets.image_folder, "--output", out, "--global-batch", "3", "--max-tokens-per-batch", "256",
           "--max-steps", "500", "--epochs", "100", "--device", "cpu", "--num-workers", "0", "--lr", "1e-3"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        path = os.path.join(out, "metrics.jsonl")
        while not (os.path.exists(path) and len(metrics_so_far(path)) >= 2):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "the run wrote no metrics in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "stopped by signal 15 after step" in stdout, stderr[-3000:]
    assert "SIGKILL" not in stderr and "exitcode  : -9" not in stderr       # no rank outlived the grace period
    done = len(metrics(out))
    assert 2 <= done < 500
    assert os.listdir(os.path.join(out, "checkpoints")) == [f"step-{done:06d}"]
    ckpt = os.path.join(out, "checkpoints", f"step-{done:06d}")
    assert {"__0_0.distcp", "__1_0.distcp", "training_state.pt"} <= set(os.listdir(ckpt))
    assert torch.load(os.path.join(ckpt, "training_state.pt"), weights_only=True)["step"] == done


@pytest.mark.parametrize("direction", ["2to1", "1to2"])
def test_resume_on_another_world_size(assets, runs, tmp_path, direction):
    """Step 2's checkpoint of one world size, resumed on the other: steps 3-4 follow the run that
    wrote it (fp32, a different reduction order: the 1-vs-2-process tolerance above)."""
    single, two = runs
    source = two if direction == "2to1" else single
    out = str(tmp_path / direction)
    shutil.copytree(source, out)
    assert os.listdir(os.path.join(out, "checkpoints")) == ["step-000002"]   # (the last step saves as final)
    shutil.rmtree(os.path.join(out, "final"))
    p = single_process(assets, out, "--resume") if direction == "2to1" else torchrun(assets, out, "--resume")
    effective = json.loads(p.stdout.splitlines()[0])["effective_config"]
    assert effective["resumed_from"].endswith("step-000002") and effective["world_size"] == (
        1 if direction == "2to1" else 2)
    ref, got = metrics(source), metrics(out)
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    for a, b in zip(ref, got, strict=True):
        assert b["lr"] == a["lr"] and b["tokens"] == a["tokens"]
        assert abs(b["loss"] - a["loss"]) <= 1e-5 * abs(a["loss"]), (a, b)
        assert abs(b["grad_norm"] - a["grad_norm"]) <= 1e-5 * a["grad_norm"], (a, b)
    w1, w2 = weights(os.path.join(source, "final")), weights(os.path.join(out, "final"))
    assert w1.keys() == w2.keys()
    for k in w1:
        assert rel_err(w2[k], w1[k]) <= 1e-5, k
