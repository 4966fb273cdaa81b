"""KV-cached generation: packed prefill, batched decode over a paged cache, on-device sampling,
continuous batching, CUDA graphs for the decode step.

Letters: B sequences in a step, T packed tokens of a step, V vocab, S runtime slots (most
sequences at once), nb cache blocks per sequence in a decode step.

Token ids in, token ids out (no tokenizer here). One ``Runtime.step()`` is one forward:

- **schedule** (``engine.scheduler``, whose docstring states the policy) — every running
  sequence that is decoding runs one token; with ``chunked_prefill`` (default) the rest of the
  step's token budget (``max_step_tokens``) goes to prompts, in arrival order, cut into chunks
  that never split an image (half of what is left while requests wait); without it, whole
  prompts up to ``max_prefill_tokens``. KV blocks are taken lazily; when they run out the
  youngest sequence is **preempted** and later recomputes what it had (the oldest never is);
- **run** — a decode-only step embeds the last tokens → decoder with a ``DecodeAttention`` over
  the block tables → logits (a CUDA graph on CUDA); a step with prefill chunks packs decode rows
  and chunks into one batch (one GEMM per weight for all rows; ``MixedAttention``: paged decode
  attention for decode rows, causal varlen attention over the cached context for chunks);
- **sample** on the device for the rows that end their sequence (decode rows, last chunks); one
  host sync per step brings back the new tokens for the stop check. Finished sequences release
  their slot and blocks at once; waiting requests join at the next step (continuous batching).

Images (engine.image_spans): a prompt holds any number; image i is ``image_sizes[i]`` (height,
width), takes the next ``cfg.image_rows(h, w)`` placeholder ids (one unbroken run) and the next
``cfg.image_tiles(h, w)`` tiles of ``pixel_values`` [ΣK, 3, S, S] (AnyRes: rows and tiles vary per
image; without AnyRes and without sizes, ``image_seq_len`` rows and one tile each).

Prefix reuse (``RuntimeConfig.prefix_caching``, on by default): a prompt whose first full
cache blocks hold exactly the tokens and images (tiles and size) of an earlier prompt's (the same system prompt,
the earlier turns of a chat with the same image) shares those blocks and prefills only the
rest, attending to the shared K/V (``PrefixPrefillAttention``); images wholly inside the shared
part skip the vision tower. Requests prefilled together share too: a burst of requests with one
system prompt computes it once. Reuse never splits an image and always leaves at least one prompt
token to compute, for the first sampled token's logits. Any change of the weights (an
optimizer step, ``load_state_dict``) drops every shared prefix.

Where the parts live: the scheduler (admission, token budget and chunks, lazy block growth,
preemption, prefix-hit lookup and block registration, slots and the block table) in
``engine.scheduler``; ``Request`` (a sequence and the scheduler's bookkeeping of it) and
``GenerationOutput`` in ``engine.request``; sampling (``SamplingParams``, ``sample_tokens``: on
the device, seeded per sequence, so a sequence samples the same tokens whatever batch it is in)
in ``engine.sampling``; the block allocator and prefix index in ``engine.kv_cache``; the
attention contexts in ``engine.kv_attention``; the decode step's CUDA graphs (one per batch
bucket × context bucket, powers of two; eager on the CPU) in ``engine.graphs``. Here: the
runtime (submit, cancel, step: the forwards and each slot's sampling settings), the step and
stream events, and ``generate``. Everything public is importable from here (``__all__``).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
import weakref
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch

from engine.graphs import DecodeGraphs, GraphCaptureError
from engine.image_spans import check_sizes, image_spans, split_per_prompt
from engine.kv_attention import DecodeAttention, MixedAttention, PrefillAttention, PrefixPrefillAttention
from engine.kv_cache import PagedKVCache
from engine.model import Llava, pack_cu_seqlens
from engine.request import GenerationOutput, Request
from engine.sampling import SamplingParams, sample_tokens
from engine.scheduler import Scheduler

__all__ = ["GenerationOutput", "GraphCaptureError", "Request", "Runtime", "RuntimeConfig", "SamplingParams",
           "StepEvent", "TokenEvent", "default_runtime", "generate", "split_images"]


@dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
    """Sizes of a runtime. ``kv_cache_bytes`` None: half the free CUDA memory, or 1 GiB on CPU; the
    cache never exceeds what ``max_batch`` sequences of ``max_seq_len`` tokens can use."""
    max_batch: int = 64               # S: sequences decoding at once
    block_size: int = 16              # tokens per KV-cache block
    kv_cache_bytes: int | None = None
    max_seq_len: int | None = None    # default: the model's max_position_embeddings
    chunked_prefill: bool = True      # split prompts into chunks that fit max_step_tokens, mixed with decode rows
    max_step_tokens: int = 2048       # with chunked_prefill: tokens per step, decode rows + prefill chunks
    max_prefill_tokens: int = 16384   # without: prompt tokens per step, whole prompts (one may exceed it alone)
    cuda_graphs: bool = True          # capture the decode step on CUDA
    prefix_caching: bool = True       # share the cached K/V of identical prompt prefixes (whole blocks)
    decode_attention: str | None = None  # llava_kernels.paged_decode_attention backend: None = dispatcher's choice

    def __post_init__(self):
        for name in ("max_batch", "block_size", "max_step_tokens", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"RuntimeConfig.{name} must be >= 1, got {getattr(self, name)}")


class TokenEvent(NamedTuple):
    """Streamed by ``generate(stream=True)``: a new token (``finish_reason`` None), or the end of
    prompt ``index`` (``token`` None, ``finish_reason`` set) — exactly one end event per prompt."""
    index: int
    token: int | None
    finish_reason: str | None


class StepEvent(NamedTuple):
    """What ``Runtime.step`` reports: a new token of ``request`` or its end (token None)."""
    request: Request
    token: int | None
    finish_reason: str | None


# ----------------------------------------------------------------------------- the runtime


class Runtime:
    """Continuous-batching generation over one model and one paged KV cache.

    ``submit`` queues a request (validated at once); ``step`` runs one prefill or one decode step
    and returns its ``StepEvent``s; ``cancel`` ends a request early. Single-threaded: the server
    drives one runtime from one scheduler thread. The model is held by a weak reference (a
    runtime cached per model must not keep it alive); keep the model referenced elsewhere.
    """

    def __init__(self, model: Llava, config: RuntimeConfig | None = None):
        self.config = config = config or RuntimeConfig()
        model.fuse_weights()  # one q/k/v and one gate/up GEMM per layer; state dict and training unchanged
        self._model = weakref.ref(model)
        w = model.decoder.embed.weight
        self.device, self.dtype = w.device, w.dtype
        self.mcfg = model.config
        tc = model.config.text
        self.max_seq_len = min(config.max_seq_len or tc.max_position_embeddings, tc.max_position_embeddings)
        bs = config.block_size
        self.max_blocks_per_seq = math.ceil(self.max_seq_len / bs)
        budget = config.kv_cache_bytes
        if budget is None:
            budget = torch.cuda.mem_get_info(self.device)[0] // 2 if self.device.type == "cuda" else 1 << 30
        self.cache = PagedKVCache.from_budget(tc, budget_bytes=budget, block_size=bs, dtype=self.dtype,
                                              device=self.device,
                                              max_blocks=config.max_batch * self.max_blocks_per_seq)
        model_ref = self._model  # not self: the scheduler must not hold the runtime that holds it
        self.scheduler = Scheduler(self.cache, config, max_blocks_per_seq=self.max_blocks_per_seq,
                                   parameters=lambda: _live(model_ref).parameters())
        s, dev = config.max_batch, self.device
        self.temperature = torch.zeros(s, dtype=torch.float32, device=dev)
        self.top_p = torch.ones(s, dtype=torch.float32, device=dev)
        self.top_k = torch.zeros(s, dtype=torch.int64, device=dev)
        self.penalty = torch.ones(s, dtype=torch.float32, device=dev)
        self.seeds = torch.zeros(s, dtype=torch.int64, device=dev)
        self.seen: torch.Tensor | None = None  # (S, V) bool, allocated when a request uses a penalty
        self.graphs = DecodeGraphs(self) if dev.type == "cuda" and config.cuda_graphs else None
        self.peak_batch = 0  # most sequences decoded in one step so far (a continuous-batching witness)

    @property
    def model(self) -> Llava:
        return _live(self._model)

    # The scheduler's state, read by the server's stats, the tests and the benches.
    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    @property
    def waiting(self) -> deque[Request]:
        return self.scheduler.waiting

    @property
    def running(self) -> list[Request]:
        return self.scheduler.running

    @property
    def block_table(self) -> torch.Tensor:
        """(S, nb) int32 on the device: the cache blocks of the sequence in each slot."""
        return self.scheduler.block_table

    @property
    def preemptions(self) -> int:
        """Sequences whose blocks were taken back (recomputed when readmitted)."""
        return self.scheduler.preemptions

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens admitted so far (a preempted request's counted once)."""
        return self.scheduler.prompt_tokens

    @property
    def reused_tokens(self) -> int:
        """Of ``prompt_tokens``, those a shared prefix covered at first admission."""
        return self.scheduler.reused_tokens

    # ---- requests -------------------------------------------------------------------------------------

    def submit(self, prompt: list[int], *, pixel_values: torch.Tensor | None = None,
               image_sizes: torch.Tensor | None = None, params: SamplingParams | None = None,
               keep_logits: bool = False) -> Request:
        """Queue one prompt (image placeholders expanded) with its images: ``pixel_values`` [ΣK, 3, S, S],
        all tiles of all images in placeholder order, and ``image_sizes`` [N, 2] (height, width) per image
        (required by an AnyRes model; without it every image is one tile of ``image_seq_len`` rows).
        Image i takes the next ``cfg.image_rows(h_i, w_i)`` placeholders, one unbroken run. ValueError
        when the prompt, the images or the lengths are invalid (an image that cannot fit is named)."""
        params = params or SamplingParams()
        cfg = self.mcfg
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise ValueError("a prompt must be a non-empty list of token ids")
        vocab = cfg.text.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt):
            bad = next(t for t in prompt if not (isinstance(t, int) and 0 <= t < vocab))
            raise ValueError(f"prompt token {bad!r} is not an int in [0, {vocab})")
        size = cfg.vision.image_size
        if pixel_values is not None and (pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (
                cfg.vision.num_channels, size, size)):
            raise ValueError(f"pixel_values must be [ΣK tiles, {cfg.vision.num_channels}, {size}, {size}]; got "
                             f"{tuple(pixel_values.shape)}")
        n_px = 0 if pixel_values is None else pixel_values.shape[0]
        sizes = check_sizes(cfg, image_sizes, n_px, "submit")
        spans = image_spans(cfg, list(prompt), pixel_values, sizes, digests=self.config.prefix_caching)
        for j, im in enumerate(spans):
            if im.end - im.start >= self.max_seq_len:
                of = f" of {im.size[0]}x{im.size[1]} pixels" if im.size else ""
                raise ValueError(f"image {j}{of} expands to {im.end - im.start} placeholder rows; the context "
                                 f"length is {self.max_seq_len}")
        rows = f" ({sum(im.end - im.start for im in spans)} of them rows of {len(spans)} images)" if spans else ""
        if len(prompt) >= self.max_seq_len:
            raise ValueError(f"prompt of {len(prompt)} tokens{rows} leaves no room to generate within the "
                             f"context length {self.max_seq_len}")
        if params.seed is None:
            params = dataclasses.replace(params, seed=int(torch.randint(0, 2**31 - 1, ()).item()))
        limit = min(params.max_new_tokens, self.max_seq_len - len(prompt))
        # the last sampled token is never written to the cache: prompt + limit - 1 slots suffice
        need = self.cache.blocks_for(len(prompt) + limit - 1)
        if need > self.cache.num_blocks - 1:
            raise ValueError(f"prompt of {len(prompt)} tokens{rows} + {limit} new tokens needs {need} KV-cache "
                             f"blocks; the cache has {self.cache.num_blocks - 1}")
        req = Request(prompt=list(prompt), pixel_values=pixel_values if spans else None, params=params,
                      image_sizes=torch.tensor(sizes, dtype=torch.long) if spans and sizes else None,
                      keep_logits=keep_logits, limit=limit, spans=spans)
        self.scheduler.add(req)
        return req

    def cancel(self, req: Request, reason: str = "cancelled") -> None:
        """End ``req`` now (waiting or running); its blocks and slot are free for the next step."""
        self.scheduler.cancel(req, reason)

    # ---- one step -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[StepEvent]:
        """One forward: every decoding sequence advances one token and, within the step's token budget,
        prompts are prefilled (whole, or in chunks with ``chunked_prefill``) in the same packed batch
        (``Scheduler.schedule`` picks the work)."""
        work: list[tuple[Request, int]] = []
        try:
            planned, admitted = self.scheduler.schedule()
            for r in admitted:
                self._set_slot(r)
            work = planned
            if not work:
                return []
            if all(r.decoding for r, _ in work):
                return self._decode([r for r, _ in work])
            return self._mixed(work)
        except Exception as e:  # a failing batch must not take the runtime (or a server) down
            events = []
            for r, _ in work:
                if not r.finished:
                    r.error = f"{type(e).__name__}: {e}"
                    self.scheduler.finish(r, "error")
                    events.append(StepEvent(r, None, "error"))
            return events

    def _set_slot(self, r: Request) -> None:
        """The sampling settings (and the repetition-penalty mask) of ``r`` in its slot's rows."""
        dev, p, s = self.device, r.params, r.slot
        if p.repetition_penalty != 1.0 and self.seen is None:
            self.seen = torch.zeros(self.config.max_batch, self.mcfg.text.vocab_size, dtype=torch.bool, device=dev)
        if self.seen is not None:
            self.seen[s] = False
            self.seen[s, torch.tensor(r.prompt + r.tokens, device=dev)] = True
        self.temperature[s], self.top_p[s], self.top_k[s] = p.temperature, p.top_p, p.top_k
        self.penalty[s], self.seeds[s] = p.repetition_penalty, p.seed

    # ---- the forward passes ---------------------------------------------------------------------------

    def _mixed(self, work: list[tuple[Request, int]]) -> list[StepEvent]:
        """One packed forward of decode rows (first, paged decode attention) and prefill chunks (causal
        attention over their cached context); the rows that end a sequence give its next token."""
        dev, model, bs = self.device, self.model, self.cache.block_size
        work = sorted(work, key=lambda w: not w[0].decoding)                    # decode rows first
        dec = [r for r, _ in work if r.decoding]
        pre = [(r, n) for r, n in work if not r.decoding]
        nd = len(dec)
        ids, pos, plain = [], [], []       # plain: rows embedded as text (decode rows, generated tokens)
        prompt_rows, images, sizes = [], [], []
        for r in dec:
            plain.append(len(ids))
            ids.append(r.tokens[-1])
            pos.append(r.cached)
        q_lens, k_lens, slot_mapping, key_slots = [], [], [], []
        for r, n in pre:
            c, e, p = r.cached, r.cached + n, len(r.prompt)
            seq = r.prompt[c:e] + r.tokens[max(0, c - p):max(0, e - p)]
            for j in range(c, e):
                (prompt_rows if j < p else plain).append(len(ids) + j - c)
            ids += seq
            pos += range(c, e)
            for im in r.spans:  # the images whose rows this chunk holds (a chunk never splits one)
                if c <= im.start < e:
                    images.append(r.pixel_values[im.first_tile:im.end_tile])
                    sizes.append(im.size)
            q_lens.append(n)
            k_lens.append(e)
            slot_mapping += self.cache.slots(r.blocks, c, e)
            key_slots += self.cache.slots(r.blocks, 0, e)
        ids_t = torch.tensor(ids, device=dev)                                               # (T,)
        pos_t = torch.tensor(pos, device=dev)
        d = model.config.text.hidden_size
        x = model.decoder.embed.weight.new_empty(len(ids), d)                               # (T, D)
        if prompt_rows:
            at = torch.tensor(prompt_rows, device=dev)
            pixels = torch.cat(images).to(dev) if images else None  # the tower casts to its own dtype
            known = images and all(sz is not None for sz in sizes)  # required with AnyRes (submit checks)
            x[at] = model.embed(ids_t[at], pixels, torch.tensor(sizes, device=dev) if known else None)
        if plain:
            at = torch.tensor(plain, device=dev)
            x[at] = model.decoder.embed(ids_t[at])
        cu, _, max_q = pack_cu_seqlens(q_lens, dev)
        sm = torch.tensor(slot_mapping, device=dev)
        if all(r.cached == 0 for r, _ in pre):
            prefill = PrefillAttention(self.cache, sm, cu, max_q, model.attention_backend)
        else:
            prefill = PrefixPrefillAttention(self.cache, sm, cu, max_q, torch.tensor(key_slots, device=dev),
                                             pack_cu_seqlens(k_lens, dev)[0], max(k_lens), model.attention_backend)
        decode = None
        if nd:
            slots_d = torch.tensor([r.slot for r in dec], device=dev)
            nb = max(r.cached for r in dec) // bs + 1
            sm_d = torch.tensor([self.cache.slot(r.blocks, r.cached) for r in dec], device=dev)
            decode = DecodeAttention(self.cache, self.block_table[slots_d, :nb], pos_t[:nd], sm_d,
                                     self.config.decode_attention)
        hidden = model.decoder(x, pos_t, MixedAttention(decode, prefill, nd))            # (T, D)
        self.peak_batch = max(self.peak_batch, len(work))
        # rows that end their sequence: every decode row, and each chunk that reaches the end
        done = dec + [r for r, n in pre if r.cached + n == r.seq_len]
        rows = list(range(nd)) + [nd + int(cu[i + 1]) - 1 for i, (r, n) in enumerate(pre)
                                  if r.cached + n == r.seq_len]
        for r, n in work:
            r.cached += n
            if self.config.prefix_caching:
                self.scheduler.register_full_blocks(r)
        if not done:
            return []
        logits = model.logits(hidden[torch.tensor(rows, device=dev)]).float()            # (B, V)
        slots = torch.tensor([r.slot for r in done], device=dev)
        counters = torch.tensor([r.seq_len for r in done], device=dev)
        return self._sample_and_advance(done, slots, counters, logits)

    def _decode_forward(self, ids, pos, block_table, slot_mapping) -> torch.Tensor:
        """(B,) ids at positions (B,) → logits [B, V]; writes their K/V. Graph-capturable."""
        model = self.model
        x = model.decoder.embed(ids)                                                      # (B, D)
        attn = DecodeAttention(self.cache, block_table, pos, slot_mapping, self.config.decode_attention)
        hidden = model.decoder(x, pos, attn)
        return model.logits(hidden)

    def _decode(self, reqs: list[Request]) -> list[StepEvent]:
        """A step of decode rows only: the CUDA-graph path."""
        bs = self.cache.block_size
        self.peak_batch = max(self.peak_batch, len(reqs))
        pos = [r.cached for r in reqs]
        slot_of = [self.cache.slot(r.blocks, p) for r, p in zip(reqs, pos, strict=True)]
        host = torch.tensor([[r.slot for r in reqs], pos, [r.tokens[-1] for r in reqs], slot_of])  # (4, B)
        if self.device.type == "cuda":
            host = host.pin_memory()
        slots, pos_t, ids, slot_mapping = host.to(self.device, non_blocking=True).unbind(0)
        nb = max(pos) // bs + 1
        logits = None
        if self.graphs is not None:
            try:
                logits = self.graphs.run(ids, pos_t, slot_mapping, slots, nb)
            except GraphCaptureError as e:  # keep serving: the eager step computes the same thing
                warnings.warn(f"{e}; decoding without CUDA graphs from now on", RuntimeWarning, stacklevel=2)
                self.graphs = None
        if logits is None:
            logits = self._decode_forward(ids, pos_t, self.block_table[slots, :nb], slot_mapping)
        for r in reqs:
            r.cached += 1
            if self.config.prefix_caching and r.cached % bs == 0:
                self.scheduler.register_full_blocks(r)
        return self._sample_and_advance(reqs, slots, pos_t + 1, logits.float())

    def _sample_and_advance(self, reqs, slots, counters, logits) -> list[StepEvent]:
        ps = [r.params for r in reqs]
        use_penalty = self.seen is not None and any(p.repetition_penalty != 1.0 for p in ps)
        tokens = sample_tokens(
            logits, temperature=self.temperature[slots], top_k=self.top_k[slots], top_p=self.top_p[slots],
            seeds=self.seeds[slots], counters=counters,
            penalty=self.penalty[slots] if use_penalty else None,
            seen=self.seen[slots] if use_penalty else None,
            greedy_only=all(p.temperature == 0 for p in ps),
            filtered=any(p.temperature > 0 and (p.top_k > 0 or p.top_p < 1) for p in ps))
        if self.seen is not None:
            self.seen[slots, tokens] = True
        keep = [i for i, r in enumerate(reqs) if r.keep_logits]
        kept = logits[keep].cpu() if keep else None
        host_tokens = tokens.tolist()                  # the one host sync of the step
        events = []
        for j, i in enumerate(keep):
            reqs[i].logits.append(kept[j])
        for r, t in zip(reqs, host_tokens, strict=True):
            if t in r.params.stop_token_ids:
                self.scheduler.finish(r, "stop")
                events.append(StepEvent(r, None, "stop"))
                continue
            r.tokens.append(t)
            events.append(StepEvent(r, t, None))
            if len(r.tokens) >= r.limit:
                self.scheduler.finish(r, "length")
                events.append(StepEvent(r, None, "length"))
        return events


