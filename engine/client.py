"""One OpenAI-compatible chat client: the teacher for instruction data and the evaluation judge.

Built on the official ``openai`` package, which owns the transport: timeouts, retries of 429,
5xx, timeouts, connection errors and truncated bodies with exponential backoff and jitter,
honouring ``Retry-After``. ``base_url`` is the API root the way OpenAI spells it
(``https://api.openai.com/v1``, ``http://127.0.0.1:8000/v1`` for ``engine.serve``).

What this file adds (why: a teacher run makes thousands of calls and must neither die on one
hiccup nor leak its key):

- a 200 whose body is not JSON, or has no ``choices[0].message.content`` → retried up to
  ``malformed_retries`` times (a flaky proxy can garble one answer), then a ``ChatError``;
- every failure that retrying cannot fix (a 4xx other than 429, retries exhausted) is a
  ``ChatError`` value with the reason and the last HTTP status, never an exception that stops
  a run of thousands of calls (``chat_many`` yields it in place of the result);
- usage counters over the client's lifetime (HTTP requests sent, retries, tokens, failures, cost);
- ``chat_many``: bounded concurrency over a lazy iterator of requests, results as they land.

The API key is read from the environment variable named by ``api_key_env`` and sent as a
``Bearer`` header (none when the variable is unset or empty: local servers need none). It is
never part of a repr, a log line or an exception message: any text that could echo it (an
error body) is scrubbed before it is stored.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import threading
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import openai

__all__ = ["ChatClient", "ChatError", "ChatResult", "ChatUsage"]

_BODY_SNIPPET = 200  # characters of an error body kept in a ChatError reason


@dataclass(frozen=True, kw_only=True)
class ChatResult:
    """One completed chat call: the assistant text, why it stopped, and the server's token usage."""
    text: str
    finish_reason: str | None
    usage: dict


class ChatError(Exception):
    """A chat call that failed for good. ``reason`` says why; ``status`` is the last HTTP status (or None)."""

    def __init__(self, reason: str, *, status: int | None = None, attempts: int = 1):
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.attempts = attempts

    def __repr__(self) -> str:
        return f"ChatError({self.reason!r}, status={self.status}, attempts={self.attempts})"


@dataclass(kw_only=True)
class ChatUsage:
    """Running totals over a client's lifetime (thread-safe through the client's lock)."""
    requests: int = 0           # HTTP requests sent, retries included
    retries: int = 0            # requests that were repeats of a failed one
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failures: int = 0           # calls that ended in ChatError
    prompt_price_per_1k: float | None = None
    completion_price_per_1k: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def cost(self) -> float | None:
        """Estimated spend from the per-1k-token prices given to the client, else None."""
        if self.prompt_price_per_1k is None and self.completion_price_per_1k is None:
            return None
        return (self.prompt_tokens * (self.prompt_price_per_1k or 0.0)
                + self.completion_tokens * (self.completion_price_per_1k or 0.0)) / 1000.0

    def as_dict(self) -> dict:
        out = {"requests": self.requests, "retries": self.retries, "prompt_tokens": self.prompt_tokens,
               "completion_tokens": self.completion_tokens, "failures": self.failures}
        if self.cost is not None:
            out["cost"] = round(self.cost, 6)
        return out


class _Malformed(Exception):
    """Internal: an HTTP 200 whose body is not a usable chat completion."""


