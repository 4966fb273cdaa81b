"""End to end over real HTTP on 127.0.0.1: ``engine.serve`` running a tiny checkpoint is the teacher
of ``train.make_instruct`` (issue 6) and the judge of ``llava_evals.llava_bench`` / ``llava_evals.scienceqa``
(issue 7). Every tool runs as its CLI in a subprocess, as a user would run it.

The tiny checkpoint is random, so its text is nonsense. One edit makes the run exercise every path:
the LM-head row of EOS is set to 1.001 × the row of a token ``t`` that greedy decoding emits a few
tokens into the first detail prompt, so the model stops (``finish_reason == "stop"``) wherever it
would have said ``t``. Detail outputs then parse (any plain text is a description) and become
training samples; conversation/complex outputs are nonsense without ``Question:`` blocks and must
be counted as parse rejects; judge reviews mostly fail to parse and must be counted as ``[-1, -1]``.

The API key (``OPENAI_API_KEY``) is set for every process and must appear in no output or log.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

import pytest
import torch
from helpers import REPO, SECRET, assert_no_secret
from PIL import Image, ImageDraw

ENV = {**os.environ, "OPENAI_API_KEY": SECRET}
MAX_TOKENS = 16      # teacher/judge reply length: every request stays tiny and fast on the CPU
CLI_TIMEOUT = 120    # seconds any one CLI may take before the test fails (normally a few seconds)
LETTERS = "ABCDE"


@dataclass(frozen=True, kw_only=True)
class Tiny:
    path: str            # checkpoint directory (HF llava layout + tokenizer)
    shapes_root: str     # image folder of the shapes records
    captions: str        # shapes captions JSONL (make_instruct input)
    ids: tuple[str, ...]
    probe_id: str        # the record whose detail answer is known to end with "stop"


@dataclass(frozen=True, kw_only=True)
class Server:
    url: str
    log: str


# ---- fixtures ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    """A random tiny LLaVA for the tiny tokenizer, made to stop early (module docstring), exported."""
    import engine
    from engine.chat import encode_chat, load_tokenizer
    from engine.conversation import get_template
    from engine.generate import generate
    from engine.tokenizer import build_tiny_tokenizer
    from train.make_instruct import DEFAULT_PROMPTS, build_messages, load_prompts, read_records
    from train.shapes import make_shapes_dataset

    root = tmp_path_factory.mktemp("tiny")
    shapes = make_shapes_dataset(str(root / "shapes"), num_train=4, num_test=0, image_size=32, seed=0)
    records = read_records(shapes.captions)
    tok_dir = build_tiny_tokenizer(str(root / "tok"))
    tok = load_tokenizer(tok_dir)
    cfg = engine.tiny_config(vocab_size=len(tok), image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    model = engine.Llava(cfg).eval()

    # The prompt the server will get for the first record's detail description.
    messages = build_messages(load_prompts(os.path.join(DEFAULT_PROMPTS, "detail")), records[0], "detail")
    ids, _, _ = encode_chat(tok, get_template("vicuna_v1"), messages, [], model)

    def greedy():
        return generate(model, [ids], max_new_tokens=MAX_TOKENS)[0]

    tokens = greedy().tokens
    special = {tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, cfg.image_token_id}
    eos, head = cfg.text.eos_token_id, model.decoder.lm_head.weight
    original = head[eos].detach().clone()
    for k in range(4, len(tokens)):  # a few tokens of text, then the first token not seen before
        if tokens[k] in tokens[:k] or tokens[k] in special:
            continue
        with torch.no_grad():  # EOS now wins wherever tokens[k] would (the winning logit is > 0)
            head[eos] = head[tokens[k]] * 1.001
        out = greedy()
        if out.finish_reason == "stop" and out.tokens == tokens[:k]:
            break
        with torch.no_grad():  # EOS also won at an earlier step: try the next candidate
            head[eos] = original
    else:
        pytest.fail(f"no token of the probe's greedy output {tokens} can be turned into an early stop")

    path = str(root / "ckpt")
    engine.export_hf(model, path, tokenizer_dir=tok_dir)
    return Tiny(path=path, shapes_root=shapes.root, captions=shapes.captions,
                ids=tuple(r.id for r in records), probe_id=records[0].id)


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    """``python -m engine.serve --model CKPT --port 0`` in a subprocess; always stopped at the end."""
    log = str(tmp_path_factory.mktemp("server") / "serve.log")
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "engine.serve", "--model", tiny.path, "--host", "127.0.0.1",
                                 "--port", "0", "--max-batch", "16"],
                                cwd=REPO, env=ENV, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline, port = time.monotonic() + 60, None
        while port is None:
            assert proc.poll() is None, f"engine.serve exited with {proc.returncode}:\n{_read(log)}"
            assert time.monotonic() < deadline, f"engine.serve did not start in 60 s:\n{_read(log)}"
            m = re.search(r"serving \S+ on http://127\.0\.0\.1:(\d+)/v1", _read(log))
            port = int(m.group(1)) if m else None
            time.sleep(0.05)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            assert r.status == 200
        yield Server(url=f"http://127.0.0.1:{port}/v1", log=log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# ---- helpers -------------------------------------------------------------------------------------------

def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _cmd(module: str, *args) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


def _check(proc: subprocess.CompletedProcess | subprocess.Popen, out: str, err: str, logs: list[str]) -> str:
    assert proc.returncode == 0, f"{proc.args[2:]} failed ({proc.returncode}):\n{err[-3000:]}"
    logs += [out, err]
    return out


def cli(logs: list[str], module: str, *args) -> str:
    """Run a CLI to completion (bounded); its stdout and stderr are kept in ``logs`` for the key check."""
    p = subprocess.run(_cmd(module, *args), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=CLI_TIMEOUT)
    return _check(p, p.stdout, p.stderr, logs)


def _upstream_letter(text: str) -> str | None:
    """ScienceQA's answer parsing (upstream eval_science_qa.py), restated here as the test's oracle."""
    if text in LETTERS:
        return text
    if len(text) >= 3 and text[0] in LETTERS and text[1:3] == ". ":
        return text[0]
    found = re.findall(r"The answer is ([A-Z]).", text)
    return found[0] if len(found) == 1 else None


def _upstream_scores(review: str) -> list[float]:
    """LLaVA-Bench's parse_score (first line, commas as spaces, exactly two numbers), as the oracle."""
    parts = review.split("\n")[0].replace(",", " ").split(" ")
    try:
        scores = [float(x) for x in parts] if len(parts) == 2 else []
    except ValueError:
        scores = []
    return scores if len(scores) == 2 and all(math.isfinite(s) for s in scores) else [-1, -1]


