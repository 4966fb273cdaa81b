"""ScienceQA: convert, answer, score, and ensemble with a text-only judge (``python -m llava_evals.scienceqa``).

Formats
- ScienceQA ``problems.json``: ``{pid: {"question", "choices": [str], "answer": int, "hint": str,
  "image": str | None, "subject", "grade", "lecture", "solution", ...}}``;
  ``pid_splits.json``: ``{split: [pid]}``.
- LLaVA question file (``llava_test_CQM-A.json`` layout): ``[{"id", "image"?: "pid/image.png",
  "conversations": [{"from": "human",
  "value": ["<image>\\n"]["Context: {hint}\\n"]{question}\\nA. ...\\nB. ...},
  {"from": "gpt", "value": target}]}]``; target is the answer letter for test files.
- Predictions, three forms (told apart by content): JSONL ``{"question_id", "text"}`` (our ``answer``
  output); upstream's ``*_output.jsonl`` (one JSON object with ``correct`` / ``incorrect`` lists — we
  re-parse each entry's ``pred`` text and ignore its stored ``parsed_ans``); a JSON object with
  ``results``: ``{pid: choice index}`` (-1 = no answer).

Parsing (upstream ``eval_science_qa.py``): the text is a bare letter A–E; or starts with ``"X. "``; or
contains exactly one match of ``The answer is ([A-Z]).`` (upstream's regex, whose ``.`` is any
character). A letter outside the question's options counts like no answer. Unparsable answers are
wrong and counted.

Table (the paper's): NAT/SOC/LAN (subject) and G1-6/G7-12 (grade) need ``problems.json``; TXT (the
question has a context/hint, i.e. a ``Context:`` line), IMG (has an image), NO (neither) and Average
come from the question file alone.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass

from engine.cli import run_main
from llava_evals.common import (
    JsonlAppender,
    add_answer_args,
    answer_all,
    done_keys,
    log_config,
    read_json,
    read_jsonl,
    write_json_atomic,
    write_jsonl_atomic,
)

LETTERS = ("A", "B", "C", "D", "E")  # upstream's options; a tuple, as "" and "AB" are substrings of "ABCDE"
SINGLE_PRED_PROMPT = "Answer with the option's letter from the given choices directly."
_ANSWER_RE = re.compile(r"The answer is ([A-Z]).")  # upstream's pattern, unescaped "." included
GRADES_LOW = {f"grade{i}" for i in range(1, 7)}
GRADES_HIGH = {f"grade{i}" for i in range(7, 13)}
SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
COLUMNS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Average")
TARGETS = ("letter", "answer-first", "reasoning-first")


# ---- convert: problems.json → LLaVA question file ----------------------------------------------------

def format_question(problem: dict) -> str:
    """The human turn in the CQM-A layout: [<image>] [Context: hint] question, lettered options."""
    choices = problem["choices"]
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"{len(choices)} choices; ScienceQA questions have 2-{len(LETTERS)}")
    parts = []
    if problem.get("image"):
        parts.append("<image>")
    if problem.get("hint"):
        parts.append(f"Context: {problem['hint']}")
    parts.append(problem["question"])
    parts.extend(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return "\n".join(parts)


def format_target(problem: dict, target: str) -> str:
    """The gpt turn: the letter (test files), or the answer with the lecture/solution after or before it."""
    letter = LETTERS[problem["answer"]]
    if target == "letter":
        return letter
    parts = (("LECTURE", "lecture"), ("SOLUTION", "solution"))
    reasoning = "\n".join(f"{tag}: {problem[key].strip()}" for tag, key in parts
                          if (problem.get(key) or "").strip())
    answer = f"The answer is {letter}."
    if target == "answer-first":
        return f"{answer}\n{reasoning}" if reasoning else answer
    if target == "reasoning-first":
        return f"{reasoning}\n{answer}" if reasoning else answer
    raise ValueError(f"unknown target {target!r}; choose from {TARGETS}")


def convert(problems: dict, pids: list[str], *, target: str = "letter",
            images_dir: str | None = None) -> list[dict]:
    """LLaVA-format entries for ``pids`` in order; with ``images_dir``, every image must exist there."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose from {TARGETS}")
    out = []
    for pid in pids:
        if pid not in problems:
            raise ValueError(f"problem {pid} is in the split but not in problems.json")
        p = problems[pid]
        if not isinstance(p.get("answer"), int) or not 0 <= p["answer"] < len(p.get("choices", [])):
            raise ValueError(f"problem {pid}: answer {p.get('answer')!r} is not an index into its choices")
        try:
            human = format_question(p)
        except ValueError as e:
            raise ValueError(f"problem {pid}: {e}") from None
        entry = {"id": pid}
        if p.get("image"):
            entry["image"] = f"{pid}/{p['image']}"
            if images_dir is not None and not os.path.isfile(os.path.join(images_dir, entry["image"])):
                path = os.path.join(images_dir, entry["image"])
                raise FileNotFoundError(f"problem {pid}: image not found: {path}")
        entry["conversations"] = [{"from": "human", "value": human},
                                  {"from": "gpt", "value": format_target(p, target)}]
        out.append(entry)
    return out


