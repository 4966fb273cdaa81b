"""The bundled procedural dataset of the embedded default: coloured shapes, no downloads.

Each image is a plain background with 1..``max_objects`` shapes (circle, square, triangle) in
distinct (colour, shape) combinations, so "the red circle" always names one object. Everything
is a pure function of ``seed``: the same call writes byte-identical files.

What ``make_shapes_dataset(out_dir, ...)`` writes (all image paths relative to ``out_dir``,
which is therefore the ``--image-folder`` for training):

- ``train/NNNNNN.png``, ``test/NNNNNN.png``: RGB PNGs, ``image_size`` × ``image_size``, or with
  ``sizes`` each image's (height, width) drawn from that list (AnyRes: varied aspect ratios).
- ``captions.jsonl``: one training record per line in our caps/boxes form, the input of
  ``train.make_instruct``: ``{"id", "image", "width", "height", "captions": [5 str],
  "boxes": [{"category": "red circle", "bbox": [x1, y1, x2, y2]}]}`` with integer pixel boxes
  (half-open: the shape's pixels lie in ``x1 <= x < x2``, ``y1 <= y < y2``).
- ``train_mc.json``: multiple-choice questions over the training images, LLaVA JSON.
- ``test_mc.json``: the held-out multiple-choice set over the test images, LLaVA JSON in the
  upstream ScienceQA layout: human ``"<image>\\n{question}\\nA. ..\\nB. .."``, gpt ``"B"``.
"""
from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import dataclass

from PIL import Image, ImageDraw

from engine.cli import run_main
from train.make_instruct import KINDS, InstructConfig, run, write_text_atomic
from train.mix_instruct import PRESETS, mix

__all__ = ["COLORS", "SHAPES", "BACKGROUNDS", "ShapesPaths", "Scene", "Shape", "make_scene", "render_scene",
           "scene_captions", "multiple_choice", "image_blind_accuracy", "make_shapes_dataset", "make_default_instruct"]

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (255, 255, 255), "gray": (128, 128, 128), "black": (0, 0, 0)}
LETTERS = "ABCD"
_NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}


@dataclass(frozen=True, kw_only=True)
class Shape:
    color: str
    shape: str
    bbox: tuple[int, int, int, int]  # pixels, half-open [x1, y1, x2, y2)

    @property
    def category(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True, kw_only=True)
class Scene:
    width: int
    height: int
    background: str
    shapes: tuple[Shape, ...]


@dataclass(frozen=True, kw_only=True)
class ShapesPaths:
    root: str           # the image folder: every "image" field is relative to it
    captions: str       # captions.jsonl (input of train.make_instruct)
    train_mc: str       # train_mc.json
    test_mc: str        # test_mc.json


def _overlaps(a, b, gap: int = 1) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def make_scene(rng: random.Random, *, width: int, height: int, max_objects: int = 3) -> Scene:
    """Draw a scene description: a background and non-overlapping shapes with distinct (colour, shape).
    Shape sizes follow the shorter side; a square scene draws exactly what it always drew."""
    background = rng.choice(sorted(BACKGROUNDS))
    # A shape in the background's colour would be invisible; black/white/gray are not shape colours.
    combos = [(c, s) for c in COLORS for s in SHAPES]
    rng.shuffle(combos)
    want = rng.randint(1, max_objects)
    size = min(width, height)
    lo, hi = max(4, size // 5), max(5, (size * 2) // 5)
    shapes: list[Shape] = []
    for color, shape in combos[:want]:
        for _ in range(50):  # rejection sampling; a crowded scene simply ends up with fewer shapes
            side = rng.randint(lo, hi)
            x1, y1 = rng.randint(0, width - side), rng.randint(0, height - side)
            box = (x1, y1, x1 + side, y1 + side)
            if not any(_overlaps(box, s.bbox) for s in shapes):
                shapes.append(Shape(color=color, shape=shape, bbox=box))
                break
    return Scene(width=width, height=height, background=background, shapes=tuple(shapes))


def render_scene(scene: Scene) -> Image.Image:
    """Rasterize a scene to an RGB image (PIL's inclusive corners → our half-open boxes)."""
    image = Image.new("RGB", (scene.width, scene.height), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        x1, y1, x2, y2 = s.bbox
        fill = COLORS[s.color]
        if s.shape == "circle":
            draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=fill)
        elif s.shape == "square":
            draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill)
        else:
            draw.polygon([(x1, y2 - 1), (x2 - 1, y2 - 1), ((x1 + x2 - 1) / 2, y1)], fill=fill)
    return image


