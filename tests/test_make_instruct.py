"""train.make_instruct / mix_instruct: upstream prompt layout, parsing, faults, resume, no key leaks."""
from __future__ import annotations

import glob
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
from helpers import REPO, SECRET, FakeServer, Reply, assert_no_secret

from train.make_instruct import (
    DEFAULT_PROMPTS,
    DETAIL_INSTRUCTIONS,
    KINDS,
    InstructConfig,
    ParseError,
    Record,
    build_messages,
    format_box,
    load_prompts,
    parse_output,
    read_records,
    render_context,
    run,
)
from train.mix_instruct import PRESETS, mix
from train.shapes import make_shapes_dataset

UPSTREAM_KIND = {"conversation": "conversation", "detail_description": "detail",
                 "complex_reasoning": "complex"}
BOX_LINE = re.compile(r"^(?P<cat>[^:\n]+): \[(?P<v>(?:0|1)\.\d{1,3}(?:, (?:0|1)\.\d{1,3}){3})\]$")


def parse_caps(text: str) -> Record:
    """Test-side inverse of render_context: an upstream NNN_caps.txt → the record it was made from."""
    captions, _, boxes = text.partition("\n\n")
    parsed = []
    for line in boxes.splitlines():
        m = BOX_LINE.match(line)
        assert m, f"box line not in the upstream format: {line!r}"
        parsed.append((m["cat"], tuple(float(v) for v in m["v"].split(", "))))
    return Record(id="x", image=None, captions=tuple(captions.split("\n")), boxes=tuple(parsed))


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


# ---- prompt building --------------------------------------------------------------------------------------

@pytest.mark.parametrize("updir,kind", sorted(UPSTREAM_KIND.items()))
def test_fewshot_caps_round_trip_upstream(upstream_dir, updir, kind):
    """Our rendering of each upstream few-shot example's record is byte-identical to its NNN_caps.txt."""
    files = sorted(glob.glob(os.path.join(upstream_dir, "instruct_prompts", updir, "*_caps.txt")))
    assert files
    for path in files:
        text = read(path)
        record = parse_caps(text)
        assert bool(record.boxes) == (kind != "conversation"), path  # conversation sees captions only
        assert render_context(record, kind) == text, path


@pytest.mark.parametrize("kind", KINDS)
def test_fewshot_caps_round_trip_ours(kind):
    for path in sorted(glob.glob(os.path.join(DEFAULT_PROMPTS, kind, "*_caps.txt"))):
        text = read(path).rstrip("\n")
        record = parse_caps(text)
        assert bool(record.boxes) == (kind != "conversation"), path
        assert render_context(record, kind) == text, path
    prompts = load_prompts(os.path.join(DEFAULT_PROMPTS, kind))
    assert len(prompts.examples) >= 2
    for _, conv in prompts.examples:  # our own few-shot answers must pass our own parser
        parse_output(conv, kind, random.Random(0))


@pytest.mark.parametrize("updir,kind", sorted(UPSTREAM_KIND.items()))
def test_messages_for_caps_boxes_record_upstream_layout(upstream_dir, updir, kind):
    prompt_dir = os.path.join(upstream_dir, "instruct_prompts", updir)
    records = read_records(os.path.join(upstream_dir, "llava_bench_coco", "caps_boxes_coco2014_val_80.jsonl"))
    with open(os.path.join(upstream_dir, "llava_bench_coco", "caps_boxes_coco2014_val_80.jsonl")) as f:
        raw = json.loads(f.readline())
    record = records[0]
    messages = build_messages(load_prompts(prompt_dir), record, kind)

    stems = sorted(os.path.basename(p)[:3] for p in glob.glob(os.path.join(prompt_dir, "*_caps.txt")))
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * len(stems) + ["user"]
    assert messages[0]["content"] == read(os.path.join(prompt_dir, "system_message.txt"))
    for i, stem in enumerate(stems):  # few-shot pairs in file order, verbatim
        assert messages[1 + 2 * i]["content"] == read(os.path.join(prompt_dir, f"{stem}_caps.txt"))
        assert messages[2 + 2 * i]["content"] == read(os.path.join(prompt_dir, f"{stem}_conv.txt"))

    query = messages[-1]["content"]
    captions, sep, boxes = query.partition("\n\n")
    assert captions.split("\n") == raw["captions"]
    if kind == "conversation":
        assert sep == "" and boxes == ""
        return
    lines = boxes.split("\n")
    assert len(lines) == len(raw["instances"])
    for line, inst in zip(lines, raw["instances"], strict=True):
        m = BOX_LINE.match(line)
        assert m and m["cat"] == inst["category"], line
        assert [float(v) for v in m["v"].split(", ")] == [round(v, 3) for v in inst["bbox"]]
        assert line == f"{inst['category']}: [{', '.join(str(round(v, 3)) for v in inst['bbox'])}]"
    # And the query has exactly the shape of the few-shot caps files (same parser accepts it).
    assert render_context(parse_caps(query), kind) == query