class ChatClient:
    """Client for one model behind one OpenAI-compatible endpoint.

    Args:
        base_url: API root, e.g. ``http://127.0.0.1:8000/v1``; requests go to ``/chat/completions`` under it.
        model: the ``model`` field of every request.
        api_key_env: name of the environment variable holding the key; unset or empty → no
            ``Authorization`` header.
        timeout: seconds per socket operation (connect, each read) of one HTTP request.
        max_retries: repeats the ``openai`` client allows after a transient failure.
        concurrency: most requests in flight at once in ``chat_many``.
        malformed_retries: repeats allowed after a 200 with an unusable body.
        prompt_price_per_1k, completion_price_per_1k: optional prices for ``usage.cost``.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 60.0, max_retries: int = 5, concurrency: int = 8, malformed_retries: int = 2,
                 prompt_price_per_1k: float | None = None, completion_price_per_1k: float | None = None):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if not model:
            raise ValueError("model must be a non-empty string")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        for name, value in (("max_retries", max_retries), ("malformed_retries", malformed_retries)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.malformed_retries = malformed_retries
        self.concurrency = concurrency
        self.usage = ChatUsage(prompt_price_per_1k=prompt_price_per_1k,
                               completion_price_per_1k=completion_price_per_1k)
        self.__key = os.environ.get(api_key_env) or None  # private: never in repr, logs or errors
        # Without a key the header is omitted per request (the openai client insists on some key).
        self._headers = None if self.__key else {"Authorization": openai.Omit()}
        self._attempts = threading.local()  # HTTP requests of the current call, per calling thread
        # No proxy for loopback: an HTTP_PROXY set for the internet must not swallow calls to a local server.
        host = urllib.parse.urlsplit(self.base_url).hostname or ""
        http = openai.DefaultHttpxClient(trust_env=host not in ("127.0.0.1", "localhost", "::1"),
                                         event_hooks={"request": [self._count]})
        self._openai = openai.OpenAI(base_url=self.base_url, api_key=self.__key or "unused",
                                     timeout=self.timeout, max_retries=max_retries, http_client=http)

    def __repr__(self) -> str:
        return (f"ChatClient(base_url={self.base_url!r}, model={self.model!r}, "
                f"api_key_env={self.api_key_env!r}, timeout={self.timeout}, "
                f"max_retries={self.max_retries}, concurrency={self.concurrency})")

    def _count(self, request) -> None:  # an httpx request hook: runs once per HTTP request, retries too
        self._attempts.n = getattr(self._attempts, "n", 0) + 1
        with self.usage._lock:
            self.usage.requests += 1

    # ---- one call -------------------------------------------------------------------------------------

    def chat(self, messages: Sequence[dict], *, temperature: float = 0.0, max_tokens: int | None = None,
             seed: int | None = None) -> ChatResult:
        """Send one chat completion request (with retries) and return its first choice.

        ``messages``: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``, non-empty.
        Raises ``ChatError`` when the call fails for good (the reason names the last failure);
        ``ValueError`` for malformed ``messages``.
        """
        body = self._body(messages, temperature, max_tokens, seed)
        self._attempts.n = 0
        try:
            result = self._call(body)
        except ChatError as e:
            e.attempts = self._attempts.n
            with self.usage._lock:
                self.usage.failures += 1
            raise
        finally:
            with self.usage._lock:
                self.usage.retries += max(0, self._attempts.n - 1)
        with self.usage._lock:
            self.usage.prompt_tokens += int(result.usage.get("prompt_tokens") or 0)
            self.usage.completion_tokens += int(result.usage.get("completion_tokens") or 0)
        return result

    def _call(self, body: dict) -> ChatResult:
        malformed = 0
        while True:
            try:
                raw = self._openai.chat.completions.with_raw_response.create(**body, extra_headers=self._headers)
            except openai.APIStatusError as e:
                snippet = self._scrub(_text(e)[:_BODY_SNIPPET])
                if e.status_code == 429 or e.status_code >= 500:
                    raise ChatError(f"gave up after {self._attempts.n} attempts: HTTP {e.status_code}: {snippet}",
                                    status=e.status_code) from None
                raise ChatError(f"HTTP {e.status_code} from {self.base_url}: {snippet}", status=e.status_code) from None
            except openai.APITimeoutError:
                raise ChatError(f"gave up after {self._attempts.n} attempts: timed out after {self.timeout:g}s") \
                    from None
            except openai.APIConnectionError as e:
                cause = e.__cause__ or e
                raise ChatError(f"gave up after {self._attempts.n} attempts: connection error: "
                                f"{type(cause).__name__}: {self._scrub(str(cause))}") from None
            try:
                return _parse(raw)
            except _Malformed as e:
                if malformed >= self.malformed_retries:
                    raise ChatError(f"malformed response after {self._attempts.n} attempts: {e}", status=200) \
                        from None
                malformed += 1

    def _body(self, messages, temperature, max_tokens, seed) -> dict:
        if not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)):
                raise ValueError(f"messages[{i}] must be a dict with string 'role' and 'content'")
        body = {"model": self.model, "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
                "temperature": float(temperature)}
        if max_tokens is not None:
            body["max_tokens"] = int(max_tokens)
        if seed is not None:
            body["seed"] = int(seed)
        return body

    def _scrub(self, text: str) -> str:
        return text.replace(self.__key, "***") if self.__key else text

    # ---- many calls -----------------------------------------------------------------------------------

    def chat_many(self, requests: Iterable[Sequence[dict]], *, temperature: float = 0.0,
                  max_tokens: int | None = None, seed: int | None = None
                  ) -> Iterator[tuple[int, ChatResult | ChatError]]:
        """Run ``chat`` over message lists, ``concurrency`` at once; yield ``(index, result)`` as each ends.

        ``index`` is the position in ``requests``; failures are yielded as ``ChatError`` values, not raised.
        Requests are pulled lazily (at most ``2 · concurrency`` pending), so a long iterator is fine.
        Closing the generator early cancels what has not started and waits for what has.
        """
        it = enumerate(requests)
        window = 2 * self.concurrency
        pool = cf.ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="chat")
        pending: dict[cf.Future, int] = {}
        try:
            exhausted = False
            while True:
                while not exhausted and len(pending) < window:
                    try:
                        index, messages = next(it)
                    except StopIteration:
                        exhausted = True
                        break
                    future = pool.submit(self.chat, messages, temperature=temperature,
                                         max_tokens=max_tokens, seed=seed)
                    pending[future] = index
                if not pending:
                    return
                done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    index = pending.pop(future)
                    try:
                        yield index, future.result()
                    except ChatError as e:
                        yield index, e
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _text(e: openai.APIStatusError) -> str:
    """The error body as the server sent it (the client's message reformats JSON bodies)."""
    try:
        return e.response.text
    except Exception:  # a body that cannot be read or decoded: the client's own message then
        return str(e.message)


def _parse(raw) -> ChatResult:
    """A raw ``openai`` response → ChatResult; _Malformed when the body is not a usable completion."""
    try:
        data = json.loads(raw.http_response.content.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _Malformed(f"body is not JSON ({e.__class__.__name__}: {e})") from None
    if not isinstance(data, dict):
        raise _Malformed(f"body is a JSON {type(data).__name__}, not an object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise _Malformed("body has no choices")
    choice = choices[0]
    message = choice.get("message") if isinstance(choice, dict) else None
    text = message.get("content") if isinstance(message, dict) else None
    if not isinstance(text, str):
        raise _Malformed("choices[0].message.content is missing or not a string")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    return ChatResult(text=text, finish_reason=choice.get("finish_reason"), usage=dict(usage))
