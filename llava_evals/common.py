"""Shared plumbing of the evaluators: line-numbered JSON(L) reading, append-only resumable outputs,
atomic JSON results, progress lines, and the effective-config log line.

Why append-only JSONL: an evaluation that dies after 3,000 of 4,241 questions (or judge calls) must
resume without redoing them; every finished item is one line, flushed as it is written, and a rerun
skips the ids already there. A last line cut short by a crash (no trailing newline) is dropped, with
a warning, before anything new is appended.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Iterator

from engine.io import write_text_atomic


def read_json(path: str):
    """Read one JSON document; FileNotFoundError / ValueError name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_jsonl(path: str, *, skip_bad: bool = False,
               required: tuple[str, ...] = ()) -> tuple[list[dict], list[str]]:
    """Read a JSONL file of objects: returns ``(rows, skipped)``.

    Blank lines are ignored. A line that is not a JSON object, or lacks one of ``required``, raises
    ValueError naming ``path:line`` — unless ``skip_bad``, when it is left out and described in
    ``skipped`` (so that callers can count and report it). Each row gets ``_line`` (1-based).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    rows, skipped = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            problem = None
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                problem = f"not valid JSON ({e.msg})"
            else:
                if not isinstance(row, dict):
                    problem = f"a JSON {type(row).__name__}, not an object"
                else:
                    missing = [k for k in required if k not in row]
                    if missing:
                        problem = f"missing field(s) {missing}"
            if problem is not None:
                where = f"{path}:{lineno}: {problem}"
                if not skip_bad:
                    raise ValueError(where)
                skipped.append(where)
                continue
            row["_line"] = lineno
            rows.append(row)
    return rows, skipped


def repair_tail(path: str) -> None:
    """Drop a partial last line (no trailing newline) left by an interrupted append."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        data_end = f.seek(0, os.SEEK_END)
        # Scan back for the last newline; files here are small enough (MBs) to read the tail block by block.
        pos, block = data_end, 1 << 16
        cut = 0
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            i = chunk.rfind(b"\n")
            if i >= 0:
                cut = start + i + 1
                break
            pos = start
        print(f"warning: {path}: dropping an incomplete last line ({data_end - cut} bytes) from an "
              "interrupted run", file=sys.stderr)
        f.truncate(cut)


def done_keys(path: str, key) -> set:
    """Keys already present in an append-only output (``key(row)`` per row); empty when the file is absent."""
    if not os.path.isfile(path):
        return set()
    repair_tail(path)
    rows, _ = read_jsonl(path)
    return {key(r) for r in rows}


