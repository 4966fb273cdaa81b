"""LLaVA-Bench: upstream's review layout and score parsing, the summarizer against upstream's stored
In-the-Wild reviews (published 72.5 / 65.4), bad review files, and a review run over real HTTP with a
fake judge whose replies partly fail to parse (counted), resumed, then summarized."""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
from helpers import FakeJudge

from llava_evals import llava_bench as lb


def _jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


# ---- parsing and layout --------------------------------------------------------------------------------

@pytest.mark.parametrize("review,want", [
    ("8 10\nBoth are fine.", [8.0, 10.0]), ("9 6.5", [9.0, 6.5]), ("7,8\nok", [7.0, 8.0]),
    ("7, 8\nok", [-1, -1]),          # upstream: the comma becomes a space, three fields → failure
    ("Scores: 7 8", [-1, -1]), ("", [-1, -1]), ("\n7 8", [-1, -1]), ("seven 8", [-1, -1]),
    ("nan 8", [-1, -1]),
])
def test_parse_score(review, want):
    assert lb.parse_score(review) == want


def test_parse_score_matches_stored_upstream_tuples(upstream_dir):
    files = glob.glob(os.path.join(upstream_dir, "llava_bench_in_the_wild", "reviews", "*.jsonl"))
    assert len(files) == 6
    for path in files:
        for line in open(path):
            r = json.loads(line)
            assert lb.parse_score(r["content"]) == r["tuple"], (path, r["question_id"])


def test_review_content_coco_layout(upstream_dir, tmp_path):
    d = os.path.join(upstream_dir, "llava_bench_coco")
    q = json.loads(open(os.path.join(d, "qa90_questions.jsonl")).readline())
    ctx = lb.load_context(os.path.join(d, "caps_boxes_coco2014_val_80.jsonl"))[q["image"]]
    raw = next(json.loads(x) for x in open(os.path.join(d, "caps_boxes_coco2014_val_80.jsonl"))
               if json.loads(x)["image"] == q["image"])
    rule = lb.load_rules(os.path.join(d, "rule.json"))[lb._rule_key(q["category"], ctx, None)]
    got = lb.review_content(q["text"], ctx, "REF", "CAND", rule)
    boxes = "\n".join(f'{i["category"]}: {i["bbox"]}' for i in raw["instances"])
    want = ("[Context]\n" + "\n".join(raw["captions"]) + "\n\n" + boxes + "\n\n[Question]\n" + q["text"]
            + "\n\n[Assistant 1]\nREF\n\n[End of Assistant 1]\n\n"
            "[Assistant 2]\nCAND\n\n[End of Assistant 2]\n\n"
            "[System]\n" + rule["prompt"] + "\n\n")
    assert got == want
    assert "bounding box" in rule["prompt"]  # the COCO prompt, which explains the boxes
    wild = {"captions": ["A photo."], "boxes": None}
    assert lb._rule_key("detail", wild, None) == "llava_bench_detail"


# ---- summarizer vs upstream ----------------------------------------------------------------------------

def _upstream_summary(path):
    """Upstream's summarize_gpt_review.py, transcribed: numpy means, rounded to 3, ratio rounded to 0.1."""
    scores = {}
    for line in open(path):
        r = json.loads(line)
        scores.setdefault(r["category"].removeprefix("llava_bench_"), []).append(r["tuple"])
        scores.setdefault("all", []).append(r["tuple"])
    out = {}
    for k, v in scores.items():
        stats = [round(x, 3) for x in np.asarray(v).mean(0).tolist()]
        out[k] = (round(stats[1] / stats[0] * 100, 1), round(stats[0] * 10, 1), round(stats[1] * 10, 1))
    return out


@pytest.mark.parametrize("model,published,per_run", [("13b", 72.5, [72.8, 72.7, 72.1]),
                                                     ("7b", 65.4, [64.7, 65.3, 66.3])])
def test_summarize_reproduces_upstream(upstream_dir, tmp_path, model, published, per_run):
    d = os.path.join(upstream_dir, "llava_bench_in_the_wild", "reviews")
    files = [os.path.join(d, f"llava-v1.5-{model}-eval{i}.jsonl") for i in (1, 2, 3)]
    out = tmp_path / "s.json"
    lb.main(["summarize", *files, "--json", str(out)])
    res = json.load(open(out))
    for path, run in zip(files, res["runs"], strict=True):
        want = _upstream_summary(path)
        got = {k: (c["relative"], c["reference_abs"], c["candidate_abs"])
               for k, c in run["categories"].items()}
        assert got == want and list(got) == ["conv", "detail", "complex", "all"]
    assert [r["categories"]["all"]["relative"] for r in res["runs"]] == per_run
    overall = res["overall"]["all"]["relative"]
    assert round(overall["mean"], 1) == published
    assert overall["std"] == pytest.approx(float(np.std(per_run, ddof=1)))
    for cat in ("conv", "detail", "complex"):
        runs = [r["categories"][cat]["relative"] for r in res["runs"]]
        assert res["overall"][cat]["relative"]["mean"] == pytest.approx(np.mean(runs))