def _where(s: Shape, scene: Scene) -> str:
    cx, cy = (s.bbox[0] + s.bbox[2]) / 2 / scene.width, (s.bbox[1] + s.bbox[3]) / 2 / scene.height
    v = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else ""
    h = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
    return f"{v} {h}".strip() or "center"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def scene_captions(scene: Scene) -> list[str]:
    """Five captions per image, like COCO's, each a different way of saying what is drawn."""
    n = len(scene.shapes)
    things = [f"a {s.category}" for s in scene.shapes]
    placed = [f"a {s.category} at the {_where(s, scene)}" for s in scene.shapes]
    count = f"{_NUMBER_WORDS[n]} shape{'s' if n > 1 else ''}"
    first = things[0][0].upper() + things[0][1:]
    return [
        f"{_join(things)[0].upper()}{_join(things)[1:]} on a {scene.background} background.",
        f"A simple drawing of {count} on {scene.background}.",
        f"There is {_join(placed)}.",
        f"{first} is one of {count} in this picture." if n > 1 else f"{first} alone on a plain background.",
        f"Flat coloured shapes: {_join([s.category for s in scene.shapes])}.",
    ]


def multiple_choice(scene: Scene, rng: random.Random) -> tuple[str, list[str], int]:
    """One question about the scene with its options and the index of the right one."""
    kinds = ["color", "shape", "count"]
    kind = rng.choice(kinds)
    target = rng.choice(scene.shapes)
    if kind == "color":
        question, answer, pool = f"What color is the {target.shape}?", target.color, list(COLORS)
        # Ask about a shape only when it is unique in the scene, else the question has two answers.
        if sum(s.shape == target.shape for s in scene.shapes) > 1:
            kind = "count"
    if kind == "shape":
        question, answer, pool = f"Which shape is {target.color}?", target.shape, list(SHAPES)
        if sum(s.color == target.color for s in scene.shapes) > 1:
            kind = "count"
    if kind == "count":
        question, answer, pool = "How many shapes are in the image?", str(len(scene.shapes)), list("1234")
    # Options keep one fixed order per question kind (as ScienceQA's do): the embedded default's tiny
    # decoder then has to read the answer from the image, not also learn to search a shuffled list,
    # which it cannot in its CPU budget. ``image_blind_accuracy`` measures what answering without the image gets.
    options = list(pool)
    return question, options, options.index(answer)


def image_blind_accuracy(train: list[dict], test: list[dict]) -> float:
    """Accuracy on ``test`` of the best policy that never looks at the image: for each question text,
    the answer letter most common for it in ``train`` (the overall most common letter for texts
    ``train`` lacks)."""
    by_question: dict[str, Counter] = {}
    overall: Counter = Counter()
    for r in train:
        answer = r["conversations"][1]["value"]
        by_question.setdefault(r["conversations"][0]["value"], Counter())[answer] += 1
        overall[answer] += 1
    fallback = overall.most_common(1)[0][0] if overall else "A"
    hits = 0
    for r in test:
        counts = by_question.get(r["conversations"][0]["value"])
        hits += (counts.most_common(1)[0][0] if counts else fallback) == r["conversations"][1]["value"]
    return hits / max(len(test), 1)


def _mc_record(sample_id: str, image: str, question: str, options: list[str], answer: int) -> dict:
    lines = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return {"id": sample_id, "image": image, "conversations": [
        {"from": "human", "value": f"<image>\n{question}\n{lines}"},
        {"from": "gpt", "value": LETTERS[answer]},
    ]}


