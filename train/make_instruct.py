"""GPT-assisted visual instruction data: captions + boxes → conversation / detail / complex samples.

    python -m train.make_instruct --input FILE --kind conversation|detail|complex --output FILE
        [--prompts DIR] [--teacher-url URL --teacher-model NAME | --offline] [--concurrency N]
        [--resume] [--seed N]

Input: JSONL, one image per line, in either form (told apart by ``boxes`` vs ``instances``):

- ours: ``{"id", "image", "width", "height", "captions": [str], "boxes": [{"category", "bbox"}]}``
  with ``bbox`` ``[x1, y1, x2, y2]`` in pixels (``train.shapes`` writes this);
- COCO ``caps_boxes``: ``{"id", "image", "captions": [str], "instances": [{"category", "bbox"}]}``
  with ``bbox`` already normalized to 0–1.

Prompt: a directory in the upstream layout (``system_message.txt``, ``NNN_caps.txt`` →
``NNN_conv.txt``) becomes ``[system, user caps_000, assistant conv_000, ..., user query]``; the
query is the captions one per line and, for detail and complex, a blank line then one
``category: [x1, y1, x2, y2]`` line per box, coordinates normalized and rounded to 3 decimals
and printed as Python floats (``0.0``, ``0.24``, ``0.574``) — exactly the upstream ``NNN_caps.txt``
layout. Conversation prompts get captions only, as upstream.

Teacher: an OpenAI-compatible endpoint through ``engine.client.ChatClient`` (API key from
``$OPENAI_API_KEY``), or ``--offline``: a rule-based generator that reads the record's captions
and boxes (the shapes dataset's, or any) and writes teacher-style text, parsed like a real
teacher's.

Parsing: conversation → ``Question:`` / ``===`` / ``Answer:`` blocks → multi-turn; complex → exactly
one such pair (the teacher writes the question: a reasoning answer only fits its own question);
detail → the whole text as the answer to an instruction sampled (seeded per id) from
``DETAIL_INSTRUCTIONS``. ``<image>\\n`` starts the first human turn. Anything else is a reject.

Output files (``OUT`` = ``--output``):
- ``OUT.samples.jsonl``: accepted samples, append-only, one line each (fsync'd with a network teacher);
- ``OUT.rejects.jsonl``: ``{"id", "kind", "reason", "output"}`` per malformed or failed item;
- ``OUT``: the final LLaVA JSON (accepted samples in input order), written atomically at the end.
``--resume`` skips ids found in either JSONL; without it, existing files are an error. With a
deterministic teacher the final file is the same whether or not the run was interrupted.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

from engine.cli import run_main
from engine.client import ChatClient, ChatError, ChatResult
from engine.io import write_text_atomic

__all__ = ["KINDS", "DETAIL_INSTRUCTIONS", "Record", "PromptSet", "InstructConfig", "ParseError",
           "read_records", "format_box", "render_context", "load_prompts", "build_messages", "parse_output",
           "offline_response", "write_text_atomic", "run", "main"]

KINDS = ("conversation", "detail", "complex")
DEFAULT_PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")

# Our own instruction list for detailed descriptions (upstream samples from a list like this too).
DETAIL_INSTRUCTIONS = (
    "Describe the image in detail.",
    "Give a thorough description of what this picture shows.",
    "What can you see in this image? Describe it carefully.",
    "Walk me through everything visible in this image.",
    "Write a detailed account of the scene in the picture.",
    "Explain in detail what is shown here.",
    "Provide a complete, careful description of this image.",
    "Describe the contents of this picture, including where things are.",
    "Tell me about this image in as much detail as you can.",
    "Paint a picture in words of what this image contains.",
)

_SEPARATOR = re.compile(r"^[ \t]*===[ \t]*$", re.MULTILINE)


class ParseError(ValueError):
    """A teacher output that does not have the expected structure (the message is the reject reason)."""


@dataclass(frozen=True, kw_only=True)
class Record:
    """One input image: captions and boxes normalized to 0–1 (``[x1, y1, x2, y2]``)."""
    id: str
    image: str | None
    captions: tuple[str, ...]
    boxes: tuple[tuple[str, tuple[float, float, float, float]], ...]


@dataclass(frozen=True, kw_only=True)
class PromptSet:
    """A system message and few-shot (context, response) pairs, in file order."""
    system: str
    examples: tuple[tuple[str, str], ...]


@dataclass(frozen=True, kw_only=True)
class InstructConfig:
    """Everything a run needs (the CLI is a thin shell over it); names the key's variable, never the key."""
    input: str
    kind: str
    output: str
    prompts: str | None = None          # None → train/prompts/<kind>
    teacher_url: str | None = None
    teacher_model: str | None = None
    offline: bool = False
    concurrency: int = 8
    resume: bool = False
    seed: int = 0
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = 60.0
    max_retries: int = 5
    malformed_retries: int = 2
    temperature: float = 0.0
    max_tokens: int | None = 1024

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"--kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.offline == bool(self.teacher_url or self.teacher_model):
            raise ValueError("give either --offline or both --teacher-url and --teacher-model")
        if not self.offline and not (self.teacher_url and self.teacher_model):
            raise ValueError("--teacher-url and --teacher-model go together")
        if self.concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {self.concurrency}")

    @property
    def samples_path(self) -> str:
        return self.output + ".samples.jsonl"

    @property
    def rejects_path(self) -> str:
        return self.output + ".rejects.jsonl"


