"""engine.chat and the OpenAI-compatible server over real HTTP on 127.0.0.1 (tiny random model).

A tiny checkpoint with the project's tiny tokenizer is exported to a directory; the server is
built from that directory exactly as ``python -m engine.serve --model DIR`` builds it.
"""
import asyncio
import base64
import concurrent.futures as cf
import http.client
import io
import json
import re
import threading
import time

import pytest
import torch
from helpers import perturbed_lora
from PIL import Image

import engine
from engine.chat import TextDecoder, chat, encode_chat, load_tokenizer
from engine.client import ChatClient
from engine.conversation import get_template
from engine.generate import generate
from engine.serve import ServerConfig, build_server
from engine.tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    tok_dir = build_tiny_tokenizer(str(root / "tok"))
    tok = load_tokenizer(tok_dir)
    cfg = engine.tiny_config(vocab_size=len(tok), image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    engine.export_hf(engine.Llava(cfg), str(root / "ckpt"), tokenizer_dir=tok_dir)
    path = str(root / "ckpt")
    return path, engine.load(path).eval(), load_tokenizer(path)


@pytest.fixture(scope="module")
def live_server(ckpt):
    """The server as ``python -m engine.serve --model DIR --port 0`` builds it, serving in a thread."""
    path, _, _ = ckpt
    srv = build_server(ServerConfig(model=path, port=0, max_tokens_limit=64, default_max_tokens=16,
                                    max_images=2, max_body_bytes=1 << 20, max_batch=16,
                                    max_image_pixels=64 * 64))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def server(live_server):
    """Its port."""
    return live_server.server_address[1]


def request(port, method, path, body=None, raw=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    return resp.status, payload


def complete(port, messages, **kw):
    body = {"model": "x", "messages": messages, **kw}
    status, payload = request(port, "POST", "/v1/chat/completions", body)
    assert status == 200, payload
    obj = json.loads(payload)
    return obj["choices"][0]["message"]["content"], obj["choices"][0]["finish_reason"], obj


def stream(port, messages, **kw):
    status, payload = request(port, "POST", "/v1/chat/completions",
                              {"model": "x", "messages": messages, "stream": True, **kw})
    assert status == 200, payload
    events = [line[len(b"data: "):] for line in payload.split(b"\n\n") if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    return text, chunks[-1]["choices"][0]["finish_reason"]


def png_bytes(seed, size=(40, 30)):
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def data_url(seed):
    return "data:image/png;base64," + base64.b64encode(png_bytes(seed)).decode()


def test_health_and_models(server):
    status, payload = request(server, "GET", "/health")
    assert status == 200 and json.loads(payload)["status"] == "ok"
    status, payload = request(server, "GET", "/v1/models")
    assert status == 200 and json.loads(payload)["data"][0]["id"] == "ckpt"


def test_completions_equal_engine_chat(server, ckpt, tmp_path):
    _, model, tok = ckpt
    img_file = tmp_path / "a.png"
    img_file.write_bytes(png_bytes(2))
    cases = [
        ([{"role": "user", "content": "What is in the image?"}], []),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(1)}},
                                       {"type": "text", "text": "Describe the red circle."}]}],
         [png_bytes(1)]),
        ([{"role": "system", "content": "Be brief."},
          {"role": "user", "content": [{"type": "text", "text": "Compare "},
                                       {"type": "image_url", "image_url": {"url": str(img_file)}},
                                       {"type": "text", "text": " and "},
                                       {"type": "image_url", "image_url": {"url": data_url(3)}}]},
          {"role": "assistant", "content": "A square."},
          {"role": "user", "content": "And the colour?"}], [png_bytes(2), png_bytes(3)]),
    ]
    for messages, raw_images in cases:
        images = [Image.open(io.BytesIO(b)).convert("RGB") for b in raw_images]
        plain = []
        for m in messages:  # the same conversation with <image> markers where the parts were
            c = m["content"]
            if isinstance(c, list):
                c = "".join(p["text"] if p["type"] == "text" else "<image>" for p in c)
            plain.append({"role": m["role"], "content": c})
        want = chat(model, plain, images, tokenizer=tok, max_new_tokens=24)
        text, reason, obj = complete(server, messages, max_tokens=24)
        assert text == want and reason in ("stop", "length")
        assert obj["usage"]["completion_tokens"] <= 24
        assert stream(server, messages, max_tokens=24) == (text, reason)
    assert len(want) > 0


