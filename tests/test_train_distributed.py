"""``torchrun --nproc_per_node 2 -m train.stage2`` (FSDP2, gloo, CPU) against one process.

The global batch (3) does not split evenly over the 2 ranks, and image and text-only steps
alternate, so the run exercises the padding micro-batches that keep the ranks' collectives
matched. Same loss curve, learning rates, token counts and grad-norms (FSDP must sum, not
average, the ranks' gradients: the loss is already normalised by the global target count),
and the same final weights; a distributed resume from a checkpoint ends where the
uninterrupted distributed run ended.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch.distributed as dist
from helpers import ENV, REPO, metrics, ok, rel_err, weights

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")


def args(assets, out: str) -> list[str]:
    return ["-m", "train.stage2", "--model", assets.model_dir, "--data", assets.mixed_data, "--image-folder",
            assets.image_folder, "--output", out, "--global-batch", "3", "--max-tokens-per-batch", "256",
            "--max-steps", "4", "--save-every", "2", "--device", "cpu", "--num-workers", "0", "--lr", "1e-3"]


def torchrun(assets, out: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *args(assets, out), *extra]
    return ok(subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240))


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    single, two = str(tmp_path_factory.mktemp("single")), str(tmp_path_factory.mktemp("two"))
    ok(subprocess.run([sys.executable, *args(assets, single)], cwd=REPO, env=ENV, capture_output=True,
                      text=True, timeout=240))
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


def test_distributed_resume_matches_the_uninterrupted_distributed_run(assets, runs, tmp_path):
    _, two = runs
    out = str(tmp_path / "resumed")
    shutil.copytree(two, out)                                        # as if stopped right after step 2's save
    assert os.listdir(os.path.join(out, "checkpoints")) == ["step-000002"]   # (the last step saves as final)
    shutil.rmtree(os.path.join(out, "final"))
    p = torchrun(assets, out, "--resume")
    assert "step-000002" in p.stdout.splitlines()[0]                 # effective config: resumed_from
    assert [m["loss"] for m in metrics(out)] == [m["loss"] for m in metrics(two)]
    a, b = weights(os.path.join(two, "final")), weights(os.path.join(out, "final"))
    for k in a:
        assert rel_err(b[k], a[k]) <= 1e-6, k
