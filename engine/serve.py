"""An OpenAI-compatible HTTP server over the generation runtime (FastAPI + uvicorn).

``python -m engine.serve --model DIR [--adapter LORA_DIR | --quantize int8] [--host 127.0.0.1] [--port 8000]
[--api-key KEY]``

Endpoints: ``POST /v1/chat/completions`` (``stream: true`` answers with server-sent events,
``chat.completion.chunk`` objects then ``data: [DONE]``), ``GET /v1/models``, ``GET /health``
(also the KV-cache block counts: a quiet server has every block free). Message content is a
string or a list of parts ``{"type": "text", "text"}`` / ``{"type": "image_url", "image_url":
{"url"}}`` where the URL is a base64 ``data:`` URL or a local file (``file://`` or a plain path;
under ``--image-root`` when one is set); a message may hold several images (up to ``--max-images`` per
request), each where its part is. Token budget: each image takes its own number of prompt tokens
(``LlavaConfig.image_rows`` of its size: with AnyRes, from the grid pinpoints); a request whose image,
images or prompt cannot fit the context (``--max-seq-len``) gets a 400 naming the image
(``messages[i].content[j]``) or the total. Nothing is fetched from the network. Supported request
fields: ``max_tokens`` / ``max_completion_tokens``, ``n``, ``stop``, ``seed``, ``temperature``,
``top_p``, ``top_k``, ``repetition_penalty``, ``logprobs`` / ``top_logprobs`` (log-probabilities
of the model's raw next-token distribution, before temperature and filtering), ``stream``,
``stream_options.include_usage``; other OpenAI fields are accepted and ignored.

Concurrency: uvicorn runs one asyncio event loop that parses and validates requests
(``ChatCompletionRequest``, pydantic) and writes responses. Decoding images and tokenizing run in
worker threads. One ``EngineLoop`` thread owns the ``Runtime`` and runs continuous batching:
requests that arrive while others decode join the running batch at the next step. The engine
thread also turns tokens into text (``engine.chat.TextDecoder``, exactly as ``engine.chat`` does)
and log-probabilities, and hands each step's output to the event loop in one call. A client that
disconnects cancels its request: its KV blocks are free for the next step. A bad request gets a
4xx with OpenAI's error body ``{"error": {"message", "type", "param", "code"}}`` naming the
problem; nothing a request carries can stop the engine loop or the server.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import dataclasses
import hmac
import io
import json
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.chat import DTYPES, TextDecoder, encode_chat, image_spec_for, load_model, load_tokenizer, stop_token_ids
from engine.cli import run_main
from engine.conversation import IMAGE_TOKEN, Template, get_template, stop_strings
from engine.generate import Runtime, RuntimeConfig, SamplingParams, StepEvent
from engine.image import ImageSpec
from engine.model import Llava
from engine.quantize import SCHEMES
from engine.weights import check_adapter

log = logging.getLogger("engine.serve")


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    model: str
    host: str = "127.0.0.1"              # loopback by default: exposing the server is a choice
    port: int = 8000
    model_name: str | None = None        # the id in /v1/models (default: the directory name)
    template: str = "vicuna_v1"
    device: str | None = None
    dtype: str | None = None
    quantize: str | None = None          # "int8" | "int4": weight-only quantized decoder linears
    adapter: str | None = None           # a PEFT LoRA adapter directory trained on ``model``, served unmerged
    max_tokens_limit: int = 2048         # most max_tokens a request may ask for
    default_max_tokens: int = 256
    max_images: int = 4                  # per request
    max_image_pixels: int = 4096 * 4096  # width × height of one decoded image
    max_body_bytes: int = 32 << 20
    max_n: int = 8                       # most choices per request
    max_batch: int = 64
    kv_cache_bytes: int | None = None
    max_seq_len: int | None = None       # context length (default: the model's); prompts and image rows count
    image_root: str | None = None        # local image paths must lie under it when set
    prefix_caching: bool = True          # share the K/V of identical prompt prefixes (system prompt, chat turns)
    api_key: str | None = dataclasses.field(default=None, repr=False)  # "Authorization: Bearer KEY" when set

    def __post_init__(self):
        if not 0 < self.default_max_tokens <= self.max_tokens_limit:
            raise ValueError(f"default_max_tokens={self.default_max_tokens} must be in [1, max_tokens_limit="
                             f"{self.max_tokens_limit}]")
        for name in ("max_images", "max_image_pixels", "max_body_bytes", "max_n", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.quantize is not None and self.quantize not in SCHEMES:
            raise ValueError(f"quantize={self.quantize!r} is not one of {', '.join(SCHEMES)}")
        check_adapter(self.model, self.adapter, self.quantize)
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be a non-empty string when given")

    def public(self) -> dict:
        """The config as JSON-able values, the API key masked (for the start-of-run log line)."""
        out = dataclasses.asdict(self)
        out["api_key"] = None if self.api_key is None else "***"
        return out


class BadRequest(Exception):
    """A client error: HTTP ``status`` with a message naming what was wrong."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------- request models


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Model):
    url: str
    detail: str | None = None


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL | str


