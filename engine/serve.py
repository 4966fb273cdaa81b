"""An OpenAI-compatible HTTP server over the generation runtime (standard library only).

``python -m engine.serve --model DIR [--host 127.0.0.1] [--port 8000]``

Endpoints: ``POST /v1/chat/completions`` (``stream: true`` answers with server-sent events,
``chat.completion.chunk`` objects then ``data: [DONE]``), ``GET /v1/models``, ``GET /health``.
Message content is a string or a list of parts ``{"type": "text", "text"}`` /
``{"type": "image_url", "image_url": {"url"}}`` where the URL is a base64 ``data:`` URL or a
local file (``file://`` or a plain path; under ``--image-root`` when one is set). Nothing is
fetched from the network.

Threads: ``ThreadingHTTPServer`` runs one thread per connection, which validates the request,
tokenizes it and preprocesses its images, then hands it to the one ``Scheduler`` thread. The
scheduler owns the ``Runtime`` and runs continuous batching: requests that arrive while others
decode join the running batch at the next step. Tokens flow back to the connection thread
through a per-request queue, where ``engine.chat.TextDecoder`` turns them into text exactly as
``engine.chat`` does. A request that fails validation gets a 4xx JSON error naming the problem;
nothing a request carries can stop the scheduler or the server.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import dataclasses
import io
import json
import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from engine.chat import DTYPES, TextDecoder, encode_chat, image_spec_for, load_model, load_tokenizer, stop_token_ids
from engine.cli import run_main
from engine.conversation import IMAGE_TOKEN, Template, get_template, stop_strings
from engine.generate import Request, Runtime, RuntimeConfig, SamplingParams, StepEvent
from engine.image import ImageSpec
from engine.model import Llava

log = logging.getLogger("engine.serve")


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str | None = None        # the id in /v1/models (default: the directory name)
    template: str = "vicuna_v1"
    device: str | None = None
    dtype: str | None = None
    max_tokens_limit: int = 2048         # most max_tokens a request may ask for
    default_max_tokens: int = 256
    max_images: int = 4                  # per request
    max_body_bytes: int = 32 << 20
    max_batch: int = 64
    kv_cache_bytes: int | None = None
    image_root: str | None = None        # local image paths must lie under it when set
    prefix_caching: bool = True          # share the K/V of identical prompt prefixes (system prompt, chat turns)

    def __post_init__(self):
        if not 0 < self.default_max_tokens <= self.max_tokens_limit:
            raise ValueError(f"default_max_tokens={self.default_max_tokens} must be in [1, max_tokens_limit="
                             f"{self.max_tokens_limit}]")


class BadRequest(Exception):
    """A client error: HTTP ``status`` with a message naming what was wrong."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------- the scheduler thread


@dataclass(eq=False)
class Ticket:
    """One request's mailbox: the scheduler puts ``(token | None, finish_reason | None, error | None)``."""
    prompt: list[int]
    pixels: torch.Tensor | None
    params: SamplingParams
    events: queue.Queue = dataclasses.field(default_factory=queue.Queue)
    request: Request | None = None