def make_shapes_dataset(out_dir: str, *, num_train: int = 2000, num_test: int = 200, image_size: int = 64,
                        seed: int = 0, max_objects: int = 3, mc_per_image: int = 1,
                        sizes: tuple[tuple[int, int], ...] = ()) -> ShapesPaths:
    """Write the shapes dataset under ``out_dir`` (created if needed) and return its paths.

    ``sizes``: (height, width) choices, one drawn per image from its own RNG stream (AnyRes data:
    varied sizes and aspect ratios); empty = every image ``image_size`` square.

    Deterministic in its arguments: train and test scenes come from separate RNG streams, so
    ``num_train`` (and ``mc_per_image``, which adds training questions only) never changes the test set.
    Raises ValueError for counts < 0, ``image_size`` or a side in ``sizes`` < 16, ``mc_per_image`` < 1,
    or ``max_objects`` outside 1..3.
    """
    if num_train < 0 or num_test < 0:
        raise ValueError(f"num_train and num_test must be >= 0, got {num_train}, {num_test}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 pixels, got {image_size}")
    if not all(len(hw) == 2 and min(hw) >= 16 for hw in sizes):
        raise ValueError(f"sizes must be (height, width) pairs of sides >= 16 pixels, got {sizes!r}")
    if mc_per_image < 1:
        raise ValueError(f"mc_per_image must be >= 1, got {mc_per_image}")
    if not 1 <= max_objects <= 3:
        raise ValueError(f"max_objects must be in 1..3 (options of the count question), got {max_objects}")
    for split in ("train", "test"):
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)
    records, train_mc, test_mc = [], [], []
    for split, count, out in (("train", num_train, train_mc), ("test", num_test, test_mc)):
        rng = random.Random(f"shapes:{seed}:{split}")
        extra = random.Random(f"shapes:{seed}:{split}:extra-questions")
        pick_size = random.Random(f"shapes:{seed}:{split}:sizes")
        for i in range(count):
            height, width = pick_size.choice(sizes) if sizes else (image_size, image_size)
            scene = make_scene(rng, width=width, height=height, max_objects=max_objects)
            image = f"{split}/{i:06d}.png"
            render_scene(scene).save(os.path.join(out_dir, image), format="PNG")
            sample_id = f"shapes-{split}-{i:06d}"
            question, options, answer = multiple_choice(scene, rng)
            out.append(_mc_record(sample_id, image, question, options, answer))
            if split == "train":  # extra training questions come from their own stream: scenes stay the same
                for j in range(1, mc_per_image):
                    question, options, answer = multiple_choice(scene, extra)
                    out.append(_mc_record(f"{sample_id}-q{j}", image, question, options, answer))
                records.append({"id": sample_id, "image": image, "width": width, "height": height,
                                "captions": scene_captions(scene),
                                "boxes": [{"category": s.category, "bbox": list(s.bbox)}
                                          for s in scene.shapes]})
    paths = ShapesPaths(root=out_dir, captions=os.path.join(out_dir, "captions.jsonl"),
                        train_mc=os.path.join(out_dir, "train_mc.json"),
                        test_mc=os.path.join(out_dir, "test_mc.json"))
    write_text_atomic(paths.captions, "".join(json.dumps(r) + "\n" for r in records))
    write_text_atomic(paths.train_mc, json.dumps(train_mc, indent=1))
    write_text_atomic(paths.test_mc, json.dumps(test_mc, indent=1))
    return paths


def make_default_instruct(out_dir: str, *, num_train: int = 2000, num_test: int = 200, image_size: int = 64,
                          seed: int = 0, preset: str = "full", mc_per_image: int = 1,
                          sizes: tuple[tuple[int, int], ...] = ()) -> dict[str, str]:
    """The embedded default's data in one call: shapes → offline teacher (3 kinds) → mixed LLaVA JSON.

    Returns the paths ``{"image_folder", "captions", "instruct", "train_mc", "test_mc", "conversation",
    "detail", "complex"}``. Idempotent: a second call with the same arguments rewrites the same files.
    ``preset`` is a ``train.mix_instruct.PRESETS`` name; ``sizes`` as in ``make_shapes_dataset``.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    paths = make_shapes_dataset(out_dir, num_train=num_train, num_test=num_test, image_size=image_size,
                                seed=seed, mc_per_image=mc_per_image, sizes=sizes)
    out = {"image_folder": out_dir, "captions": paths.captions, "train_mc": paths.train_mc,
           "test_mc": paths.test_mc}
    datasets = {}
    for kind in KINDS:
        out[kind] = os.path.join(out_dir, f"instruct_{kind}.json")
        config = InstructConfig(input=paths.captions, kind=kind, output=out[kind], offline=True, seed=seed)
        # Regenerate rather than resume: ids are the same for every seed and image size, so resuming
        # would keep an earlier call's text about different images. The offline teacher is cheap.
        for stale in (config.samples_path, config.rejects_path):
            if os.path.exists(stale):
                os.remove(stale)
        run(config)
        with open(out[kind], encoding="utf-8") as f:
            datasets[kind] = json.load(f)
    out["instruct"] = os.path.join(out_dir, "instruct.json")
    write_text_atomic(out["instruct"], json.dumps(mix(datasets, PRESETS[preset], seed=seed), indent=1))
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse
    p = argparse.ArgumentParser(prog="python -m train.shapes", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (also the image folder for training)")
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-test", type=int, default=200)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--instruct", action="store_true",
                   help="also generate the offline instruction data and its full mix (make_default_instruct)")
    a = p.parse_args(argv)
    kw = dict(num_train=a.num_train, num_test=a.num_test, image_size=a.image_size, seed=a.seed)
    if a.instruct:
        print(json.dumps(make_default_instruct(a.out, **kw)))
    else:
        print(json.dumps(make_shapes_dataset(a.out, **kw).__dict__))


if __name__ == "__main__":
    run_main(main)