class Message(_Model):
    role: str
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]]
    name: str | None = None


class StreamOptions(_Model):
    include_usage: bool = False


class ChatCompletionRequest(_Model):
    """The body of ``POST /v1/chat/completions``: types here; limits that depend on the server's
    config (max_tokens, n, images) are checked in ``parse_request``."""
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


def _where(loc: tuple) -> str:
    """A pydantic error location as a JSON path (``messages[0].content[1].image_url``), without the
    union-branch names pydantic inserts (``str``, ``list[...]``, class names, repeated tags)."""
    out, last = "", None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not ("[" in part or part[:1].isupper() or part in ("str", "int", "float", "bool") or part == last):
            out += ("." if out else "") + part
        last = part
    return out


def validation_message(e: ValidationError) -> str:
    """The first problem of a request body, phrased for a client (the field path, then what is wrong).
    Of a union's alternatives, the error that got deepest names what the client meant."""
    err = max(e.errors(include_url=False), key=lambda x: len(x["loc"]))
    where = _where(err["loc"])
    if err["type"] == "missing":
        return f"'{where}' is required"
    if err["type"] == "too_short":
        return f"'{where}' must be non-empty"
    if err["type"].startswith(("greater_than", "less_than")):
        return f"'{where}'={err.get('input')!r} is out of range: {err['msg']}"
    return f"'{where}': {err['msg']}"


# ----------------------------------------------------------------------------- request parsing


def _load_image(url: str, where: str, cfg: ServerConfig):
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
        root = cfg.image_root
        if root is not None and os.path.commonpath([path, os.path.realpath(root)]) != os.path.realpath(root):
            raise BadRequest(f"{where}: {url!r} is outside the server's image root", 403)
        if not os.path.isfile(path):
            raise BadRequest(f"{where}: image file {url!r} not found")
        source = path
    try:
        with Image.open(source) as im:
            w, h = im.size  # from the header: an oversize image is refused before it is decoded
            if w * h > cfg.max_image_pixels:
                raise BadRequest(f"{where}: image of {w}x{h} pixels exceeds the limit of {cfg.max_image_pixels}",
                                 413)
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadRequest(f"{where}: cannot read the image ({type(e).__name__}: {e})") from None


def parse_messages(messages: list[Message], cfg: ServerConfig) -> tuple[list[dict], list, list[str]]:
    """Validated messages → (``engine.chat`` messages with ``<image>`` markers, PIL images in order, where
    each image is in the request: ``messages[i].content[j]``)."""
    out, images, wheres = [], [], []
    for i, m in enumerate(messages):
        if isinstance(m.content, str):
            text = m.content
        else:
            text = ""
            for j, part in enumerate(m.content):
                if isinstance(part, TextPart):
                    text += part.text
                    continue
                where = f"messages[{i}].content[{j}]"
                if len(images) >= cfg.max_images:
                    raise BadRequest(f"{where}: more than {cfg.max_images} images in one request")
                url = part.image_url.url if isinstance(part.image_url, ImageURL) else part.image_url
                images.append(_load_image(url, where, cfg))
                wheres.append(where)
                text += IMAGE_TOKEN
        out.append({"role": m.role, "content": text})
    return out, images, wheres


