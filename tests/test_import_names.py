"""Our top-level import names next to what our dependencies install.

transformers >= 5.25 requires Hugging Face's ``kernels`` distribution (top-level package ``kernels``) and
imports it from ``transformers.activations``. When our kernels package was also called ``kernels``, the
checkout's copy shadowed it from the repository root (transformers failed to import) and Hugging Face's
shadowed ours from anywhere else (``engine`` failed). These tests run a user's program in a fresh
interpreter, from outside the checkout and from its root: import ``engine``, ``llava_kernels`` and
``transformers.activations`` together, load a tiny checkpoint and run ``engine.generate`` with an image
(the projector and the image-token scatter go through ``llava_kernels``). A third test reads every installed
distribution's file list and fails if any of them ships a top-level name of ours.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUR_NAMES = ("engine", "train", "llava_kernels", "llava_evals")
DIST = "llava-engine"

# The user's program. argv: checkout root, checkpoint dir. Prints one JSON line.
PROGRAM = r"""
import json, sys
from pathlib import Path

root = Path(sys.argv[1]).resolve()
import engine, llava_kernels, llava_evals, train
import transformers.activations  # transformers >= 5.25 imports Hugging Face's `kernels` here

# A package of ours is a folder directly under the checkout; a virtual environment may live inside the
# checkout too (CI's .ci-venv), so "somewhere below the root" would not tell them apart.
for mod in (engine, llava_kernels, llava_evals, train):
    where = Path(mod.__file__).resolve().parent
    assert where.parent == root, f"{mod.__name__} imported from {where}, not from the checkout {root}"
hf = sys.modules.get("kernels")
if hf is not None:
    where = Path(hf.__file__).resolve().parent
    assert where.parent != root, f"'kernels' resolved to {where}, a folder of the checkout"

import torch
model = engine.load(sys.argv[2]).eval()
cfg = model.config
g = torch.Generator().manual_seed(0)
prompt = [1] + [cfg.image_token_id] * cfg.image_seq_len + torch.randint(3, 60, (7,), generator=g).tolist()
size = cfg.vision.image_size
pixels = torch.randn(1, 3, size, size, generator=g)
out = engine.generate(model, [prompt, prompt[:1] + prompt[-3:]], images=pixels, max_new_tokens=5,
                      stop_token_ids=[])
print(json.dumps({"tokens": [o.tokens for o in out], "hf_kernels": None if hf is None else hf.__file__,
                  "llava_kernels": llava_kernels.__file__}))
"""


def _installed_engine(cwd: Path) -> Path | None:
    """Where a fresh interpreter outside the checkout finds ``engine`` (None: not installed)."""
    proc = subprocess.run([sys.executable, "-c", "import importlib.util as u; s = u.find_spec('engine'); "
                           "print(s.origin if s else '')"], cwd=cwd, capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    origin = proc.stdout.strip()
    return Path(origin).resolve() if origin else None


def _run(cwd: Path, ckpt: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only what an installed user has
    env.setdefault("TRITON_INTERPRET", "1")
    proc = subprocess.run([sys.executable, "-c", PROGRAM, str(ROOT), ckpt], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"from {cwd}:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check(result: dict) -> None:
    assert [len(t) for t in result["tokens"]] == [5, 5]
    assert Path(result["llava_kernels"]).resolve().parent == ROOT / "llava_kernels"


def test_user_program_from_outside_the_checkout(tiny_checkpoint, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    found = _installed_engine(outside)
    if found is None:
        pytest.skip(f"{DIST} is not installed (pip install -e .), so no program outside the checkout can import it")
    if found.parent.parent != ROOT:
        pytest.skip(f"the installed {DIST} is another checkout ({found.parent.parent}), not this one")
    _check(_run(outside, tiny_checkpoint))


def test_user_program_from_the_repository_root(tiny_checkpoint):
    result = _run(ROOT, tiny_checkpoint)  # sys.path[0] is the checkout, as for `python -m train.stage2`
    _check(result)
    with_hf = result["hf_kernels"] is not None
    try:
        needs = int(md.version("transformers").split(".")[0]), int(md.version("transformers").split(".")[1])
    except (md.PackageNotFoundError, ValueError):
        needs = (0, 0)
    if needs >= (5, 25):  # from 5.25 transformers.activations imports Hugging Face's package
        assert with_hf, "transformers >= 5.25 should have imported Hugging Face's kernels"


def _top_level_names(dist: md.Distribution) -> set[str]:
    """Top-level import names a distribution installs: its top_level.txt, else the first path part of
    every .py file / package folder in its RECORD."""
    text = dist.read_text("top_level.txt")
    if text:
        return {line.strip() for line in text.splitlines() if line.strip()}
    names = set()
    for f in dist.files or ():
        parts = Path(str(f)).parts
        if not parts or parts[0].endswith((".dist-info", ".egg-info", ".data")) or parts[0] in ("..", "__pycache__"):
            continue
        if len(parts) > 1 or parts[0].endswith(".py"):
            names.add(parts[0].removesuffix(".py"))
    return names


def test_no_installed_distribution_ships_our_names():
    clashes = {}
    for dist in md.distributions():
        name = dist.metadata["Name"] or "?"
        if name.lower().replace("_", "-") == DIST:
            continue
        shared = _top_level_names(dist) & set(OUR_NAMES)
        if shared:
            clashes[name] = sorted(shared)
    assert not clashes, f"installed distributions ship our top-level import names: {clashes}"
