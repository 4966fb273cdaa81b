"""The judge model of both evaluators: a text-only chat model behind an OpenAI-compatible endpoint.

This file holds what ScienceQA ensembling and LLaVA-Bench reviews share: the judge settings
(``JudgeConfig``, built from the same CLI flags in both), the client (``engine.client.ChatClient``,
which owns retries and concurrency), and ``run_judge``: a resumable fan-out that writes each reply
to an append-only JSONL the moment it arrives. The prompts themselves live with their evaluator.

Determinism: everything downstream of the judge is a pure function of the stored replies, so an
evaluation re-scored from the same reply file gives the same numbers; only the calls themselves
depend on the judge (use ``temperature=0`` and a ``seed`` where the server honours them).
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass

from engine.client import ChatClient, ChatError, ChatResult
from llava_evals.common import JsonlAppender, Progress


@dataclass(frozen=True, kw_only=True)
class JudgeConfig:
    """Where the judge is and how it is sampled."""
    base_url: str                   # API root, e.g. http://127.0.0.1:8000/v1
    model: str                      # the request's ``model`` field
    temperature: float = 0.0
    max_tokens: int | None = 1024
    seed: int | None = None
    concurrency: int = 8
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = 60.0
    max_retries: int = 5

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"judge temperature must be >= 0, got {self.temperature}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"judge max_tokens must be >= 1, got {self.max_tokens}")

    def client(self) -> ChatClient:
        return ChatClient(self.base_url, self.model, api_key_env=self.api_key_env, timeout=self.timeout,
                          max_retries=self.max_retries, concurrency=self.concurrency)

    def as_dict(self) -> dict:
        return asdict(self)


def add_judge_args(p: argparse.ArgumentParser, *, temperature: float) -> None:
    """The judge flags, the same for every command that calls a judge."""
    g = p.add_argument_group("judge")
    g.add_argument("--judge-url", required=True, help="API root, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--judge-model", required=True, help="model name sent to the judge endpoint")
    g.add_argument("--temperature", type=float, default=temperature, help=f"default {temperature}")
    g.add_argument("--max-tokens", type=int, default=1024, help="judge reply length limit")
    g.add_argument("--seed", type=int, default=None, help="sampling seed sent to the judge")
    g.add_argument("--concurrency", type=int, default=8, help="judge requests in flight at once")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    g.add_argument("--timeout", type=float, default=60.0, help="seconds per judge request")
    g.add_argument("--max-retries", type=int, default=5, help="retries of a failed judge request")


def judge_config(args: argparse.Namespace) -> JudgeConfig:
    return JudgeConfig(base_url=args.judge_url, model=args.judge_model, temperature=args.temperature,
                       max_tokens=args.max_tokens, seed=args.seed, concurrency=args.concurrency,
                       api_key_env=args.api_key_env, timeout=args.timeout, max_retries=args.max_retries)


class JudgeFailed(RuntimeError):
    """Some judge calls failed for good; their replies were not written, so a rerun retries exactly them."""


def run_judge(cfg: JudgeConfig, jobs: Sequence[tuple[Hashable, list[dict]]], out: JsonlAppender,
              make_row: Callable[[Hashable, ChatResult], dict], *, name: str,
              client: ChatClient | None = None) -> dict:
    """Send every job's messages to the judge; write ``make_row(key, result)`` to ``out`` as each reply lands.

    ``jobs`` are ``(key, messages)`` pairs that are not done yet (the caller skips done keys).
    Failed calls are not written; after all jobs ran, JudgeFailed lists them (the replies that did
    arrive are kept, so a rerun only retries the failures). Returns the client's usage counters.
    """
    client = client or cfg.client()
    progress = Progress(name, len(jobs))
    failed: list[tuple[Hashable, ChatError]] = []
    for index, result in client.chat_many((m for _, m in jobs), temperature=cfg.temperature,
                                          max_tokens=cfg.max_tokens, seed=cfg.seed):
        key = jobs[index][0]
        if isinstance(result, ChatError):
            failed.append((key, result))
        else:
            out.write(make_row(key, result))
        progress.update()
    if failed:
        first = ", ".join(f"{k}: {e.reason}" for k, e in failed[:3])
        raise JudgeFailed(f"{len(failed)} of {len(jobs)} judge calls failed (rerun to retry them); "
                          f"first: {first}")
    return client.usage.as_dict()
