"""Load test of ``engine.serve``: the FastAPI + uvicorn server against the standard-library server it
replaced, on the same tiny checkpoint, with the same load, in one run.

``python bench/serve_load.py [--old-rev REV] [--clients 64] [--requests 4] [--max-tokens 64]``

The old server is not kept in the tree: its ``engine/serve.py`` is read from git history
(``--old-rev``, default the last commit before the rewrite) into a temporary file and run from
the repository root, so it imports today's runtime. Each server runs in its own subprocess
(``--max-batch`` slots); both are up for the whole run and the phases alternate between them,
``--repeats`` times (the median run by tokens/s is shown; every run is in the JSON), so that a
busy neighbour on a shared machine weighs on both alike. The load generator is plain asyncio
sockets (no client library on either side's critical path).

Load, two phases per server: ``clean``: ``--clients`` concurrent clients, each sending
``--requests`` streaming chat requests one after another (greedy, ``--max-tokens``, prompts from a
fixed pool); ``mixed``: the same plus ``--leavers`` clients that disconnect after their first token
and ``--bad`` clients sending malformed JSON, bad base64 and oversize images (each should get a
4xx). Reported per phase, over the good streams: TTFT p50/p99 (from the
request's first byte sent to the first ``data:`` event; both servers send the first event only
once the first token exists), completion tokens/s over the whole run (tokens per prompt from
``usage`` of one non-streamed request each, over the good clients' span; greedy answers are
identical between the servers, which the run checks), the number of bad requests answered 4xx, and the new server's
``/health`` at the end (every KV block free). Printed as a table and saved as JSON in
``$BENCH_OUT/serve_load.json`` (default ``bench/results/local``).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from common import OUT_DIR, environment  # noqa: E402

OLD_REV = "6591fad"  # the last commit with the ThreadingHTTPServer engine/serve.py
PROMPTS = [f"Question {i}: describe shape number {i} and its colour." + " Be precise." * (i % 4) for i in range(16)]


def tiny_checkpoint(root: str) -> str:
    import torch

    import engine
    from engine.chat import load_tokenizer
    from engine.tokenizer import build_tiny_tokenizer

    tok_dir = build_tiny_tokenizer(os.path.join(root, "tok"))
    tok = load_tokenizer(tok_dir)
    cfg = engine.tiny_config(vocab_size=len(tok), image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    path = os.path.join(root, "ckpt")
    engine.export_hf(engine.Llava(cfg), path, tokenizer_dir=tok_dir)
    return path


def start(cmd: list[str], log_path: str) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log_path, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while True:
        text = open(log_path, errors="replace").read()
        m = re.search(r"serving \S+ on http://127\.0\.0\.1:(\d+)/v1", text)
        if m:
            return proc, int(m.group(1))
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{cmd} did not start:\n{text[-3000:]}")
        time.sleep(0.1)


async def post(port: int, body: bytes, *, leave_early: bool = False) -> tuple[int, float | None, bytes]:
    """(status, seconds to the first data event or None, body) of one POST over a raw socket."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.perf_counter()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    while (await reader.readline()).strip():
        pass
    data, ttft = b"", None
    while chunk := await reader.read(1 << 16):
        data += chunk
        if ttft is None and b"data: " in data:
            ttft = time.perf_counter() - t0
            if leave_early:
                break
    writer.close()
    return status, ttft, data


def stream_text(data: bytes) -> str:
    events = re.findall(rb"data: (\{.*?\}|\[DONE\])\n", data)
    if not events or events[-1] != b"[DONE]":
        raise RuntimeError(f"a stream did not end with [DONE]: {data[-300:]!r}")
    return "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])


def png_data_url(size: int) -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def load(port: int, args, *, mixed: bool) -> dict:
    def body(prompt, **kw):
        return json.dumps({"model": "ckpt", "messages": [{"role": "user", "content": prompt}],
                           "max_tokens": args.max_tokens, "temperature": 0, **kw}).encode()

    big = png_data_url(5000)   # 25 M pixels: over the new server's 16.8 M limit; the old one decodes it
    bad = [b'{"messages": [', body([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]),
           body([{"type": "image_url", "image_url": {"url": big}}, {"type": "text", "text": "What?"}])]
    ttfts, texts, statuses = [], [], []

    done = []

    async def client(c):
        for r in range(args.requests):
            prompt = PROMPTS[(c * args.requests + r) % len(PROMPTS)]
            status, ttft, data = await post(port, body(prompt, stream=True))
            if status != 200:
                raise RuntimeError(f"a good request got HTTP {status}: {data[:300]!r}")
            ttfts.append(ttft)
            texts.append((prompt, stream_text(data)))
        done.append(time.perf_counter())

    async def leaver(c):
        for _ in range(args.requests):
            await post(port, body(PROMPTS[c % len(PROMPTS)], stream=True), leave_early=True)

    async def bad_client(c):
        for r in range(args.requests):
            statuses.append((await post(port, bad[(c + r) % len(bad)]))[0])

    t0 = time.perf_counter()
    await asyncio.gather(*[client(c) for c in range(args.clients)],
                         *[leaver(c) for c in range(args.leavers if mixed else 0)],
                         *[bad_client(c) for c in range(args.bad if mixed else 0)])
    # the good clients' span: a slow bad request answered after them does not count as their time
    return {"wall_s": max(done) - t0, "ttfts": ttfts, "texts": texts, "bad_statuses": statuses}


