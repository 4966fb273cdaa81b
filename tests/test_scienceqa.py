"""ScienceQA: converter, upstream answer parsing, the paper's table, prediction formats, bad input,
judge ensembling over real HTTP (a fake judge on 127.0.0.1), resumable answering, and the two
reproductions of upstream's published figures from upstream's stored predictions."""
from __future__ import annotations

import json
import os

import pytest
from helpers import FakeJudge

from llava_evals import scienceqa as sqa
from llava_evals.common import answer_all

# ---- a fake OpenAI-compatible judge --------------------------------------------------------------------


# ---- synthetic ScienceQA -------------------------------------------------------------------------------

def _problems():
    base = {"lecture": "", "solution": "", "task": "closed choice", "topic": "t", "category": "c",
            "skill": "s"}
    return {
        "1": base | {"question": "Which is a mammal?", "choices": ["shark", "whale"], "answer": 1, "hint": "",
                     "image": None, "subject": "natural science", "grade": "grade3", "split": "test",
                     "lecture": "Mammals breathe air.", "solution": "A whale is a mammal."},
        "2": base | {"question": "What is the capital of the state shown?",
                     "choices": ["Salem", "Boise", "Reno"], "answer": 0, "hint": "", "image": "image.png",
                     "subject": "social science",
                     "grade": "grade8", "split": "test"},
        "3": base | {"question": "Which word is a noun?", "choices": ["run", "blue", "table", "fast"],
                     "answer": 2, "hint": "Read the list.\nPick one.", "image": None,
                     "subject": "language science", "grade": "grade2", "split": "test",
                     "solution": "Table names a thing."},
        "4": base | {"question": "Which force acts?", "choices": ["push", "pull"], "answer": 0,
                     "hint": "A magnet is shown.", "image": "image.png", "subject": "natural science",
                     "grade": "grade11", "split": "test"},
        "5": base | {"question": "Pick E.", "choices": ["a", "b", "c", "d", "e"], "answer": 4, "hint": "",
                     "image": None, "subject": "natural science", "grade": "grade7", "split": "train"},
    }


@pytest.fixture
def sqa_files(tmp_path):
    problems = tmp_path / "problems.json"
    problems.write_text(json.dumps(_problems()))
    splits = tmp_path / "pid_splits.json"
    splits.write_text(json.dumps({"test": ["1", "2", "3", "4"], "train": ["5"]}))
    questions = tmp_path / "test.json"
    assert sqa.main(["convert", "--problems", str(problems), "--pid-splits", str(splits), "--split", "test",
                     "--out", str(questions)]) == 0
    return {"problems": str(problems), "splits": str(splits), "questions": str(questions), "dir": tmp_path}


def _jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


# ---- convert -------------------------------------------------------------------------------------------

def test_convert_layout_and_question_fields(sqa_files):
    data = json.load(open(sqa_files["questions"]))
    assert [e["id"] for e in data] == ["1", "2", "3", "4"]
    assert data[0] == {"id": "1", "conversations": [
        {"from": "human", "value": "Which is a mammal?\nA. shark\nB. whale"}, {"from": "gpt", "value": "B"}]}
    assert data[1]["image"] == "2/image.png"
    assert data[1]["conversations"][0]["value"] == ("<image>\nWhat is the capital of the state shown?\n"
                                                    "A. Salem\nB. Boise\nC. Reno")
    assert data[2]["conversations"][0]["value"] == ("Context: Read the list.\nPick one.\n"
                                                    "Which word is a noun?\n"
                                                    "A. run\nB. blue\nC. table\nD. fast")
    assert data[3]["conversations"][0]["value"].startswith("<image>\nContext: A magnet is shown.\nWhich")
    qs = sqa.load_questions(sqa_files["questions"])
    got = {q: (x.n_choices, x.answer, x.has_context, x.image) for q, x in qs.items()}
    assert got == {"1": (2, 1, False, None), "2": (3, 0, False, "2/image.png"), "3": (4, 2, True, None),
                   "4": (2, 0, True, "4/image.png")}