def _live(model_ref: weakref.ref) -> Llava:
    model = model_ref()
    if model is None:
        raise RuntimeError("the runtime's model has been garbage-collected")
    return model


# ----------------------------------------------------------------------------- generate()

_RUNTIMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def default_runtime(model: Llava) -> Runtime:
    """The runtime ``generate`` uses for ``model``: built once (cache, CUDA graphs) and reused while
    the model stays on the same device and dtype."""
    w = model.decoder.embed.weight
    rt = _RUNTIMES.get(model)
    if rt is None or rt.device != w.device or rt.dtype != w.dtype:
        rt = _RUNTIMES[model] = Runtime(model)
    model.fuse_weights()  # again, in case weights were re-assigned since (a no-op when still fused)
    return rt


def split_images(model: Llava, prompts: list[list[int]], images: torch.Tensor | None,
                 image_sizes: torch.Tensor | None = None) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Cut ``images`` [ΣK, 3, S, S] and ``image_sizes`` [N, 2] into each prompt's (pixels, sizes): a
    prompt takes the next images until their rows (``cfg.image_rows``) cover its placeholders."""
    return split_per_prompt(model.config, prompts, images, image_sizes)


def generate(model: Llava, prompts: list[list[int]], *, images: torch.Tensor | None = None,
             image_sizes: torch.Tensor | None = None,
             max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             repetition_penalty: float = 1.0, stop_token_ids: list[int] | None = None,
             seed: int | None = None, stream: bool = False, output_logits: bool = False,
             runtime: Runtime | None = None):
    """Generate continuations of token-id prompts.

    prompts: token-id lists (ragged; each image's placeholders expanded to its rows, ``cfg.image_rows``);
    images: [ΣK, 3, S, S] the tiles of all images of all prompts, in order (or None);
    image_sizes: [N, 2] (height, width) of each image (required for AnyRes; optional otherwise);
    stop_token_ids: None = the checkpoint's EOS; [] = never stop early. Prompt i samples with
    seed ``seed + i`` (so its output does not depend on the rest of the batch).
    Returns a list of ``GenerationOutput`` (``.tokens`` new tokens, stop token excluded;
    ``.finish_reason`` "stop" | "length"; ``.logits`` [steps, V] when ``output_logits``), or with
    ``stream=True`` an iterator of ``TokenEvent``s as tokens are produced.
    Raises ValueError for invalid prompts, images or settings; RuntimeError if the model fails.
    """
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    per_prompt = split_images(model, prompts, images, image_sizes)
    if stop_token_ids is None:
        eos = model.config.text.eos_token_id
        stop_token_ids = [] if eos is None else [eos]
    rt = runtime or default_runtime(model)
    if rt.has_work:
        raise RuntimeError("the runtime is busy (an earlier streaming generate was not exhausted or closed)")
    reqs = []
    try:
        for i, (p, (pix, sizes)) in enumerate(zip(prompts, per_prompt, strict=True)):
            params = SamplingParams(max_new_tokens=max_new_tokens, temperature=float(temperature),
                                    top_p=float(top_p), top_k=int(top_k),
                                    repetition_penalty=float(repetition_penalty),
                                    stop_token_ids=tuple(int(t) for t in stop_token_ids),
                                    seed=None if seed is None else seed + i)
            reqs.append(rt.submit(list(p), pixel_values=pix, image_sizes=sizes, params=params,
                                  keep_logits=output_logits))
    except BaseException:
        for r in reqs:
            rt.cancel(r)
        raise
    events = _drive(rt, reqs)
    if stream:
        return events
    for _ in events:
        pass
    return [r.output() for r in reqs]


def _drive(rt: Runtime, reqs: list[Request]) -> Iterator[TokenEvent]:
    index = {id(r): i for i, r in enumerate(reqs)}
    try:
        while any(not r.finished for r in reqs):
            for ev in rt.step():
                if ev.finish_reason == "error":
                    raise RuntimeError(f"generation failed: {ev.request.error}")
                yield TokenEvent(index[id(ev.request)], ev.token, ev.finish_reason)
    finally:  # a closed stream frees what it still holds
        for r in reqs:
            rt.cancel(r)