# ---- issue 6: make_instruct against engine.serve, then stage2 on the result ---------------------------

def test_make_instruct_over_http_then_stage2(tiny, server, tmp_path):
    from train.make_instruct import DETAIL_INSTRUCTIONS, KINDS

    logs: list[str] = []
    outs = {k: str(tmp_path / f"{k}.json") for k in KINDS}
    procs = {k: subprocess.Popen(_cmd("train.make_instruct", "--input", tiny.captions, "--kind", k,
                                      "--output", outs[k], "--teacher-url", server.url, "--teacher-model", "tiny",
                                      "--max-tokens", MAX_TOKENS, "--concurrency", 4, "--max-retries", 1,
                                      "--timeout", 60, "--seed", 0),
                                 cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in KINDS}  # the three kinds at once: the server batches their requests together
    try:
        results = {k: p.communicate(timeout=CLI_TIMEOUT) for k, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()

    for kind in KINDS:
        _check(procs[kind], *results[kind], logs)
        summary = json.loads(results[kind][1].strip().splitlines()[-1])["summary"]
        samples = json.loads(_read(outs[kind]))
        rejects = _jsonl(outs[kind] + ".rejects.jsonl")
        accepted, rejected = [s["id"] for s in samples], [r["id"] for r in rejects]
        # every input id ends up in exactly one of the two files, output in input order
        assert sorted(accepted + rejected) == sorted(tiny.ids) and not set(accepted) & set(rejected)
        assert accepted == [i for i in tiny.ids if i in accepted]
        # (the append-only JSONL is in completion order; the final file is in input order)
        assert sorted(json.loads(x)["id"] for x in _read(outs[kind] + ".samples.jsonl").splitlines()) == sorted(
            accepted)
        # the summary counts what the files hold; every request reached the server and was answered
        assert summary["samples"] == summary["new_accepted"] == len(samples)
        assert summary["new_rejected"] == len(rejects) == sum(summary["reject_reasons"].values())
        usage = summary["teacher_usage"]
        assert usage["failures"] == 0 and usage["requests"] == len(tiny.ids) and usage["completion_tokens"] > 0
        # nonsense is rejected for its structure, never for a transport failure
        for r in rejects:
            assert r["kind"] == kind and isinstance(r["output"], str), r
            assert r["reason"].startswith(("parse: ", "truncated output")), r
        for s in samples:
            assert s["kind"] == kind and os.path.isfile(os.path.join(tiny.shapes_root, s["image"]))
            turns = s["conversations"]
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and turns
            assert turns[0]["value"].startswith("<image>\n")
        if kind != "detail":  # nonsense holds no "Question:/===/Answer:" blocks
            assert samples == [] and all(r["reason"].startswith("parse: ") or "length" in r["reason"]
                                         for r in rejects)
    detail = json.loads(_read(outs["detail"]))
    assert tiny.probe_id in [s["id"] for s in detail], "the record probed to stop early was not accepted"
    for s in detail:
        human, gpt = s["conversations"]
        assert human["value"].removeprefix("<image>\n") in DETAIL_INSTRUCTIONS and gpt["value"].strip()

    # The detail file, as make_instruct wrote it, trains for one step in stage 2 on the same checkpoint.
    run = tmp_path / "stage2"
    out = cli(logs, "train.stage2", "--model", tiny.path, "--data", outs["detail"], "--image-folder",
              tiny.shapes_root, "--output", run, "--max-steps", 1, "--global-batch", 2, "--device", "cpu",
              "--num-workers", 0, "--lr", "1e-3")
    assert f"data: {len(detail)} samples" in out  # every accepted sample loaded, none skipped
    (metrics,) = _jsonl(str(run / "metrics.jsonl"))
    assert metrics["step"] == 1 and math.isfinite(metrics["loss"]) and metrics["loss"] > 0
    assert metrics["target_tokens"] > 0 and os.path.isfile(run / "final" / "config.json")
    assert_no_secret(logs + [_read(server.log)], str(tmp_path))


# ---- issue 7: LLaVA-Bench answer → review (engine.serve as the judge) → summarize ----------------------

def _draw(path, colour, box):
    img = Image.new("RGB", (48, 40), (240, 240, 240))
    ImageDraw.Draw(img).rectangle(box, fill=colour)
    img.save(path)


def test_llava_bench_answer_review_summarize(tiny, server, tmp_path):
    logs: list[str] = []
    images = tmp_path / "images"
    images.mkdir()
    _draw(images / "a.png", (220, 20, 20), (4, 4, 30, 30))
    _draw(images / "b.png", (20, 20, 220), (20, 10, 44, 36))
    cats = ["conv", "detail", "complex", "conv", "detail", "complex"]
    questions = _write_jsonl(tmp_path / "questions.jsonl", [
        {"question_id": i, "image": "ab"[i % 2] + ".png", "category": c,
         "text": f"Question {i}: what is shown, and where?"} for i, c in enumerate(cats)])
    context = _write_jsonl(tmp_path / "context.jsonl", [  # one COCO-style (boxes), one In-the-Wild-style
        {"image": "a.png", "captions": ["A red square on a grey background."],
         "instances": [{"category": "square", "bbox": [0.083, 0.1, 0.625, 0.75]}]},
        {"image": "b.png", "caption": "A blue rectangle on the right."}])
    reference = _write_jsonl(tmp_path / "reference.jsonl", [
        {"question_id": i, "text": f"A coloured shape, answer {i}.", "answer_id": f"ref{i}"} for i in range(6)])
    rules = tmp_path / "rule.json"
    rules.write_text(json.dumps({f"{p}{c}": {"role": "Assistant", "prompt": f"Rate both answers ({c}) from 1 to "
                                             "10. First line: the two scores, separated by a space."}
                                 for c in ("conv", "detail", "complex") for p in ("", "llava_bench_")}))

    answers = tmp_path / "answers.jsonl"
    cli(logs, "llava_evals.llava_bench", "answer", "--questions", questions, "--images", images, "--model", tiny.path,
        "--out", answers, "--batch-size", 6, "--max-new-tokens", 8)
    rows = _jsonl(str(answers))
    assert sorted(r["question_id"] for r in rows) == list(range(6))
    assert all(isinstance(r["text"], str) and r["model_id"] == "ckpt" for r in rows)

    reviews = []
    for run in (1, 2):  # two judge runs (sampled at the default temperature 0.2 with different seeds)
        reviews.append(tmp_path / f"review{run}.jsonl")
        cli(logs, "llava_evals.llava_bench", "review", "--questions", questions, "--context", context,
            "--reference", reference, "--answers", answers, "--rules", rules, "--out", reviews[-1],
            "--judge-url", server.url, "--judge-model", "tiny", "--max-tokens", MAX_TOKENS, "--seed", run,
            "--concurrency", 6, "--max-retries", 1)
    failed = {}
    for run, path in enumerate(reviews):
        got = {r["question_id"]: r for r in _jsonl(str(path))}
        assert sorted(got) == list(range(6))
        for qid, r in got.items():
            assert r["category"] == cats[qid] and r["answer2_id"] == qid and r["answer1_id"] == f"ref{qid}"
            assert r["rule"] == ("" if qid % 2 == 0 else "llava_bench_") + cats[qid]
            assert r["tuple"] == _upstream_scores(r["content"]), r  # the judge's own text, parsed
            assert r["finish_reason"] in ("stop", "length")
        failed[run] = {c: sum(r["tuple"] == [-1, -1] for r in got.values() if r["category"] == c) for c in cats}
    assert sum(sum(f.values()) for f in failed.values()) > 6  # a tiny judge's reviews mostly fail to parse

    summary = tmp_path / "summary.json"
    table = cli(logs, "llava_evals.llava_bench", "summarize", *reviews, "--label", "tiny", "--json", summary)
    res = json.loads(_read(str(summary)))
    assert [r["file"] for r in res["runs"]] == [str(p) for p in reviews]
    for run, r in enumerate(res["runs"]):
        assert list(r["categories"]) == ["conv", "detail", "complex", "all"]
        for c in ("conv", "detail", "complex"):
            assert (r["categories"][c]["n"], r["categories"][c]["failed"]) == (2, failed[run][c])
        assert (r["categories"]["all"]["n"], r["categories"]["all"]["failed"]) == (6, sum(failed[run].values()))
    for c in ("conv", "detail", "complex", "all"):
        o = res["overall"][c]
        assert o["failed"] == sum(r["categories"][c]["failed"] for r in res["runs"])
        assert set(o["relative"]) == {"mean", "std", "runs"}
        assert o["relative"]["runs"] == sum(r["categories"][c]["relative"] is not None for r in res["runs"])
    lines = table.splitlines()
    assert lines[0] == "| run | conv | detail | complex | all | failed parses |"
    assert lines[2].startswith("| review1.jsonl |") and lines[3].startswith("| review2.jsonl |")
    assert lines[4].startswith("| **tiny** (mean ± std, 2 runs) |")
    assert lines[4].endswith(f"| {res['overall']['all']['failed']} |") and len(lines[4].split("|")) == 8
    assert_no_secret(logs + [_read(server.log)], str(tmp_path))


# ---- issue 7: ScienceQA answer → score, and judge ensembling with engine.serve -------------------------

PROBLEMS = {  # pid → (question, choices, answer, hint, has image, subject, grade)
    "11": ("Which animal is a mammal?", ["shark", "whale"], 1, "", False, "natural science", "grade3"),
    "12": ("Which state is highlighted?", ["Ohio", "Utah", "Iowa"], 2, "", True, "social science", "grade8"),
    "13": ("Which word is a noun?", ["run", "table", "blue"], 1, "Pick one word.", False, "language science",
           "grade2"),
    "14": ("Which force moves the cart?", ["push", "pull"], 0, "A child stands behind the cart.", True,
           "natural science", "grade10"),
    "15": ("What is the opposite of hot?", ["cold", "warm", "wet", "dry"], 0, "", False, "language science",
           "grade5"),
}


def test_scienceqa_answer_score_ensemble(tiny, server, tmp_path):
    from llava_evals import scienceqa as sqa

    logs: list[str] = []
    problems = {pid: {"question": q, "choices": ch, "answer": a, "hint": h, "image": "image.png" if img else None,
                      "subject": s, "grade": g, "split": "test", "lecture": "", "solution": ""}
                for pid, (q, ch, a, h, img, s, g) in PROBLEMS.items()}
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": list(PROBLEMS)}))
    images = tmp_path / "images"
    for pid, p in problems.items():
        if p["image"]:
            (images / pid).mkdir(parents=True)
            _draw(images / pid / "image.png", (30, 160, 30), (6, 6, 40, 30))
    questions = str(tmp_path / "test.json")
    assert sqa.main(["convert", "--problems", str(tmp_path / "problems.json"), "--pid-splits",
                     str(tmp_path / "pid_splits.json"), "--images", str(images), "--out", questions]) == 0

    answers = tmp_path / "answers.jsonl"
    cli(logs, "llava_evals.scienceqa", "answer", "--questions", questions, "--images", images, "--model", tiny.path,
        "--out", answers, "--batch-size", 5, "--max-new-tokens", 6, "--single-pred-prompt")
    texts = {r["question_id"]: r["text"] for r in _jsonl(str(answers))}
    assert sorted(texts) == sorted(PROBLEMS)

    def expected(preds: dict[str, str]) -> tuple[int, int]:
        """(correct, unparsable) by the upstream rules, letters limited to each question's options."""
        correct = unparsable = 0
        for pid, (_, choices, answer, *_) in PROBLEMS.items():
            letter = _upstream_letter(preds[pid])
            idx = LETTERS.index(letter) if letter and letter in LETTERS[:len(choices)] else -1
            unparsable += idx < 0
            correct += idx == answer
        return correct, unparsable

    result = tmp_path / "score.json"
    table = cli(logs, "llava_evals.scienceqa", "score", "--questions", questions, "--predictions", answers,
                "--problems", tmp_path / "problems.json", "--json", result, "--label", "tiny")
    res = json.loads(_read(str(result)))
    correct, unparsable = expected(texts)
    assert (res["n"], res["correct"], res["unparsable"], res["missing"]) == (5, correct, unparsable, 0)
    totals = {c: v["total"] for c, v in res["columns"].items()}
    assert totals == {"NAT": 2, "SOC": 1, "LAN": 2, "TXT": 2, "IMG": 2, "NO": 2, "G1-6": 3, "G7-12": 2,
                      "Average": 5}  # pid 14 has both a hint and an image
    assert set(res["table"]) == set(totals) and res["table"]["Average"] == pytest.approx(100 * correct / 5)
    head, _, row = table.splitlines()[:3]
    assert head == "| method | NAT | SOC | LAN | TXT | IMG | NO | G1-6 | G7-12 | Average |"
    assert row.startswith("| tiny |") and f"{correct}/5 correct; unparsable {unparsable}," in table

    # Ensembling with engine.serve as the text-only judge: its replies are logged and counted.
    ens, ens_json = tmp_path / "ensemble.jsonl", tmp_path / "ensemble.json"
    cli(logs, "llava_evals.scienceqa", "ensemble", "--mode", "judge", "--questions", questions,
        "--predictions", answers, "--out", ens, "--json", ens_json, "--judge-url", server.url, "--judge-model", "tiny",
        "--max-tokens", MAX_TOKENS, "--concurrency", 5, "--max-retries", 1)
    judge_log = _jsonl(str(ens) + ".judge.jsonl")
    first = {r["question_id"]: r["reply"] for r in judge_log if r["stage"] == "answer"}
    assert sorted(first) == sorted(PROBLEMS)
    stats = json.loads(_read(str(ens_json)))["ensemble"]
    n_choices = {pid: len(v[1]) for pid, v in PROBLEMS.items()}

    def idx(text, pid):
        letter = _upstream_letter(text)
        return LETTERS.index(letter) if letter and letter in LETTERS[:n_choices[pid]] else -1

    assert stats["judge_unparsable"] == sum(idx(first[p], p) < 0 for p in PROBLEMS)
    disagree = [p for p in PROBLEMS if min(idx(texts[p], p), idx(first[p], p)) >= 0
                and idx(texts[p], p) != idx(first[p], p)]
    assert stats["disagreements"] == len(disagree)
    assert sorted(r["question_id"] for r in judge_log if r["stage"] == "choose") == sorted(disagree)
    ens_rows = {r["question_id"]: r for r in _jsonl(str(ens))}
    assert sorted(ens_rows) == sorted(PROBLEMS)
    for pid, r in ens_rows.items():  # neither parses → our text is kept (and still counts as wrong)
        if idx(texts[pid], pid) < 0 and idx(first[pid], pid) < 0:
            assert r["source"] == "ours" and r["text"] == texts[pid]
    assert_no_secret(logs + [_read(server.log)], str(tmp_path))
