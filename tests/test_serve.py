"""engine.chat and the OpenAI-compatible server over real HTTP on 127.0.0.1 (tiny random model).

A tiny checkpoint with the project's tiny tokenizer is exported to a directory; the server is
built from that directory exactly as ``python -m engine.serve --model DIR`` builds it.
"""
import base64
import concurrent.futures as cf
import http.client
import io
import json
import threading

import pytest
import torch
from PIL import Image

import engine
from engine.chat import TextDecoder, chat, load_tokenizer
from engine.client import ChatClient
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
                                    max_images=2, max_body_bytes=1 << 20, max_batch=16))
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
    assert live_server.scheduler.runtime.peak_batch > 1   # requests were batched together
    for i, q in enumerate(questions):
        want = chat(model, [{"role": "user", "content": q}], tokenizer=tok, max_new_tokens=12)
        assert results[i].text == want
    # streamed clients at the same time as non-streamed ones
    with cf.ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda q: stream(server, [{"role": "user", "content": q}], max_tokens=12)[0],
                             questions[:8]))
    assert outs == [results[i].text for i in range(8)]


def test_openai_client_if_installed(server):
    openai = pytest.importorskip("openai", reason="the openai package is not installed in this environment")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="none")
    hi = [{"role": "user", "content": "Hi"}]
    out = client.chat.completions.create(model="ckpt", messages=hi, max_tokens=8)
    assert isinstance(out.choices[0].message.content, str)
    chunks = list(client.chat.completions.create(model="ckpt", messages=hi, max_tokens=8, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content


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
    with pytest.raises(FileNotFoundError, match="no such file"):
        main(["--model", path, "--image", str(tmp_path / "missing.png"), "hi"])