def check_budget(model_cfg, context: int, images: list, wheres: list[str]) -> None:
    """The token budget, before any tokenizing or preprocessing: each image takes ``image_rows(h, w)``
    prompt tokens (AnyRes: from the grid pinpoints); BadRequest naming the image that cannot fit in the
    ``context``, or listing them when together they cannot."""
    rows = []
    for where, im in zip(wheres, images, strict=True):
        try:
            rows.append(model_cfg.image_rows(im.height, im.width))
        except ValueError as e:
            raise BadRequest(f"{where}: {e}") from None
    for where, im, r in zip(wheres, images, rows, strict=True):
        if r >= context:
            raise BadRequest(f"{where}: an image of {im.width}x{im.height} pixels takes {r} prompt tokens; the "
                             f"context length is {context} tokens")
    if sum(rows) >= context:
        each = ", ".join(f"{w}: {r}" for w, r in zip(wheres, rows, strict=True))
        raise BadRequest(f"the request's {len(images)} images take {sum(rows)} prompt tokens ({each}); the "
                         f"context length is {context} tokens")


def _in_range(name: str, value: int, lo: int, hi: int) -> int:
    if not lo <= value <= hi:
        raise BadRequest(f"'{name}'={value} is out of range [{lo}, {hi}]")
    return value


@dataclass(frozen=True, kw_only=True)
class Plan:
    """What a validated request asks the engine for."""
    params: list[SamplingParams]       # one per choice
    stops: tuple[str, ...]
    top_logprobs: int | None           # None: no logprobs
    stream: bool
    include_usage: bool


def plan_request(req: ChatCompletionRequest, cfg: ServerConfig, stop_ids: tuple[int, ...]) -> Plan:
    # the newer name wins; errors name the field the client actually sent
    key = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = getattr(req, key)
    max_tokens = cfg.default_max_tokens if max_tokens is None else _in_range(key, max_tokens, 1,
                                                                             cfg.max_tokens_limit)
    n = _in_range("n", 1 if req.n is None else req.n, 1, cfg.max_n)
    stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stop) > 4:
        raise BadRequest("'stop' must be a string or an array of at most 4 strings")
    if req.top_logprobs is not None and not req.logprobs:
        raise BadRequest("'top_logprobs' requires 'logprobs': true")
    try:
        base = SamplingParams(max_new_tokens=max_tokens, temperature=req.temperature or 0.0,
                              top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
                              repetition_penalty=req.repetition_penalty or 1.0, stop_token_ids=stop_ids,
                              seed=req.seed)
    except ValueError as e:
        raise BadRequest(str(e)) from None
    # choice i samples with seed + i: seeded choices differ from each other and are reproducible
    params = [base if req.seed is None else dataclasses.replace(base, seed=req.seed + i) for i in range(n)]
    return Plan(params=params, stops=tuple(stop), top_logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                stream=req.stream, include_usage=bool(req.stream_options and req.stream_options.include_usage))


# ----------------------------------------------------------------------------- the engine loop


@dataclass(frozen=True)
class Delta:
    """What one engine step produced for one choice: new text, log-probabilities, the end."""
    index: int
    text: str
    logprobs: list[dict] | None
    finish_reason: str | None


@dataclass(eq=False)
class _Choice:
    index: int
    params: SamplingParams
    decoder: TextDecoder
    request: object = None     # engine.generate.Request once submitted
    tokens: int = 0
    done: bool = False


@dataclass(eq=False)
class Job:
    """One HTTP request inside the engine: its choices and the asyncio queue its output goes to.
    The queue receives lists of ``Delta`` and, on a failure, a ``BadRequest`` (rejected by the
    runtime's validation, before anything was generated) or a ``RuntimeError``."""
    prompt: list[int]
    pixels: torch.Tensor | None           # [ΣK, 3, S, S] every tile of every image
    choices: list[_Choice]
    top_logprobs: int | None
    loop: asyncio.AbstractEventLoop
    image_sizes: torch.Tensor | None = None  # [N, 2] (height, width) per image
    queue: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)

    @property
    def finished(self) -> bool:
        return all(c.done for c in self.choices)


