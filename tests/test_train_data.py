"""Training data (train/data.py): validation, packing, step plans, rank shards, bad records.

On the tiny assets every training test starts from (tests/helpers.py ``build_tiny_assets``, built once
per session by conftest's ``assets`` fixture; ``samples`` is its mixed file loaded).
"""
from __future__ import annotations

import json
import os
import random

import pytest
import torch
from helpers import IMAGE_SIZE, MULTI_IMAGE, SPEC, TEXT_ONLY, load_tiny, write_bad_data, write_multi_image_data
from PIL import Image

import engine
from engine.conversation import IGNORE_INDEX
from engine.image import preprocess
from train.data import (
    BadRecord,
    Sample,
    StepDataset,
    collate,
    count_targets,
    pack_micro_batches,
    plan_steps,
    shifted_targets,
)


def test_mixed_data_loads_cleanly(assets, samples):
    """conftest's ``samples``: every record of the mixed file, none skipped, dropped or truncated."""
    _, report = load_tiny(assets, assets.mixed_data)
    assert len(samples) == 12 + len(TEXT_ONLY)
    assert report.summary() == "0 bad records skipped, 0 over-long samples dropped, 0 truncated"


# --------------------------------------------------------------------------- packing a micro-batch


def test_collate_packs_without_padding(samples):
    chosen = [samples[0], samples[-1], samples[1]]          # image, text-only, image
    mb = collate(chosen, spec=SPEC)
    lengths = [s.length for s in chosen]
    assert mb.input_ids.tolist() == sum((s.input_ids for s in chosen), [])
    assert mb.cu_seqlens.dtype == torch.int32
    assert mb.cu_seqlens.tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert mb.position_ids.tolist() == sum((list(range(n)) for n in lengths), [])
    assert mb.max_seqlen == max(lengths) and mb.ids == [s.id for s in chosen]
    for s, a in zip(chosen, mb.cu_seqlens[:-1].tolist(), strict=True):
        got = mb.targets[a:a + s.length].tolist()
        # Row t predicts token t+1 of the same sequence; the last row never predicts the next sequence.
        assert got == s.labels[1:] + [IGNORE_INDEX] and got[-1] == IGNORE_INDEX
        assert any(x != IGNORE_INDEX for x in got)
    assert mb.num_targets == sum(sum(x != IGNORE_INDEX for x in s.labels[1:]) for s in chosen)
    assert mb.pixel_values.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with Image.open(chosen[2].images[0]) as img:
        assert torch.equal(mb.pixel_values[1], preprocess(img.convert("RGB"), size=IMAGE_SIZE, mode="pad"))
    assert shifted_targets([5, -100, 7]) == [-100, 7, -100]


@pytest.mark.parametrize("lengths,budget", [
    ([random.Random(0).randint(1, 600) for _ in range(97)], 1025),
    ([577, 577, 1, 1025, 448], 1025),       # an exact fit and a sample of exactly the budget
    ([5, 2], 3),                            # a sample longer than the budget gets a bin of its own
    ([7], 100),
    ([], 10),
])
def test_pack_micro_batches_first_fit(lengths, budget):
    bins = pack_micro_batches(lengths, budget)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in b) for b in bins]
    for b, load_ in zip(bins, loads, strict=True):
        assert load_ <= budget or len(b) == 1
    # First fit: an item only opens a new bin when it fits in no earlier one, so no two bins could merge.
    for i in range(len(bins)):
        for j in range(i + 1, len(bins)):
            assert loads[i] + loads[j] > budget
    assert pack_micro_batches(lengths, budget) == bins