class JsonlAppender:
    """Append rows to a JSONL file, one flushed line each (a crash loses at most the line being written)."""

    def __init__(self, path: str):
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        repair_tail(path)
        self.path = path
        self._f = open(path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_json_atomic(path: str, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (a reader sees the old file or the new one)."""
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: str, rows: Iterable[dict]) -> None:
    """Write ``rows`` as JSONL to ``path`` atomically (for outputs rebuilt whole, unlike ``JsonlAppender``)."""
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


class Progress:
    """``[name] done/total (pct) rate eta`` lines on stderr, at most one per ``every`` s, and the last."""

    def __init__(self, name: str, total: int, *, done: int = 0, every: float = 2.0, stream=None):
        self.name, self.total, self.done, self.every = name, total, done, every
        self.stream = stream if stream is not None else sys.stderr
        self._start_done, self._t0, self._last = done, time.monotonic(), 0.0

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.every or self.done >= self.total:
            self._last = now
            rate = (self.done - self._start_done) / max(now - self._t0, 1e-9)
            left = (self.total - self.done) / rate if rate > 0 else float("inf")
            pct = 100.0 * self.done / self.total if self.total else 100.0
            eta = f"{left:.0f}s" if left != float("inf") else "?"
            print(f"[{self.name}] {self.done}/{self.total} ({pct:.1f}%) {rate:.2f}/s eta {eta}",
                  file=self.stream, flush=True)


def log_config(name: str, config: dict) -> None:
    """Print the effective configuration of a run as one JSON line (stderr), first thing."""
    line = json.dumps({"run": name, "config": config}, default=str, sort_keys=True)
    print(line, file=sys.stderr, flush=True)


# ---- answer generation over a checkpoint (the runtime API: engine.generate's Runtime) ----------------------

def add_answer_args(p) -> None:
    """Checkpoint and decoding flags shared by the ``answer`` commands."""
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="checkpoint directory (HF llava layout, with a tokenizer)")
    g.add_argument("--model-id", default=None, help="name in each answer row (default: the directory name)")
    g.add_argument("--template", default="vicuna_v1", help="conversation template (vicuna_v1, llava_v0, ...)")
    g.add_argument("--batch-size", type=int, default=16,
                   help="most questions decoded at once (continuous batching: a finished one's slot is refilled "
                        "at the next step)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None,
                   help="sampling seed (question k of the file uses seed + k, whatever runs beside it)")
    g.add_argument("--device", default=None)
    g.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))  # engine.chat.DTYPES


class CheckpointAnswerer:
    """Text (+ one image) in, text out, through the engine runtime's continuous batching.

    Prompts, images and stops are handled by ``engine.chat``'s helpers, so an answer here equals
    what ``engine.chat`` / ``engine.serve`` return for the same message. ``stream(jobs)`` takes
    ``(key, user message, PIL image | None)`` triples (``<image>`` marks the image) and yields
    ``(key, text, finish_reason)`` as each answer ends: up to ``--batch-size`` questions decode at
    once and a finished question's slot goes to the next at the following step, so no question
    waits on the slowest of a fixed batch. Under greedy decoding the answers equal batch size 1's.
    """

    def __init__(self, args):
        from engine.chat import image_spec_for, load_model, load_tokenizer, stop_token_ids
        from engine.conversation import get_template, stop_strings
        from engine.generate import Runtime, RuntimeConfig

        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        self.model = load_model(args.model, device=args.device, dtype=args.dtype)
        self.tokenizer = load_tokenizer(args.model)
        self.template = get_template(args.template)
        self.spec = image_spec_for(args.model, self.model)
        self.stop_ids = tuple(stop_token_ids(self.tokenizer, self.model))
        self.stop_strings = stop_strings(self.template)
        self.max_new_tokens, self.temperature, self.seed = args.max_new_tokens, args.temperature, args.seed
        self.max_batch = args.batch_size
        self.runtime = Runtime(self.model, RuntimeConfig(max_batch=args.batch_size))

    def stream(self, jobs: Iterable[tuple[int, str, object]]) -> Iterator[tuple[int, str, str]]:
        from engine.chat import TextDecoder, encode_chat
        from engine.generate import SamplingParams

        rt, jobs = self.runtime, iter(jobs)
        live: dict[int, tuple[int, TextDecoder, object]] = {}   # id(request) → (key, decoder, request)
        exhausted = False
        try:
            while True:
                # Keep the runtime fed: up to 2 × batch requests submitted (prompts encoded and images
                # preprocessed ahead, not all at once), the runtime admits them as slots free up.
                while not exhausted and len(live) < 2 * self.max_batch:
                    try:
                        key, prompt, image = next(jobs)
                    except StopIteration:
                        exhausted = True
                        break
                    ids, pixels, sizes = encode_chat(self.tokenizer, self.template,
                                                     [{"role": "user", "content": prompt}],
                                                     [image] if image is not None else [], self.model, self.spec)
                    params = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=float(self.temperature),
                                            stop_token_ids=self.stop_ids,
                                            seed=None if self.seed is None else self.seed + key)
                    req = rt.submit(ids, pixel_values=pixels, image_sizes=sizes, params=params)
                    live[id(req)] = (key, TextDecoder(self.tokenizer, self.stop_strings), req)
                if not live:
                    return
                for ev in rt.step():
                    entry = live.get(id(ev.request))
                    if entry is None:   # ended earlier in this step (a stop string, then its length event)
                        continue
                    key, decoder, req = entry
                    if ev.finish_reason == "error":
                        raise RuntimeError(f"generation failed for question {key}: {req.error}")
                    if ev.token is not None:
                        # engine.chat's decoder: a template whose stop is a string ("###" for llava_v0) ends
                        # the answer there, and the text is the one engine.chat / engine.serve give.
                        decoder.push(ev.token)
                        if not decoder.stopped:
                            continue
                        rt.cancel(req)  # its slot and blocks go to the next question at the next step
                        reason = "stop"
                    else:
                        decoder.finish()
                        reason = ev.finish_reason
                    del live[id(req)]
                    yield key, decoder.text.strip(), reason
        finally:  # an interrupted run leaves nothing behind in the runtime
            for _, _, req in live.values():
                rt.cancel(req)


def check_images(items: list[dict]) -> None:
    """FileNotFoundError naming the first question whose image is missing (checked before a model loads)."""
    for it in items:
        if it["image"] is not None and not os.path.isfile(it["image"]):
            raise FileNotFoundError(f"question {it['question_id']}: image not found: {it['image']}")


def answer_all(answerer, items: list[dict], out_path: str, *, name: str, row: dict | None = None) -> int:
    """Answer ``items`` (``{"question_id", "prompt", "image": path | None}``) into an append-only JSONL.

    Ids already in ``out_path`` are skipped (resume). Every question goes through ``answerer.stream``
    (continuous batching: image and text-only questions share the batch); each answer is written the
    moment it ends, in completion order, as ``{"question_id", "prompt", "text", "finish_reason"} | row``;
    a progress bar counts them. Every image must exist before any generation starts
    (FileNotFoundError names the question). Question k of ``items`` is the stream's key k (its
    sampling seed offset). Returns the number of new answers.
    """
    from PIL import Image
    from tqdm import tqdm

    check_images(items)
    done = done_keys(out_path, lambda r: str(r["question_id"]))
    todo = [k for k, it in enumerate(items) if str(it["question_id"]) not in done]

    def jobs():
        for k in todo:
            it = items[k]
            image = Image.open(it["image"]).convert("RGB") if it["image"] is not None else None
            yield k, it["prompt"], image

    with JsonlAppender(out_path) as out, tqdm(total=len(items), initial=len(items) - len(todo), desc=name,
                                              unit="q", file=sys.stderr, mininterval=1.0) as bar:
        for k, text, finish in answerer.stream(jobs()):
            it = items[k]
            out.write({"question_id": it["question_id"], "prompt": it["prompt"], "text": text,
                       "finish_reason": finish} | (row or {}))
            bar.update(1)
    return len(todo)