def test_pixel_boxes_are_normalized_and_rounded(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"id": 7, "image": "a.png", "width": 64, "height": 48,
                                "captions": ["c1", "c2"],
                                "boxes": [{"category": "red circle", "bbox": [16, 0, 64, 48]},
                                          {"category": "blue square", "bbox": [1, 16, 3, 32]}]}) + "\n")
    (record,) = read_records(str(path))
    assert record.id == "7"
    assert render_context(record, "detail") == ("c1\nc2\n\nred circle: [0.25, 0.0, 1.0, 1.0]\n"
                                                "blue square: [0.016, 0.333, 0.047, 0.667]")
    assert render_context(record, "conversation") == "c1\nc2"
    assert format_box("x", [-1e-9, 0.0005, 0.9996, 1.0]) == "x: [0.0, 0.001, 1.0, 1.0]"


@pytest.mark.parametrize("line,match", [
    ({"id": "a", "captions": ["c"], "boxes": []}, "width"),
    ({"id": "a", "captions": [], "instances": []}, "captions"),
    ({"id": "a", "captions": ["c"], "instances": [], "boxes": []}, "exactly one"),
    ({"id": "a", "captions": ["c"], "instances": [{"category": "x", "bbox": [0.5, 0.1, 0.2, 0.3]}]},
     "x2 < x1"),
    ({"captions": ["c"], "instances": []}, "'id'"),
])
def test_bad_input_names_file_line_and_id(tmp_path, line, match):
    path = tmp_path / "in.jsonl"
    good = json.dumps({"id": "ok", "captions": ["c"], "instances": []})
    path.write_text(good + "\n" + json.dumps(line) + "\n")
    with pytest.raises(ValueError, match=match) as e:
        read_records(str(path))
    assert f"{path}:2" in str(e.value)


def test_duplicate_ids_and_missing_file(tmp_path):
    path = tmp_path / "in.jsonl"
    rec = json.dumps({"id": "a", "captions": ["c"], "instances": []})
    path.write_text(rec + "\n" + rec + "\n")
    with pytest.raises(ValueError, match="duplicate id 'a'"):
        read_records(str(path))
    with pytest.raises(FileNotFoundError):
        read_records(str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match="system_message"):
        load_prompts(str(tmp_path))


# ---- parsing ----------------------------------------------------------------------------------------------