def test_convert_training_targets():
    p = _problems()
    first = sqa.format_target(p["1"], "answer-first")
    last = sqa.format_target(p["1"], "reasoning-first")
    assert first == "The answer is B.\nLECTURE: Mammals breathe air.\nSOLUTION: A whale is a mammal."
    assert last == "LECTURE: Mammals breathe air.\nSOLUTION: A whale is a mammal.\nThe answer is B."
    assert sqa.format_target(p["3"], "reasoning-first") == "SOLUTION: Table names a thing.\nThe answer is C."
    assert sqa.format_target(p["2"], "answer-first") == "The answer is A."  # no lecture/solution: answer only
    for t in (first, last):
        assert sqa.choice_index(t, 2) == 1
    out = sqa.convert(p, ["5"], target="reasoning-first")
    assert sqa._count_options(out[0]["conversations"][0]["value"]) == 5
    with pytest.raises(ValueError, match="unknown target"):
        sqa.format_target(p["1"], "cot")


def test_convert_errors(tmp_path):
    p = _problems()
    with pytest.raises(FileNotFoundError, match=r"problem 2: image not found: .*2/image\.png"):
        sqa.convert(p, ["1", "2"], images_dir=str(tmp_path))
    (tmp_path / "2").mkdir()
    (tmp_path / "2" / "image.png").write_bytes(b"png")
    assert len(sqa.convert(p, ["1", "2"], images_dir=str(tmp_path))) == 2
    with pytest.raises(ValueError, match="problem 9 is in the split but not in problems.json"):
        sqa.convert(p, ["9"])
    p["1"]["answer"] = 2
    with pytest.raises(ValueError, match="problem 1: answer 2"):
        sqa.convert(p, ["1"])


def test_option_lines_may_continue():
    # Upstream question 512: an option spans two lines ("See you soon,\nJanet").
    text = "Which closing is correct for a letter?\nA. See you soon,\nJanet\nB. See You Soon,\nJanet"
    assert sqa._count_options(text) == 2


# ---- parsing -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,n,want", [
    ("A", 4, 0), ("C", 4, 2), ("E", 5, 4),
    ("E", 2, -1),                                # a letter outside the options counts as no answer
    ("B. whale", 2, 1), ("B.whale", 2, -1), ("b", 2, -1), (" A", 2, -1),
    ("Because ... The answer is B.", 2, 1), ("The answer is B,", 2, 1),  # upstream's regex: "." is any char
    ("The answer is A. No wait, The answer is B.", 2, -1),          # two matches: unparsable
    ("The answer is B", 2, -1), ("the answer is B.", 2, -1), ("", 2, -1), ("AB", 2, -1), ("FAILED", 2, -1),
])
def test_parse_answer_upstream_rules(text, n, want):
    assert sqa.choice_index(text, n) == want


# ---- scoring -------------------------------------------------------------------------------------------

def test_score_table_with_problems(sqa_files, tmp_path):
    # 1 right (NAT, NO, G1-6), 2 wrong (SOC, IMG, G7-12), 3 right (LAN, TXT, G1-6),
    # 4 unparsable (NAT, TXT+IMG, G7-12)
    preds = _jsonl(tmp_path / "p.jsonl", [{"question_id": "1", "text": "B"},
                                          {"question_id": 2, "text": "C. Reno"},
                                          {"question_id": "3", "text": "So... The answer is C."},
                                          {"question_id": "4", "text": "I am not sure."}])
    out = tmp_path / "res.json"
    sqa.main(["score", "--questions", sqa_files["questions"], "--predictions", preds, "--problems",
              sqa_files["problems"], "--json", str(out)])
    res = json.load(open(out))
    want = {"NAT": (1, 2), "SOC": (0, 1), "LAN": (1, 1), "TXT": (1, 2), "IMG": (0, 2), "NO": (1, 1),
            "G1-6": (2, 2), "G7-12": (0, 2), "Average": (2, 4)}
    assert {c: (v["correct"], v["total"]) for c, v in res["columns"].items()} == want
    assert res["table"]["Average"] == 50.0 and res["unparsable"] == 1
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []
    # Without problems.json only the columns computable from the question file.
    qs = sqa.load_questions(sqa_files["questions"])
    idx, _ = sqa.predicted_indices(qs, sqa.load_predictions(preds))
    assert list(sqa.score(qs, idx)["columns"]) == ["TXT", "IMG", "NO", "Average"]