# ---- bad review files ----------------------------------------------------------------------------------

def _review(qid, cat, t):
    return {"question_id": qid, "category": cat, "content": "...", "tuple": t}


def test_bad_review_files(tmp_path):
    good = [_review(0, "conv", [8, 6]), _review(1, "detail", [9, 9]), _review(2, "complex", [-1, -1])]
    bad = _jsonl(tmp_path / "bad.jsonl", [good[0], '{"question_id": 1, "category": "detail", "tup', good[2]])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        lb.summarize([bad])
    res = lb.summarize([bad], skip_bad=True)
    assert len(res["skipped_lines"]) == 1 and res["runs"][0]["categories"]["all"]["n"] == 2
    cases = [([good[0], _review(1, "detail", [9])], r"x\.jsonl:2: 'tuple' must be two numbers"),
             ([good[0], {"question_id": 1, "category": "conv"}],
              r"x\.jsonl:2: missing field\(s\) \['tuple'\]"),
             ([good[0], _review(0, "conv", [1, 2])],
              r"x\.jsonl:2: duplicate question_id 0 \(first on line 1\)"),
             ([_review(0, "conv", ["8", 6])], r"x\.jsonl:1: 'tuple' must be two numbers")]
    for rows, msg in cases:
        with pytest.raises(ValueError, match=msg):
            lb.summarize([_jsonl(tmp_path / "x.jsonl", rows)])
    a, b = _jsonl(tmp_path / "a.jsonl", good), _jsonl(tmp_path / "b.jsonl", good[:2])
    with pytest.raises(ValueError, match=r"b\.jsonl reviews other questions than .*a\.jsonl \(differ: 2\)"):
        lb.summarize([a, b])


def test_failed_parses_are_counted_not_averaged(tmp_path):
    rows = [_review(0, "conv", [8, 4]), _review(1, "conv", [-1, -1]), _review(2, "detail", [-1, -1])]
    res = lb.summarize([_jsonl(tmp_path / "r.jsonl", rows)])
    c = res["runs"][0]["categories"]
    assert (c["conv"]["relative"], c["conv"]["failed"], c["conv"]["n"]) == (50.0, 1, 2)
    assert c["detail"]["relative"] is None and c["detail"]["failed"] == 1
    assert (c["all"]["relative"], c["all"]["failed"]) == (50.0, 2)
    table = lb.format_summary(res)
    assert "n/a" in table and table.splitlines()[-1].endswith("| 2 |")


# ---- review over HTTP, resumed, summarized --------------------------------------------------------------

@pytest.fixture
def bench(tmp_path):
    qs = [{"question_id": i, "image": f"img{i % 2}.jpg", "text": f"Question {i}?", "category": c}
          for i, c in enumerate(["conv", "detail", "complex", "conv", "detail", "complex"])]
    files = {
        "questions": _jsonl(tmp_path / "q.jsonl", qs),
        "context": _jsonl(tmp_path / "ctx.jsonl", [{"image": "img0.jpg", "caption": "A cat on a mat."},
                                                   {"image": "img1.jpg", "caption": "Two dogs."}]),
        "reference": _jsonl(tmp_path / "ref.jsonl", [{"question_id": q["question_id"], "text": f"ref {i}"}
                                                     for i, q in enumerate(qs)]),
        "answers": _jsonl(tmp_path / "ans.jsonl", [{"question_id": q["question_id"], "text": f"cand {i}",
                                                    "answer_id": f"a{i}"} for i, q in enumerate(qs)]),
        "rules": str(tmp_path / "rule.json"),
    }
    json.dump({f"llava_bench_{c}": {"role": "Assistant", "prompt": f"Rate ({c})."} for c in lb.CATEGORIES},
              open(files["rules"], "w"))
    return files


def _review_argv(files, out, url):
    return ["review", *[x for k, v in files.items() for x in (f"--{k}", v)], "--out", str(out),
            "--judge-url", url, "--judge-model", "tiny", "--concurrency", "3"]


def _tiny_judge(messages):
    user = messages[-1]["content"]
    q = int(user.split("[Question]\nQuestion ")[1].split("?")[0])
    return ["8 6\nfine", "I think both are good.", "9 9", "7,7\n", "??", "10 5"][q]