def test_plan_steps_groups_by_modality_and_is_deterministic():
    rng = random.Random(1)
    # 0, 1 or 2 images: a multi-image record is an image record for the grouping
    fake = [Sample(f"s{i}", [1] * rng.randint(3, 300), [1] * 3, ("img.png",) * (i % 3)) for i in range(50)]
    plan = plan_steps(fake, global_batch=4, seed=7, epoch=0)
    flat = [i for step in plan for i in step]
    assert sorted(flat) == list(range(50))                          # every sample once per epoch
    assert all(1 <= len(step) <= 4 for step in plan)
    assert all(len({not fake[i].images for i in step}) == 1 for step in plan)   # one modality per step
    n_img = sum(bool(s.images) for s in fake)
    assert len(plan) == -(-n_img // 4) + -(-(50 - n_img) // 4)
    assert plan == plan_steps(fake, global_batch=4, seed=7, epoch=0)
    assert plan != plan_steps(fake, global_batch=4, seed=7, epoch=1)
    assert plan != plan_steps(fake, global_batch=4, seed=8, epoch=0)


def test_step_dataset_ranks_split_each_step(samples):
    plan = plan_steps(samples, global_batch=3, seed=0, epoch=0)
    budget = max(s.length for s in samples) + 10                     # two short samples fit together
    single = StepDataset(samples, plan, max_tokens=budget, spec=SPEC)
    ranks = [StepDataset(samples, plan, max_tokens=budget, spec=SPEC, rank=r, world=2)
             for r in (0, 1)]
    padded = {True: 0, False: 0}                                      # by modality
    for k, step in enumerate(plan):
        step_ids = sorted(samples[i].id for i in step)
        (s0, mbs0), (s1, mbs1) = ranks[0][k], ranks[1][k]
        assert s0 == s1 == k and len(mbs0) == len(mbs1)              # collectives stay matched
        assert sorted(i for mb in mbs0 + mbs1 for i in mb.ids) == step_ids
        assert sum(mb.num_targets for mb in mbs0 + mbs1) == count_targets(samples, step)
        has_image = bool(samples[step[0]].images)
        for mb in mbs0 + mbs1:
            if not mb.ids:                                           # padding: no data, same modality
                padded[has_image] += 1
                assert mb.num_targets == 0 and (mb.pixel_values is not None) == has_image
        _, whole = single[k]
        assert sorted(i for mb in whole for i in mb.ids) == step_ids
        assert all(int(mb.cu_seqlens[-1]) <= budget or len(mb.ids) == 1 for mb in whole)
    assert padded[True] and padded[False], f"needs padded steps of both modalities, got {padded}"
    # Resuming at step k: the dataset that starts at k yields exactly what the full one yields at k.
    later = StepDataset(samples, plan, max_tokens=budget, spec=SPEC, first_step=3)
    assert len(later) == len(plan) - 3
    (k0, a), (k1, b) = later[0], single[3]
    assert k0 == k1 == 3 and [m.ids for m in a] == [m.ids for m in b]
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.targets, y.targets)


def test_over_long_samples_are_dropped_or_truncated_outside_the_image(assets, samples):
    first = samples[0]
    image_at = first.input_ids.index(assets.image_token_id)
    inside = image_at + 2                                           # would split the image rows
    kept, report = load_tiny(assets, assets.image_data, max_length=inside, truncate=True)
    assert report.too_long and all(s.length <= inside for s in kept)
    cut = first.length - 1                                          # drops the stop token only
    kept, report = load_tiny(assets, assets.image_data, max_length=cut)
    assert first.id in report.too_long and first.id not in [s.id for s in kept]
    kept, report = load_tiny(assets, assets.image_data, max_length=cut, truncate=True)
    got = {s.id: s for s in kept}[first.id]
    assert first.id in report.truncated and got.input_ids == first.input_ids[:cut]
    assert got.labels == first.labels[:cut]


# --------------------------------------------------------------------------- several images per record


def _runs(ids: list[int], token: int) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of ``token`` in ``ids``."""
    out = []
    for i, x in enumerate(ids):
        if x == token and (i == 0 or ids[i - 1] != token):
            out.append([i, i + 1])
        elif x == token:
            out[-1][1] = i + 1
    return [tuple(r) for r in out]


def _label_segments(labels: list[int]) -> list[tuple[int, list[int]]]:
    """(start, ids) of each maximal run of labelled (not -100) tokens."""
    out, start = [], None
    for i, x in enumerate([*labels, IGNORE_INDEX]):
        if x != IGNORE_INDEX and start is None:
            start = i
        elif x == IGNORE_INDEX and start is not None:
            out.append((start, labels[start:i]))
            start = None
    return out


@pytest.fixture(scope="module")
def multi(assets, tmp_path_factory):
    """(data path, samples) of helpers.MULTI_IMAGE + one text-only record."""
    path = write_multi_image_data(assets, str(tmp_path_factory.mktemp("multi")))
    samples, report = load_tiny(assets, path)
    assert report.summary() == "0 bad records skipped, 0 over-long samples dropped, 0 truncated"
    return path, samples


def test_multi_image_records_tokenize_with_one_run_per_image(assets, multi):
    """Labels decode to exactly the answers (each with its stop); each image is a run of S placeholder rows
    in the human turn that held its marker; ``images`` lists the files in marker order."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets.tok_dir)
    path, samples = multi
    with open(path) as f:
        records = {r["id"]: r for r in json.load(f)}
    by_id = {s.id: s for s in samples}
    assert list(by_id) == [rid for rid, _, _ in MULTI_IMAGE] + ["multi-text"]
    for rid, which, turns in MULTI_IMAGE:
        s, rec = by_id[rid], records[rid]
        names = [rec["image"]] if isinstance(which, int) else rec["image"]
        assert s.images == tuple(os.path.join(assets.image_folder, n) for n in names)
        answers = _label_segments(s.labels)
        assert [tok.decode(a) for _, a in answers] == [a + tok.eos_token for _, a in turns]
        runs = _runs(s.input_ids, assets.image_token_id)
        assert [e - b for b, e in runs] == [assets.image_seq_len] * len(s.images)
        # the k-th run sits in the round whose question held the k-th marker: before that round's answer,
        # after the previous round's
        markers = [r for r, (q, _) in enumerate(turns) for _ in range(q.count("<image>"))]
        for (b, _), r in zip(runs, markers, strict=True):
            assert b < answers[r][0] and (r == 0 or b > answers[r - 1][0] + len(answers[r - 1][1]))
    assert by_id["multi-text"].images == ()