# ---- the question file --------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Question:
    qid: str
    text: str               # the human turn, <image> included
    image: str | None       # relative image path
    n_choices: int
    answer: int | None      # index of the right option, when the gpt turn states it
    has_context: bool       # a "Context:" line (ScienceQA hint) precedes the question


def parse_answer(text: str) -> str | None:
    """The letter an answer text gives, by upstream's rules, or None."""
    if text in LETTERS:
        return text
    if len(text) >= 3 and text[0] in LETTERS and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_RE.findall(text)
    return found[0] if len(found) == 1 else None


def choice_index(text: str, n_choices: int) -> int:
    """Option index of an answer text, -1 when it gives none of the question's ``n_choices`` letters."""
    letter = parse_answer(text)
    return LETTERS.index(letter) if letter in LETTERS[:n_choices] else -1


def _count_options(text: str) -> int:
    """How many options "A. …", "B. …", … end the question (an option may continue on further lines)."""
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if line.startswith("A. ")]
    if not starts:
        return 0
    n = 1
    for line in lines[starts[-1] + 1:]:
        if n < len(LETTERS) and line.startswith(f"{LETTERS[n]}. "):
            n += 1
    return n


def load_questions(path: str) -> dict[str, Question]:
    """Read a LLaVA-format ScienceQA file; ValueError names the entry that does not fit the layout."""
    data = read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of questions, got {type(data).__name__}")
    out: dict[str, Question] = {}
    for i, e in enumerate(data):
        where = f"{path}: entry {i} (id {e.get('id') if isinstance(e, dict) else '?'})"
        if not isinstance(e, dict) or "id" not in e or not e.get("conversations"):
            raise ValueError(f"{where}: needs 'id' and 'conversations'")
        qid = str(e["id"])
        if qid in out:
            raise ValueError(f"{where}: duplicate question id {qid}")
        human = e["conversations"][0]["value"]
        n = _count_options(human)
        if n < 2:
            raise ValueError(f"{where}: no lettered options ('A. ...' lines) at the end of the question")
        answer = None
        if len(e["conversations"]) > 1:
            answer = choice_index(e["conversations"][1]["value"], n)
            answer = None if answer < 0 else answer
        body = human.removeprefix("<image>\n")
        out[qid] = Question(qid=qid, text=human, image=e.get("image"), n_choices=n, answer=answer,
                            has_context=body.startswith("Context: "))
    return out


# ---- predictions ---------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Predictions:
    kind: str                       # "text" (answer texts to parse) or "index" (choice indices)
    values: dict[str, str | int]    # question id → text or index
    skipped: tuple[str, ...] = ()   # malformed lines left out (only with skip_bad)