def test_a_repeated_conversation_reuses_its_prefix(server):
    """The second identical request (same image) prefills only its last block's worth; same answer."""
    def reused():
        return json.loads(request(server, "GET", "/health")[1])["reused_prompt_tokens"]

    messages = [{"role": "system", "content": "You are a careful assistant who describes shapes and colours."},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(4)}},
                                             {"type": "text", "text": "How many shapes are there?"}]}]
    before = reused()
    first = complete(server, messages, max_tokens=8)
    assert reused() == before   # no earlier request began with this system prompt
    second = complete(server, messages, max_tokens=8)
    assert second[:2] == first[:2]
    assert reused() - before >= 16
    prompt = second[2]["usage"]["prompt_tokens"]
    assert reused() - before == (prompt - 1) // 16 * 16  # whole blocks, the last prompt token recomputed


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server):
    good = [{"role": "user", "content": "How many shapes are there?"}]

    def post(body=None, raw=None, path="/v1/chat/completions"):
        return request(server, "POST", path, body, raw)

    def image(url):
        return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}

    garbage = "data:image/png;base64," + base64.b64encode(b"definitely not an image").decode()
    three = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(i)}} for i in range(3)]}]}
    bad = [
        (post(raw=b"{not json"), 400, "not valid JSON"),
        (post({"model": "x"}), 400, "'messages' is required"),
        (post({"messages": []}), 400, "non-empty"),
        (post(image(garbage)), 400, "cannot read the image"),
        (post(image("/no/such/image.png")), 400, "not found"),
        (post(image("https://example.com/a.png")), 400, "not fetched"),
        (post({"messages": good, "max_tokens": 100000}), 400, "out of range"),
        (post(three), 400, "more than 2"),
        (post({"messages": [{"role": "robot", "content": "hi"}]}), 400, "unknown role"),
        (post({"messages": [{"role": "user", "content": "x" * 5000}]}), 400, "context length"),
        (post(raw=b"x" * (2 << 20)), 413, "exceeds"),
        (post({"messages": good}, path="/v1/other"), 404, "no route"),
    ]
    for (status, payload), want_status, want_text in bad:
        assert status == want_status, payload
        assert want_text in json.loads(payload)["error"]["message"]
        text, _, _ = complete(server, good, max_tokens=8)   # and the next good request succeeds
        assert isinstance(text, str)
    # a streaming request that fails validation answers with a status, not a broken stream
    status, payload = post({"messages": good, "stream": True, "max_tokens": 0})
    assert status == 400


def test_32_concurrent_requests_complete_with_batch_invariant_answers(server, live_server, ckpt):
    _, model, tok = ckpt
    questions = [f"What color is the shape number {i}?" + " Describe it." * (i % 5) for i in range(32)]
    client = ChatClient(f"http://127.0.0.1:{server}/v1", "ckpt", max_retries=0, concurrency=32, timeout=120)
    results = dict(client.chat_many([[{"role": "user", "content": q}] for q in questions], max_tokens=12))
    assert sorted(results) == list(range(32))
    assert live_server.engine.runtime.peak_batch > 1   # requests were batched together
    for i, q in enumerate(questions):
        want = chat(model, [{"role": "user", "content": q}], tokenizer=tok, max_new_tokens=12)
        assert results[i].text == want
    # streamed clients at the same time as non-streamed ones
    with cf.ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda q: stream(server, [{"role": "user", "content": q}], max_tokens=12)[0],
                             questions[:8]))
    assert outs == [results[i].text for i in range(8)]