class EngineLoop(threading.Thread):
    """Owns the runtime: submits, cancels and steps it from one thread (continuous batching)."""

    def __init__(self, runtime: Runtime, tokenizer, tokenizer_lock: threading.Lock):
        super().__init__(name="engine-loop", daemon=True)
        self.runtime, self.tokenizer, self.tokenizer_lock = runtime, tokenizer, tokenizer_lock
        self.inbox: queue.Queue = queue.Queue()
        self._owner: dict[int, tuple[Job, _Choice]] = {}   # id(runtime request) → its job and choice
        self._stop = threading.Event()
        self.cancelled = 0     # runtime requests a client abandoned before they ended (disconnects)

    def submit(self, job: Job) -> Job:
        self.inbox.put(("submit", job))
        return job

    def cancel(self, job: Job) -> None:
        """End what is left of ``job`` (a no-op for a finished one); safe from any thread."""
        if not job.finished:
            self.inbox.put(("cancel", job))

    def stop(self) -> None:
        self._stop.set()
        self.inbox.put(("wake", None))

    def stats(self) -> dict:
        rt, cache = self.runtime, self.runtime.cache  # plain int reads: safe beside the engine thread
        return {"running": len(rt.running), "waiting": len(rt.waiting), "kv_blocks_total": cache.num_blocks - 1,
                "kv_blocks_free": cache.free_blocks, "prompt_tokens": rt.prompt_tokens,
                "reused_prompt_tokens": rt.reused_tokens, "peak_batch": rt.peak_batch,
                "cancelled_requests": self.cancelled}

    # ---- the engine thread --------------------------------------------------------------------------

    def run(self) -> None:
        rt = self.runtime
        while not self._stop.is_set():
            out: dict[Job, list] = {}
            try:  # block only when idle; otherwise take whatever arrived and keep stepping
                op = self.inbox.get() if not rt.has_work else self.inbox.get_nowait()
                while True:
                    self._handle(*op, out)
                    op = self.inbox.get_nowait()
            except queue.Empty:
                pass
            if rt.has_work:
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
                    try:
                        self._event(ev, out)
                    except Exception as e:  # a bug in turning one token into text fails that request only
                        log.exception("handling a token failed")
                        owner = self._owner.get(id(ev.request))
                        if owner is not None:
                            self._cancel(owner[0])
                            out.setdefault(owner[0], []).append(RuntimeError(f"{type(e).__name__}: {e}"))
                for r in {id(ev.request): ev.request for ev in events}.values():
                    r.logits.clear()  # this step's rows are consumed: memory stays one row per sequence
            self._deliver(out)

    def _deliver(self, out: dict[Job, list]) -> None:
        """One hand-off per event loop per step (not one wake-up per token)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for job, items in out.items():
            by_loop.setdefault(job.loop, []).append((job, items))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop has closed (the server stopped): nobody waits for these jobs
                for job, _ in items:
                    self._cancel(job)

    def _handle(self, op: str, job: Job | None, out: dict) -> None:
        rt = self.runtime
        if op == "submit":
            try:
                for c in job.choices:
                    c.request = rt.submit(job.prompt, pixel_values=job.pixels, image_sizes=job.image_sizes,
                                          params=c.params,
                                          keep_logits=job.top_logprobs is not None)
                    self._owner[id(c.request)] = (job, c)
            except ValueError as e:
                self._cancel(job)
                out.setdefault(job, []).append(BadRequest(str(e)))
        elif op == "cancel":
            self._cancel(job)

    def _cancel(self, job: Job) -> None:
        for c in job.choices:
            c.done = True
            if c.request is not None:
                self.cancelled += not c.request.finished
                self.runtime.cancel(c.request)
                self._owner.pop(id(c.request), None)

    def _event(self, ev, out: dict) -> None:
        owner = self._owner.get(id(ev.request))
        if owner is None:
            return
        job, c = owner
        if c.done:
            return
        if ev.finish_reason == "error":
            self._cancel(job)
            out.setdefault(job, []).append(RuntimeError(f"generation failed: {ev.request.error}"))
            return
        if ev.token is None:
            with self.tokenizer_lock:
                text = c.decoder.finish()
            self._end(c, ev.finish_reason)
            out.setdefault(job, []).append(Delta(c.index, text, None, ev.finish_reason))
            return
        c.tokens += 1
        with self.tokenizer_lock:
            text = c.decoder.push(ev.token)
            lp = None if job.top_logprobs is None else [self._logprob(ev.request.logits[-1], ev.token,
                                                                      job.top_logprobs)]
        reason = None
        if c.decoder.stopped:  # a stop string: end the sequence now, its blocks free for the next step
            self.runtime.cancel(ev.request)
            self._end(c, "stop")
            reason = "stop"
        out.setdefault(job, []).append(Delta(c.index, text, lp, reason))

    def _end(self, c: _Choice, reason: str) -> None:
        c.done = True
        self._owner.pop(id(c.request), None)

    def _logprob(self, logits: torch.Tensor, token: int, k: int) -> dict:
        """OpenAI's logprob entry for ``token`` from the raw logits [V] of its step (tokenizer lock held)."""
        lp = torch.log_softmax(logits.float(), -1)                                         # (V,)

        def entry(t: int, value: float) -> dict:
            s = self.tokenizer.decode([t])
            return {"token": s, "logprob": value, "bytes": list(s.encode("utf-8"))}

        out = entry(token, float(lp[token]))
        top = lp.topk(k) if k else None
        out["top_logprobs"] = [] if top is None else [entry(int(i), float(v)) for v, i in
                                                      zip(top.values.tolist(), top.indices.tolist(), strict=True)]
        return out