def get(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
        return json.loads(r.read())


def usage_tokens(port: int, prompt: str, max_tokens: int) -> tuple[str, int]:
    body = json.dumps({"model": "ckpt", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                       "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        out = json.loads(r.read())
    return out["choices"][0]["message"]["content"], out["usage"]["completion_tokens"]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old-rev", default=OLD_REV, help="git revision holding the old engine/serve.py")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=4, help="streaming requests per client, one after another")
    p.add_argument("--leavers", type=int, default=8, help="extra clients that disconnect after the first token")
    p.add_argument("--bad", type=int, default=6, help="extra clients sending malformed requests")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="runs of each phase per server (the median is shown)")
    args = p.parse_args(argv)
    print(json.dumps({"run": "serve_load", "config": vars(args)}), file=sys.stderr)

    results, answers = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = tiny_checkpoint(tmp)
        old_file = os.path.join(tmp, "old_serve.py")
        with open(old_file, "w") as f:
            f.write(subprocess.run(["git", "show", f"{args.old_rev}:engine/serve.py"], cwd=REPO, check=True,
                                   capture_output=True, text=True).stdout)
        common = ["--model", ckpt, "--port", "0", "--max-batch", str(args.max_batch), "--max-tokens-limit",
                  str(max(args.max_tokens, 64))]
        servers = {"old (http.server)": [sys.executable, old_file, *common],
                   "new (fastapi+uvicorn)": [sys.executable, "-m", "engine.serve", *common]}
        procs = {}
        try:
            for k, (name, cmd) in enumerate(servers.items()):   # both up; only one is loaded at a time
                procs[name] = start(cmd, os.path.join(tmp, f"{k}.log"))
            tokens = {}
            for name, (_, port) in procs.items():  # warm-up, and each prompt's answer and token count
                tokens[name] = {q: usage_tokens(port, q, args.max_tokens) for q in PROMPTS}
            runs = {name: {"clean": [], "mixed": []} for name in servers}
            for _ in range(args.repeats):   # interleaved: a noisy neighbour hits both servers alike
                for phase in ("clean", "mixed"):
                    for name, (_, port) in procs.items():
                        runs[name][phase].append(asyncio.run(load(port, args, mixed=phase == "mixed")))
            health = {name: get(port, "/health") for name, (_, port) in procs.items()}
        finally:
            for proc, _ in procs.values():
                proc.terminate()
                proc.wait(timeout=30)
    for name in servers:
        answers[name] = {q: t for q, (t, _) in tokens[name].items()}
        results[name] = {}
        for phase, reps in runs[name].items():
            rows = []
            for run in reps:
                wrong = [q for q, text in run["texts"] if text != tokens[name][q][0]]
                if wrong:
                    raise RuntimeError(f"{name}: {len(wrong)} streamed answers differ from the non-streamed ones")
                n_tokens = sum(tokens[name][q][1] for q, _ in run["texts"])
                rows.append({
                    "requests": len(run["texts"]), "completion_tokens": n_tokens, "wall_s": round(run["wall_s"], 3),
                    "ttft_p50_ms": round(1e3 * percentile(run["ttfts"], 50), 1),
                    "ttft_p99_ms": round(1e3 * percentile(run["ttfts"], 99), 1),
                    "tokens_per_s": round(n_tokens / run["wall_s"], 1),
                    "bad_requests": len(run["bad_statuses"]),
                    "bad_answered_4xx": sum(400 <= s < 500 for s in run["bad_statuses"])})
            median = sorted(rows, key=lambda r: r["tokens_per_s"])[len(rows) // 2]   # the median run by tokens/s
            results[name][phase] = median | {"runs": rows}
        results[name]["health_after"] = health[name]
    same = len({json.dumps(a, sort_keys=True) for a in answers.values()}) == 1
    old, new = results.values()
    print(f"{'server':24} {'load':6} {'requests':>8} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} {'tok/s':>8} "
          f"{'bad→4xx':>8}")
    for name, r in results.items():
        for phase in ("clean", "mixed"):
            x = r[phase]
            print(f"{name:24} {phase:6} {x['requests']:>8} {x['ttft_p50_ms']:>12} {x['ttft_p99_ms']:>12} "
                  f"{x['tokens_per_s']:>8} {x['bad_answered_4xx']:>4}/{x['bad_requests']}")
    for phase in ("clean", "mixed"):
        print(f"{phase}: new/old tokens/s {new[phase]['tokens_per_s'] / old[phase]['tokens_per_s']:.2f}x, "
              f"TTFT p50 new/old {new[phase]['ttft_p50_ms'] / old[phase]['ttft_p50_ms']:.2f}x")
    print(f"identical greedy answers: {same}; new /health after: {new['health_after'].get('kv_blocks_free')}/"
          f"{new['health_after'].get('kv_blocks_total')} KV blocks free, {new['health_after'].get('running')} running")
    doc = {"suite": "serve_load", "config": vars(args), "environment": environment(), "results": results,
           "identical_answers": same}
    os.makedirs(OUT_DIR, exist_ok=True)
    path = os.path.join(OUT_DIR, "serve_load.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