def load_predictions(path: str, *, skip_bad: bool = False) -> Predictions:
    """Read predictions in any of the three forms (module docstring); duplicates and bad lines are errors."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    with open(path, encoding="utf-8") as f:
        content = f.read()
    try:  # one JSON document (results / upstream output object), else JSONL
        whole = json.loads(content)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, dict) and "results" in whole:
        values = {}
        for qid, idx in whole["results"].items():
            if not isinstance(idx, int) or isinstance(idx, bool):
                raise ValueError(f"{path}: results[{qid!r}] = {idx!r} is not a choice index")
            values[str(qid)] = idx
        return Predictions(kind="index", values=values)
    if isinstance(whole, dict) and ("correct" in whole or "incorrect" in whole):
        values = {}
        for part in ("correct", "incorrect"):
            for j, r in enumerate(whole.get(part, [])):
                if not isinstance(r, dict) or "question_id" not in r or not isinstance(r.get("pred"), str):
                    raise ValueError(f"{path}: {part}[{j}] needs 'question_id' and a string 'pred'")
                qid = str(r["question_id"])
                if qid in values:
                    raise ValueError(f"{path}: {part}[{j}]: duplicate question id {qid}")
                values[qid] = r["pred"]
        return Predictions(kind="text", values=values)
    if isinstance(whole, dict) and "question_id" not in whole:
        raise ValueError(f"{path}: a JSON object with neither 'results' nor 'correct'/'incorrect'")
    rows, skipped = read_jsonl(path, skip_bad=skip_bad, required=("question_id", "text"))
    values, where = {}, {}
    for r in rows:
        qid = str(r["question_id"])
        if qid in values:
            raise ValueError(f"{path}:{r['_line']}: duplicate question id {qid} (first on line {where[qid]})")
        if not isinstance(r["text"], str):
            raise ValueError(f"{path}:{r['_line']}: 'text' is not a string")
        values[qid], where[qid] = r["text"], r["_line"]
    return Predictions(kind="text", values=values, skipped=tuple(skipped))


def predicted_indices(questions: dict[str, Question], preds: Predictions, *, allow_missing: bool = False,
                      skip_unknown: bool = False) -> tuple[dict[str, int], dict]:
    """Choice index per question (-1 = unparsable or missing) and the bookkeeping counts.

    Unknown ids (not in the question file) and questions without a prediction are errors naming the
    ids, unless ``skip_unknown`` / ``allow_missing`` turn them into counted skips / counted failures.
    """
    unknown = sorted(set(preds.values) - set(questions), key=_id_order)
    if unknown and not skip_unknown:
        raise ValueError(f"{len(unknown)} prediction(s) for question ids not in the question file: "
                         f"{', '.join(unknown[:10])} (--skip-unknown to ignore them, counted)")
    missing = [q for q in questions if q not in preds.values]
    if missing and not allow_missing:
        raise ValueError(f"predictions lack {len(missing)} of {len(questions)} questions: "
                         f"{', '.join(missing[:10])} (--allow-missing to count them as wrong)")
    out, unparsable = {}, 0
    for qid, q in questions.items():
        if qid not in preds.values:
            out[qid] = -1
            continue
        v = preds.values[qid]
        idx = choice_index(v, q.n_choices) if preds.kind == "text" else (v if 0 <= v < q.n_choices else -1)
        unparsable += idx < 0
        out[qid] = idx
    return out, {"unknown_skipped": len(unknown), "missing": len(missing), "unparsable": unparsable,
                 "skipped_lines": len(preds.skipped)}


def _id_order(qid: str):
    return (0, int(qid), "") if qid.isdigit() else (1, 0, qid)


# ---- score ---------------------------------------------------------------------------------------------

def score(questions: dict[str, Question], indices: dict[str, int], *, problems: dict | None = None) -> dict:
    """Accuracy per column of the paper's table. ``indices``: choice index per question id (-1 = wrong).

    Returns ``{"columns": {col: {"correct", "total", "acc"}}, "n", "correct", "answer_mismatches"}``;
    ``acc`` is a percentage, or None for an empty column. Subject/grade columns only with ``problems``,
    whose ``answer`` is then the truth (as in upstream); otherwise the question file's gpt turn is.
    """
    cols = {c: [0, 0] for c in COLUMNS if problems is not None or c in ("TXT", "IMG", "NO", "Average")}
    mismatches = 0
    for qid, q in questions.items():
        truth = q.answer
        keys = ["Average"]
        if problems is not None:
            if qid not in problems:
                raise ValueError(f"question {qid} is not in problems.json")
            p = problems[qid]
            if p["answer"] != q.answer and q.answer is not None:
                mismatches += 1
            truth = p["answer"]
            if p.get("subject") in SUBJECTS:
                keys.append(SUBJECTS[p["subject"]])
            if p.get("grade") in GRADES_LOW:
                keys.append("G1-6")
            elif p.get("grade") in GRADES_HIGH:
                keys.append("G7-12")
        if truth is None:
            raise ValueError(f"question {qid}: its answer turn gives no option letter (pass --problems)")
        if q.has_context:
            keys.append("TXT")
        if q.image:
            keys.append("IMG")
        if not q.has_context and not q.image:
            keys.append("NO")
        ok = indices[qid] == truth
        for k in keys:
            cols[k][0] += ok
            cols[k][1] += 1
    columns = {c: {"correct": n, "total": t, "acc": (100.0 * n / t if t else None)}
               for c, (n, t) in cols.items()}
    return {"columns": columns, "n": cols["Average"][1], "correct": cols["Average"][0],
            "answer_mismatches": mismatches}


def format_table(result: dict, label: str = "ours") -> str:
    cols = [c for c in COLUMNS if c in result["columns"]]
    accs = [result["columns"][c]["acc"] for c in cols]
    head = "| method | " + " | ".join(cols) + " |"
    rule = "|---|" + "---:|" * len(cols)
    row = f"| {label} | " + " | ".join("n/a" if a is None else f"{a:.2f}" for a in accs) + " |"
    return "\n".join([head, rule, row])


def _score_and_report(args, questions, indices, counts, extra: dict) -> dict:
    problems = read_json(args.problems) if args.problems else None
    result = score(questions, indices, problems=problems) | counts | extra
    print(format_table(result, label=args.label))
    print(f"{result['correct']}/{result['n']} correct; unparsable {counts['unparsable']}, missing "
          f"{counts['missing']}, unknown ids skipped {counts['unknown_skipped']}, bad lines skipped "
          f"{counts['skipped_lines']}" + (f"; answers differing from problems.json "
                                          f"{result['answer_mismatches']}" if problems is not None else ""))
    if args.json:
        write_json_atomic(args.json, result | {"table": {c: v["acc"] for c, v in result["columns"].items()}})
    return result


# ---- ensembling with a text-only judge ---------------------------------------------------------------

JUDGE_SYSTEM = ("You are an expert science teacher answering multiple-choice questions from school exams. "
                "You cannot see images.")
_JUDGE_FORMAT = ('End your reply with one sentence of the form "The answer is X." where X is the letter of '
                 "the correct option.")


def _judge_question(q: Question, caption: str | None) -> str:
    text = q.text.replace("<image>", "").strip()
    if q.image:
        note = f"Image caption: {caption}" if caption else "The question refers to an image you cannot see."
        text = f"{note}\n{text}"
    return text


def judge_answer_messages(q: Question, caption: str | None = None) -> list[dict]:
    """First request: the judge answers alone, or declines when the image is needed."""
    user = (f"{_judge_question(q, caption)}\n\nThink step by step if it helps. {_JUDGE_FORMAT} If the "
            "question "
            'cannot be answered without seeing the image, reply only "I cannot answer."')
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def judge_choose_messages(q: Question, ours: str, judge_first: str, caption: str | None = None) -> list[dict]:
    """Second request (mode ``judge``, on disagreement): the judge decides, given both answers."""
    user = (f"{_judge_question(q, caption)}\n\nTwo answers were proposed and they disagree.\n"
            f"[Answer 1, from a model that saw the image]\n{ours}\n[End of answer 1]\n"
            f"[Answer 2, your own earlier reply without the image]\n{judge_first}\n[End of answer 2]\n\n"
            f"Weigh both and give the final answer. {_JUDGE_FORMAT}")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def ensemble_decide(mode: str, ours: int, judge: int, chosen: int | None = None) -> tuple[int, str]:
    """The ensembled choice index and where it came from; indices are -1 where unparsable.

    complement: the judge's answer where it parses, else ours.
    judge: agreement or a one-sided failure keeps the answer that parses (ours first); on a real
    disagreement the judge's second reply (``chosen``) decides, falling back to ours if it does not parse.
    """
    if mode == "complement":
        return (judge, "judge") if judge >= 0 else (ours, "ours")
    if mode != "judge":
        raise ValueError(f"unknown ensemble mode {mode!r}; choose complement or judge")
    if judge < 0 or judge == ours:
        return ours, "ours"
    if ours < 0:
        return judge, "judge"
    if chosen is None:
        raise ValueError("mode judge: disagreement without the judge's choice")
    return (chosen, "judge-choice") if chosen >= 0 else (ours, "ours")


def ensemble(args) -> dict:
    from llava_evals.judge import judge_config, run_judge

    cfg = judge_config(args)
    questions = load_questions(args.questions)
    preds = load_predictions(args.predictions, skip_bad=args.skip_bad)
    ours, counts = predicted_indices(questions, preds, allow_missing=args.allow_missing,
                                     skip_unknown=args.skip_unknown)
    captions = read_json(args.captions)["captions"] if args.captions else {}
    log_path = args.judge_log or args.out + ".judge.jsonl"
    log_config("scienceqa.ensemble", {"questions": args.questions, "predictions": args.predictions,
                                      "mode": args.mode, "out": args.out, "judge_log": log_path,
                                      "judge": cfg.as_dict()})

    def ours_text(qid):
        v = preds.values.get(qid)
        if isinstance(v, str):
            return v
        return f"The answer is {LETTERS[v]}." if v is not None and v >= 0 else ""

    def row(key, res):
        return {"question_id": key[0], "stage": key[1], "reply": res.text, "finish_reason": res.finish_reason}

    client = cfg.client()  # one client for both stages: its usage counters add up over them
    with JsonlAppender(log_path) as log:
        done = done_keys(log_path, lambda r: (str(r["question_id"]), r["stage"]))
        jobs = [((qid, "answer"), judge_answer_messages(q, captions.get(qid)))
                for qid, q in questions.items() if (qid, "answer") not in done]
        usage = run_judge(cfg, jobs, log, row, name="sqa-judge-answer", client=client)
        replies = _judge_replies(log_path)
        judge_idx = {qid: choice_index(replies[(qid, "answer")], q.n_choices) for qid, q in questions.items()}
        if args.mode == "judge":
            disagree = [qid for qid in questions if ours[qid] >= 0 and judge_idx[qid] >= 0
                        and ours[qid] != judge_idx[qid]]
            jobs = [((qid, "choose"), judge_choose_messages(questions[qid], ours_text(qid),
                                                            replies[(qid, "answer")], captions.get(qid)))
                    for qid in disagree if (qid, "choose") not in replies]
            usage = run_judge(cfg, jobs, log, row, name="sqa-judge-choose", client=client)
            replies = _judge_replies(log_path)
    final, sources, rows = {}, {}, []
    for qid, q in questions.items():
        chosen = replies.get((qid, "choose"))
        chosen_idx = choice_index(chosen, q.n_choices) if chosen is not None else None
        final[qid], sources[qid] = ensemble_decide(args.mode, ours[qid], judge_idx[qid], chosen_idx)
        text = f"The answer is {LETTERS[final[qid]]}." if final[qid] >= 0 else ours_text(qid)
        rows.append({"question_id": qid, "text": text, "source": sources[qid]})
    write_jsonl_atomic(args.out, rows)
    n_disagree = sum(ours[q] >= 0 and judge_idx[q] >= 0 and ours[q] != judge_idx[q] for q in questions)
    stats = {"mode": args.mode, "judge_unparsable": sum(i < 0 for i in judge_idx.values()),
             "disagreements": n_disagree, "from_judge": sum(s != "ours" for s in sources.values()),
             "judge_usage": usage}
    counts = counts | {"unparsable": sum(i < 0 for i in final.values())}
    print(f"ensemble {args.mode}: {stats['from_judge']} answers from the judge, judge unparsable "
          f"{stats['judge_unparsable']}, disagreements {stats['disagreements']}")
    return _score_and_report(args, questions, final, counts, {"ensemble": stats})


def _judge_replies(path: str) -> dict[tuple[str, str], str]:
    rows, _ = read_jsonl(path, required=("question_id", "stage", "reply"))
    return {(str(r["question_id"]), r["stage"]): r["reply"] for r in rows}


# ---- answer --------------------------------------------------------------------------------------------

def answer_items(questions: dict[str, Question], images_dir: str | None,
                 single_pred_prompt: bool) -> list[dict]:
    """Prompts as upstream's ``model_vqa_science``: the human turn with <image> moved to the front."""
    items = []
    for qid, q in questions.items():
        text = q.text.replace("<image>", "").strip()
        if single_pred_prompt:
            text = f"{text}\n{SINGLE_PRED_PROMPT}"
        image = None
        if q.image:
            if images_dir is None:
                raise ValueError(f"question {qid} has an image ({q.image}); pass --images DIR")
            text, image = f"<image>\n{text}", os.path.join(images_dir, q.image)
        items.append({"question_id": qid, "prompt": text, "image": image})
    return items