def test_parse_conversation_multi_turn():
    text = ("Question:\nWhat color?\n===\nAnswer:\nRed.\n\nReally red.\n===\n"
            "Question: How many?\n  ===  \nAnswer:\nTwo.")
    assert parse_output(text, "conversation", random.Random(0)) == [
        {"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "Red.\n\nReally red."},
        {"from": "human", "value": "How many?"}, {"from": "gpt", "value": "Two."}]


@pytest.mark.parametrize("kind,text,why", [
    ("conversation", "", "empty"),
    ("conversation", "Sure! Here is a conversation about the image.", "expected 'Question:'"),
    ("conversation", "Question:\nA?\n===\nAnswer:\nB.\n===\nQuestion:\nC?", "has no answer"),
    ("conversation", "Question:\nA?\n===\nQuestion:\nB?", "expected 'Answer:'"),
    ("conversation", "Question:\n\n===\nAnswer:\nB.", "empty question"),
    ("complex", "Question:\nA?\n===\nAnswer:\nB.\n===\nQuestion:\nC?\n===\nAnswer:\nD.", "exactly one"),
    ("detail", "   \n", "empty"),
    ("detail", "Question:\nA?\n===\nAnswer:\nB.", "Question/Answer form"),
])
def test_parse_rejects_malformed(kind, text, why):
    with pytest.raises(ParseError, match=re.escape(why)):
        parse_output(text, kind, random.Random(0))


def test_detail_instruction_is_sampled_from_the_list_with_the_rng():
    picked = {parse_output("A scene.", "detail", random.Random(s))[0]["value"] for s in range(50)}
    assert len(picked) > 3
    assert all(p.startswith("<image>\n") and p[len("<image>\n"):] in DETAIL_INSTRUCTIONS for p in picked)


# ---- offline teacher on the shapes dataset ---------------------------------------------------------------

def assert_valid_llava(samples: list[dict], image_folder: str):
    assert samples and len({s["id"] for s in samples}) == len(samples)
    for s in samples:
        assert set(s) == {"id", "image", "kind", "conversations"}
        assert os.path.isfile(os.path.join(image_folder, s["image"]))
        turns = s["conversations"]
        assert len(turns) >= 2 and len(turns) % 2 == 0
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert all(isinstance(t["value"], str) and t["value"].strip() for t in turns)
        assert turns[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in turns) == 1


def test_offline_generator_writes_valid_llava_data_deterministically(tmp_path):
    paths = make_shapes_dataset(str(tmp_path / "shapes"), num_train=12, num_test=2, image_size=32, seed=1)
    for kind in KINDS:
        outs = []
        for name, seed in (("a", 0), ("b", 0), ("c", 5)):
            out = str(tmp_path / f"{kind}_{name}.json")
            config = InstructConfig(input=paths.captions, kind=kind, output=out, offline=True, seed=seed)
            summary = run(config)
            assert summary["samples"] == 12 and summary["new_rejected"] == 0
            assert read(out + ".rejects.jsonl") == ""
            outs.append(read(out))
        assert outs[0] == outs[1]  # same seed → same bytes
        assert outs[0] != outs[2]  # the seed matters
        samples = json.loads(outs[0])
        assert_valid_llava(samples, paths.root)
        assert [s["id"] for s in samples] == [f"shapes-train-{i:06d}" for i in range(12)]
        assert all(s["kind"] == kind for s in samples)
        if kind == "conversation":
            assert all(len(s["conversations"]) >= 4 for s in samples)  # multi-turn
        else:
            assert all(len(s["conversations"]) == 2 for s in samples)


def test_existing_files_need_resume_and_config_is_checked(tmp_path):
    paths = make_shapes_dataset(str(tmp_path / "shapes"), num_train=2, num_test=0, image_size=16, seed=0)
    out = str(tmp_path / "o.json")
    run(InstructConfig(input=paths.captions, kind="detail", output=out, offline=True))
    with pytest.raises(ValueError, match="--resume"):
        run(InstructConfig(input=paths.captions, kind="detail", output=out, offline=True))
    with pytest.raises(ValueError, match="either --offline"):
        InstructConfig(input="i", kind="detail", output="o")
    with pytest.raises(ValueError, match="either --offline"):
        InstructConfig(input="i", kind="detail", output="o", offline=True, teacher_url="http://x")
    with pytest.raises(ValueError, match="--kind"):
        InstructConfig(input="i", kind="details", output="o", offline=True)


# ---- a scripted teacher over HTTP -------------------------------------------------------------------------

def write_records(path, n: int) -> list[str]:
    ids = [f"r{i:02d}" for i in range(n)]
    with open(path, "w") as f:
        for rid in ids:
            f.write(json.dumps({"id": rid, "image": f"{rid}.jpg",
                                "captions": [f"Picture {rid}.", "Another line."],
                                "instances": [{"category": "dog", "bbox": [0.1, 0.2, 0.3, 0.4]}]}) + "\n")
    return ids


def teacher_text(rid: str) -> str:
    return (f"Question:\nWhat is in picture {rid}?\n===\nAnswer:\nA dog, in picture {rid}.\n===\n"
            f"Question:\nWhere is the dog?\n===\nAnswer:\nNear the top left of picture {rid}.")


def record_id(request: dict) -> str:
    return re.search(r"Picture (r\d\d)\.", request["messages"][-1]["content"]).group(1)


FAULTS = {  # id → (reply for try n), and where it must end up
    "r02": (lambda n: Reply(status=429, headers={"Retry-After": "0"}) if n < 2 else None, "output"),
    "r03": (lambda n: Reply(status=500) if n < 1 else None, "output"),
    "r04": (lambda n: Reply(status=500), "rejects"),
    "r05": (lambda n: Reply(body=b'{"choices": [{"mess'), "rejects"),
    "r06": (lambda n: Reply(truncate=True) if n < 1 else None, "output"),
    "r07": (lambda n: Reply(delay=1.5) if n < 1 else None, "output"),
    "r08": (lambda n: Reply(text="I am sorry, I cannot help with that."), "rejects"),
    "r09": (lambda n: Reply(status=401), "rejects"),
    "r10": (lambda n: Reply(body={"choices": []}) if n < 1 else None, "output"),
    "r11": (lambda n: Reply(text="Question:\nWhat is", finish_reason="length"), "rejects"),
}


def faulty_teacher(request, headers, n):
    rid = record_id(request)
    if headers.get("Authorization") != f"Bearer {SECRET}":
        return Reply(status=401, body=b"wrong key")
    if rid in FAULTS:
        reply = FAULTS[rid][0](n)
        if reply is not None:
            if reply.status == 401:  # a server that echoes the credentials it got
                reply.body = f"bad token {headers['Authorization']}".encode()
            return reply
    return Reply(text=teacher_text(rid))


def test_fault_handling_every_id_ends_in_output_or_rejects(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    ids = write_records(tmp_path / "in.jsonl", 14)
    out = str(tmp_path / "out.json")
    with FakeServer(faulty_teacher) as srv:
        summary = run(InstructConfig(input=str(tmp_path / "in.jsonl"), kind="conversation", output=out,
                                     teacher_url=srv.url, teacher_model="fake", concurrency=4, timeout=0.5,
                                     max_retries=2, malformed_retries=1))
    samples = json.loads(read(out))
    rejects = [json.loads(line) for line in read(out + ".rejects.jsonl").splitlines()]
    want_out = [i for i in ids if FAULTS.get(i, (None, "output"))[1] == "output"]
    assert [s["id"] for s in samples] == want_out  # input order, whatever the completion order
    assert sorted(r["id"] for r in rejects) == sorted(set(ids) - set(want_out))
    reasons = {r["id"]: r["reason"] for r in rejects}
    assert reasons["r04"].startswith("teacher error: gave up after 3 attempts: HTTP 500")
    assert reasons["r05"].startswith("teacher error: malformed response")
    assert reasons["r08"].startswith("parse: block 1: expected 'Question:'")
    assert reasons["r09"].startswith("teacher error: HTTP 401")
    assert reasons["r11"].startswith("truncated output")
    per_id = {}
    for request in srv.requests:
        per_id[record_id(request)] = per_id.get(record_id(request), 0) + 1
    assert per_id["r09"] == 1 and per_id["r04"] == 3 and per_id["r05"] == 2 and per_id["r02"] == 3
    s = samples[0]
    assert s["conversations"][0]["value"] == "<image>\nWhat is in picture r00?" and s["image"] == "r00.jpg"
    assert summary["new_accepted"] == len(want_out) and summary["teacher_usage"]["failures"] == 3
    assert_no_secret(capsys.readouterr(), tmp_path)


def slow_teacher(request, headers, n):
    rid = record_id(request)
    if headers.get("Authorization") != f"Bearer {SECRET}":
        return Reply(status=401)
    if int(rid[1:]) % 7 == 3:  # deterministic parse failures: rejects must resume too
        return Reply(text="no structure here", delay=0.08)
    return Reply(text=teacher_text(rid), delay=0.08)


def count_lines(path: str) -> int:
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        return f.read().count(b"\n")


def test_killed_run_resumes_to_the_same_file(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    n = 30
    write_records(tmp_path / "in.jsonl", n)
    ref, out = str(tmp_path / "ref.json"), str(tmp_path / "out.json")

    with FakeServer(slow_teacher) as srv:  # uninterrupted reference run (same code, in process)
        run(InstructConfig(input=str(tmp_path / "in.jsonl"), kind="conversation", output=ref,
                           teacher_url=srv.url, teacher_model="fake", concurrency=2, seed=3))

    def cli(url, *extra):
        cmd = [sys.executable, "-m", "train.make_instruct", "--input", str(tmp_path / "in.jsonl"),
               "--kind", "conversation", "--output", out, "--teacher-url", url, "--teacher-model", "fake",
               "--concurrency", "2", "--seed", "3", *extra]
        return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OPENAI_API_KEY": SECRET})

    with FakeServer(slow_teacher) as srv:
        proc = cli(srv.url)
        deadline = time.monotonic() + 90
        while count_lines(out + ".samples.jsonl") + count_lines(out + ".rejects.jsonl") < 8:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never got going"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        stdout1, stderr1 = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(out), "killed too late: the run had finished"
    with open(out + ".samples.jsonl", "a") as f:
        f.write('{"id": "r2')  # a line torn by the kill: must be cut off, its id redone
    done = count_lines(out + ".samples.jsonl") + count_lines(out + ".rejects.jsonl")
    assert done < n

    with FakeServer(slow_teacher) as srv:
        proc = cli(srv.url, "--resume")
        stdout2, stderr2 = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr2
    assert len(srv.requests) == n - done  # nothing done before was asked again
    assert read(out) == read(ref)
    rejects = sorted(json.loads(x)["id"] for x in read(out + ".rejects.jsonl").splitlines())
    assert rejects == sorted(json.loads(x)["id"] for x in read(ref + ".rejects.jsonl").splitlines())
    assert rejects == [f"r{i:02d}" for i in range(n) if i % 7 == 3]
    assert_no_secret([stdout1, stderr1, stdout2, stderr2], tmp_path)


# ---- mixing -----------------------------------------------------------------------------------------------

def test_mix_presets_are_seeded_proportions():
    data = {k: [{"id": f"{k}{i}", "conversations": []} for i in range(200)] for k in KINDS}
    m = mix(data, PRESETS["conv_5d_10c"], seed=1)
    per = {k: sum(s["kind"] == k for s in m) for k in KINDS}
    assert per == {"conversation": 200, "detail": 10, "complex": 20}
    assert m == mix(data, PRESETS["conv_5d_10c"], seed=1)
    assert m != mix(data, PRESETS["conv_5d_10c"], seed=2)
    assert len(mix(data, PRESETS["full"])) == 600
    assert {s["kind"] for s in mix(data, PRESETS["detail_complex"])} == {"detail", "complex"}
    assert {s["kind"] for s in mix(data, PRESETS["conversation"])} == {"conversation"}
    with pytest.raises(ValueError, match="no complex dataset"):
        mix({"detail": data["detail"]}, {"detail": 1.0, "complex": 0.5})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mix(data, {"detail": 1.5})


def test_mix_cli(tmp_path):
    files = {}
    for k in KINDS:
        files[k] = tmp_path / f"{k}.json"
        files[k].write_text(json.dumps([{"id": f"{k}{i}", "conversations": []} for i in range(20)]))
    out = tmp_path / "mix.json"
    from train.mix_instruct import main
    summary = main(["--conversation", str(files["conversation"]), "--detail", str(files["detail"]),
                    "--complex", str(files["complex"]), "--output", str(out),
                    "--fractions", "conversation=0.5,detail=0.25"])
    assert summary["per_kind"] == {"conversation": 10, "detail": 5, "complex": 0}
    assert len(json.loads(out.read_text())) == 15