def test_prediction_forms_agree(sqa_files, tmp_path):
    qs = sqa.load_questions(sqa_files["questions"])
    texts = {"1": "B", "2": "The answer is C.", "3": "A. run", "4": "???"}
    jsonl = _jsonl(tmp_path / "a.jsonl", [{"question_id": k, "text": v} for k, v in texts.items()])
    output = tmp_path / "b_output.jsonl"  # upstream: one JSON object; parsed_ans is stale on purpose
    output.write_text(json.dumps({"correct": [{"question_id": "1", "pred": "B", "parsed_ans": "A"}],
                                  "incorrect": [{"question_id": k, "pred": v, "parsed_ans": "B"}
                                                for k, v in texts.items() if k != "1"]}))
    results = tmp_path / "c.json"
    results.write_text(json.dumps({"acc": 0, "results": {"1": 1, "2": 2, "3": 0, "4": -1}}))
    got = [sqa.predicted_indices(qs, sqa.load_predictions(str(p)))[0] for p in (jsonl, output, results)]
    assert got[0] == got[1] == got[2] == {"1": 1, "2": 2, "3": 0, "4": -1}


def test_bad_predictions(sqa_files, tmp_path):
    qs = sqa.load_questions(sqa_files["questions"])
    rows = [{"question_id": q, "text": "A"} for q in ("1", "2", "3")]
    missing = sqa.load_predictions(_jsonl(tmp_path / "m.jsonl", rows))
    with pytest.raises(ValueError, match=r"lack 1 of 4 questions: 4 "):
        sqa.predicted_indices(qs, missing)
    idx, counts = sqa.predicted_indices(qs, missing, allow_missing=True)
    assert idx["4"] == -1 and counts["missing"] == 1
    unknown = sqa.load_predictions(_jsonl(tmp_path / "u.jsonl", rows + [{"question_id": "4", "text": "A"},
                                                                       {"question_id": "999", "text": "A"}]))
    with pytest.raises(ValueError, match=r"not in the question file: 999"):
        sqa.predicted_indices(qs, unknown)
    assert sqa.predicted_indices(qs, unknown, skip_unknown=True)[1]["unknown_skipped"] == 1
    bad = _jsonl(tmp_path / "b.jsonl", [rows[0], '{"question_id": "2", "text": "A"', rows[2]])
    with pytest.raises(ValueError, match=r"b\.jsonl:2: not valid JSON"):
        sqa.load_predictions(bad)
    assert len(sqa.load_predictions(bad, skip_bad=True).skipped) == 1
    no_text = _jsonl(tmp_path / "t.jsonl", [rows[0], {"question_id": "2"}])
    with pytest.raises(ValueError, match=r"t\.jsonl:2: missing field\(s\) \['text'\]"):
        sqa.load_predictions(no_text)
    dup = _jsonl(tmp_path / "d.jsonl", [rows[0], rows[1], rows[0]])
    with pytest.raises(ValueError, match=r"d\.jsonl:3: duplicate question id 1 \(first on line 1\)"):
        sqa.load_predictions(dup)
    res = tmp_path / "r.json"
    res.write_text(json.dumps({"results": {"1": "B"}}))
    with pytest.raises(ValueError, match=r"results\['1'\] = 'B' is not a choice index"):
        sqa.load_predictions(str(res))


# ---- upstream reproductions ------------------------------------------------------------------------------

def test_reproduces_llava_paper_row(upstream_dir, tmp_path):
    d = os.path.join(upstream_dir, "scienceqa")
    out = tmp_path / "v0.json"
    sqa.main(["score", "--questions", os.path.join(d, "llava_test_CQM-A.json"),
              "--predictions", os.path.join(d, "test_sqa_llava_13b_v0.json"), "--json", str(out)])
    table = {c: round(v, 2) for c, v in json.load(open(out))["table"].items()}
    assert table == {"Average": 90.92, "TXT": 89.49, "IMG": 88.00, "NO": 90.66}


def test_reproduces_llava15_13b_from_raw_text(upstream_dir, tmp_path):
    d = os.path.join(upstream_dir, "scienceqa")
    out = tmp_path / "v15.json"
    sqa.main(["score", "--questions", os.path.join(d, "llava_test_CQM-A.json"),
              "--predictions", os.path.join(d, "llava-v1.5-13b_output.jsonl"), "--json", str(out)])
    res = json.load(open(out))
    assert (res["correct"], res["n"], res["unparsable"]) == (3155, 4241, 38)
    assert round(res["table"]["Average"], 2) == 74.39
    # Our parse agrees with upstream's stored per-question verdicts (its results file: -1 = unparsable).
    upstream = json.load(open(os.path.join(d, "llava-v1.5-13b_result.json")))["results"]
    qs = sqa.load_questions(os.path.join(d, "llava_test_CQM-A.json"))
    ours, _ = sqa.predicted_indices(qs, sqa.load_predictions(os.path.join(d, "llava-v1.5-13b_output.jsonl")))
    assert ours == {k: int(v) for k, v in upstream.items()}