def test_official_openai_client_sync_async_and_streaming(server, ckpt):
    import openai

    _, model, tok = ckpt
    q = "What color is the square?"
    want = chat(model, [{"role": "user", "content": q}], tokenizer=tok, max_new_tokens=10)
    msgs = [{"role": "user", "content": q}]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="none", max_retries=0)
    assert [m.id for m in client.models.list()] == ["ckpt"]
    out = client.chat.completions.create(model="ckpt", messages=msgs, max_tokens=10)
    assert out.choices[0].message.content == want and out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.completion_tokens <= 10 and out.usage.total_tokens == out.usage.prompt_tokens + \
        out.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="ckpt", messages=msgs, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    with pytest.raises(openai.BadRequestError, match="out of range"):
        client.chat.completions.create(model="ckpt", messages=msgs, max_tokens=1000)

    async def run_async():
        aclient = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="none", max_retries=0)
        many = await asyncio.gather(*[aclient.chat.completions.create(model="ckpt", messages=msgs, max_tokens=10)
                                      for _ in range(4)])
        stream = await aclient.chat.completions.create(model="ckpt", messages=msgs, max_tokens=10, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
        await aclient.close()
        return [m.choices[0].message.content for m in many], text

    many, streamed = asyncio.run(run_async())
    assert many == [want] * 4 and streamed == want


def test_n_seed_stop_and_logprobs(server, ckpt):
    import openai

    _, model, tok = ckpt
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="none", max_retries=0)
    msgs = [{"role": "user", "content": "Name three shapes."}]
    kw = dict(model="ckpt", messages=msgs, max_tokens=12, temperature=1.0)
    three = client.chat.completions.create(n=3, seed=5, **kw)
    texts = [c.message.content for c in sorted(three.choices, key=lambda c: c.index)]
    assert [c.index for c in three.choices] == [0, 1, 2] and len(set(texts)) > 1  # seeds 5, 6, 7 differ
    # choice i samples with seed + i, whatever else runs beside it
    assert texts == [client.chat.completions.create(seed=5 + i, **kw).choices[0].message.content for i in range(3)]
    streamed = {}
    for c in client.chat.completions.create(n=3, seed=5, stream=True, **kw):
        for ch in c.choices:
            streamed[ch.index] = streamed.get(ch.index, "") + (ch.delta.content or "")
    assert [streamed[i] for i in range(3)] == texts
    assert three.usage.completion_tokens == sum(
        client.chat.completions.create(seed=5 + i, **kw).usage.completion_tokens for i in range(3))

    # a stop string cuts the text before it and ends with "stop"
    greedy = client.chat.completions.create(model="ckpt", messages=msgs, max_tokens=24).choices[0].message.content
    cut = greedy[len(greedy) // 2:len(greedy) // 2 + 3]
    assert len(cut) == 3
    stopped = client.chat.completions.create(model="ckpt", messages=msgs, max_tokens=24, stop=[cut]).choices[0]
    assert stopped.message.content == greedy[:greedy.index(cut)] and stopped.finish_reason == "stop"

    # logprobs: the model's own log-softmax at each step (fp32), the greedy token on top
    out = client.chat.completions.create(model="ckpt", messages=msgs, max_tokens=6, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    ids, _, _ = encode_chat(tok, get_template("vicuna_v1"), msgs, [], model)
    ref = generate(model, [ids], max_new_tokens=6, output_logits=True)[0]
    assert len(content) == len(ref.tokens)
    ref_lp = torch.log_softmax(ref.logits[:len(ref.tokens)].double(), -1)
    for step, (entry, t) in enumerate(zip(content, ref.tokens, strict=True)):
        assert entry.token == tok.decode([t]) and len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(float(ref_lp[step, t]), abs=1e-4)
        assert entry.top_logprobs[0].logprob == entry.logprob   # greedy: the chosen token is the most likely
        assert [x.logprob for x in entry.top_logprobs] == sorted((x.logprob for x in entry.top_logprobs),
                                                                 reverse=True)
    streamed = [c.choices[0] for c in client.chat.completions.create(model="ckpt", messages=msgs, max_tokens=6,
                                                                      logprobs=True, top_logprobs=3, stream=True)]
    assert [e.model_dump() for c in streamed if c.logprobs for e in c.logprobs.content] == \
        [e.model_dump() for e in content]
    with pytest.raises(openai.BadRequestError, match="requires 'logprobs'"):
        client.chat.completions.create(model="ckpt", messages=msgs, max_tokens=6, top_logprobs=3)
    with pytest.raises(openai.BadRequestError, match="'n'=9 is out of range"):
        client.chat.completions.create(model="ckpt", messages=msgs, max_tokens=6, n=9)


def test_chunked_bodies_are_read_and_limited_and_the_schema_is_published(server):
    def chunked(parts):
        conn = http.client.HTTPConnection("127.0.0.1", server, timeout=60)
        conn.request("POST", "/v1/chat/completions", body=iter(parts), encode_chunked=True,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        out = resp.status, json.loads(resp.read())
        conn.close()
        return out

    body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}).encode()
    status, obj = chunked([body[:10], body[10:]])     # no Content-Length: read in pieces
    assert status == 200 and obj["choices"][0]["message"]["role"] == "assistant"
    status, obj = chunked([b"x" * (1 << 19)] * 3)      # 1.5 MiB against the 1 MiB limit
    assert status == 413 and "exceeds the limit" in obj["error"]["message"]
    status, payload = request(server, "GET", "/openapi.json")
    body_schema = json.loads(payload)["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]
    assert "messages" in body_schema["application/json"]["schema"]["properties"]


def test_a_client_leaving_a_non_streamed_request_frees_it(ckpt):
    path, model, tok = ckpt
    srv = build_server(ServerConfig(model=path, port=0, max_tokens_limit=1500, max_batch=2), model=model,
                       tokenizer=tok)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        port = srv.server_address[1]

        def health():
            return json.loads(request(port, "GET", "/health")[1])

        body = json.dumps({"messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 1500})
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        deadline = time.monotonic() + 30
        while health()["running"] == 0:   # decoding (1500 tokens take seconds here)
            assert time.monotonic() < deadline
            time.sleep(0.01)
        conn.close()                       # gone before the answer
        while (h := health())["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert h["running"] == h["waiting"] == 0 and h["cancelled_requests"] == 1
        assert h["kv_blocks_free"] == h["kv_blocks_total"]
    finally:
        srv.shutdown()
        srv.server_close()


def test_api_key_is_required_when_set(ckpt):
    import openai

    path, model, tok = ckpt
    srv = build_server(ServerConfig(model=path, port=0, api_key="s3cret-key", max_batch=2), model=model,
                       tokenizer=tok)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        port = srv.server_address[1]
        assert request(port, "GET", "/health")[0] == 200          # health needs no key
        status, payload = request(port, "GET", "/v1/models")
        assert status == 401 and json.loads(payload)["error"]["type"] == "authentication_error"
        url = f"http://127.0.0.1:{port}/v1"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url, api_key="s3cret-key", max_retries=0)
        out = good.chat.completions.create(model="ckpt", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert isinstance(out.choices[0].message.content, str)
        assert "s3cret-key" not in repr(srv.cfg) and "s3cret-key" not in json.dumps(srv.cfg.public())
    finally:
        srv.shutdown()
        srv.server_close()


# ---- a bounded load test: 64 streaming clients, some leaving mid-stream, some sending garbage ----------

async def _raw_post(port: int, body: bytes, *, leave_after_first_token: bool = False) -> tuple[int, bytes]:
    """POST over a raw socket; with ``leave_after_first_token`` close the connection after the first content
    chunk (a client that goes away mid-stream). Returns (status, the body read)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    while (await reader.readline()).strip():
        pass
    data = b""
    while chunk := await reader.read(1 << 16):
        data += chunk
        if leave_after_first_token and b'"content": "' in data.split(b"\n\n", 1)[-1]:
            break
    writer.close()
    return status, data


def _sse_text(data: bytes) -> str:
    """The content of a chunked (Transfer-Encoding) SSE body, joined."""
    events = re.findall(rb"data: (\{.*?\}|\[DONE\])\n", data)
    assert events and events[-1] == b"[DONE]", data[-300:]
    return "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])


def test_load_64_streaming_clients_with_disconnects_and_bad_requests(server, live_server):
    questions = [f"Describe shape {i}." for i in range(4)]
    bad_b64 = "data:image/png;base64,@@not-base64@@"
    big = "data:image/png;base64," + base64.b64encode(png_bytes(9, size=(80, 80))).decode()   # over 64×64 pixels

    def body(content, **kw):
        return json.dumps({"model": "ckpt", "messages": [{"role": "user", "content": content}], **kw}).encode()

    def img(url):
        return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]

    kinds = (["good"] * 40 + ["leave"] * 8 + ["json"] * 6 + ["b64"] * 5 + ["big"] * 5)
    before = json.loads(request(server, "GET", "/health")[1])

    async def one(i, kind):
        if kind == "good":
            return await _raw_post(server, body(questions[i % 4], max_tokens=12, stream=True))
        if kind == "leave":
            return await _raw_post(server, body("Tell a long story.", max_tokens=64, stream=True),
                                   leave_after_first_token=True)
        raw = {"json": b'{"messages": [', "b64": body(img(bad_b64), stream=True), "big": body(img(big))}[kind]
        return await _raw_post(server, raw)

    async def run():
        return await asyncio.gather(*[one(i, k) for i, k in enumerate(kinds)])

    results = asyncio.run(run())
    want = {q: complete(server, [{"role": "user", "content": q}], max_tokens=12)[0] for q in questions}
    for i, (kind, (status, data)) in enumerate(zip(kinds, results, strict=True)):
        if kind == "good":
            assert status == 200 and _sse_text(data) == want[questions[i % 4]]
        elif kind == "leave":
            assert status == 200
        else:
            expect = {"json": (400, "not valid JSON"), "b64": (400, "invalid base64"), "big": (413, "exceeds")}[kind]
            assert status == expect[0] and expect[1] in data.decode(), data
    deadline = time.monotonic() + 10
    while True:  # the engine frees a departed client's blocks at its next step
        health = json.loads(request(server, "GET", "/health")[1])
        if health["running"] == health["waiting"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert health["running"] == health["waiting"] == 0
    assert health["kv_blocks_free"] == health["kv_blocks_total"]
    assert health["cancelled_requests"] - before["cancelled_requests"] == kinds.count("leave")
    assert complete(server, [{"role": "user", "content": questions[0]}], max_tokens=12)[0] == want[questions[0]]


def test_text_decoder_stops_at_stop_strings_and_streams_consistently(ckpt):
    _, _, tok = ckpt
    ids = tok("The red circle is big###Human: next", add_special_tokens=False)["input_ids"]
    dec = TextDecoder(tok, ("###",))
    pieces = [dec.push(t) for t in ids]
    assert dec.stopped and dec.text == "The red circle is big"
    assert "".join(pieces) + dec.finish() == dec.text
    dec = TextDecoder(tok, ("###",))
    pieces = [dec.push(t) for t in tok("a # b ## c", add_special_tokens=False)["input_ids"]]
    assert not dec.stopped and "".join(pieces) + dec.finish() == dec.text == "a # b ## c"


def test_chat_cli(ckpt, tmp_path, capsys):
    from engine.chat import main
    path, model, tok = ckpt
    img = tmp_path / "q.png"
    img.write_bytes(png_bytes(5))
    assert main(["--model", path, "--image", str(img), "--max-new-tokens", "10", "What is this?"]) == 0
    want = chat(model, [{"role": "user", "content": "What is this?"}], [Image.open(img).convert("RGB")],
                tokenizer=tok, max_new_tokens=10)
    assert capsys.readouterr().out == want + "\n"
    other = tmp_path / "r.png"
    other.write_bytes(png_bytes(6, (20, 50)))
    question = "Is <image> the same as <image>?"
    assert main(["--model", path, "--image", str(img), "--image", str(other), "--max-new-tokens", "10",
                 question]) == 0
    want = chat(model, [{"role": "user", "content": question}],
                [Image.open(f).convert("RGB") for f in (img, other)], tokenizer=tok, max_new_tokens=10)
    assert capsys.readouterr().out == want + "\n"
    with pytest.raises(ValueError, match="mark 2 <image> placeholders but 1 images"):
        main(["--model", path, "--image", str(img), question])
    with pytest.raises(FileNotFoundError, match="no such file"):
        main(["--model", path, "--image", str(tmp_path / "missing.png"), "hi"])


# ---- several images per message, AnyRes rows and the token budget --------------------------------------

PINPOINTS = ((28, 56), (56, 28), (56, 56), (84, 84))   # tiny AnyRes grids: 28-px tiles (2×2 patches each)


def png_of(width, height, seed):
    return "data:image/png;base64," + base64.b64encode(png_bytes(seed, (width, height))).decode()


def image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.fixture(scope="module")
def anyres_ckpt(ckpt):
    """The tiny model with AnyRes pinpoints (random weights; same tokenizer)."""
    import dataclasses
    path, model, tok = ckpt
    torch.manual_seed(1)
    m = engine.Llava(dataclasses.replace(model.config, image_grid_pinpoints=PINPOINTS)).eval()
    return path, m, tok


@pytest.fixture(scope="module")
def anyres_server(anyres_ckpt, tmp_path_factory):
    """An AnyRes server with a 150-token context (an 84×84 image takes 46 rows, a 30×60 one 32)."""
    _, model, tok = anyres_ckpt
    srv = build_server(ServerConfig(model=str(tmp_path_factory.mktemp("anyres")), port=0, max_tokens_limit=16,
                                    default_max_tokens=8, max_images=4, max_seq_len=150, max_batch=4),
                       model=model, tokenizer=tok)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def test_two_anyres_images_in_one_message_equal_engine_chat(anyres_server, anyres_ckpt):
    _, model, tok = anyres_ckpt
    (w1, h1), (w2, h2) = (60, 30), (40, 50)
    assert (model.config.image_rows(h1, w1), model.config.image_rows(h2, w2)) == (32, 24)
    assert (model.config.image_tiles(h1, w1), model.config.image_tiles(h2, w2)) == (10, 5)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Is "}, image_part(png_of(w1, h1, 7)),
                                             {"type": "text", "text": " like "}, image_part(png_of(w2, h2, 8)),
                                             {"type": "text", "text": "?"}]}]
    images = [Image.open(io.BytesIO(png_bytes(seed, size))).convert("RGB") for seed, size in ((7, (w1, h1)),
                                                                                             (8, (w2, h2)))]
    want = chat(model, [messages[0], {"role": "user", "content": "Is <image> like <image>?"}], images,
                tokenizer=tok, max_new_tokens=12)
    text, reason, obj = complete(anyres_server, messages, max_tokens=12)
    assert text == want and len(want) > 0
    ids, pixels, sizes = encode_chat(tok, get_template("vicuna_v1"), [messages[0], {
        "role": "user", "content": "Is <image> like <image>?"}], images, model)
    assert obj["usage"]["prompt_tokens"] == len(ids) and ids.count(model.config.image_token_id) == 56
    assert pixels.shape[0] == 15 and sizes.tolist() == [[h1, w1], [h2, w2]]
    assert stream(anyres_server, messages, max_tokens=12) == (text, reason)


def test_token_budget_counts_each_images_anyres_rows(anyres_server, anyres_ckpt):
    _, model, _ = anyres_ckpt
    assert model.config.image_rows(84, 84) == 46 and model.config.image_rows(200, 210) == 46

    def post(content, **kw):
        status, payload = request(anyres_server, "POST", "/v1/chat/completions",
                                  {"model": "x", "messages": [{"role": "user", "content": content}], **kw})
        return status, json.loads(payload)["error"]["message"] if status != 200 else json.loads(payload)

    # each image fits alone (46 < 150 rows), together they cannot: the message lists them
    status, msg = post([image_part(png_of(84, 84, 2)), {"type": "text", "text": "Look: "}]
                       + [image_part(png_of(210, 200, i)) for i in range(3)], max_tokens=4)
    assert status == 400
    assert msg == ("the request's 4 images take 184 prompt tokens (messages[0].content[0]: 46, "
                   "messages[0].content[2]: 46, messages[0].content[3]: 46, messages[0].content[4]: 46); "
                   "the context length is 150 tokens")
    # the images fit (138 rows), the template + text + image rows do not
    status, msg = post([image_part(png_of(84, 84, i)) for i in range(3)] + [{"type": "text", "text": "Describe."}])
    assert status == 400 and re.fullmatch(r"the prompt takes \d+ tokens \(with the rows of 3 images\); "
                                          r"the context length is 150 tokens", msg), msg
    # more <image> markers than images: the text's literal marker plus one image part
    status, msg = post([{"type": "text", "text": "<image> and "}, image_part(png_of(28, 28, 4))])
    assert status == 400 and "mark 2 <image> placeholders but 1 images" in msg


def test_one_image_larger_than_the_context_is_named(anyres_ckpt, tmp_path):
    _, model, tok = anyres_ckpt
    srv = build_server(ServerConfig(model=str(tmp_path), port=0, max_seq_len=40, max_tokens_limit=8,
                                    default_max_tokens=4, max_batch=2), model=model, tokenizer=tok)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        port = srv.server_address[1]
        body = {"model": "x", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Compare "}, image_part(png_of(28, 28, 1)),
                                         {"type": "text", "text": " with "}, image_part(png_of(210, 200, 5))]}]}
        status, payload = request(port, "POST", "/v1/chat/completions", body)
        assert status == 400
        assert json.loads(payload)["error"]["message"] == (
            "messages[1].content[3]: an image of 210x200 pixels takes 46 prompt tokens; the context length is "
            "40 tokens")
    finally:
        srv.shutdown()
        srv.server_close()


def test_chat_with_more_markers_than_images_is_a_value_error(ckpt):
    _, model, tok = ckpt
    img = Image.open(io.BytesIO(png_bytes(1))).convert("RGB")
    with pytest.raises(ValueError, match="mark 3 <image> placeholders but 2 images were given"):
        chat(model, [{"role": "user", "content": "<image> vs <image> vs <image>"}], [img, img], tokenizer=tok)
    with pytest.raises(ValueError, match="mark 1 <image> placeholders but 0 images"):
        encode_chat(tok, get_template("vicuna_v1"), [{"role": "user", "content": "<image> what?"}], [], model)


def test_encode_chat_refuses_preprocessing_with_other_pinpoints(anyres_ckpt):
    from engine.image import ImageSpec
    _, model, tok = anyres_ckpt
    img = Image.open(io.BytesIO(png_bytes(1))).convert("RGB")
    msgs = [{"role": "user", "content": "<image> what?"}]
    with pytest.raises(ValueError, match=r"pinpoints \(\) differ from the model's image_grid_pinpoints"):
        encode_chat(tok, get_template("vicuna_v1"), msgs, [img], model, ImageSpec(size=28))
    ids, pixels, sizes = encode_chat(tok, get_template("vicuna_v1"), msgs, [img], model)  # the model's own
    assert ids.count(model.config.image_token_id) == model.config.image_rows(30, 40)
    assert pixels.shape[0] == model.config.image_tiles(30, 40) and sizes.tolist() == [[30, 40]]


# ---- a LoRA adapter served unmerged (--adapter) --------------------------------------------------------


@pytest.fixture(scope="module")
def lora(ckpt, tmp_path_factory):
    """A PEFT adapter directory trained (perturbed) on the tiny checkpoint, and that model merged. The adapters
    are scaled up 5× so that the greedy answer changes too (at 1× only the log-probabilities move, by ~0.15)."""
    from engine.lora import merge_lora, save_adapter
    path, _, _ = ckpt
    model = perturbed_lora(path)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.mul_(5)
    adapter = str(tmp_path_factory.mktemp("lora") / "adapter")
    save_adapter(model.state_dict(), model.config, model.lora, adapter, base=path)
    merge_lora(model)
    return adapter, model


def test_a_served_adapter_answers_as_the_merged_model_and_not_as_the_base(server, ckpt, lora, tmp_path, capsys):
    """``ServerConfig(adapter=)`` (``python -m engine.serve --model DIR --adapter A``): greedy text and
    log-probabilities of the merged model (fp32: merged and unmerged logits agree to ~1e-6), not the base's."""
    from engine.chat import main as chat_main
    path, _, tok = ckpt
    adapter, merged = lora
    srv = build_server(ServerConfig(model=path, adapter=adapter, port=0, max_tokens_limit=16, default_max_tokens=8))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    msgs = [{"role": "user", "content": [image_part(data_url(4)), {"type": "text", "text": "What is it?"}]}]
    try:
        text, _, obj = complete(srv.server_address[1], msgs, max_tokens=8, logprobs=True, top_logprobs=2)
    finally:
        srv.shutdown()
        srv.server_close()
    base_text, _, base_obj = complete(server, msgs, max_tokens=8, logprobs=True, top_logprobs=2)

    plain = [{"role": "user", "content": "<image>What is it?"}]
    images = [Image.open(io.BytesIO(png_bytes(4))).convert("RGB")]
    assert text == chat(merged, plain, images, tokenizer=tok, max_new_tokens=8) and len(text) > 0
    ids, pixels, sizes = encode_chat(tok, get_template("vicuna_v1"), plain, images, merged)
    ref = generate(merged, [ids], images=pixels, image_sizes=sizes, max_new_tokens=8, output_logits=True)[0]
    ref_lp = torch.log_softmax(ref.logits[:len(ref.tokens)].double(), -1)
    content = obj["choices"][0]["logprobs"]["content"]
    assert 0 < len(content) <= len(ref.tokens)
    for step, (entry, t) in enumerate(zip(content, ref.tokens, strict=False)):
        assert entry["token"] == tok.decode([t])
        assert entry["logprob"] == pytest.approx(float(ref_lp[step, t]), abs=1e-4)
    base_lp = [e["logprob"] for e in base_obj["choices"][0]["logprobs"]["content"]]
    assert base_text != text and abs(base_lp[0] - content[0]["logprob"]) > 1e-2

    # python -m engine.chat --adapter: the same answer
    img = tmp_path / "q.png"
    img.write_bytes(png_bytes(4))
    capsys.readouterr()
    assert chat_main(["--model", path, "--adapter", adapter, "--image", str(img), "--max-new-tokens", "8",
                      "<image>What is it?"]) == 0
    assert capsys.readouterr().out == text + "\n"


def test_adapter_flag_errors_before_any_loading(ckpt, lora, tmp_path, capsys):
    """A missing adapter directory, and an adapter with --quantize (merge first: the command is named), on both
    command lines and in ServerConfig, before any weight is read."""
    from engine.chat import main as chat_main
    from engine.serve import main as serve_main
    path, adapter = ckpt[0], lora[0]
    missing = str(tmp_path / "no_adapter")
    merge = re.escape(f"merge the adapter first (python -m train.merge_lora --base {path} --adapter {adapter} "
                      f"--output MERGED), then load MERGED quantized (--model MERGED --quantize int8)")
    for argv, want in (([], f"adapter directory {missing} does not exist"), (["--quantize", "int8"], merge)):
        with pytest.raises(SystemExit) as e:
            serve_main(["--model", path, "--adapter", missing if not argv else adapter, *argv])
        assert e.value.code == 2 and re.search(want, capsys.readouterr().err)
        with pytest.raises((FileNotFoundError, ValueError), match=want):
            chat_main(["--model", path, "--adapter", missing if not argv else adapter, *argv, "hi"])
    with pytest.raises(FileNotFoundError, match="adapter directory .* does not exist"):
        ServerConfig(model=path, adapter=missing)
    with pytest.raises(ValueError, match=merge):
        ServerConfig(model=path, adapter=adapter, quantize="int8")
