"""One OpenAI-compatible chat client: the teacher for instruction data and the evaluation judge.

Standard library only (``urllib``): POST ``{base_url}/chat/completions`` with a JSON body, where
``base_url`` is the API root the way OpenAI spells it (``https://api.openai.com/v1``,
``http://127.0.0.1:8000/v1`` for ``engine.serve``).

Failure policy (why: a teacher run makes thousands of calls and must neither die on one
hiccup nor hammer a server that asks it to slow down):

- 429, 5xx, timeouts, connection errors, truncated bodies → retried up to ``max_retries``
  times with exponential backoff ``backoff · 2^attempt`` times a jitter factor in [0.5, 1.5)
  drawn from a seeded RNG; a ``Retry-After`` header (seconds or an HTTP date) is honoured
  instead of the computed delay.
- a 200 whose body is not JSON, or has no ``choices[0].message.content`` → retried up to
  ``malformed_retries`` times (a flaky proxy can garble one answer), then a ``ChatError``.
- any other 4xx (bad request, auth, unknown model) → ``ChatError`` at once: retrying cannot help.

The API key is read from the environment variable named by ``api_key_env`` and sent as a
``Bearer`` header. It is never part of a repr, a log line or an exception message: any text
that could echo it (an error body) is scrubbed before it is stored.
"""
from __future__ import annotations

import concurrent.futures as cf
import email.utils
import http.client
import json
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

__all__ = ["ChatClient", "ChatError", "ChatResult", "ChatUsage"]

RETRY_STATUS = frozenset({429, *range(500, 600)})
_MAX_RETRY_AFTER = 300.0  # seconds; a server asking for longer is treated as asking for this
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


class _Retryable(Exception):
    """Internal: a transient failure; ``retry_after`` is the server's requested wait, if any."""

    def __init__(self, reason: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.status, self.retry_after = reason, status, retry_after


class _Malformed(Exception):
    """Internal: an HTTP 200 whose body is not a usable chat completion."""


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), _MAX_RETRY_AFTER)


