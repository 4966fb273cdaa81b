"""A sequence inside a runtime (``Request``) and what it ends with (``GenerationOutput``).

``Request`` holds the caller's prompt and images, the tokens generated so far, and the scheduler's
bookkeeping for it (slot, blocks, cached tokens, prefix keys, arrival order); ``engine.scheduler``
reads and writes the latter, ``engine.generate`` the rest.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.kv_cache import ImageSpan
from engine.sampling import SamplingParams


@dataclass
class GenerationOutput:
    """One prompt's result: new tokens (the stop token excluded) and why it ended."""
    tokens: list[int]
    finish_reason: str
    logits: torch.Tensor | None = None  # [len(tokens) (+1 if stopped), V] raw logits when asked for


@dataclass(eq=False)
class Request:
    """A sequence inside a runtime. ``tokens`` grows as it decodes; ``finish_reason`` is set at the end
    ("stop", "length", "cancelled" or "error" with ``error`` holding the message)."""
    prompt: list[int]
    pixel_values: torch.Tensor | None     # [ΣK, 3, S, S]: every tile of every image of the prompt, in order
    params: SamplingParams
    image_sizes: torch.Tensor | None = None  # [N, 2] (height, width) per image, when given
    keep_logits: bool = False
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    logits: list[torch.Tensor] = field(default_factory=list)
    slot: int = -1
    blocks: list[int] = field(default_factory=list)
    cached: int = 0                   # tokens whose K/V are in the cache
    limit: int = 0                    # most new tokens (max_new_tokens capped by the context length)
    reused: int = 0                   # leading prompt tokens whose K/V came from a shared prefix
    spans: list[ImageSpan] = field(default_factory=list)  # the prompt's images (digests with prefix caching)
    keys: list[bytes] | None = None       # prefix keys of the sequence's full blocks so far
    registered: int = 0               # leading blocks offered for reuse so far
    arrival: int = 0                  # submission order: the scheduler's priority (older first)
    admitted: bool = False            # admitted at least once (a preempted request is readmitted)
    preemptions: int = 0              # times its blocks were taken back (its K/V then recomputed)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def seq_len(self) -> int:
        """Prompt and generated tokens so far (the last generated one is not in the cache yet)."""
        return len(self.prompt) + len(self.tokens)

    @property
    def decoding(self) -> bool:
        """Everything but the last generated token is cached: the next step runs that one token."""
        return bool(self.tokens) and self.cached == self.seq_len - 1

    def output(self) -> GenerationOutput:
        logits = torch.stack(self.logits) if self.keep_logits and self.logits else None
        return GenerationOutput(tokens=list(self.tokens), finish_reason=self.finish_reason, logits=logits)
