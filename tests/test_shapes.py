"""train.shapes: the procedural dataset is deterministic, its boxes are tight, its questions are right."""
from __future__ import annotations

import json
import os
import random
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from train.shapes import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    make_default_instruct,
    make_scene,
    make_shapes_dataset,
    multiple_choice,
)

MC = re.compile(r"^<image>\n(?P<q>[^\n]+\?)(?P<opts>(?:\n[A-D]\. [^\n]+){3,4})$")


def files(root: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def test_deterministic_and_test_split_independent_of_train(tmp_path):
    a = files(make_shapes_dataset(str(tmp_path / "a"), num_train=6, num_test=4, image_size=32, seed=3).root)
    b = files(make_shapes_dataset(str(tmp_path / "b"), num_train=6, num_test=4, image_size=32, seed=3).root)
    assert a == b and len(a) == 6 + 4 + 3
    c = files(make_shapes_dataset(str(tmp_path / "c"), num_train=2, num_test=4, image_size=32, seed=3).root)
    assert all(c[k] == a[k] for k in c if k.startswith("test"))
    d = files(make_shapes_dataset(str(tmp_path / "d"), num_train=6, num_test=4, image_size=32, seed=4).root)
    assert d["captions.jsonl"] != a["captions.jsonl"]


@pytest.mark.parametrize("sizes", [(), ((32, 64), (64, 32), (48, 48), (40, 72))], ids=["square", "varied"])
def test_boxes_are_tight_and_captions_describe_the_image(tmp_path, sizes):
    """Square images, or (the AnyRes default's data) each image's size drawn from ``sizes``."""
    paths = make_shapes_dataset(str(tmp_path), num_train=40, num_test=0, image_size=48, seed=0, sizes=sizes)
    with open(paths.captions) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 40
    counts, seen = Counter(), Counter()
    for r in records:
        image = np.asarray(Image.open(os.path.join(paths.root, r["image"])).convert("RGB"))  # (H, W, 3)
        height, width = image.shape[:2]
        assert image.shape[2] == 3 and (r["width"], r["height"]) == (width, height)
        assert (height, width) in (sizes or ((48, 48),))
        seen[height, width] += 1
        background = re.search(r"on a (\w+) background", r["captions"][0]).group(1)
        ink = (image != np.array(BACKGROUNDS[background])).any(-1)  # (H, W) pixels of some shape
        covered = np.zeros_like(ink)
        cats = [b["category"] for b in r["boxes"]]
        assert 1 <= len(cats) <= 3 and len(set(cats)) == len(cats)
        for box in r["boxes"]:
            color, shape = box["category"].split()
            assert color in COLORS and shape in SHAPES
            counts[shape] += 1
            x1, y1, x2, y2 = box["bbox"]
            assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
            inside = ink[y1:y2, x1:x2]
            ys, xs = np.nonzero(inside)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (0, 0, x2 - x1, y2 - y1), box
            assert (image[y1:y2, x1:x2][inside] == np.array(COLORS[color])).all()
            covered[y1:y2, x1:x2] = True
        assert not (ink & ~covered).any(), "ink outside every box"
        assert len(r["captions"]) == 5
        assert all(c in r["captions"][0] and c in r["captions"][4] for c in cats)
    assert set(counts) == set(SHAPES) and set(seen) == set(sizes or ((48, 48),))


def parse_mc(sample: dict) -> tuple[str, list[str], str]:
    human, gpt = sample["conversations"]
    assert (human["from"], gpt["from"]) == ("human", "gpt")
    m = MC.match(human["value"])
    assert m, human["value"]
    options = [line[3:] for line in m["opts"].strip("\n").split("\n")]
    assert [line[0] for line in m["opts"].strip("\n").split("\n")] == list("ABCD"[: len(options)])
    assert len(set(options)) == len(options) and gpt["value"] in "ABCD"[: len(options)]
    return m["q"], options, options["ABCD".index(gpt["value"])]


def test_multiple_choice_files_are_scienceqa_layout_and_correct(tmp_path):
    paths = make_shapes_dataset(str(tmp_path), num_train=60, num_test=30, image_size=32, seed=2)
    with open(paths.captions) as f:
        boxes = {r["id"]: [b["category"].split() for b in r["boxes"]] for r in map(json.loads, f)}
    with open(paths.train_mc) as f:
        train = json.load(f)
    with open(paths.test_mc) as f:
        test = json.load(f)
    assert len(train) == 60 and len(test) == 30
    for sample in test:
        assert set(sample) == {"id", "image", "conversations"} and sample["image"].startswith("test/")
        assert os.path.isfile(os.path.join(paths.root, sample["image"]))
        parse_mc(sample)
    for sample in train:  # answers checked against the boxes of the same image
        question, _, answer = parse_mc(sample)
        objs = boxes[sample["id"]]
        if question == "How many shapes are in the image?":
            assert answer == str(len(objs))
        elif m := re.fullmatch(r"What color is the (\w+)\?", question):
            assert [c for c, s in objs if s == m[1]] == [answer]
        else:
            m = re.fullmatch(r"Which shape is (\w+)\?", question)
            assert m and [s for c, s in objs if c == m[1]] == [answer]


def test_question_answers_are_unambiguous_and_letters_balanced():
    rng = random.Random(0)
    letters, kinds = Counter(), Counter()
    for _ in range(2000):
        scene = make_scene(rng, width=64, height=64)
        question, options, answer = multiple_choice(scene, rng)
        letters[answer] += 1
        kinds[question.split()[0]] += 1
        if question.startswith("What color"):
            shape = question.split()[-1][:-1]
            assert [s.color for s in scene.shapes if s.shape == shape] == [options[answer]]
        elif question.startswith("Which shape"):
            color = question.split()[-1][:-1]
            assert [s.shape for s in scene.shapes if s.color == color] == [options[answer]]
        else:
            assert options[answer] == str(len(scene.shapes))
    assert set(kinds) == {"What", "Which", "How"}
    assert min(letters[i] for i in range(3)) > 300 and letters[3] > 100  # no position bias to exploit


def test_make_default_instruct_is_idempotent(tmp_path):
    out = make_default_instruct(str(tmp_path), num_train=8, num_test=2, image_size=16, seed=1)
    with open(out["instruct"], "rb") as f:
        first = f.read()
    mixed = json.loads(first)
    assert Counter(s["kind"] for s in mixed) == {"conversation": 8, "detail": 8, "complex": 8}
    out2 = make_default_instruct(str(tmp_path), num_train=8, num_test=2, image_size=16, seed=1)
    with open(out2["instruct"], "rb") as f:
        assert f.read() == first


@pytest.mark.parametrize("kw,match", [({"image_size": 8}, "image_size"), ({"num_train": -1}, "num_train"),
                                      ({"max_objects": 4}, "max_objects")])
def test_bad_arguments(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        make_shapes_dataset(str(tmp_path), **{"num_train": 1, "num_test": 1, **kw})