class ChatClient:
    """Client for one model behind one OpenAI-compatible endpoint.

    Args:
        base_url: API root, e.g. ``http://127.0.0.1:8000/v1``; requests go to ``/chat/completions`` under it.
        model: the ``model`` field of every request.
        api_key_env: name of the environment variable holding the key; unset or empty → no
            ``Authorization`` header (local servers need none).
        timeout: seconds per socket operation (connect, and each read) of one request.
        max_retries: repeats allowed after a transient failure (429, 5xx, timeout, connection, truncation).
        backoff: base delay in seconds of the exponential backoff.
        concurrency: most requests in flight at once in ``chat_many``.
        malformed_retries: repeats allowed after a 200 with an unusable body.
        max_backoff: cap of the computed (not the server-requested) delay.
        seed: seed of the jitter RNG, so a run's retry timing is reproducible.
        prompt_price_per_1k, completion_price_per_1k: optional prices for ``usage.cost``.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 60.0, max_retries: int = 5, backoff: float = 1.0, concurrency: int = 8,
                 malformed_retries: int = 2, max_backoff: float = 60.0, seed: int = 0,
                 prompt_price_per_1k: float | None = None, completion_price_per_1k: float | None = None):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if not model:
            raise ValueError("model must be a non-empty string")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        for name, value in (("backoff", backoff), ("max_backoff", max_backoff), ("max_retries", max_retries),
                            ("malformed_retries", malformed_retries)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.malformed_retries = malformed_retries
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.concurrency = concurrency
        self.usage = ChatUsage(prompt_price_per_1k=prompt_price_per_1k,
                               completion_price_per_1k=completion_price_per_1k)
        self.__key = os.environ.get(api_key_env) or None  # private: never in repr, logs or errors
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        # No proxy for loopback: an HTTP_PROXY set for the internet must not swallow calls to a local server.
        host = urllib.parse.urlsplit(self.base_url).hostname or ""
        handlers = [urllib.request.ProxyHandler({})] if host in ("127.0.0.1", "localhost", "::1") else []
        self._opener = urllib.request.build_opener(*handlers)

    def __repr__(self) -> str:
        return (f"ChatClient(base_url={self.base_url!r}, model={self.model!r}, "
                f"api_key_env={self.api_key_env!r}, timeout={self.timeout}, "
                f"max_retries={self.max_retries}, concurrency={self.concurrency})")

    # ---- one call -------------------------------------------------------------------------------------

    def chat(self, messages: Sequence[dict], *, temperature: float = 0.0, max_tokens: int | None = None,
             seed: int | None = None) -> ChatResult:
        """Send one chat completion request (with retries) and return its first choice.

        ``messages``: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``, non-empty.
        Raises ``ChatError`` when the call fails for good (the reason names the last failure);
        ``ValueError`` for malformed ``messages``.
        """
        body = self._body(messages, temperature, max_tokens, seed)
        transient = malformed = 0
        while True:
            attempt = transient + malformed
            with self.usage._lock:
                self.usage.requests += 1
                if attempt:
                    self.usage.retries += 1
            try:
                result = self._once(body)
            except _Retryable as e:
                if transient >= self.max_retries:
                    self._fail()
                    raise ChatError(f"gave up after {attempt + 1} attempts: {e.reason}",
                                    status=e.status, attempts=attempt + 1) from None
                self._sleep(transient, e.retry_after)
                transient += 1
                continue
            except _Malformed as e:
                if malformed >= self.malformed_retries:
                    self._fail()
                    raise ChatError(f"malformed response after {attempt + 1} attempts: {e}",
                                    status=200, attempts=attempt + 1) from None
                malformed += 1
                continue
            except ChatError:
                self._fail()
                raise
            with self.usage._lock:
                self.usage.prompt_tokens += int(result.usage.get("prompt_tokens") or 0)
                self.usage.completion_tokens += int(result.usage.get("completion_tokens") or 0)
            return result

    def _body(self, messages, temperature, max_tokens, seed) -> bytes:
        if not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)):
                raise ValueError(f"messages[{i}] must be a dict with string 'role' and 'content'")
        payload = {"model": self.model,
                   "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
                   "temperature": float(temperature)}
        if max_tokens is not None:
            payload["max_tokens"] = int(max_tokens)
        if seed is not None:
            payload["seed"] = int(seed)
        return json.dumps(payload).encode()

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.__key:
            headers["Authorization"] = f"Bearer {self.__key}"
        return headers

    def _scrub(self, text: str) -> str:
        return text.replace(self.__key, "***") if self.__key else text

    def _once(self, body: bytes) -> ChatResult:
        request = urllib.request.Request(self.url, data=body, headers=self._headers(), method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            try:
                snippet = self._scrub(e.read(_BODY_SNIPPET * 4).decode("utf-8", "replace")[:_BODY_SNIPPET])
            except (OSError, http.client.HTTPException):
                snippet = ""
            if e.code in RETRY_STATUS:
                retry_after = _parse_retry_after(e.headers.get("Retry-After") if e.headers else None)
                raise _Retryable(f"HTTP {e.code}: {snippet}", e.code, retry_after) from None
            raise ChatError(f"HTTP {e.code} from {self.url}: {snippet}", status=e.code) from None
        except http.client.IncompleteRead as e:
            raise _Retryable(f"truncated body ({len(e.partial)} bytes read)") from None
        except TimeoutError:  # socket.timeout is an alias of it since Python 3.10
            raise _Retryable(f"timed out after {self.timeout:g}s") from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, TimeoutError):
                raise _Retryable(f"timed out after {self.timeout:g}s") from None
            raise _Retryable(f"connection error: {self._scrub(str(reason))}") from None
        except (http.client.HTTPException, OSError) as e:  # ConnectionError is an OSError
            raise _Retryable(f"connection error: {type(e).__name__}: {self._scrub(str(e))}") from None
        return self._parse(raw)

    def _parse(self, raw: bytes) -> ChatResult:
        try:
            data = json.loads(raw.decode("utf-8"))
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

    def _sleep(self, attempt: int, retry_after: float | None) -> None:
        if retry_after is not None:
            delay = retry_after
        else:
            with self._rng_lock:
                jitter = 0.5 + self._rng.random()
            delay = min(self.max_backoff, self.backoff * (2 ** attempt)) * jitter
        if delay > 0:
            time.sleep(delay)

    def _fail(self) -> None:
        with self.usage._lock:
            self.usage.failures += 1

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