# ---- ensembling ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,ours,judge,chosen,want", [
    ("complement", 1, 0, None, (0, "judge")), ("complement", 1, -1, None, (1, "ours")),
    ("complement", -1, -1, None, (-1, "ours")),
    ("judge", 1, 1, None, (1, "ours")), ("judge", 1, -1, None, (1, "ours")),
    ("judge", -1, 2, None, (2, "judge")),
    ("judge", 1, 0, 0, (0, "judge-choice")), ("judge", 1, 0, 1, (1, "judge-choice")),
    ("judge", 1, 0, -1, (1, "ours")),
])
def test_ensemble_decide(mode, ours, judge, chosen, want):
    assert sqa.ensemble_decide(mode, ours, judge, chosen) == want


def _judge_reply(messages):
    """Judge behaviour keyed by question: 1 agrees, 2 declines (image), 3 disagrees then picks, 4 answers."""
    user = messages[-1]["content"]
    choosing = "Two answers were proposed" in user
    if "mammal" in user:
        return "Whales are mammals. The answer is B."
    if "capital" in user:
        return "I cannot answer."
    if "noun" in user:
        return "The answer is C." if choosing else "Blue is a thing? The answer is B."
    if "force" in user:
        return "Hmm." if choosing else "The answer is A."
    raise AssertionError(user)


@pytest.mark.parametrize("mode", ["complement", "judge"])
def test_ensemble_over_http(sqa_files, tmp_path, mode):
    # ours: 1 right (B), 2 right (A), 3 right (C), 4 unparsable
    preds = _jsonl(tmp_path / "ours.jsonl", [{"question_id": q, "text": t}
                                             for q, t in (("1", "B"), ("2", "A"), ("3", "C"), ("4", "?"))])
    out, res = tmp_path / f"{mode}.jsonl", tmp_path / f"{mode}.json"
    argv = ["ensemble", "--mode", mode, "--questions", sqa_files["questions"], "--predictions", preds,
            "--out", str(out), "--json", str(res), "--problems", sqa_files["problems"]]
    with FakeJudge(_judge_reply) as judge:
        sqa.main(argv + ["--judge-url", judge.url, "--judge-model", "fake", "--concurrency", "2"])
        n_first = len(judge.requests)
        sqa.main(argv + ["--judge-url", judge.url, "--judge-model", "fake"])  # resumed: nothing to ask
        assert len(judge.requests) == n_first
    assert all(r["temperature"] == 0.0 and r["model"] == "fake" for r in judge.requests)
    final = {r["question_id"]: (r["text"], r["source"]) for r in map(json.loads, open(out))}
    result = json.load(open(res))
    if mode == "complement":
        assert n_first == 4
        assert final == {"1": ("The answer is B.", "judge"), "2": ("The answer is A.", "ours"),
                         "3": ("The answer is B.", "judge"), "4": ("The answer is A.", "judge")}
        assert result["correct"] == 3
    else:
        assert n_first == 5  # one "choose" request, for the only real disagreement (question 3)
        assert final == {"1": ("The answer is B.", "ours"), "2": ("The answer is A.", "ours"),
                         "3": ("The answer is C.", "judge-choice"), "4": ("The answer is A.", "judge")}
        assert result["correct"] == 4 and result["ensemble"]["disagreements"] == 1
    assert result["ensemble"]["judge_unparsable"] == 1


def test_ensemble_judge_failure_is_retried_on_rerun(sqa_files, tmp_path):
    preds = _jsonl(tmp_path / "ours.jsonl", [{"question_id": q, "text": "A"} for q in ("1", "2", "3", "4")])
    state = {"fail": True}

    def reply(messages):
        if state["fail"] and "noun" in messages[-1]["content"]:
            return 400  # not retryable: the call fails for good
        return _judge_reply(messages)

    out = tmp_path / "e.jsonl"
    argv = ["ensemble", "--mode", "complement", "--questions", sqa_files["questions"], "--predictions", preds,
            "--out", str(out), "--max-retries", "0"]
    with FakeJudge(reply) as judge:
        argv += ["--judge-url", judge.url, "--judge-model", "fake"]
        with pytest.raises(RuntimeError, match=r"1 of 4 judge calls failed .*HTTP 400"):
            sqa.main(argv)
        assert not out.exists()  # no half-ensembled predictions
        state["fail"] = False
        sqa.main(argv)
        assert len(judge.requests) == 5  # only the failed one was asked again
    assert len(open(out).readlines()) == 4


