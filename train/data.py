"""Training data: LLaVA JSON/JSONL → validated, tokenized samples → packed micro-batches.

Letters: T packed tokens of a micro-batch, B sequences in it, N images in it, S rows per image.

A record holds any number of images: LLaVA's ``"image": "a.png"`` (one) or ``"image": ["a.png",
"b.png"]`` (several, in the order of the conversation's ``<image>`` markers). A micro-batch's images
of all its samples go to the vision tower in one call, in placeholder order.

A plan is built once per epoch and is a pure function of (samples, seed, epoch, sizes): the
samples are shuffled, grouped by modality (image / text-only) and length as upstream's
``group_by_modality_length`` does, cut into optimizer steps of ``global_batch`` samples, and
each step's samples are packed into micro-batches of at most ``max_tokens`` tokens (no padding).
Resuming at step k therefore only needs k.
"""
from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from PIL import Image

from engine.conversation import IGNORE_INDEX, IMAGE_TOKEN, get_template, tokenize_conversation
from engine.image import ImageSpec
from engine.model import pack_cu_seqlens


class BadRecord(ValueError):
    """A record that cannot be trained on; the message names its id (and file)."""


@dataclass(frozen=True)
class Sample:
    id: str
    input_ids: list[int]
    labels: list[int]                 # aligned with input_ids (HF convention); shifted when packed
    images: tuple[str, ...] = ()      # absolute paths in <image> marker order; () for a text-only sample

    def __post_init__(self):
        assert isinstance(self.images, tuple) and all(isinstance(p, str) for p in self.images), self.images

    @property
    def length(self) -> int:
        return len(self.input_ids)


@dataclass
class LoadReport:
    """What loading skipped, by reason; printed at the end of a run."""
    skipped: dict[str, str] = field(default_factory=dict)   # id → reason
    too_long: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{len(self.skipped)} bad records skipped, {len(self.too_long)} over-long samples dropped, "
                f"{len(self.truncated)} truncated")


def read_records(path: str) -> list[dict]:
    """A LLaVA JSON list or a JSONL file (one record per line)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path} does not exist")
    with open(path) as f:
        text = f.read()
    if path.endswith(".jsonl"):
        records = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not valid JSON ({e})") from e
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


def _image_names(rec: dict, rid: str) -> list[str]:
    """The record's image file names: none, one (a string) or a list of them, in marker order."""
    image = rec.get("image")
    if image is None:
        return []
    names = [image] if isinstance(image, str) else image
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise BadRecord(f"record {rid}: 'image' must be a file name or a list of file names, got "
                        f"{type(image).__name__} {str(image)[:80]}")
    return names


def _validate(rec, index: int, image_folder: str | None) -> tuple[str, list[str], list[tuple[int, int]]]:
    """(id, absolute image paths, (height, width) of each); raises BadRecord naming the record."""
    if not isinstance(rec, dict):
        raise BadRecord(f"record #{index} is not an object")
    rid = str(rec.get("id", f"#{index}"))
    convs = rec.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise BadRecord(f"record {rid}: 'conversations' must be a non-empty list")
    if not any(isinstance(t, dict) and t.get("from") == "gpt" for t in convs):
        raise BadRecord(f"record {rid}: the conversation has no assistant ('gpt') turn")
    markers = sum(str(t.get("value", "")).count(IMAGE_TOKEN) for t in convs if isinstance(t, dict))
    names = _image_names(rec, rid)
    if markers != len(names):
        raise BadRecord(f"record {rid}: {markers} {IMAGE_TOKEN} markers but {len(names)} images")
    paths, sizes = [], []
    for k, name in enumerate(names):
        full = os.path.join(image_folder or "", name)
        which = f"image {k + 1} of {len(names)}" if len(names) > 1 else "image"
        if not os.path.isfile(full):
            raise BadRecord(f"record {rid}: {which} file {full} does not exist")
        try:   # the header only (no decoding): catches files that are not images before training starts
            with Image.open(full) as img:
                width, height = img.size
        except (OSError, ValueError) as e:
            raise BadRecord(f"record {rid}: cannot read {which} {full} ({e})") from e
        paths.append(full)
        sizes.append((height, width))
    return rid, paths, sizes


def _cut_images(rows: list[int], kept_rows: int) -> int | None:
    """How many whole images ``kept_rows`` placeholder tokens hold (images of ``rows`` rows each, in
    order), or None when the count ends inside an image."""
    total = 0
    for k, r in enumerate(rows):
        if total == kept_rows:
            return k
        total += r
    return len(rows) if total == kept_rows else None


