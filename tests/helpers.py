"""Shared test helpers: the tolerance rule and output poisoning (CONVENTIONS.md, habit 6), and a
fake OpenAI-compatible judge server on 127.0.0.1.

Rule: compare against a float64 truth. In float32 the error must be tiny (``fp32_tol``);
in bf16/fp16 the kernel's error may be at most ``factor`` × the error of the reference
implementation run in that same precision, plus a small floor.
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


def rel_err(out: torch.Tensor, truth: torch.Tensor) -> float:
    out, truth = out.detach().double().cpu(), truth.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    denom = truth.norm().item()
    diff = (out - truth).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close_rule(out: torch.Tensor, truth: torch.Tensor, ref_lowp: torch.Tensor | None = None, *,
                      fp32_tol: float = 1e-5, factor: float = 2.0, floor: float = 1e-6,
                      what: str = "") -> None:
    """Assert ``out`` matches ``truth``; for low precision, relative to ``ref_lowp``'s own error."""
    assert out.shape == truth.shape, f"{what}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    err = rel_err(out, truth)
    if ref_lowp is None:
        assert err <= fp32_tol, f"{what}: relative error {err:.3e} > {fp32_tol:.1e}"
        return
    ref_err = rel_err(ref_lowp, truth)
    bound = factor * ref_err + floor
    assert err <= bound, f"{what}: relative error {err:.3e} > {factor}×ref {ref_err:.3e} + {floor:.0e}"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (floating) or a sentinel (integer) so an unwritten element fails a check."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(-(2**30))


class FakeJudge:
    """``POST /v1/chat/completions`` answered by ``reply(messages) -> str | int`` (int: an HTTP error)."""

    def __init__(self, reply):
        self.reply, self.requests = reply, []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.requests.append(body)
                out = judge.reply(body["messages"])
                if isinstance(out, int):
                    self.send_response(out)
                    self.end_headers()
                    return
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": out},
                                                "finish_reason": "stop"}], "usage": {}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