# ---- resumable answering (the runtime is faked: the loop, the order and resume are ours) ------------------

class _FakeAnswerer:
    """Answers in reverse order of arrival (a continuous batch ends questions out of order)."""

    def __init__(self):
        self.keys = []

    def stream(self, jobs):
        jobs = list(jobs)
        for key, prompt, image in jobs:
            self.keys.append(key)
            assert image is None or image.size == (4, 3)
            assert ("<image>" in prompt) == (image is not None)
        for key, prompt, _ in reversed(jobs):
            yield key, f"A ({prompt[:7]})", "stop"


def test_answer_resumable_in_completion_order(sqa_files, tmp_path):
    from PIL import Image
    qs = sqa.load_questions(sqa_files["questions"])
    with pytest.raises(ValueError, match="question 2 has an image"):
        sqa.answer_items(qs, None, False)
    items = sqa.answer_items(qs, str(tmp_path), True)
    assert items[1]["prompt"].startswith("<image>\nWhat is the capital") and items[1]["prompt"].endswith(
        sqa.SINGLE_PRED_PROMPT)
    out = tmp_path / "answers.jsonl"
    with pytest.raises(FileNotFoundError, match="question 2: image not found"):
        answer_all(_FakeAnswerer(), items, str(out), name="t")
    for q in ("2", "4"):
        os.makedirs(tmp_path / q, exist_ok=True)
        Image.new("RGB", (4, 3)).save(tmp_path / q / "image.png")
    # An interrupted earlier run: one finished answer and a torn last line.
    out.write_text(json.dumps({"question_id": "1", "text": "B"}) + "\n" + '{"question_id": "3", "te')
    fake = _FakeAnswerer()
    assert answer_all(fake, items, str(out), name="t", row={"model_id": "m"}) == 3
    assert fake.keys == [1, 2, 3]  # keys are positions in the question file (the seed offsets)
    rows = [json.loads(line) for line in open(out)]
    assert [r["question_id"] for r in rows] == ["1", "4", "3", "2"]   # written as they end
    assert all(r["prompt"] == items[int(r["question_id"]) - 1]["prompt"] for r in rows[1:])
    assert all(r["text"] == f"A ({r['prompt'][:7]})" and r["model_id"] == "m" for r in rows[1:])
    assert answer_all(fake, items, str(out), name="t") == 0
    qsx = sqa.load_questions(sqa_files["questions"])
    idx, counts = sqa.predicted_indices(qsx, sqa.load_predictions(str(out)))
    assert counts["unparsable"] == 3 and idx["1"] == 1


# ---- answer end to end with a tiny random checkpoint (CPU) ----------------------------------------------

def test_answer_end_to_end_tiny_checkpoint(sqa_files, tiny_checkpoint, tmp_path):
    from PIL import Image
    for q in ("2", "4"):
        os.makedirs(tmp_path / "img" / q)
        Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "img" / q / "image.png")
    out, res = tmp_path / "answers.jsonl", tmp_path / "res.json"
    argv = ["answer", "--questions", sqa_files["questions"], "--images", str(tmp_path / "img"),
            "--model", tiny_checkpoint, "--out", str(out), "--batch-size", "3", "--max-new-tokens", "4"]
    sqa.main(argv)
    rows = [json.loads(line) for line in open(out)]
    assert sorted(r["question_id"] for r in rows) == ["1", "2", "3", "4"]
    assert all(isinstance(r["text"], str) and r["finish_reason"] in ("stop", "length") for r in rows)
    assert all(r["model_id"] == "ckpt" for r in rows)
    sqa.main(argv)  # resumed: nothing left to answer
    assert len(open(out).readlines()) == 4
    sqa.main(["score", "--questions", sqa_files["questions"], "--predictions", str(out), "--json", str(res)])
    assert json.load(open(res))["n"] == 4


