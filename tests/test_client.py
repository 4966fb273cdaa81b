"""engine.client.ChatClient (on the official openai client) against a scripted HTTP server on 127.0.0.1
(429, 5xx, garbage, truncation, slow).

``FakeServer`` (tests/helpers.py) runs in a daemon thread, stops itself after ``lifetime`` seconds
whatever happens, and records every request.
"""
from __future__ import annotations

import time

import pytest
from helpers import SECRET, FakeServer, Reply

from engine.client import ChatClient, ChatError, ChatResult

MSG = [{"role": "user", "content": "hi"}]


def make(server, **kw):
    kw.setdefault("timeout", 2.0)
    return ChatClient(server.url, "fake", **kw)


def test_success_sends_bearer_and_counts_usage(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with FakeServer(lambda r, h, n: Reply(text="bonjour")) as srv:
        client = make(srv, prompt_price_per_1k=1.0, completion_price_per_1k=2.0)
        result = client.chat(MSG, temperature=0.5, max_tokens=9, seed=4)
    assert result == ChatResult(text="bonjour", finish_reason="stop",
                                usage={"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18})
    assert srv.headers[0]["Authorization"] == f"Bearer {SECRET}"
    assert srv.requests[0] == {"model": "fake", "messages": MSG, "temperature": 0.5, "max_tokens": 9,
                               "seed": 4}
    assert client.usage.as_dict() == {"requests": 1, "retries": 0, "prompt_tokens": 11,
                                      "completion_tokens": 7, "failures": 0,
                                      "cost": pytest.approx((11 * 1.0 + 7 * 2.0) / 1000)}
    assert SECRET not in repr(client) and SECRET not in repr(client.usage)


def test_no_key_no_header(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with FakeServer(lambda r, h, n: Reply()) as srv:
        make(srv).chat(MSG)
    assert "Authorization" not in srv.headers[0]


@pytest.mark.parametrize("fault", [
    Reply(status=429, headers={"Retry-After": "0"}),
    Reply(status=500),
    Reply(status=503),
    Reply(truncate=True),
    Reply(delay=1.0),                       # beyond the 0.3 s timeout
], ids=["429", "500", "503", "truncated", "timeout"])
def test_transient_faults_are_retried(fault):
    with FakeServer(lambda r, h, n: fault if n < 2 else Reply(text="ok")) as srv:
        client = make(srv, timeout=0.3, max_retries=3)
        assert client.chat(MSG).text == "ok"
    assert len(srv.requests) == 3
    assert client.usage.requests == 3 and client.usage.retries == 2 and client.usage.failures == 0


def test_retries_exhausted_raise_chat_error():
    with FakeServer(lambda r, h, n: Reply(status=500, body=b"boom")) as srv:
        client = make(srv, max_retries=2)
        with pytest.raises(ChatError) as e:
            client.chat(MSG)
    assert len(srv.requests) == 3 and e.value.status == 500 and e.value.attempts == 3
    assert "HTTP 500" in e.value.reason and "boom" in e.value.reason
    assert client.usage.failures == 1


def test_client_error_is_not_retried_and_key_is_scrubbed(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    # A hostile or buggy server that echoes the credentials back in its error body.
    with FakeServer(lambda r, h, n: Reply(status=401, body=f"bad key {h['Authorization']}".encode())) as srv:
        with pytest.raises(ChatError) as e:
            make(srv).chat(MSG)
    assert len(srv.requests) == 1 and e.value.status == 401
    assert SECRET not in str(e.value) and SECRET not in repr(e.value) and "***" in e.value.reason


@pytest.mark.parametrize("body,why", [
    (b"{not json", "not JSON"),
    (b'{"choices": []}', "no choices"),
    (b'{"choices": [{"message": {"role": "assistant"}}]}', "content"),
    (b"[1, 2]", "not an object"),
])
def test_malformed_body_retried_then_error(body, why):
    with FakeServer(lambda r, h, n: Reply(body=body)) as srv:
        client = make(srv, malformed_retries=2)
        with pytest.raises(ChatError) as e:
            client.chat(MSG)
    assert len(srv.requests) == 3 and why in e.value.reason


def test_malformed_once_then_good():
    with FakeServer(lambda r, h, n: Reply(body=b"garbage") if n == 0 else Reply(text="fine")) as srv:
        assert make(srv, malformed_retries=1).chat(MSG).text == "fine"


def test_connection_refused_is_retried_then_fails():
    with FakeServer(lambda r, h, n: Reply()) as srv:
        url = srv.url
    client = ChatClient(url, "fake", max_retries=2)  # the port is closed now
    with pytest.raises(ChatError) as e:
        client.chat(MSG)
    assert "connection" in e.value.reason and client.usage.requests == 3


def test_retry_after_is_honoured():
    busy = Reply(status=429, headers={"Retry-After": "2"})
    with FakeServer(lambda r, h, n: busy if n < 1 else Reply(text="later")) as srv:
        start = time.monotonic()
        assert make(srv, max_retries=1).chat(MSG).text == "later"
        waited = time.monotonic() - start
    assert len(srv.requests) == 2 and 1.9 <= waited < 10  # the server's 2 s, not the client's own backoff


def test_chat_many_bounded_concurrency_and_every_index_once():
    def script(r, h, n):
        text = r["messages"][0]["content"]
        if text == "q5":
            return Reply(status=400)
        return Reply(text=text.upper(), delay=0.05)

    with FakeServer(script) as srv:
        client = make(srv, concurrency=3)
        results = dict(client.chat_many([[{"role": "user", "content": f"q{i}"}] for i in range(12)]))
    assert sorted(results) == list(range(12))
    assert isinstance(results[5], ChatError) and results[5].status == 400
    assert all(results[i].text == f"Q{i}" for i in range(12) if i != 5)
    assert 2 <= srv.max_in_flight <= 3
    assert client.usage.requests == 12 and client.usage.failures == 1


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="base_url"):
        ChatClient("127.0.0.1:8000", "m")
    with pytest.raises(ValueError, match="concurrency"):
        ChatClient("http://127.0.0.1:1/v1", "m", concurrency=0)
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        ChatClient("http://127.0.0.1:1/v1", "m").chat([{"role": "user"}])