def _put_all(items: list[tuple[Job, list]]) -> None:
    for job, out in items:
        job.queue.put_nowait(out)


# ----------------------------------------------------------------------------- the HTTP side


class ServerState:
    """Everything a handler needs: config, model, tokenizer, template, the engine loop."""

    def __init__(self, cfg: ServerConfig, model: Llava, tokenizer, template: Template, image_spec: ImageSpec):
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self.template, self.image_spec = template, image_spec
        self.model_name = cfg.model_name or os.path.basename(os.path.normpath(cfg.model))
        self.tokenizer_lock = threading.Lock()  # HF fast tokenizers are not safe to share across threads
        self.stop_ids = tuple(stop_token_ids(tokenizer, model))
        runtime = Runtime(model, RuntimeConfig(max_batch=cfg.max_batch, kv_cache_bytes=cfg.kv_cache_bytes,
                                               max_seq_len=cfg.max_seq_len, prefix_caching=cfg.prefix_caching))
        self.engine = EngineLoop(runtime, tokenizer, self.tokenizer_lock)


def error_response(status: int, message: str) -> JSONResponse:
    kind = ("invalid_request_error" if status < 500 else "server_error") if status != 401 else "authentication_error"
    code = {401: "invalid_api_key", 404: "not_found", 413: "request_too_large"}.get(status)
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}},
                        status_code=status)


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="llava-engine", docs_url=None, redoc_url=None)
    cfg = state.cfg

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            return error_response(404, f"no route {request.method} {request.url.path}")
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(BadRequest)
    async def _bad_request(request: Request, e: BadRequest):
        return error_response(e.status, str(e))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):  # never let one request take the server down
        log.error("request failed: %s: %s", type(e).__name__, e)
        return error_response(500, f"internal error: {type(e).__name__}: {e}")

    def authorize(request: Request) -> None:
        if cfg.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), cfg.api_key.encode()):
            raise BadRequest("a valid API key is required (Authorization: Bearer KEY)", 401)

    @app.get("/health")
    async def health():
        return {"status": "ok", **state.engine.stats()}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0,
                                            "owned_by": "engine"}]}

    schema = ChatCompletionRequest.model_json_schema()  # self-contained: its $refs point into its own $defs
    body_doc = {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}

    @app.post("/v1/chat/completions", openapi_extra=body_doc)
    async def chat_completions(request: Request):
        authorize(request)
        req = _validate(await _read_json(request, cfg.max_body_bytes))
        plan = plan_request(req, cfg, state.stop_ids)
        ids, pixels, sizes = await run_in_threadpool(_encode, state, req)
        loop = asyncio.get_running_loop()
        job = Job(prompt=ids, pixels=pixels, image_sizes=sizes, top_logprobs=plan.top_logprobs, loop=loop,
                  choices=[_Choice(i, p, TextDecoder(state.tokenizer, stop_strings(state.template) + plan.stops))
                           for i, p in enumerate(plan.params)])
        state.engine.submit(job)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        # A client that goes away wakes its handler through the job's queue (None): no per-token asyncio.wait.
        watcher = asyncio.ensure_future(_disconnected(request))
        watcher.add_done_callback(lambda t: t.cancelled() or job.queue.put_nowait(None))
        try:
            first = await _next(job)   # the first output decides between an error status and a 200
        except BaseException:
            watcher.cancel()
            state.engine.cancel(job)
            raise
        if first is None:                       # the client left before anything was generated
            state.engine.cancel(job)
            return JSONResponse({}, status_code=499)
        if plan.stream:
            return StreamingResponse(_stream(state, job, plan, first, watcher, rid, created, len(ids)),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            return await _collect(state, job, first, watcher, rid, created, len(ids))
        finally:
            watcher.cancel()
            state.engine.cancel(job)  # no-op when finished; frees the blocks when the client left early

    return app


def _validate(obj) -> ChatCompletionRequest:
    if not isinstance(obj, dict):
        raise BadRequest("the body must be a JSON object")
    try:
        return ChatCompletionRequest.model_validate(obj)
    except ValidationError as e:
        raise BadRequest(validation_message(e)) from None


async def _read_json(request: Request, limit: int):
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit()):
        raise BadRequest("the Content-Length header is not a number")
    if length is not None and int(length) > limit:
        # Read and drop a moderately oversized body before answering: closing the socket with
        # unread data makes the client's send fail (EPIPE/reset) before it can read the 413.
        if int(length) <= 4 * limit:
            async for _ in request.stream():
                pass
        raise BadRequest(f"request body of {length} bytes exceeds the limit of {limit}", 413)
    chunks, size = [], 0
    async for chunk in request.stream():   # a chunked body has no length to check up front
        size += len(chunk)
        if size > limit:
            raise BadRequest(f"request body exceeds the limit of {limit} bytes", 413)
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON ({e})") from None