class Scheduler(threading.Thread):
    """Owns the runtime; submits, cancels and steps it from one thread (continuous batching)."""

    def __init__(self, runtime: Runtime):
        super().__init__(name="scheduler", daemon=True)
        self.runtime = runtime
        self.inbox: queue.Queue = queue.Queue()
        self._tickets: dict[int, Ticket] = {}
        self._stop = threading.Event()

    def submit(self, ticket: Ticket) -> Ticket:
        self.inbox.put(("submit", ticket))
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        self.inbox.put(("cancel", ticket))

    def stop(self) -> None:
        self._stop.set()
        self.inbox.put(("wake", None))

    def _handle(self, op: str, ticket: Ticket | None) -> None:
        if op == "submit":
            try:
                ticket.request = self.runtime.submit(ticket.prompt, pixel_values=ticket.pixels,
                                                     params=ticket.params)
            except ValueError as e:
                ticket.events.put((None, None, str(e)))
                return
            self._tickets[id(ticket.request)] = ticket
        elif op == "cancel" and ticket.request is not None and not ticket.request.finished:
            self.runtime.cancel(ticket.request)
            self._tickets.pop(id(ticket.request), None)

    def run(self) -> None:
        rt = self.runtime
        while not self._stop.is_set():
            try:
                # block only when idle; otherwise take whatever arrived and keep stepping
                op = self.inbox.get() if not rt.has_work else self.inbox.get_nowait()
                self._handle(*op)
                continue
            except queue.Empty:
                pass
            try:
                events = rt.step()
            except Exception as e:  # the runtime already isolates failures; this is the last guard
                log.exception("runtime step failed")
                events = []
                for r in list(rt.running) + list(rt.waiting):
                    rt.cancel(r, "error")
                    r.error = f"{type(e).__name__}: {e}"
                    events.append(StepEvent(r, None, "error"))
            for ev in events:
                ticket = self._tickets.get(id(ev.request))
                if ticket is None:
                    continue
                if ev.finish_reason is not None:
                    self._tickets.pop(id(ev.request), None)
                ticket.events.put((ev.token, ev.finish_reason, ev.request.error))


# ----------------------------------------------------------------------------- request parsing


def _load_image(url: str, where: str, image_root: str | None):
    from PIL import Image, UnidentifiedImageError

    if url.startswith("data:"):
        head, _, data = url.partition(",")
        if ";base64" not in head:
            raise BadRequest(f"{where}: only base64 data URLs are supported")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise BadRequest(f"{where}: invalid base64 data ({e})") from None
        source = io.BytesIO(raw)
    elif url.startswith(("http://", "https://")):
        raise BadRequest(f"{where}: remote image URLs are not fetched; send a base64 data URL or a "
                         "local path")
    else:
        path = os.path.realpath(url.removeprefix("file://"))
        if image_root is not None and os.path.commonpath([path, os.path.realpath(image_root)]) != \
                os.path.realpath(image_root):
            raise BadRequest(f"{where}: {url!r} is outside the server's image root", 403)
        if not os.path.isfile(path):
            raise BadRequest(f"{where}: image file {url!r} not found")
        source = path
    try:
        with Image.open(source) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadRequest(f"{where}: cannot read the image ({type(e).__name__}: {e})") from None


def parse_messages(raw, cfg: ServerConfig) -> tuple[list[dict], list]:
    """OpenAI messages → (``engine.chat`` messages with ``<image>`` markers, PIL images in order)."""
    if not isinstance(raw, list) or not raw:
        raise BadRequest("'messages' must be a non-empty array")
    messages, images = [], []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object")
        content = m.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            text = ""
            for j, part in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    text += part["text"]
                elif kind == "image_url":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    if not isinstance(url, str):
                        raise BadRequest(f"{where}: image_url must hold a 'url' string")
                    if len(images) >= cfg.max_images:
                        raise BadRequest(f"{where}: more than {cfg.max_images} images in one request")
                    images.append(_load_image(url, where, cfg.image_root))
                    text += IMAGE_TOKEN
                else:
                    raise BadRequest(f"{where}: expected a text or image_url part")
        else:
            raise BadRequest(f"messages[{i}].content must be a string or an array of parts")
        messages.append({"role": m.get("role"), "content": text})
    return messages, images


def _number(body: dict, key: str, default, kind, lo, hi):
    value = body.get(key, default)
    if value is None:
        value = default
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise BadRequest(f"'{key}' must be an integer")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise BadRequest(f"'{key}' must be a number")
    if not lo <= value <= hi:
        raise BadRequest(f"'{key}'={value} is out of range [{lo}, {hi}]")
    return kind(value)


# ----------------------------------------------------------------------------- the HTTP side