# ---- input ---------------------------------------------------------------------------------------------

def _box(raw, where: str, scale: tuple[float, float] | None) -> tuple[str, tuple[float, float, float, float]]:
    if not isinstance(raw, dict) or not isinstance(raw.get("category"), str) or not raw["category"]:
        raise ValueError(f"{where}: a box must be {{'category': str, 'bbox': [x1, y1, x2, y2]}}, got {raw!r}")
    bbox = raw.get("bbox")
    if (not isinstance(bbox, list) or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
        raise ValueError(f"{where}: bbox of {raw['category']!r} must be 4 numbers, got {bbox!r}")
    x1, y1, x2, y2 = (float(v) for v in bbox)
    if scale is not None:
        x1, x2, y1, y2 = x1 / scale[0], x2 / scale[0], y1 / scale[1], y2 / scale[1]
    if not (x1 <= x2 and y1 <= y2):
        raise ValueError(f"{where}: bbox of {raw['category']!r} has x2 < x1 or y2 < y1: {bbox!r}")
    clamp = [min(1.0, max(0.0, v)) for v in (x1, y1, x2, y2)]  # COCO boxes can poke a pixel outside
    return raw["category"], (clamp[0], clamp[1], clamp[2], clamp[3])


def _record(obj, where: str) -> Record:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: each line must be a JSON object")
    if not isinstance(obj.get("id"), (str, int)) or isinstance(obj.get("id"), bool):
        raise ValueError(f"{where}: missing or non-string/int 'id'")
    rid = str(obj["id"])
    where = f"{where} (id {rid})"
    captions = obj.get("captions")
    if (not isinstance(captions, list) or not captions
            or not all(isinstance(c, str) and c.strip() for c in captions)):
        raise ValueError(f"{where}: 'captions' must be a non-empty list of non-empty strings")
    if ("boxes" in obj) == ("instances" in obj):
        raise ValueError(f"{where}: give exactly one of 'boxes' (pixels, with width/height) "
                         "or 'instances' (caps_boxes, 0-1)")
    if "boxes" in obj:
        w, h = obj.get("width"), obj.get("height")
        if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0):
            raise ValueError(f"{where}: pixel 'boxes' need positive integer 'width' and 'height'")
        raw, scale = obj["boxes"], (float(w), float(h))
    else:
        raw, scale = obj["instances"], None
    if not isinstance(raw, list):
        raise ValueError(f"{where}: boxes must be a list")
    image = obj.get("image")
    if image is not None and not isinstance(image, str):
        raise ValueError(f"{where}: 'image' must be a string")
    return Record(id=rid, image=image, captions=tuple(c.strip() for c in captions),
                  boxes=tuple(_box(b, where, scale) for b in raw))


