"""LLaVA-Bench (COCO, In-the-Wild): answer, review with a judge, summarize (``python -m llava_evals.llava_bench``).

Formats (upstream's)
- questions JSONL: ``{"question_id", "image", "text", "category": "conv"|"detail"|"complex"}``.
- answers JSONL (reference and candidate): ``{"question_id", "text", "answer_id"?}``.
- context JSONL, keyed by ``image``: COCO ``{"image", "captions": [str], "instances": [{"category",
  "bbox"}]}``; In-the-Wild ``{"image", "caption": str}``.
- ``rule.json``: ``{key: {"role", "prompt"}}``; COCO prompts (they describe boxes) are keyed by the
  category, In-the-Wild ones by ``llava_bench_<category>``.
- review JSONL (one line per question and run): ``{"question_id", "category", "content", "tuple":
  [reference score, candidate score]}``; the category may carry upstream's ``llava_bench_`` prefix.

Review: the judge sees the context (captions, then boxes as ``category: [x1, y1, x2, y2]``), the
question, the reference answer as Assistant 1 and the candidate as Assistant 2, and the rule's prompt,
laid out exactly as upstream's ``eval_gpt_review_visual.py`` / ``eval_gpt_review_bench.py``. Its two
scores are read from the first line of the reply (upstream's ``parse_score``); a reply that does not
parse is stored as ``[-1, -1]``.

Summary (upstream's ``summarize_gpt_review.py``): per category and over all questions, the mean
reference and candidate scores (rounded to 3 decimals, as upstream), relative = candidate / reference
× 100 (rounded to 0.1) and absolute = mean × 10; over several runs, the mean ± sample std of those
per-run figures (this is how the published 72.5 / 65.4 come out). One deliberate difference: upstream
averages the ``[-1, -1]`` of failed parses into the means; we leave them out and count them.
"""
from __future__ import annotations

import argparse
import math
import os
from collections import defaultdict

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
)

CATEGORIES = ("conv", "detail", "complex")
JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
FAILED = [-1, -1]


# ---- inputs --------------------------------------------------------------------------------------------

def load_rules(path: str) -> dict[str, dict]:
    rules = read_json(path)
    if not isinstance(rules, dict):
        raise ValueError(f"{path}: expected an object of rules keyed by category")
    for key, r in rules.items():
        if not (isinstance(r, dict) and isinstance(r.get("role"), str) and isinstance(r.get("prompt"), str)):
            raise ValueError(f"{path}: rule {key!r} needs string 'role' and 'prompt'")
    return rules


def load_context(path: str) -> dict[str, dict]:
    """image → {"captions": [str], "boxes": [(category, bbox)] | None}."""
    rows, _ = read_jsonl(path, required=("image",))
    out = {}
    for r in rows:
        if isinstance(r.get("captions"), list):
            caps = r["captions"]
        elif isinstance(r.get("caption"), str):
            caps = [r["caption"]]
        else:
            raise ValueError(f"{path}:{r['_line']}: needs 'captions' (list) or 'caption' (string)")
        boxes = None
        if "instances" in r:
            try:
                boxes = [(inst["category"], inst["bbox"]) for inst in r["instances"]]
            except (KeyError, TypeError):
                raise ValueError(f"{path}:{r['_line']}: each instance needs 'category' and 'bbox'") from None
        out[r["image"]] = {"captions": caps, "boxes": boxes}
    return out


def _by_id(path: str, rows: list[dict]) -> dict[str, dict]:
    out = {}
    for r in rows:
        qid = str(r["question_id"])
        if qid in out:
            raise ValueError(f"{path}:{r['_line']}: duplicate question_id {qid}")
        out[qid] = r
    return out


# ---- review --------------------------------------------------------------------------------------------

def review_content(question: str, ctx: dict, answer1: str, answer2: str, rule: dict) -> str:
    """The judge's user message, byte for byte upstream's layout."""
    cap_str = "\n".join(ctx["captions"])
    if ctx["boxes"] is not None:
        box_str = "\n".join(f"{cat}: {bbox}" for cat, bbox in ctx["boxes"])  # Python list repr, as upstream
        context = f"{cap_str}\n\n{box_str}"
    else:
        context = cap_str
    role = rule["role"]
    return (f"[Context]\n{context}\n\n"
            f"[Question]\n{question}\n\n"
            f"[{role} 1]\n{answer1}\n\n[End of {role} 1]\n\n"
            f"[{role} 2]\n{answer2}\n\n[End of {role} 2]\n\n"
            f"[System]\n{rule['prompt']}\n\n")