def _encode(state: ServerState, req: ChatCompletionRequest) -> tuple[list[int], torch.Tensor | None,
                                                                      torch.Tensor | None]:
    """Images decoded and checked against the token budget, prompt tokenized, pixels preprocessed (in a
    worker thread): (ids, pixels [ΣK, 3, S, S], image sizes [N, 2])."""
    messages, images, wheres = parse_messages(req.messages, state.cfg)
    context = state.engine.runtime.max_seq_len
    check_budget(state.model.config, context, images, wheres)
    try:
        with state.tokenizer_lock:
            ids, pixels, sizes = encode_chat(state.tokenizer, state.template, messages, images, state.model,
                                             state.image_spec)
    except ValueError as e:
        raise BadRequest(str(e)) from None
    if len(ids) >= context:
        with_images = f" (with the rows of {len(images)} image{'s' * (len(images) != 1)})" if images else ""
        raise BadRequest(f"the prompt takes {len(ids)} tokens{with_images}; the context length is {context} tokens")
    return ids, pixels, sizes


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is read, so the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _next(job: Job) -> list[Delta] | None:
    """The engine's next output for ``job``; None when the client disconnected first."""
    out = await job.queue.get()
    for item in out or ():
        if isinstance(item, Exception):
            raise item
    return out


async def _collect(state: ServerState, job: Job, out: list[Delta], watcher, rid, created, n_prompt):
    texts = [""] * len(job.choices)
    reasons: list[str | None] = [None] * len(job.choices)
    logprobs: list[list] = [[] for _ in job.choices]
    while True:
        for d in out:
            texts[d.index] += d.text
            logprobs[d.index] += d.logprobs or []
            reasons[d.index] = d.finish_reason or reasons[d.index]
        if all(reasons):  # (job.finished can turn true in the engine thread before its last output arrives)
            break
        out = await _next(job)
        if out is None:
            return JSONResponse({}, status_code=499)   # nobody reads it
    n = sum(c.tokens for c in job.choices)
    choices = []
    for c in job.choices:
        choice = {"index": c.index, "message": {"role": "assistant", "content": texts[c.index]},
                  "finish_reason": reasons[c.index]}
        if job.top_logprobs is not None:
            choice["logprobs"] = {"content": logprobs[c.index]}
        choices.append(choice)
    return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": state.model_name,
                         "choices": choices,
                         "usage": {"prompt_tokens": n_prompt, "completion_tokens": n,
                                   "total_tokens": n_prompt + n}})