def read_records(path: str) -> list[Record]:
    """Read and validate a whole input JSONL (either form); ValueError names the file, line and id."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file not found: {path}")
    records, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from None
            rec = _record(obj, f"{path}:{n}")
            if rec.id in seen:
                raise ValueError(f"{path}:{n}: duplicate id {rec.id!r}")
            seen.add(rec.id)
            records.append(rec)
    return records


# ---- prompt --------------------------------------------------------------------------------------------

def format_box(category: str, bbox: Sequence[float]) -> str:
    """``category: [x1, y1, x2, y2]`` with 0–1 coordinates rounded to 3 decimals, Python float repr."""
    return f"{category}: [{', '.join(repr(round(float(v), 3) + 0.0) for v in bbox)}]"  # + 0.0: no "-0.0"


def render_context(record: Record, kind: str) -> str:
    """The teacher's view of one image, laid out like the upstream ``NNN_caps.txt`` files."""
    text = "\n".join(record.captions)
    if kind != "conversation" and record.boxes:
        text += "\n\n" + "\n".join(format_box(c, b) for c, b in record.boxes)
    return text


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read().rstrip("\n")  # our files may end with a newline; upstream's do not


def load_prompts(directory: str) -> PromptSet:
    """Read ``system_message.txt`` and every ``NNN_caps.txt``/``NNN_conv.txt`` pair, ordered by NNN."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"prompt directory not found: {directory}")
    system_path = os.path.join(directory, "system_message.txt")
    if not os.path.isfile(system_path):
        raise FileNotFoundError(f"prompt directory {directory} has no system_message.txt")
    names = sorted(os.listdir(directory))
    stems = sorted({m.group(1) for n in names if (m := re.fullmatch(r"(\d+)_(caps|conv)\.txt", n))}, key=int)
    examples = []
    for stem in stems:
        caps, conv = (os.path.join(directory, f"{stem}_{part}.txt") for part in ("caps", "conv"))
        for path in (caps, conv):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"few-shot pair {stem} in {directory} lacks {os.path.basename(path)}")
        examples.append((_read_text(caps), _read_text(conv)))
    return PromptSet(system=_read_text(system_path), examples=tuple(examples))


def build_messages(prompts: PromptSet, record: Record, kind: str) -> list[dict]:
    """``[system, user/assistant few-shot pairs in order, user query]`` chat messages."""
    messages = [{"role": "system", "content": prompts.system}]
    for context, response in prompts.examples:
        messages.append({"role": "user", "content": context})
        messages.append({"role": "assistant", "content": response})
    messages.append({"role": "user", "content": render_context(record, kind)})
    return messages


# ---- parsing -------------------------------------------------------------------------------------------

def _qa_pairs(text: str) -> list[tuple[str, str]]:
    blocks = [b.strip() for b in _SEPARATOR.split(text.strip())]
    blocks = [b for b in blocks if b]
    if not blocks:
        raise ParseError("empty output")
    pairs, question = [], None
    for i, block in enumerate(blocks):
        label = "Question:" if question is None else "Answer:"
        if not block.startswith(label):
            raise ParseError(f"block {i + 1}: expected {label!r}, got {block[:40]!r}")
        body = block[len(label):].strip()
        if not body:
            raise ParseError(f"block {i + 1}: empty {label[:-1].lower()}")
        if question is None:
            question = body
        else:
            pairs.append((question, body))
            question = None
    if question is not None:
        raise ParseError(f"question {len(pairs) + 1} has no answer")
    return pairs


def parse_output(text: str, kind: str, rng: random.Random) -> list[dict]:
    """Teacher text → LLaVA ``conversations`` (``<image>`` opens the first human turn); ParseError if bad."""
    if kind == "detail":
        answer = text.strip()
        if not answer:
            raise ParseError("empty output")
        if re.match(r"(Question|Answer):", answer):
            raise ParseError("detail output is in Question/Answer form")
        pairs = [(rng.choice(DETAIL_INSTRUCTIONS), answer)]
    else:
        pairs = _qa_pairs(text)
        if kind == "complex" and len(pairs) != 1:
            raise ParseError(f"complex output must hold exactly one Question/Answer pair, got {len(pairs)}")
    conversations = []
    for i, (q, a) in enumerate(pairs):
        conversations.append({"from": "human", "value": f"<image>\n{q}" if i == 0 else q})
        conversations.append({"from": "gpt", "value": a})
    return conversations


# ---- offline teacher -----------------------------------------------------------------------------------

_COLOR_WORDS = {"red", "green", "blue", "yellow", "white", "black", "gray", "grey", "orange", "purple",
                "brown", "pink"}


def _split(category: str) -> tuple[str | None, str]:
    words = category.split()
    if len(words) > 1 and words[0] in _COLOR_WORDS:
        return words[0], " ".join(words[1:])
    return None, category


def _where(b) -> str:
    cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
    v = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else ""
    h = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
    return f"{v} {h}".strip() or "center"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _qa(pairs: list[tuple[str, str]]) -> str:
    return "\n===\n".join(f"Question:\n{q}\n===\nAnswer:\n{a}" for q, a in pairs)


def _offline_conversation(record: Record, rng: random.Random) -> str:
    objs = [(c, b) for c, b in record.boxes]
    counts = Counter(c for c, _ in objs)
    noun = "shapes" if all(_split(c)[1] in ("circle", "square", "triangle") for c, _ in objs) else "objects"
    if objs:
        verb, word = ("is", noun[:-1]) if len(objs) == 1 else ("are", noun)
        count = f"There {verb} {len(objs)} {word} in the image: {_join([f'a {c}' for c, _ in objs])}."
    else:
        count = f"I cannot make out any distinct {noun} in the image."
    pairs = [(f"How many {noun} are in the image?", count)]
    candidates = []
    nouns = Counter(_split(c)[1] for c, _ in objs)
    for cat, box in objs:
        color, thing = _split(cat)
        if counts[cat] == 1:
            candidates.append((f"Where is the {cat} in the image?",
                               f"The {cat} is at the {_where(box)} of the image."))
        if color and nouns[thing] == 1:
            candidates.append((f"What color is the {thing}?", f"The {thing} is {color}."))
            other = rng.choice(sorted({"red", "green", "blue", "yellow"} - {color}))
            candidates.append((f"Is there a {other} {thing} in the image?",
                               f"No, there is no {other} {thing}. The {thing} in the image is {color}."))
    if len(objs) >= 2 and counts[objs[0][0]] == 1 and counts[objs[1][0]] == 1:
        (a, ba), (b, bb) = objs[0], objs[1]
        side = "left" if (ba[0] + ba[2]) < (bb[0] + bb[2]) else "right"
        candidates.append((f"Is the {a} to the left or to the right of the {b}?",
                           f"The {a} is to the {side} of the {b}."))
    rng.shuffle(candidates)
    pairs += candidates[:3]
    return _qa(pairs)


def _offline_detail(record: Record, rng: random.Random) -> str:
    found = (re.search(r"\bon an? (\w+) background", c) for c in record.captions)
    background = next((m.group(1) for m in found if m), None)
    objs = list(record.boxes)
    if not objs:
        return f"The image shows the following scene: {record.captions[0]}"
    opener = f"The image shows {len(objs)} object{'s' if len(objs) > 1 else ''}"
    opener += f" on a plain {background} background." if background else "."
    sentences = [opener]
    for cat, b in objs:
        area = (b[2] - b[0]) * (b[3] - b[1])
        size = "large" if area > 0.12 else "small" if area < 0.04 else "medium-sized"
        sentences.append(f"A {size} {cat} is at the {_where(b)} of the image.")
    if len(objs) >= 2:
        (a, ba), (c, bc) = rng.sample(objs, 2)
        h = "left of" if ba[0] + ba[2] < bc[0] + bc[2] else "right of"
        v = "above" if ba[1] + ba[3] < bc[1] + bc[3] else "below"
        sentences.append(f"The {a} is to the {h} and {v} the {c}.")
    return " ".join(sentences)


def _offline_complex(record: Record, rng: random.Random) -> str:
    objs = list(record.boxes)
    if not objs:
        return _qa([("What stands out about this image?",
                     f"The scene can be summed up as: {record.captions[0]} Nothing else is clearly marked.")])
    listing = _join([f"a {c} at the {_where(b)}" for c, b in objs])
    choice = rng.randrange(3)
    if choice == 0:
        areas = [((b[2] - b[0]) * (b[3] - b[1]), c, b) for c, b in objs]
        area, cat, box = max(areas, key=lambda t: t[0])
        q, a = ("Which object takes up the most space, and where is it?",
                f"The image contains {listing}. Comparing their sizes, the {cat} covers the most area, about "
                f"{round(100 * area)}% of the picture, so it is the largest; it sits at the {_where(box)}.")
    elif choice == 1:
        cat, box = min(objs, key=lambda t: (t[1][1], t[1][0]))
        q, a = ("Which object is closest to the top edge of the image?",
                f"The image contains {listing}. The {cat} reaches highest, its top edge at about "
                f"{round(100 * box[1])}% of the image height, so it is the one closest to the top edge.")
    else:
        order = [c for c, _ in sorted(objs, key=lambda t: (t[1][0] + t[1][2], t[1][1]))]
        q, a = ("If you read the objects from left to right, in what order do they appear?",
                f"The image contains {listing}. Sorting them by horizontal position, the order from left "
                f"to right is: {_join(order)}.")
    return _qa([(q, a)])


def offline_response(record: Record, kind: str, rng: random.Random) -> str:
    """Rule-based teacher: the text a teacher would write for ``record`` and ``kind`` (upstream format)."""
    return {"conversation": _offline_conversation, "detail": _offline_detail,
            "complex": _offline_complex}[kind](record, rng)


# ---- run -----------------------------------------------------------------------------------------------

def _rng(seed: int, kind: str, rid: str, what: str) -> random.Random:
    # Seeded per (seed, kind, id): completion order under concurrency and resumes cannot change a sample.
    return random.Random(f"{what}:{seed}:{kind}:{rid}")


def _load_done(path: str) -> set[str]:
    """Ids in an append-only JSONL; a torn last line (killed mid-write) is cut off so appends stay valid."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as f:
        data = f.read()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
    done = set()
    for n, line in enumerate(data[:keep].splitlines(), 1):
        try:
            done.add(str(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}:{n}: corrupt line; fix or remove the file") from None
    return done


def _append(f, obj: dict, durable: bool) -> None:
    f.write(json.dumps(obj, ensure_ascii=False) + "\n")
    f.flush()
    if durable:
        os.fsync(f.fileno())


def _log(msg: dict) -> None:
    print(json.dumps(msg), file=sys.stderr, flush=True)


def _teacher_stream(config: InstructConfig, todo: list[Record], prompts: PromptSet | None,
                    client: ChatClient | None) -> Iterator[tuple[int, ChatResult | ChatError]]:
    if client is None:
        for i, rec in enumerate(todo):
            text = offline_response(rec, config.kind, _rng(config.seed, config.kind, rec.id, "offline"))
            yield i, ChatResult(text=text, finish_reason="stop", usage={})
        return
    requests = (build_messages(prompts, rec, config.kind) for rec in todo)
    yield from client.chat_many(requests, temperature=config.temperature, max_tokens=config.max_tokens,
                                seed=config.seed)


def run(config: InstructConfig) -> dict:
    """Generate one kind of instruction data; return a summary (counts, teacher usage)."""
    records = read_records(config.input)
    prompts = None
    if not config.offline:
        prompts = load_prompts(config.prompts or os.path.join(DEFAULT_PROMPTS, config.kind))
    existing = [p for p in (config.samples_path, config.rejects_path) if os.path.exists(p)]
    if existing and not config.resume:
        raise ValueError(f"{', '.join(existing)} already exist(s); pass --resume to continue or remove them")
    done = _load_done(config.samples_path) | _load_done(config.rejects_path) if config.resume else set()
    todo = [r for r in records if r.id not in done]
    _log({"config": asdict(config), "records": len(records), "already_done": len(records) - len(todo)})

    client = None
    if not config.offline:
        client = ChatClient(config.teacher_url, config.teacher_model, api_key_env=config.api_key_env,
                            timeout=config.timeout, max_retries=config.max_retries,
                            concurrency=config.concurrency, malformed_retries=config.malformed_retries)
    # A teacher's answer costs money and minutes: each line is fsync'd. Offline lines are free to redo.
    durable = not config.offline
    reasons: Counter = Counter()
    accepted = 0
    start = time.monotonic()
    with (open(config.samples_path, "a", encoding="utf-8") as fs,
          open(config.rejects_path, "a", encoding="utf-8") as fr):
        for i, result in _teacher_stream(config, todo, prompts, client):
            rec = todo[i]
            reason, output = None, None
            if isinstance(result, ChatError):
                reason = f"teacher error: {result.reason}"
            elif result.finish_reason == "length":
                reason, output = "truncated output (finish_reason=length)", result.text
            else:
                try:
                    conv = parse_output(result.text, config.kind,
                                        _rng(config.seed, config.kind, rec.id, "instr"))
                except ParseError as e:
                    reason, output = f"parse: {e}", result.text
            if reason is not None:
                reasons[reason.split(":")[0]] += 1
                _append(fr, {"id": rec.id, "kind": config.kind, "reason": reason, "output": output}, durable)
                continue
            sample = {"id": rec.id, "kind": config.kind, "conversations": conv}
            if rec.image is not None:
                sample = {"id": rec.id, "image": rec.image, "kind": config.kind, "conversations": conv}
            _append(fs, sample, durable)
            accepted += 1

    by_id = {}
    with open(config.samples_path, encoding="utf-8") as f:
        for line in f:
            sample = json.loads(line)
            by_id[str(sample["id"])] = sample
    final = [by_id[r.id] for r in records if r.id in by_id]
    write_text_atomic(config.output, json.dumps(final, ensure_ascii=False, indent=1) + "\n")
    summary = {"kind": config.kind, "output": config.output, "samples": len(final), "new_accepted": accepted,
               "new_rejected": sum(reasons.values()), "reject_reasons": dict(reasons),
               "seconds": round(time.monotonic() - start, 2)}
    if client is not None:
        summary["teacher_usage"] = client.usage.as_dict()
    _log({"summary": summary})
    return summary


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m train.make_instruct", description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="JSONL of captions + boxes (ours or COCO caps_boxes)")
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--output", required=True, help="final LLaVA JSON (OUTPUT.samples/.rejects.jsonl beside)")
    p.add_argument("--prompts", help="prompt directory in the upstream layout (default: train/prompts/KIND)")
    p.add_argument("--teacher-url", help="OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--teacher-model", help="model name sent to the teacher")
    p.add_argument("--offline", action="store_true", help="rule-based teacher, no network")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--resume", action="store_true", help="skip ids already in the samples or rejects file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--max-retries", type=int, default=5)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-tokens", type=int, default=1024)
    a = p.parse_args(argv)
    config = InstructConfig(input=a.input, kind=a.kind, output=a.output, prompts=a.prompts,
                            teacher_url=a.teacher_url, teacher_model=a.teacher_model, offline=a.offline,
                            concurrency=a.concurrency, resume=a.resume, seed=a.seed,
                            api_key_env=a.api_key_env, timeout=a.timeout, max_retries=a.max_retries,
                            temperature=a.temperature, max_tokens=a.max_tokens)
    return run(config)


if __name__ == "__main__":
    run_main(main)