def test_collate_puts_every_image_of_a_micro_batch_in_placeholder_order(assets, multi):
    """One pixel tensor for all images of all samples, in order; in the model each image's projected rows
    land exactly on its run of placeholders."""
    _, samples = multi
    chosen = [samples[2], samples[-1], samples[1], samples[4]]           # 3 images, text, 2 images, 1 image
    mb = collate(chosen, spec=SPEC)
    paths = [p for s in chosen for p in s.images]
    assert mb.pixel_values.shape == (6, 3, IMAGE_SIZE, IMAGE_SIZE) and mb.image_sizes.shape == (6, 2)
    for k, p in enumerate(paths):
        with Image.open(p) as img:
            assert torch.equal(mb.pixel_values[k], preprocess(img.convert("RGB"), size=IMAGE_SIZE, mode="pad"))
            assert mb.image_sizes[k].tolist() == [img.height, img.width]
    model = engine.load(assets.model_dir, dtype=torch.float32, kernel_backend="torch")
    with torch.no_grad():
        x = model.embed(mb.input_ids, mb.pixel_values)                    # (T, D)
        rows = model.encode_images(mb.pixel_values)                       # (6·S, D), image order
    S = assets.image_seq_len
    runs = _runs(mb.input_ids.tolist(), assets.image_token_id)
    assert len(runs) == 6                                                 # a sequence boundary splits runs
    for k, (b, e) in enumerate(runs):
        assert torch.equal(x[b:e], rows[k * S:(k + 1) * S])
    text = mb.input_ids != assets.image_token_id
    assert torch.equal(x[text], model.decoder.embed.weight[mb.input_ids[text]])


def test_truncation_keeps_whole_images_only(assets, multi):
    """A cut after the first round of a two-image record keeps the first image only; a cut inside the
    second image's rows drops the sample."""
    path, samples = multi
    full = {s.id: s for s in samples}["multi-rounds"]
    (b1, e1), (b2, e2) = _runs(full.input_ids, assets.image_token_id)
    answer_end = _label_segments(full.labels)[0][0] + 2
    assert e1 < answer_end < b2
    kept, report = load_tiny(assets, path, max_length=b2, truncate=True)       # just before image 2
    got = {s.id: s for s in kept}["multi-rounds"]
    assert "multi-rounds" in report.truncated and got.images == full.images[:1]
    assert got.input_ids == full.input_ids[:b2] and got.labels == full.labels[:b2]
    mb = collate([got], spec=SPEC)
    assert mb.pixel_values.shape[0] == 1
    kept, report = load_tiny(assets, path, max_length=b2 + 1, truncate=True)   # one row of image 2
    assert "multi-rounds" in report.too_long and "multi-rounds" not in {s.id for s in kept}
    kept, report = load_tiny(assets, path, max_length=e2, truncate=True)       # all of image 2, no answer
    assert "multi-rounds" in report.truncated
    assert {s.id: s for s in kept}["multi-rounds"].images == full.images