def load_samples(path: str, tokenizer, *, template: str, image_token_id: int, image_rows: Callable[[int, int], int],
                 image_folder: str | None = None, max_length: int = 2048, truncate: bool = False,
                 on_bad_record: str = "error", answer_first: bool = False) -> tuple[list[Sample], LoadReport]:
    """Validate and tokenize every record up front.

    ``image_rows(height, width)``: the placeholder rows of one image of that original size (the
    model's ``LlavaConfig.image_rows``: image_seq_len, or AnyRes's count); each image's size comes
    from its file header, so every image of a record gets its own run length.
    ``on_bad_record``: "error" raises the first BadRecord; "skip" records it in the report.
    Over-long samples (> ``max_length`` tokens) are dropped (counted), or with ``truncate``
    cut at ``max_length`` unless that would split an image's rows or leave no target; images
    whose rows the cut removes entirely leave the sample with them.
    ``answer_first`` reorders reasoning answers ("... The answer is X." → answer first).
    """
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    tmpl = get_template(template)
    report, samples = LoadReport(), []
    for i, rec in enumerate(read_records(path)):
        try:
            rid, images, sizes = _validate(rec, i, image_folder)
            convs = rec["conversations"]
            if answer_first:
                convs = [dict(t, value=answer_first_order(t["value"])) if t.get("from") == "gpt" else t
                         for t in convs]
            if template == "plain":
                convs = convs[:2]
            try:
                rows = [image_rows(h, w) for h, w in sizes]
                tok = tokenize_conversation(tokenizer, tmpl, convs, image_token_id=image_token_id,
                                            image_seq_len=rows)
            except ValueError as e:
                raise BadRecord(f"record {rid}: {e}") from e
        except BadRecord as e:
            if on_bad_record == "error":
                raise BadRecord(f"{path}: {e}") from e
            report.skipped[str(rec.get("id", f"#{i}")) if isinstance(rec, dict) else f"#{i}"] = str(e)
            continue
        ids, labels = tok.input_ids, tok.labels
        if len(ids) > max_length:
            whole = _cut_images(rows, ids[:max_length].count(image_token_id))
            if not truncate or whole is None or all(x == IGNORE_INDEX for x in labels[1:max_length]):
                report.too_long.append(rid)
                continue
            ids, labels, images = ids[:max_length], labels[:max_length], images[:whole]
            report.truncated.append(rid)
        samples.append(Sample(rid, ids, labels, tuple(images)))
    return samples, report


def answer_first_order(answer: str) -> str:
    """Put "The answer is X." before the explanation (the paper's answer-first ablation)."""
    marker = "The answer is"
    at = answer.rfind(marker)
    if at <= 0:
        return answer
    return (answer[at:].strip() + "\n" + answer[:at].strip()).strip()


# --------------------------------------------------------------------------- planning


def plan_steps(samples: list[Sample], *, global_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """Sample indices of each optimizer step of one epoch.

    Like upstream's modality-length grouping: image and text-only samples never share a step
    (their lengths differ a lot), and within a mega-batch of steps samples are sorted by length
    so packed micro-batches are full. The last incomplete step is kept.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    groups = [[i for i, s in enumerate(samples) if s.images],      # one or several images
              [i for i, s in enumerate(samples) if not s.images]]
    steps = []
    for group in groups:
        rng.shuffle(group)
        mega = global_batch * 8
        for m in range(0, len(group), mega):
            chunk = sorted(group[m:m + mega], key=lambda i: -samples[i].length)
            steps += [chunk[k:k + global_batch] for k in range(0, len(chunk), global_batch)]
    rng.shuffle(steps)
    return steps


def pack_micro_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """First-fit-decreasing packing of sample lengths into bins of ≤ ``max_tokens``; returns
    index lists in a deterministic order. A sample longer than the budget gets its own bin."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, r in enumerate(room):
            if lengths[i] <= r:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_tokens - lengths[i])
    return bins


def shard_step(step: list[int], rank: int, world: int) -> list[int]:
    """This rank's share of a step's samples (strided: balanced lengths after the sort)."""
    return step[rank::world]


# --------------------------------------------------------------------------- batches


