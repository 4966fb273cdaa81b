"""The runtime's scheduler: which sequences run how many tokens in a step, and the slots and KV
blocks they hold. No model and no forward here: ``Scheduler.schedule`` returns the step's work
list, (request, tokens to run) with their blocks allocated; ``engine.generate.Runtime`` runs it.

Letters: S runtime slots (most sequences at once), nb blocks per sequence (the block table's width).

The policy, one ``schedule()`` per step:

- **Running sequences first, oldest first**: a decoding one runs 1 token; one still prefilling
  runs the next chunk of what the budget leaves after every decode row (``max_step_tokens``, with
  ``chunked_prefill``), but only half of that while requests wait for a free slot, so a short
  prompt arriving behind a long one starts at the next step instead of after the long prefill
  (the long one still gets half the budget; a prompt admitted with others queued behind it
  likewise takes half of what is left). Without ``chunked_prefill`` prompts run whole, up to
  ``max_prefill_tokens`` a step (the first prefill of a step may exceed it alone).
- **Chunks never split an image**: a chunk ending inside an image's rows ends before the image,
  or past its end when the image starts the chunk (one image's rows come from one tower call).
- **Lazy blocks**: blocks are taken as tokens need them, not reserved for ``max_new_tokens`` at
  admission. When the cache runs out, the youngest running sequence not yet scheduled is
  **preempted** (its blocks and slot freed, its prompt and tokens so far recomputed when
  readmitted; it waits first in line), or the sequence itself when it is the youngest. The
  oldest is never preempted, and a request fits the cache alone (``Runtime.submit`` checks), so
  every request finishes.
- **Admission**: then waiting requests are admitted in FIFO order while a slot, the budget and
  free blocks last (no preemption for them; a request that does not fit stops the admission, so a
  long prompt is never starved).
- **Prefix reuse** (``prefix_caching``): an admitted request first shares the registered blocks
  holding its longest cached prefix (``PagedKVCache.lookup``), or blocks an earlier request of
  the same step writes; reuse never splits an image and always leaves at least one token to
  compute, for the next logits. Full blocks are registered as prefill and decode write them
  (``register_full_blocks``, called by the runtime after its forward). A change of the model's
  weights (an in-place update, a reassignment) drops every shared prefix.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from engine.kv_cache import PagedKVCache, block_keys
from engine.request import Request

if TYPE_CHECKING:
    from engine.generate import RuntimeConfig


class Scheduler:
    """The waiting queue, the running sequences, the free slots and the block table (S, nb) of one
    runtime's cache. ``add`` queues a request, ``schedule`` picks a step's work, ``finish`` /
    ``cancel`` free what a request holds. Not thread-safe: one runtime thread owns it.

    ``parameters`` yields the model's weights when called (their stamp is compared before prefix
    lookups); it must not hold the runtime, which holds this scheduler.
    """

    def __init__(self, cache: PagedKVCache, config: RuntimeConfig, *, max_blocks_per_seq: int,
                 parameters: Callable[[], Iterable[torch.Tensor]]):
        self.cache, self.config = cache, config
        s = config.max_batch
        self.block_table = torch.zeros(s, max_blocks_per_seq, dtype=torch.int32, device=cache.k.device)  # (S, nb)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.free_slots = list(range(s - 1, -1, -1))  # pop() hands out slot 0 first
        self.prompt_tokens = 0  # prompt tokens admitted so far, and how many of them a shared prefix covered
        self.reused_tokens = 0
        self.preemptions = 0   # sequences whose blocks were taken back (recomputed when readmitted)
        self._arrivals = 0
        self._parameters = parameters
        self._weights_stamp: tuple | None = None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- requests -------------------------------------------------------------------------------------

    def add(self, req: Request) -> None:
        """Queue ``req`` last; its arrival order is its priority from now on."""
        req.arrival = self._arrivals
        self._arrivals += 1
        self.waiting.append(req)

    def cancel(self, req: Request, reason: str) -> None:
        """End ``req`` now (waiting or running); a finished one is left as it is."""
        if req.finished:
            return
        if req in self.waiting:
            self.waiting.remove(req)
        self.finish(req, reason)

    def finish(self, req: Request, reason: str) -> None:
        """Mark ``req`` ended and give back its slot and blocks (usable by the next step)."""
        req.finish_reason = reason
        if req in self.running:
            self.running.remove(req)
        if req.slot >= 0:
            self.cache.release(req.blocks)
            self.free_slots.append(req.slot)
            req.blocks, req.slot = [], -1

    # ---- one step -------------------------------------------------------------------------------------

    def schedule(self) -> tuple[list[tuple[Request, int]], list[Request]]:
        """This step's work, (request, tokens to run) with their blocks allocated and their block-table
        rows written, and the requests admitted into a slot by it (their slot's sampling settings are
        the runtime's to write). Running sequences come first, oldest first; see the module docstring."""
        chunked = self.config.chunked_prefill
        queue = sorted(self.running, key=lambda r: r.arrival)
        left = (self.config.max_step_tokens - sum(r.decoding for r in queue) if chunked
                else self.config.max_prefill_tokens)
        reserve = left // 2 if chunked and self.waiting and self.free_slots else 0
        work, first_prefill = [], True
        i = 0
        while i < len(queue):
            r = queue[i]
            if r.decoding:
                n = 1
            elif chunked and left - reserve <= 0:
                i += 1
                continue
            else:
                n = self._chunk_end(r, r.cached, left - reserve if chunked else None) - r.cached
            while self._blocks_needed(r, n) > self.cache.free_blocks and queue[-1] is not r:
                self._preempt(queue.pop())             # younger than r: scheduled after it
            short = self._blocks_needed(r, n) > self.cache.free_blocks
            if short and chunked and not r.decoding:    # a smaller chunk the free blocks hold
                room = (len(r.blocks) + self.cache.free_blocks) * self.cache.block_size
                n = self._chunk_end(r, r.cached, room - r.cached) - r.cached if room > r.cached else 0
                short = n <= 0 or self._blocks_needed(r, n) > self.cache.free_blocks
            if short:
                if r.decoding:                          # the youngest left: it yields its blocks
                    self._preempt(queue.pop(i))
                else:
                    i += 1
                continue
            self._grow(r, n)
            work.append((r, n))
            if not r.decoding:
                left -= n
                first_prefill = False
            i += 1
        admitted = self._admit(left, first_prefill)
        return work + admitted, [r for r, _ in admitted]

    def _blocks_needed(self, r: Request, n: int) -> int:
        return max(0, self.cache.blocks_for(r.cached + n) - len(r.blocks))

    def _grow(self, r: Request, n: int) -> None:
        """Allocate the blocks ``r`` needs to run ``n`` more tokens (and note them in its table row)."""
        need = self._blocks_needed(r, n)
        if need:
            start = len(r.blocks)
            r.blocks += self.cache.allocate(need)
            self.block_table[r.slot, start:len(r.blocks)] = torch.tensor(r.blocks[start:], dtype=torch.int32)

    def _chunk_end(self, r: Request, start: int, budget: int | None) -> int:
        """End of the chunk of ``r``'s sequence from ``start`` under ``budget`` tokens (None: all of it),
        moved so that no image is split: back to the image's start, or past its end when it starts
        the chunk (one image's rows come from one tower call)."""
        end = r.seq_len if budget is None else min(r.seq_len, start + budget)
        for im in r.spans:
            if im.start < end < im.end:
                return im.start if im.start > start else im.end
        return end

    def _preempt(self, r: Request) -> None:
        """Free ``r``'s blocks and slot and queue it first: readmitted, it recomputes prompt + tokens."""
        self.running.remove(r)
        self.cache.release(r.blocks)
        self.free_slots.append(r.slot)
        r.blocks, r.slot, r.cached, r.reused, r.registered = [], -1, 0, 0, 0
        r.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(r)  # older than every waiting request

    def _admit(self, left: int, first: bool) -> list[tuple[Request, int]]:
        """Waiting requests that get a slot, budget and blocks, in FIFO order (a request that does not fit
        stops the admission: a long prompt is never starved). Without chunking the first prefill of a step
        may exceed the budget alone."""
        chunked, bs = self.config.chunked_prefill, self.cache.block_size
        caching = self.config.prefix_caching
        if caching and self.waiting and self.free_slots:
            self._forget_prefixes_if_weights_changed()
        # Full blocks this step writes, by key: a later request of the same step with the same prefix shares
        # them too (each layer writes every fresh K/V row before attending).
        pending: dict[bytes, int] = {}
        admitted = []
        while self.waiting and self.free_slots and (left > 0 or (first and not chunked)):
            r = self.waiting[0]
            hits = self._prefix_hits(r, pending) if caching else []
            start = len(hits) * bs
            # with others waiting behind it (and slots for them) a prompt takes half of what is left
            share = max(1, left // 2) if chunked and len(self.waiting) > 1 and len(self.free_slots) > 1 else left
            end = self._chunk_end(r, start, share if chunked else None)
            room = (self.cache.free_blocks - self.cache.idle_among(hits) + len(hits)) * bs
            if chunked and end > room:
                end = self._chunk_end(r, start, room - start) if room > start else start
            need = self.cache.blocks_for(end) - len(hits)
            if end <= start or need > self.cache.free_blocks - self.cache.idle_among(hits) or (
                    not chunked and not first and end - start > left):
                break
            self.waiting.popleft()
            self.cache.share(hits)  # before allocating, which could otherwise evict them
            r.slot, r.blocks = self.free_slots.pop(), list(hits)
            r.cached = r.reused = start
            r.registered = len(hits)
            self.block_table[r.slot, :len(hits)] = torch.tensor(hits, dtype=torch.int32)
            self._grow(r, end - start)
            if caching:
                for i in range(len(hits), end // bs):
                    pending.setdefault(r.keys[i], r.blocks[i])
            if not r.admitted:
                r.admitted = True
                self.prompt_tokens += len(r.prompt)
                self.reused_tokens += r.reused
            self.running.append(r)
            admitted.append((r, end - start))
            left -= end - start
            first = False
        return admitted

    # ---- prefix reuse ---------------------------------------------------------------------------------

    def register_full_blocks(self, r: Request) -> None:
        """Offer the sequence's full, written blocks for reuse (prompt blocks as prefill writes them,
        then each block decode fills); the runtime calls it once ``r.cached`` has advanced."""
        full = r.cached // self.cache.block_size
        keys = self._seq_keys(r)
        for i in range(r.registered, full):
            self.cache.register(r.blocks[i], keys[i])
        r.registered = max(r.registered, full)

    def _forget_prefixes_if_weights_changed(self) -> None:
        """Shared K/V is only valid for the weights that computed it: an in-place update bumps a
        parameter's version counter, a reassignment changes its storage."""
        stamp = tuple(_weight_stamp(p) for p in self._parameters())
        if stamp != self._weights_stamp:
            self.cache.forget_prefixes()
            self._weights_stamp = stamp

    def _seq_keys(self, r: Request) -> list[bytes]:
        """Prefix keys of the full blocks of ``r``'s sequence (prompt + tokens; extended as it grows)."""
        bs = self.cache.block_size
        if r.keys is None:
            r.keys = block_keys(r.prompt, bs, r.spans, 0, len(r.prompt) // bs)
        full = r.seq_len // bs
        if full > len(r.keys):
            done = len(r.keys)
            r.keys += block_keys(r.prompt + r.tokens, bs, r.spans, done, full, r.keys[-1] if done else b"")
        return r.keys

    def _prefix_hits(self, r: Request, pending: dict[bytes, int]) -> list[int]:
        """Blocks ``r`` can share (registered, or ``pending`` in this step): at most seq_len - 1 tokens
        (the last token must run to give the next logits), cut back to a block boundary before any
        image they would split (an image's rows come from one tower call)."""
        bs = self.cache.block_size
        hits = self.cache.lookup(self._seq_keys(r)[:(r.seq_len - 1) // bs], pending)
        n = len(hits) * bs
        for im in reversed(r.spans):  # from the last image: a cut back to a block start can land in an earlier one
            if im.start < n < im.end:
                n = im.start // bs * bs
        return hits[:n // bs]


def _weight_stamp(p: torch.Tensor) -> tuple:
    """(address, version) of a weight's storage; for a tensor subclass (a quantized weight, whose own
    data_ptr is 0 and version never moves) the stamps of the plain tensors it holds."""
    if not is_traceable_wrapper_subclass(p):
        return (p.data_ptr(), p._version)
    return tuple(_weight_stamp(getattr(p, name)) for name in p.__tensor_flatten__()[0])