@pytest.mark.parametrize("image,marker_text,error", [
    (["train/000000.png", "train/000001.png"], "<image>\nOne marker?", "1 <image> markers but 2 images"),
    (["train/000000.png"], "<image>\n<image>\nTwo markers?", "2 <image> markers but 1 images"),
    ([], "<image>\nA marker?", "1 <image> markers but 0 images"),
    (["train/000000.png", "train/nope.png"], "<image><image> Two?", "image 2 of 2 file {folder}/train/nope.png"),
    (["train/000000.png", "{garbage}"], "<image><image> Two?", "cannot read image 2 of 2 {garbage}"),
    (["train/000000.png", 3], "<image><image> Two?", "'image' must be a file name or a list of file names"),
    ({"a": 1}, "<image> One?", "'image' must be a file name or a list of file names"),
])
def test_bad_multi_image_record_names_the_record(assets, tmp_path, image, marker_text, error):
    garbage = os.path.join(tmp_path, "garbage.png")
    with open(garbage, "wb") as f:
        f.write(b"not an image")
    fill = lambda x: x.format(garbage=garbage, folder=assets.image_folder) if isinstance(x, str) else x  # noqa: E731
    image = [fill(x) for x in image] if isinstance(image, list) else image
    data = os.path.join(tmp_path, "bad.json")
    with open(data, "w") as f:
        json.dump([{"id": "bad-multi", "image": image, "conversations": [
            {"from": "human", "value": marker_text}, {"from": "gpt", "value": "Yes."}]}], f)
    with pytest.raises(BadRecord) as e:
        load_tiny(assets, data)
    assert f"{data}: record bad-multi: " in str(e.value) and fill(error) in str(e.value), str(e.value)


def test_anyres_rows_per_image_come_from_each_image_size(assets, tmp_path):
    """With grid pinpoints, each image's run is ``cfg.image_rows(h, w)`` of that image's own size, read from
    its file: three sizes/aspect ratios → three different run lengths in one record, in marker order."""
    from engine.config import from_hf

    cfg = from_hf(assets.model_dir).replace(image_grid_pinpoints=((28, 56), (56, 28), (56, 56)))
    sizes = [(20, 60), (50, 17), (41, 41)]                              # (height, width): wide, tall, square
    names = []
    for k, (h, w) in enumerate(sizes):
        names.append(f"anyres-{k}.png")
        Image.new("RGB", (w, h), (40 * k, 90, 200)).save(tmp_path / names[-1])
    data = tmp_path / "anyres.json"
    data.write_text(json.dumps([{"id": "anyres-3", "image": names, "conversations": [
        {"from": "human", "value": "<image> <image> <image> Which is square?"}, {"from": "gpt", "value": "C"}]}]))
    (s,), _ = load_tiny(assets, str(data), image_folder=str(tmp_path), image_rows=cfg.image_rows)
    want = [cfg.image_rows(h, w) for h, w in sizes]
    assert len(set(want)) == 3 and min(want) > cfg.image_seq_len
    assert [e - b for b, e in _runs(s.input_ids, assets.image_token_id)] == want


# --------------------------------------------------------------------------- bad records


@pytest.mark.parametrize("which", ["bad-missing", "bad-unreadable", "bad-no-answer", "bad-two-markers"])
def test_bad_record_error_names_the_record_and_file(assets, tmp_path, which):
    data, names = write_bad_data(assets, str(tmp_path))
    with open(data) as f:
        records = json.load(f)
    only = os.path.join(tmp_path, "one.json")
    with open(only, "w") as f:
        json.dump([r for r in records if not r["id"].startswith("bad-") or r["id"] == which], f)
    with pytest.raises(BadRecord) as e:
        load_tiny(assets, only)
    assert which in str(e.value) and only in str(e.value) and names[which].replace(data, only) in str(e.value)


def test_bad_records_are_skipped_and_counted(assets, tmp_path):
    data, names = write_bad_data(assets, str(tmp_path))
    kept, report = load_tiny(assets, data, on_bad_record="skip")
    assert [s.id for s in kept] == ["shapes-train-000000", "shapes-train-000001", "shapes-train-000002"]
    assert sorted(report.skipped) == sorted(names)
    assert report.summary().startswith("4 bad records skipped")
    assert "does-not-exist.png" in report.skipped["bad-missing"]


def test_image_that_fails_to_decode_names_record_and_file(assets, tmp_path, samples):
    """A file whose header reads but whose pixels do not passes loading and fails when collated."""
    victim = samples[0]
    broken = os.path.join(tmp_path, "truncated.png")
    with open(victim.images[0], "rb") as f:
        payload = f.read()
    with open(broken, "wb") as f:
        f.write(payload[:len(payload) // 2])
    with Image.open(broken) as img:
        assert img.size == (IMAGE_SIZE, IMAGE_SIZE)                 # the header is intact
    bad = Sample(victim.id, victim.input_ids, victim.labels, (broken,))
    with pytest.raises(BadRecord) as e:
        collate([samples[1], bad], spec=SPEC)
    assert victim.id in str(e.value) and broken in str(e.value)