@dataclass
class MicroBatch:
    """One packed forward/backward: every tensor on the CPU until ``to(device)``."""
    input_ids: torch.Tensor      # (T,) int64
    targets: torch.Tensor        # (T,) int64, -100 where no loss (already shifted)
    cu_seqlens: torch.Tensor     # (B+1,) int32
    position_ids: torch.Tensor   # (T,) int64
    max_seqlen: int
    pixel_values: torch.Tensor | None  # (ΣK, 3, S, S): every tile of every image of every sample, in order
    ids: list[str]
    image_sizes: torch.Tensor | None = None   # (N, 2) int64: each image's original (height, width)

    @property
    def num_targets(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    def pin_memory(self) -> MicroBatch:
        """Page-locked copies (the DataLoader calls this with ``pin_memory=True``), so that ``to``'s
        non-blocking host-to-GPU copies overlap with compute."""
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return MicroBatch(pin(self.input_ids), pin(self.targets), pin(self.cu_seqlens), pin(self.position_ids),
                          self.max_seqlen, pin(self.pixel_values), self.ids,
                          pin(self.image_sizes))

    def to(self, device) -> MicroBatch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return MicroBatch(move(self.input_ids), move(self.targets), move(self.cu_seqlens), move(self.position_ids),
                          self.max_seqlen, move(self.pixel_values), self.ids,
                          move(self.image_sizes))


def shifted_targets(labels: list[int]) -> list[int]:
    """Row t predicts token t+1: targets[t] = labels[t+1]; the last row of a sequence has none."""
    return labels[1:] + [IGNORE_INDEX]


def collate(samples: list[Sample], *, spec: ImageSpec) -> MicroBatch:
    """Pack samples (decoding their images) into one MicroBatch: every tile of every image of all the
    samples, in order, is one pixel tensor [ΣK, 3, S, S] (``spec.preprocess_image``: K = 1 per image, or
    AnyRes's base + grid tiles), so the vision tower encodes them in one call; ``image_sizes`` [N, 2]
    holds each image's original (height, width), from which the model finds its tiles and rows."""
    ids, targets, pixels, sizes = [], [], [], []
    for s in samples:
        ids += s.input_ids
        targets += shifted_targets(s.labels)
        for path in s.images:
            try:
                with Image.open(path) as img:
                    sizes.append((img.height, img.width))
                    pixels.append(spec.preprocess_image(img))          # (K, 3, S, S)
            except (OSError, ValueError) as e:
                raise BadRecord(f"record {s.id}: cannot read image {path} ({e})") from e
    cu, pos, max_len = pack_cu_seqlens([s.length for s in samples])
    return MicroBatch(torch.tensor(ids, dtype=torch.long), torch.tensor(targets, dtype=torch.long), cu, pos,
                      max_len, torch.cat(pixels) if pixels else None, [s.id for s in samples],
                      torch.tensor(sizes, dtype=torch.long) if sizes else None)


def padding_micro_batch(sample: Sample, *, spec: ImageSpec) -> MicroBatch:
    """``sample`` with no target and no id: keeps ranks' collective calls in step when one rank
    has fewer micro-batches than another; it contributes nothing to loss or gradients. A real
    sample of the step (not a one-token stub) so the rank runs the same modules as the others:
    FSDP reduce-scatters only parameters that received a gradient (the projector needs an image)."""
    mb = collate([sample], spec=spec)
    return replace(mb, targets=torch.full_like(mb.targets, IGNORE_INDEX), ids=[])


class StepDataset(torch.utils.data.Dataset):
    """Item k = the micro-batches of optimizer step ``first_step + k`` for this rank, collated in a
    DataLoader worker (image decoding off the training thread)."""

    def __init__(self, samples, steps, *, max_tokens, spec: ImageSpec, rank=0, world=1, first_step=0):
        self.samples, self.steps, self.first = samples, steps, first_step
        self.max_tokens, self.spec, self.rank, self.world = max_tokens, spec, rank, world

    def __len__(self):
        return len(self.steps) - self.first

    def micro_batch_groups(self, step: int, rank: int) -> list[list[int]]:
        """Sample indices of each of ``rank``'s micro-batches in ``step``."""
        mine = shard_step(self.steps[step], rank, self.world)
        bins = pack_micro_batches([self.samples[i].length for i in mine], self.max_tokens)
        return [[mine[j] for j in b] for b in bins]

    def __getitem__(self, k):
        step = self.first + k
        per_rank = [self.micro_batch_groups(step, r) for r in range(self.world)]
        groups = per_rank[self.rank]
        # Every rank runs as many micro-batches as the busiest one (collectives stay matched).
        most = max(map(len, per_rank))
        mbs = [collate([self.samples[i] for i in g], spec=self.spec) for g in groups]
        if len(mbs) < most:   # steps are single-modality, so the step's first sample matches the others
            pad = padding_micro_batch(self.samples[self.steps[step][0]], spec=self.spec)
            mbs += [pad] * (most - len(mbs))
        return step, mbs


def count_targets(samples: list[Sample], indices: list[int]) -> int:
    """Target tokens of a step over all ranks (the loss normaliser), without collectives."""
    return sum(sum(1 for x in samples[i].labels[1:] if x != IGNORE_INDEX) for i in indices)