# ---- CLI -----------------------------------------------------------------------------------------------

def _add_pred_args(p):
    p.add_argument("--questions", required=True, help="LLaVA-format questions (llava_test_CQM-A layout)")
    p.add_argument("--predictions", required=True, help="JSONL {question_id, text}, upstream *_output.jsonl, "
                                                        "or a JSON with results {id: choice index}")
    p.add_argument("--problems", default=None, help="ScienceQA problems.json: adds subject and grade columns")
    p.add_argument("--json", default=None, metavar="OUT", help="write every column as JSON (atomically)")
    p.add_argument("--label", default="ours", help="row name in the printed table")
    p.add_argument("--allow-missing", action="store_true", help="count unanswered questions as wrong")
    p.add_argument("--skip-unknown", action="store_true", help="ignore (and count) unknown question ids")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed prediction lines")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llava_evals.scienceqa", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("convert", help="problems.json + pid_splits.json → LLaVA question file")
    p.add_argument("--problems", required=True)
    p.add_argument("--pid-splits", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--target", choices=TARGETS, default="letter",
                   help="gpt turn: the letter (test), or answer before/after lecture + solution (training)")
    p.add_argument("--images", default=None, help="image root ({pid}/image.png), checked")
    p.add_argument("--out", required=True)

    p = sub.add_parser("answer", help="answer a question file with a checkpoint (continuous batching, resumable)")
    p.add_argument("--questions", required=True)
    p.add_argument("--images", default=None, help="image root the question file's paths are relative to")
    p.add_argument("--out", required=True, help="answers JSONL (appended; ids already there are skipped)")
    p.add_argument("--single-pred-prompt", action="store_true", help="add the LLaVA-1.5 letter instruction")
    add_answer_args(p)

    p = sub.add_parser("score", help="print the paper's table for a prediction file")
    _add_pred_args(p)

    p = sub.add_parser("ensemble", help="combine predictions with a text-only judge, then score")
    _add_pred_args(p)
    p.add_argument("--mode", choices=("complement", "judge"), required=True)
    p.add_argument("--out", required=True, help="ensembled predictions JSONL {question_id, text, source}")
    p.add_argument("--judge-log", default=None, help="judge replies JSONL (default OUT.judge.jsonl)")
    p.add_argument("--captions", default=None, help="captions.json: shown to the judge")
    from llava_evals.judge import add_judge_args
    add_judge_args(p, temperature=0.0)

    args = ap.parse_args(argv)
    if args.cmd == "convert":
        log_config("scienceqa.convert", vars(args))
        problems, splits = read_json(args.problems), read_json(args.pid_splits)
        if args.split not in splits:
            raise ValueError(f"{args.pid_splits}: no split {args.split!r} (has {sorted(splits)})")
        pids = [str(p) for p in splits[args.split]]
        out = convert(problems, pids, target=args.target, images_dir=args.images)
        write_json_atomic(args.out, out)
        print(f"wrote {len(out)} questions ({sum('image' in e for e in out)} with an image) to {args.out}")
    elif args.cmd == "answer":
        from llava_evals.common import CheckpointAnswerer, check_images
        log_config("scienceqa.answer", vars(args))
        items = answer_items(load_questions(args.questions), args.images, args.single_pred_prompt)
        check_images(items)  # before the model loads: a missing image should not cost a load
        model_id = args.model_id or os.path.basename(os.path.normpath(args.model))
        n = answer_all(CheckpointAnswerer(args), items, args.out, name="sqa-answer",
                       row={"model_id": model_id})
        print(f"answered {n} new questions; {args.out} holds answers for {len(items)}")
    elif args.cmd == "score":
        log_config("scienceqa.score", vars(args))
        questions = load_questions(args.questions)
        preds = load_predictions(args.predictions, skip_bad=args.skip_bad)
        indices, counts = predicted_indices(questions, preds, allow_missing=args.allow_missing,
                                            skip_unknown=args.skip_unknown)
        files = {"questions": args.questions, "predictions": args.predictions, "problems": args.problems}
        _score_and_report(args, questions, indices, counts, files)
    else:
        ensemble(args)
    return 0


if __name__ == "__main__":
    from llava_evals.judge import JudgeFailed
    run_main(main, reported=(JudgeFailed,))