def parse_score(review: str) -> list[float]:
    """Upstream's rule: first line, commas as spaces, exactly two space-separated numbers; else [-1, -1]."""
    parts = review.split("\n")[0].replace(",", " ").split(" ")
    if len(parts) != 2:
        return list(FAILED)
    try:
        scores = [float(parts[0]), float(parts[1])]
    except ValueError:
        return list(FAILED)
    return scores if all(math.isfinite(s) for s in scores) else list(FAILED)


def _rule_key(category: str, ctx: dict, prefix: str | None) -> str:
    # Default: boxes in the context → the COCO prompt that explains them; captions only → In-the-Wild's.
    if prefix is None:
        prefix = "" if ctx["boxes"] is not None else "llava_bench_"
    return prefix + category


def review_jobs(args) -> tuple[list[tuple[str, list[dict]]], dict[str, dict], dict]:
    """All (question id, judge messages) of a review run, and the rows' fixed fields per id."""
    questions = _by_id(args.questions, read_jsonl(args.questions, required=("question_id", "image", "text",
                                                                            "category"))[0])
    ref = _by_id(args.reference, read_jsonl(args.reference, required=("question_id", "text"))[0])
    cand_rows, skipped = read_jsonl(args.answers, skip_bad=args.skip_bad, required=("question_id", "text"))
    cand = _by_id(args.answers, cand_rows)
    context, rules = load_context(args.context), load_rules(args.rules)
    for name, answers in (("reference", ref), ("candidate", cand)):
        unknown = [q for q in answers if q not in questions]
        if unknown and not (name == "candidate" and args.skip_unknown):
            raise ValueError(f"{name} answers name question ids not in {args.questions}: "
                             f"{', '.join(unknown[:10])}")
        missing = [q for q in questions if q not in answers]
        if missing:
            raise ValueError(f"{name} answers lack {len(missing)} of {len(questions)} questions: "
                             f"{', '.join(missing[:10])}")
    jobs, fixed = [], {}
    for i, (qid, q) in enumerate(questions.items()):
        if q["image"] not in context:
            raise ValueError(f"question {qid}: image {q['image']} has no entry in {args.context}")
        ctx = context[q["image"]]
        key = _rule_key(q["category"], ctx, args.rule_prefix)
        if key not in rules:
            raise ValueError(f"question {qid}: no rule {key!r} in {args.rules} (has {sorted(rules)})")
        content = review_content(q["text"], ctx, ref[qid]["text"], cand[qid]["text"], rules[key])
        messages = [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": content}]
        jobs.append((qid, messages))
        fixed[qid] = {"id": i + 1, "question_id": q["question_id"], "category": q["category"], "rule": key,
                      "answer1_id": ref[qid].get("answer_id", q["question_id"]),
                      "answer2_id": cand[qid].get("answer_id", q["question_id"])}
    counts = {"unknown_skipped": sum(c not in questions for c in cand), "skipped_lines": len(skipped)}
    return jobs, fixed, counts


def review(args) -> dict:
    from llava_evals.judge import judge_config, run_judge

    cfg = judge_config(args)
    log_config("llava_bench.review", vars(args) | {"judge": cfg.as_dict()})
    jobs, fixed, counts = review_jobs(args)
    done = done_keys(args.out, lambda r: str(r["question_id"]))
    todo = [j for j in jobs if j[0] not in done]

    def row(qid, res):
        return fixed[qid] | {"content": res.text, "tuple": parse_score(res.text),
                             "finish_reason": res.finish_reason}

    with JsonlAppender(args.out) as out:
        usage = run_judge(cfg, todo, out, row, name="llava-bench-review")
    rows, _ = read_jsonl(args.out, required=("question_id", "tuple"))
    failed = sum(r["tuple"] == FAILED for r in rows)
    print(f"reviews: {len(rows)} in {args.out} ({len(todo)} new), failed to parse {failed}; "
          f"judge usage {usage}")
    return counts | {"failed": failed, "usage": usage}


# ---- summarize -----------------------------------------------------------------------------------------

def _category(raw: str) -> str:
    return raw.removeprefix("llava_bench_")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def load_reviews(path: str, *,
                 skip_bad: bool = False) -> tuple[dict[str, tuple[str, list[float]]], list[str]]:
    """question id → (category, [reference, candidate]); a malformed line is a ValueError naming path:line."""
    rows, skipped = read_jsonl(path, skip_bad=skip_bad, required=("question_id", "category", "tuple"))
    out, line_of = {}, {}
    for r in rows:
        where = f"{path}:{r['_line']}"
        t = r["tuple"]
        problem = None
        if not (isinstance(t, list) and len(t) == 2 and all(_is_number(x) for x in t)):
            problem = f"'tuple' must be two numbers, got {t!r}"
        elif not isinstance(r["category"], str):
            problem = f"'category' must be a string, got {r['category']!r}"
        else:
            qid = str(r["question_id"])
            if qid in out:
                problem = f"duplicate question_id {qid} (first on line {line_of[qid]})"
        if problem is not None:
            if not skip_bad:
                raise ValueError(f"{where}: {problem}")
            skipped.append(f"{where}: {problem}")
            continue
        out[qid], line_of[qid] = (_category(r["category"]), [float(x) for x in t]), r["_line"]
    return out, skipped


def summarize_run(reviews: dict[str, tuple[str, list[float]]]) -> dict[str, dict]:
    """Per category and "all": n, failed, mean scores, relative and absolute scores (upstream's rounding)."""
    groups: dict[str, list] = defaultdict(list)
    for cat, t in reviews.values():
        groups[cat].append(t)
        groups["all"].append(t)
    others = sorted(c for c in groups if c not in CATEGORIES and c != "all")
    order = [c for c in CATEGORIES if c in groups] + others
    out = {}
    for cat in order + ["all"]:
        ts = groups[cat]
        ok = [t for t in ts if t != FAILED]
        entry = {"n": len(ts), "failed": len(ts) - len(ok), "reference_mean": None, "candidate_mean": None,
                 "relative": None, "relative_exact": None, "reference_abs": None, "candidate_abs": None}
        if ok:
            ref = sum(t[0] for t in ok) / len(ok)
            cand = sum(t[1] for t in ok) / len(ok)
            ref3, cand3 = round(ref, 3), round(cand, 3)  # upstream rounds the means before dividing
            entry |= {"reference_mean": ref, "candidate_mean": cand,
                      "reference_abs": round(ref3 * 10, 1), "candidate_abs": round(cand3 * 10, 1)}
            if ref3 > 0:
                entry |= {"relative": round(cand3 / ref3 * 100, 1), "relative_exact": cand / ref * 100}
        out[cat] = entry
    return out


def _mean_std(xs: list[float]) -> dict:
    if not xs:
        return {"mean": None, "std": None, "runs": 0}
    m = sum(xs) / len(xs)
    std = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return {"mean": m, "std": std, "runs": len(xs)}


def summarize(paths: list[str], *, skip_bad: bool = False) -> dict:
    """Per-run tables and, per category, mean ± sample std over runs (all of the same questions)."""
    if not paths:
        raise ValueError("summarize needs at least one review file")
    runs, skipped, ids = [], [], None
    for path in paths:
        reviews, bad = load_reviews(path, skip_bad=skip_bad)
        skipped += bad
        if ids is not None and set(reviews) != ids:
            diff = sorted(set(reviews) ^ ids)
            raise ValueError(f"{path} reviews other questions than {paths[0]} "
                             f"(differ: {', '.join(diff[:10])})")
        ids = set(reviews)
        runs.append({"file": path, "categories": summarize_run(reviews)})
    cats = list(runs[0]["categories"])
    overall = {}
    for cat in cats:
        per = [r["categories"][cat] for r in runs]
        overall[cat] = {key: _mean_std([p[key] for p in per if p[key] is not None])
                        for key in ("relative", "reference_abs", "candidate_abs")}
        overall[cat]["failed"] = sum(p["failed"] for p in per)
    return {"runs": runs, "overall": overall, "skipped_lines": skipped, "std": "sample (n-1)"}


def _fmt(x, nd=1):
    return "n/a" if x is None else f"{x:.{nd}f}"


def format_summary(result: dict, label: str = "ours") -> str:
    cats = list(result["overall"])
    lines = ["| run | " + " | ".join(cats) + " | failed parses |", "|---|" + "---:|" * (len(cats) + 1)]
    for r in result["runs"]:
        c = r["categories"]
        lines.append(f"| {os.path.basename(r['file'])} | " + " | ".join(_fmt(c[k]["relative"]) for k in cats)
                     + f" | {c['all']['failed']} |")
    o = result["overall"]
    cells = [f"{_fmt(o[k]['relative']['mean'])} ± {_fmt(o[k]['relative']['std'])}"
             if o[k]["relative"]["mean"] is not None else "n/a" for k in cats]
    lines.append(f"| **{label}** (mean ± std, {len(result['runs'])} runs) | " + " | ".join(cells)
                 + f" | {o['all']['failed']} |")
    return "\n".join(lines)


# ---- answer --------------------------------------------------------------------------------------------

def answer_items(path: str, images_dir: str) -> list[dict]:
    """Prompts as upstream's ``model_vqa``: the image token, a newline, the question."""
    rows, _ = read_jsonl(path, required=("question_id", "image", "text"))
    _by_id(path, rows)
    return [{"question_id": r["question_id"], "prompt": f"<image>\n{r['text']}",
             "image": os.path.join(images_dir, r["image"])} for r in rows]


# ---- CLI -----------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llava_evals.llava_bench", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("answer", help="answer a question file with a checkpoint (continuous batching, resumable)")
    p.add_argument("--questions", required=True)
    p.add_argument("--images", required=True, help="folder holding the questions' images")
    p.add_argument("--out", required=True, help="answers JSONL (appended; ids already there are skipped)")
    add_answer_args(p)
    p.set_defaults(max_new_tokens=1024)

    p = sub.add_parser("review", help="have a judge score reference (Assistant 1) vs candidate (Assistant 2)")
    p.add_argument("--questions", required=True)
    p.add_argument("--context", required=True, help="captions (+ boxes) JSONL keyed by image")
    p.add_argument("--reference", required=True, help="reference answers JSONL (Assistant 1)")
    p.add_argument("--answers", required=True, help="candidate answers JSONL (Assistant 2)")
    p.add_argument("--rules", required=True, help="rule.json")
    p.add_argument("--rule-prefix", default=None,
                   help="rule key = PREFIX+category (default: '' with boxes, else 'llava_bench_')")
    p.add_argument("--out", required=True, help="review JSONL of this run (appended; resumes)")
    p.add_argument("--skip-unknown", action="store_true", help="ignore answers to unknown question ids")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed answer lines")
    from llava_evals.judge import add_judge_args
    add_judge_args(p, temperature=0.2)

    p = sub.add_parser("summarize", help="relative scores per category; mean ± std over review runs")
    p.add_argument("reviews", nargs="+", help="review JSONL files, one per run of the same model")
    p.add_argument("--label", default="ours")
    p.add_argument("--json", default=None, metavar="OUT", help="write the summary as JSON (atomically)")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed review lines")

    args = ap.parse_args(argv)
    if args.cmd == "answer":
        from llava_evals.common import CheckpointAnswerer, check_images
        log_config("llava_bench.answer", vars(args))
        items = answer_items(args.questions, args.images)
        check_images(items)  # before the model loads: a missing image should not cost a load
        model_id = args.model_id or os.path.basename(os.path.normpath(args.model))
        n = answer_all(CheckpointAnswerer(args), items, args.out, name="llava-bench-answer",
                       row={"model_id": model_id, "metadata": {}})
        print(f"answered {n} new questions; {args.out} holds answers for {len(items)}")
    elif args.cmd == "review":
        review(args)
    else:
        log_config("llava_bench.summarize", vars(args))
        result = summarize(args.reviews, skip_bad=args.skip_bad)
        print(format_summary(result, args.label))
        if result["skipped_lines"]:
            skipped = result["skipped_lines"]
            print(f"skipped {len(skipped)} malformed review line(s):", *skipped, sep="\n  ")
        if args.json:
            write_json_atomic(args.json, result | {"label": args.label})
    return 0


if __name__ == "__main__":
    from llava_evals.judge import JudgeFailed
    run_main(main, reported=(JudgeFailed,))