async def _stream(state: ServerState, job: Job, plan: Plan, out: list[Delta] | None, watcher, rid, created,
                  n_prompt) -> AsyncIterator[bytes]:
    def chunk(choices: list[dict], **extra) -> bytes:
        obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
               "choices": choices, **extra}
        return b"data: " + json.dumps(obj).encode() + b"\n\n"

    ended: set[int] = set()
    try:
        yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                     for c in job.choices])
        while out is not None:
            parts = []
            for d in out:
                if d.text or d.logprobs:
                    part = {"index": d.index, "delta": {"content": d.text}, "finish_reason": None}
                    if d.logprobs is not None:
                        part["logprobs"] = {"content": d.logprobs}
                    parts.append(part)
                if d.finish_reason is not None:
                    ended.add(d.index)
                    parts.append({"index": d.index, "delta": {}, "finish_reason": d.finish_reason})
            for p in parts:
                yield chunk([p])
            if len(ended) == len(job.choices):
                break
            try:
                out = await _next(job)
            except RuntimeError as e:  # headers are sent: report the failure inside the stream
                yield b"data: " + json.dumps({"error": {"message": str(e), "type": "server_error",
                                                        "param": None, "code": None}}).encode() + b"\n\n"
                return
        else:
            return  # the client went away
        if plan.include_usage:
            n = sum(c.tokens for c in job.choices)
            yield chunk([], usage={"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n})
        yield b"data: [DONE]\n\n"
    finally:
        watcher.cancel()
        state.engine.cancel(job)


# ----------------------------------------------------------------------------- entry points


class LlavaServer:
    """The bound server: ``serve_forever()`` (blocking, any thread), ``shutdown()`` (from another
    thread), ``server_close()``; ``server_address`` is known once built (port 0 picks a free port)."""

    def __init__(self, cfg: ServerConfig, model: Llava, tokenizer, template: Template, image_spec: ImageSpec):
        self.cfg = cfg
        self.state = ServerState(cfg, model, tokenizer, template, image_spec)
        self.model_name = self.state.model_name
        self.app = create_app(self.state)
        family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        self.socket = socket.create_server((cfg.host, cfg.port), family=family, backlog=2048, reuse_port=False)
        self.server_address = self.socket.getsockname()
        self._uvicorn = uvicorn.Server(uvicorn.Config(self.app, log_config=None, access_log=False,
                                                      timeout_graceful_shutdown=5, lifespan="off"))
        self._done = threading.Event()
        self.state.engine.start()

    @property
    def engine(self) -> EngineLoop:
        return self.state.engine

    def serve_forever(self) -> None:
        self._done.clear()
        try:
            asyncio.run(self._uvicorn.serve(sockets=[self.socket]))
        finally:
            self._done.set()

    def shutdown(self, timeout: float = 30.0) -> None:
        self._uvicorn.should_exit = True
        self._done.wait(timeout)

    def server_close(self) -> None:
        self.state.engine.stop()
        self.socket.close()


def build_server(cfg: ServerConfig, *, model: Llava | None = None, tokenizer=None) -> LlavaServer:
    """Load the checkpoint (unless given) and bind; call ``serve_forever()`` on the result."""
    if model is None:
        model = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, quantize=cfg.quantize, adapter=cfg.adapter)
    tokenizer = tokenizer or load_tokenizer(cfg.model)
    spec = image_spec_for(cfg.model, model)
    return LlavaServer(cfg, model, tokenizer, get_template(cfg.template), spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.serve", description="OpenAI-compatible LLaVA server")
    p.add_argument("--model", required=True, help="checkpoint directory (HF llava layout with a tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None)
    p.add_argument("--template", default="vicuna_v1")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=tuple(DTYPES))
    p.add_argument("--quantize", default=None, choices=SCHEMES, help="weight-only quantized decoder linears")
    p.add_argument("--adapter", default=None,
                   help="a LoRA adapter directory trained on --model (train.stage2 --lora), served unmerged")
    p.add_argument("--max-tokens-limit", type=int, default=2048, help="largest max_tokens a request may ask")
    p.add_argument("--default-max-tokens", type=int, default=None,
                   help="max_tokens when a request gives none (default: min(256, --max-tokens-limit))")
    p.add_argument("--max-images", type=int, default=4)
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="largest width × height of an image")
    p.add_argument("--max-body-bytes", type=int, default=32 << 20)
    p.add_argument("--max-n", type=int, default=8, help="most choices (n) per request")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--kv-cache-bytes", type=int, default=None)
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="context length in tokens, prompt (image rows included) + answer (default: the model's)")
    p.add_argument("--image-root", default=None, help="only read local images under this directory")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="recompute every prompt in full (default: share identical prompt prefixes)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: the LLAVA_SERVE_API_KEY "
                        "environment variable, else no key)")
    args = p.parse_args(argv)
    if args.default_max_tokens is None:
        args.default_max_tokens = min(256, args.max_tokens_limit)
    if args.api_key is None:
        args.api_key = os.environ.get("LLAVA_SERVE_API_KEY") or None
    try:
        cfg = ServerConfig(**vars(args))
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    log.info("config %s", json.dumps(cfg.public()))
    server = build_server(cfg)
    host, port = server.server_address[:2]
    log.info("serving %s on http://%s:%d/v1", server.model_name, host, port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    run_main(main)