class LlavaServer(ThreadingHTTPServer):
    """The HTTP server plus everything a handler needs (model, tokenizer, template, scheduler)."""
    daemon_threads = True
    request_queue_size = 256   # many clients may connect at once

    def __init__(self, cfg: ServerConfig, model: Llava, tokenizer, template: Template, image_spec: ImageSpec):
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self.template, self.image_spec = template, image_spec
        self.model_name = cfg.model_name or os.path.basename(os.path.normpath(cfg.model))
        self.tokenizer_lock = threading.Lock()  # HF fast tokenizers are not safe to share across threads
        self.stop_ids = tuple(stop_token_ids(tokenizer, model))
        runtime = Runtime(model, RuntimeConfig(max_batch=cfg.max_batch, kv_cache_bytes=cfg.kv_cache_bytes,
                                               prefix_caching=cfg.prefix_caching))
        self.scheduler = Scheduler(runtime)
        super().__init__((cfg.host, cfg.port), Handler)
        self.scheduler.start()

    def server_close(self) -> None:
        self.scheduler.stop()
        super().server_close()


class Handler(BaseHTTPRequestHandler):
    server: LlavaServer
    server_version = "llava-engine"

    def log_message(self, fmt, *args):  # through logging, not stderr prints
        log.info("%s %s", self.address_string(), fmt % args)

    def _json(self, status: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        self._json(status, {"error": {"message": message, "type": kind, "code": status}})

    def do_GET(self):
        if self.path == "/health":
            rt = self.server.scheduler.runtime  # plain int reads: safe beside the scheduler thread
            self._json(200, {"status": "ok", "prompt_tokens": rt.prompt_tokens,
                             "reused_prompt_tokens": rt.reused_tokens})
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model",
                                                         "created": 0, "owned_by": "engine"}]})
        else:
            self._error(404, f"no route GET {self.path}")

    def do_POST(self):
        try:
            if self.path != "/v1/chat/completions":
                raise BadRequest(f"no route POST {self.path}", 404)
            self._completions(self._body())
        except BadRequest as e:
            self._error(e.status, str(e))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away; its request was cancelled
        except Exception as e:  # never let one request take the server down
            log.exception("request failed")
            try:
                self._error(500, f"internal error: {type(e).__name__}: {e}")
            except OSError:
                pass

    def _body(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise BadRequest("a Content-Length header is required", 411)
        limit = self.server.cfg.max_body_bytes
        if int(length) > limit:
            # Read and drop a moderately oversized body before answering: closing the socket with
            # unread data makes the client's send fail (EPIPE/reset) before it can read the 413.
            left = int(length) if int(length) <= 4 * limit else 0
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
            self.close_connection = True
            raise BadRequest(f"request body of {length} bytes exceeds the limit of {limit}", 413)
        raw = self.rfile.read(int(length))
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadRequest(f"the body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    def _completions(self, body: dict) -> None:
        srv, cfg = self.server, self.server.cfg
        if "messages" not in body:
            raise BadRequest("'messages' is required")
        messages, images = parse_messages(body["messages"], cfg)
        # the newer name wins; errors name the field the client actually sent
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _number(body, key, cfg.default_max_tokens, int, 1, cfg.max_tokens_limit)
        _number(body, "n", 1, int, 1, 1)  # only n=1 is supported: other values are out of range
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
            raise BadRequest("'stop' must be a string or an array of at most 4 strings")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise BadRequest("'seed' must be an integer")
        try:
            params = SamplingParams(
                max_new_tokens=max_tokens, temperature=_number(body, "temperature", 0.0, float, 0, 2),
                top_p=_number(body, "top_p", 1.0, float, 1e-9, 1),
                top_k=_number(body, "top_k", 0, int, 0, 1 << 20),
                repetition_penalty=_number(body, "repetition_penalty", 1.0, float, 1e-3, 100),
                stop_token_ids=srv.stop_ids, seed=seed)
            with srv.tokenizer_lock:
                ids, pixels = encode_chat(srv.tokenizer, srv.template, messages, images, srv.model,
                                          srv.image_spec)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        ticket = srv.scheduler.submit(Ticket(prompt=ids, pixels=pixels, params=params))
        decoder = TextDecoder(srv.tokenizer, stop_strings(srv.template) + tuple(stop))
        stream = bool(body.get("stream", False))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        try:
            if stream:
                self._stream(ticket, decoder, rid, created, len(ids))
            else:
                reason, n = self._collect(ticket, decoder)
                self._json(200, {
                    "id": rid, "object": "chat.completion", "created": created, "model": srv.model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": decoder.text},
                                 "finish_reason": reason}],
                    "usage": {"prompt_tokens": len(ids), "completion_tokens": n,
                              "total_tokens": len(ids) + n}})
        finally:
            srv.scheduler.cancel(ticket)  # no-op when finished; frees the slot when the client left early

    def _next(self, ticket: Ticket, decoder: TextDecoder) -> tuple[str, str | None]:
        """(new text, finish reason or None) for the next event; BadRequest/500 on a failed request."""
        token, reason, error = ticket.events.get()
        if error is not None and ticket.request is None:
            raise BadRequest(error)                     # rejected by the runtime's validation
        if reason == "error":
            raise RuntimeError(error)
        if token is not None:
            with self.server.tokenizer_lock:
                delta = decoder.push(token)
            if decoder.stopped:
                self.server.scheduler.cancel(ticket)
                return delta, "stop"
            return delta, None
        with self.server.tokenizer_lock:
            return decoder.finish(), reason

    def _collect(self, ticket: Ticket, decoder: TextDecoder) -> tuple[str, int]:
        while True:
            _, reason = self._next(ticket, decoder)
            if reason is not None:
                return reason, len(decoder.ids)

    def _stream(self, ticket: Ticket, decoder: TextDecoder, rid: str, created: int, n_prompt: int) -> None:
        # the first event decides between an error status and a 200 stream
        first = self._next(ticket, decoder)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()

        def chunk(delta: dict, reason: str | None) -> None:
            obj = {"id": rid, "object": "chat.completion.chunk", "created": created,
                   "model": self.server.model_name,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
            self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            self.wfile.flush()

        chunk({"role": "assistant", "content": ""}, None)
        delta, reason = first
        while True:
            if delta:
                chunk({"content": delta}, None)
            if reason is not None:
                break
            try:
                delta, reason = self._next(ticket, decoder)
            except RuntimeError as e:  # headers are sent: report the failure inside the stream
                self.wfile.write(b"data: " + json.dumps({"error": {"message": str(e)}}).encode() + b"\n\n")
                return
        chunk({}, reason)
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


# ----------------------------------------------------------------------------- entry points


def build_server(cfg: ServerConfig, *, model: Llava | None = None, tokenizer=None) -> LlavaServer:
    """Load the checkpoint (unless given) and bind; call ``serve_forever()`` on the result."""
    if model is None:
        model = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    tokenizer = tokenizer or load_tokenizer(cfg.model)
    spec = image_spec_for(cfg.model, model)
    return LlavaServer(cfg, model, tokenizer, get_template(cfg.template), spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.serve", description="OpenAI-compatible LLaVA server")
    p.add_argument("--model", required=True, help="checkpoint directory (HF llava layout with a tokenizer)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None)
    p.add_argument("--template", default="vicuna_v1")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=tuple(DTYPES))
    p.add_argument("--max-tokens-limit", type=int, default=2048, help="largest max_tokens a request may ask")
    p.add_argument("--default-max-tokens", type=int, default=None,
                   help="max_tokens when a request gives none (default: min(256, --max-tokens-limit))")
    p.add_argument("--max-images", type=int, default=4)
    p.add_argument("--max-body-bytes", type=int, default=32 << 20)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--kv-cache-bytes", type=int, default=None)
    p.add_argument("--image-root", default=None, help="only read local images under this directory")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="recompute every prompt in full (default: share identical prompt prefixes)")
    args = p.parse_args(argv)
    if args.default_max_tokens is None:
        args.default_max_tokens = min(256, args.max_tokens_limit)
    try:
        cfg = ServerConfig(**vars(args))
    except ValueError as e:
        p.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    log.info("config %s", json.dumps(dataclasses.asdict(cfg)))
    server = build_server(cfg)
    log.info("serving %s on http://%s:%d/v1", server.model_name, cfg.host, server.server_address[1])
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    run_main(main)
