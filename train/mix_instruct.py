"""Mix instruction-data kinds in given proportions (the paper's data ablation).

    python -m train.mix_instruct --conversation FILE --detail FILE --complex FILE --output FILE
        [--preset full|detail_complex|conv_5d_10c|conversation | --fractions conversation=1,detail=0.05,...]
        [--seed N]

A fraction is the share of that kind's samples kept: ``round(fraction · n)`` of them, drawn
without replacement with a seeded RNG (the same seed always keeps the same samples); the mix
is then shuffled with the same seed. Presets are the paper's ablation rows: ``full`` (all
three kinds), ``detail_complex``, ``conv_5d_10c`` (conversation + 5% detail + 10% complex) and
``conversation`` only. Inputs are LLaVA JSON files (``train.make_instruct`` outputs); each sample
gets ``kind`` set to the kind it was given as, and the output is written atomically.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys

from engine.cli import run_main
from train.make_instruct import KINDS, write_text_atomic

__all__ = ["PRESETS", "mix", "main"]

PRESETS = {
    "full": {"conversation": 1.0, "detail": 1.0, "complex": 1.0},
    "detail_complex": {"conversation": 0.0, "detail": 1.0, "complex": 1.0},
    "conv_5d_10c": {"conversation": 1.0, "detail": 0.05, "complex": 0.10},
    "conversation": {"conversation": 1.0, "detail": 0.0, "complex": 0.0},
}


def mix(datasets: dict[str, list[dict]], fractions: dict[str, float], *, seed: int = 0) -> list[dict]:
    """Keep ``round(fractions[k] · len(datasets[k]))`` samples of each kind, then shuffle; all seeded.

    Kinds missing from ``fractions`` are dropped; a kind with a positive fraction must be in ``datasets``.
    Raises ValueError for fractions outside [0, 1] or a missing dataset.
    """
    out = []
    for kind in sorted(fractions):
        frac = fractions[kind]
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"fraction for {kind!r} must be in [0, 1], got {frac}")
        if frac == 0.0:
            continue
        if kind not in datasets:
            raise ValueError(f"fraction {frac} given for {kind!r} but no {kind} dataset")
        samples = datasets[kind]
        keep = round(frac * len(samples))
        # Per-kind RNG: the detail subset does not change when the conversation file grows.
        picked = sorted(random.Random(f"mix:{seed}:{kind}").sample(range(len(samples)), keep))
        out.extend({**samples[i], "kind": kind} for i in picked)
    random.Random(f"mix:{seed}:shuffle").shuffle(out)
    return out


def _parse_fractions(text: str) -> dict[str, float]:
    fractions = {}
    for part in text.split(","):
        kind, sep, value = part.partition("=")
        if not sep or kind.strip() not in KINDS:
            raise ValueError(f"--fractions wants kind=value pairs with kinds {KINDS}, got {part!r}")
        try:
            fractions[kind.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--fractions: {value!r} is not a number") from None
    return fractions


def _load(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset not found: {path}")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list) or not all(isinstance(s, dict) and "conversations" in s for s in data):
        raise ValueError(f"{path}: expected a LLaVA JSON list of samples with 'conversations'")
    return data


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m train.mix_instruct", description=__doc__.splitlines()[0])
    for kind in KINDS:
        p.add_argument(f"--{kind}", help=f"LLaVA JSON of {kind} samples")
    p.add_argument("--output", required=True)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--preset", choices=sorted(PRESETS), default="full")
    group.add_argument("--fractions", help="e.g. conversation=1,detail=0.05,complex=0.1")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    fractions = _parse_fractions(a.fractions) if a.fractions else PRESETS[a.preset]
    datasets = {kind: _load(getattr(a, kind)) for kind in KINDS if getattr(a, kind)}
    mixed = mix(datasets, fractions, seed=a.seed)
    write_text_atomic(a.output, json.dumps(mixed, ensure_ascii=False, indent=1))
    summary = {"output": a.output, "fractions": fractions, "samples": len(mixed),
               "per_kind": {k: sum(s["kind"] == k for s in mixed) for k in KINDS}}
    print(json.dumps(summary), file=sys.stderr)
    return summary


if __name__ == "__main__":
    run_main(main)