def test_review_over_http_then_summarize(bench, tmp_path):
    out = tmp_path / "review1.jsonl"
    with FakeJudge(_tiny_judge) as judge:
        argv = _review_argv(bench, out, judge.url)
        # An interrupted run: two reviews already written, the last line torn.
        first = lb.main(argv)
        rows = open(out).read().splitlines()
        out.write_text("\n".join(rows[:2]) + "\n" + rows[2][:20])
        n_before = len(judge.requests)
        lb.main(argv)
        assert len(judge.requests) == n_before + 4  # the torn line and the three missing ones
    assert first == 0 and n_before == 6
    body = next(b for b in judge.requests if "[Question]\nQuestion 0?" in b["messages"][1]["content"])
    assert body["temperature"] == 0.2 and body["messages"][0]["content"] == lb.JUDGE_SYSTEM
    assert body["messages"][1]["content"].startswith("[Context]\nA cat on a mat.\n\n[Question]\nQuestion ")
    reviews = {r["question_id"]: r for r in map(json.loads, open(out))}
    assert sorted(reviews) == list(range(6))
    assert reviews[0]["tuple"] == [8.0, 6.0] and reviews[1]["tuple"] == [-1, -1]
    assert reviews[1]["rule"] == "llava_bench_detail" and reviews[5]["answer2_id"] == "a5"
    res_path = tmp_path / "summary.json"
    lb.main(["summarize", str(out), "--json", str(res_path)])
    c = json.load(open(res_path))["runs"][0]["categories"]
    assert (c["all"]["failed"], c["all"]["n"]) == (2, 6)
    assert c["all"]["relative"] == round(round(27 / 4, 3) / round(34 / 4, 3) * 100, 1)
    assert c["detail"]["relative"] is None and c["conv"]["relative"] == round(13 / 15 * 100, 1)


def test_review_rejects_bad_answers(bench, tmp_path):
    rows = open(bench["answers"]).read().splitlines()
    with FakeJudge(_tiny_judge) as judge:
        _jsonl(bench["answers"], rows[:-1])
        with pytest.raises(ValueError, match=r"candidate answers lack 1 of 6 questions: 5"):
            lb.main(_review_argv(bench, tmp_path / "r.jsonl", judge.url))
        _jsonl(bench["answers"], rows + [json.dumps({"question_id": 77, "text": "x"})])
        with pytest.raises(ValueError, match=r"candidate answers name question ids not in .*: 77"):
            lb.main(_review_argv(bench, tmp_path / "r.jsonl", judge.url))
        _jsonl(bench["answers"], rows[:3] + ['{"question_id": 3, "text": '] + rows[4:])
        with pytest.raises(ValueError, match=r"ans\.jsonl:4: not valid JSON"):
            lb.main(_review_argv(bench, tmp_path / "r.jsonl", judge.url))
        assert judge.requests == []


# ---- answer (tiny random checkpoint, CPU) → review (fake judge over HTTP) → summarize ---------------------

def test_answer_review_summarize_end_to_end(bench, tiny_checkpoint, tmp_path):
    from PIL import Image
    images = tmp_path / "images"
    images.mkdir()
    for i, colour in enumerate([(250, 0, 0), (0, 0, 250)]):
        Image.new("RGB", (30, 40), colour).save(images / f"img{i}.jpg")
    answers = tmp_path / "tiny_answers.jsonl"
    lb.main(["answer", "--questions", bench["questions"], "--images", str(images), "--model", tiny_checkpoint,
             "--out", str(answers), "--batch-size", "4", "--max-new-tokens", "6", "--template", "llava_v0"])
    rows = [json.loads(line) for line in open(answers)]
    assert sorted(r["question_id"] for r in rows) == list(range(6))
    assert all(r["prompt"].startswith("<image>\nQuestion ") for r in rows)
    files = dict(bench, answers=str(answers))
    out = tmp_path / "review.jsonl"
    with FakeJudge(_tiny_judge) as judge:
        lb.main(_review_argv(files, out, judge.url))
    assert sorted(json.loads(line)["question_id"] for line in open(out)) == list(range(6))
    contents = [b["messages"][1]["content"] for b in judge.requests]
    for r in rows:  # the candidate (Assistant 2) is the tiny model's answer
        assert any(f"[Assistant 2]\n{r['text']}\n\n[End of Assistant 2]" in c for c in contents)
    summary = tmp_path / "summary.json"
    lb.main(["summarize", str(out), "--json", str(summary)])
    res = json.load(open(summary))
    assert res["overall"]["all"]["failed"] == 2 and res["overall"]["all"]["relative"]["runs"] == 1
