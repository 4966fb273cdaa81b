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
from helpers import IMAGE_SIZE, TEXT_ONLY, load_tiny, write_bad_data
from PIL import Image

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
    mb = collate(chosen, image_size=IMAGE_SIZE)
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
    with Image.open(chosen[2].image) as img:
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
    fake = [Sample(f"s{i}", [1] * rng.randint(3, 300), [1] * 3, "img.png" if i % 3 else None)
            for i in range(50)]
    plan = plan_steps(fake, global_batch=4, seed=7, epoch=0)
    flat = [i for step in plan for i in step]
    assert sorted(flat) == list(range(50))                          # every sample once per epoch
    assert all(1 <= len(step) <= 4 for step in plan)
    assert all(len({fake[i].image is None for i in step}) == 1 for step in plan)   # one modality per step
    n_img = sum(s.image is not None for s in fake)
    assert len(plan) == -(-n_img // 4) + -(-(50 - n_img) // 4)
    assert plan == plan_steps(fake, global_batch=4, seed=7, epoch=0)
    assert plan != plan_steps(fake, global_batch=4, seed=7, epoch=1)
    assert plan != plan_steps(fake, global_batch=4, seed=8, epoch=0)


def test_step_dataset_ranks_split_each_step(samples):
    plan = plan_steps(samples, global_batch=3, seed=0, epoch=0)
    budget = max(s.length for s in samples) + 10                     # two short samples fit together
    single = StepDataset(samples, plan, max_tokens=budget, image_size=IMAGE_SIZE)
    ranks = [StepDataset(samples, plan, max_tokens=budget, image_size=IMAGE_SIZE, rank=r, world=2)
             for r in (0, 1)]
    padded = {True: 0, False: 0}                                      # by modality
    for k, step in enumerate(plan):
        step_ids = sorted(samples[i].id for i in step)
        (s0, mbs0), (s1, mbs1) = ranks[0][k], ranks[1][k]
        assert s0 == s1 == k and len(mbs0) == len(mbs1)              # collectives stay matched
        assert sorted(i for mb in mbs0 + mbs1 for i in mb.ids) == step_ids
        assert sum(mb.num_targets for mb in mbs0 + mbs1) == count_targets(samples, step)
        has_image = samples[step[0]].image is not None
        for mb in mbs0 + mbs1:
            if not mb.ids:                                           # padding: no data, same modality
                padded[has_image] += 1
                assert mb.num_targets == 0 and (mb.pixel_values is not None) == has_image
        _, whole = single[k]
        assert sorted(i for mb in whole for i in mb.ids) == step_ids
        assert all(int(mb.cu_seqlens[-1]) <= budget or len(mb.ids) == 1 for mb in whole)
    assert padded[True] and padded[False], f"needs padded steps of both modalities, got {padded}"
    # Resuming at step k: the dataset that starts at k yields exactly what the full one yields at k.
    later = StepDataset(samples, plan, max_tokens=budget, image_size=IMAGE_SIZE, first_step=3)
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
    with open(victim.image, "rb") as f:
        payload = f.read()
    with open(broken, "wb") as f:
        f.write(payload[:len(payload) // 2])
    with Image.open(broken) as img:
        assert img.size == (IMAGE_SIZE, IMAGE_SIZE)                 # the header is intact
    bad = Sample(victim.id, victim.input_ids, victim.labels, broken)
    with pytest.raises(BadRecord) as e:
        collate([samples[1], bad], image_size=IMAGE_SIZE)
    assert victim.id in str(e.value) and broken in str(e.value)