@pytest.fixture(scope="module")
def sensitive_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with its matrices scaled ×4: a default-initialized tiny model says nearly the same
    thing whatever it is asked, which would make "the same answers" a weak check."""
    import engine
    from engine.weights import write_hf_checkpoint

    model = engine.load(tiny_checkpoint)
    sd = {k: v * 4 if v.dim() >= 2 else v for k, v in model.state_dict().items()}
    path = str(tmp_path_factory.mktemp("sensitive") / "ckpt")
    write_hf_checkpoint(sd, model.config, path, tokenizer_dir=tiny_checkpoint)
    return path


def test_continuous_batching_answers_equal_batch_size_one(sensitive_checkpoint, tmp_path):
    """Questions of different lengths, with and without an image, through the runtime's continuous batching:
    the same answers as one at a time, and as engine.chat; sampled answers are seeded per question."""
    import argparse

    import torch
    from PIL import Image

    from engine.chat import chat, encode_chat
    from engine.generate import generate
    from llava_evals.common import CheckpointAnswerer

    for i, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        Image.new("RGB", (40, 30), colour).save(tmp_path / f"{i}.png")
    asks = ["Which shape is it?", "Name the colour.", "Is it red or blue?", "How big is the square?",
            "Count the circles."]
    items = [{"question_id": f"q{k}", "prompt": ("<image>\n" if k % 3 == 0 else "") + asks[k % 5] + " Think." * (k % 4),
              "image": str(tmp_path / f"{k % 2}.png") if k % 3 == 0 else None} for k in range(8)]

    def answerer(batch):
        return CheckpointAnswerer(argparse.Namespace(model=sensitive_checkpoint, template="vicuna_v1", batch_size=batch,
                                                     max_new_tokens=8, temperature=0.0, seed=None, device=None,
                                                     dtype=None))

    def run(answerer, tag):
        out = tmp_path / f"{tag}.jsonl"
        assert answer_all(answerer, items, str(out), name="t") == len(items)
        return {r["question_id"]: (r["text"], r["finish_reason"]) for r in map(json.loads, open(out))}

    single, batched = answerer(1), answerer(4)
    # Make some answers end early: EOS wins wherever a token t, said by some answers but not all, would win.
    encoded = [encode_chat(single.tokenizer, single.template, [{"role": "user", "content": it["prompt"]}],
                           [Image.open(it["image"]).convert("RGB")] if it["image"] else [], single.model, single.spec)
               for it in items]

    def greedy_outputs():
        return [generate(single.model, [ids], images=px, image_sizes=sz, max_new_tokens=8,
                         stop_token_ids=list(single.stop_ids))[0]
                for ids, px, sz in encoded]

    answers = [o.tokens for o in greedy_outputs()]
    eos = single.model.config.text.eos_token_id
    for t in sorted({t for a in answers for t in a[1:]} - {eos}):
        if not 0 < sum(t in a[1:] for a in answers) < len(answers) - 1:
            continue
        for a in (single, batched):
            with torch.no_grad():
                head = a.model.decoder.lm_head.weight
                head[eos] = head[t] * 1.001
        if len({o.finish_reason for o in greedy_outputs()}) == 2:
            break
    else:
        pytest.fail("no token turns some answers into early stops")

    rt, step, joins = batched.runtime, batched.runtime.step, []

    def watched_step():  # a question admitted while others are mid-answer: no fixed batch waits on its slowest
        running, waiting = len(rt.running), len(rt.waiting)
        events = step()
        joins.append(running > 0 and len(rt.waiting) < waiting)
        return events

    rt.step = watched_step
    one, many = run(single, "one"), run(batched, "many")
    assert {reason for _, reason in one.values()} == {"stop", "length"} and any(joins)
    assert batched.runtime.peak_batch == 4                   # questions decoded together
    assert sorted(many) == sorted(it["question_id"] for it in items) and many == one
    assert len({text for text, _ in one.values()}) > 3       # the questions get different answers
    assert batched.runtime.cache.free_blocks == batched.runtime.cache.num_blocks - 1   # nothing left held
    for it in items[:4]:   # and the text engine.chat gives for the same message
        images = [Image.open(it["image"]).convert("RGB")] if it["image"] else []
        want = chat(single.model, [{"role": "user", "content": it["prompt"]}], images,
                    tokenizer=single.tokenizer, max_new_tokens=8)
        assert one[it["question_id"]][0] == want.strip()
    for a in (single, batched):   # sampled: question k uses seed + k, whatever runs beside it
        a.temperature, a.seed = 0.8, 3
    sampled_one, sampled_many = run(single, "sampled-one"), run(batched, "sampled-many")
    assert sampled_many == sampled_one and sampled_one != one
