"""Shared test helpers, one copy each (test modules import from here, never from each other):

- the tolerance rule and output poisoning (CONVENTIONS.md, habit 6). Rule: compare against a float64
  truth. In float32 the error must be tiny (``fp32_tol``); in bf16/fp16 the kernel's error may be at
  most ``factor`` × the error of the reference implementation run in that same precision, plus a
  small floor;
- fake OpenAI-compatible servers on 127.0.0.1 (``FakeServer``, ``FakeJudge``) and the API-key leak check;
- a tiny random transformers LLaVA (``hf_model``) with prompts for logit parity, and a LoRA model with
  non-zero adapters on any base directory (``perturbed_lora``);
- the tiny training assets (``build_tiny_assets``; conftest's session fixture ``assets`` builds them
  once) and the helpers for running the training CLIs as subprocesses.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from engine.image import ImageSpec


def rel_err(out: torch.Tensor, truth: torch.Tensor) -> float:
    out, truth = out.detach().double().cpu(), truth.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    denom = truth.norm().item()
    diff = (out - truth).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close_rule(out: torch.Tensor, truth: torch.Tensor, ref_lowp: torch.Tensor | None = None, *,
                      fp32_tol: float = 1e-5, factor: float = 2.0, floor: float = 1e-6,
                      what: str = "") -> None:
    """Assert ``out`` matches ``truth``; for low precision, relative to ``ref_lowp``'s own error."""
    assert out.shape == truth.shape, f"{what}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    err = rel_err(out, truth)
    if ref_lowp is None:
        assert err <= fp32_tol, f"{what}: relative error {err:.3e} > {fp32_tol:.1e}"
        return
    ref_err = rel_err(ref_lowp, truth)
    bound = factor * ref_err + floor
    assert err <= bound, f"{what}: relative error {err:.3e} > {factor}×ref {ref_err:.3e} + {floor:.0e}"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (floating) or a sentinel (integer) so an unwritten element fails a check."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(-(2**30))


# ---- fake OpenAI-compatible servers -----------------------------------------------------------------------

SECRET = "sk-test-DO-NOT-LEAK-8f3a91"   # the API key the fakes expect; it must never reach output or files


@dataclass
class Reply:
    status: int = 200
    body: bytes | dict | None = None      # dict → JSON; None → a chat completion of ``text``
    text: str = "hello"
    finish_reason: str = "stop"
    headers: dict = field(default_factory=dict)
    delay: float = 0.0                     # seconds before answering
    truncate: bool = False                 # announce more bytes than are sent, then close


def completion(text: str, finish_reason: str = "stop") -> dict:
    return {"id": "x", "object": "chat.completion", "model": "fake",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}}


class FakeServer:
    """Scripted OpenAI-compatible server: ``script(request_json, headers, n) -> Reply`` (n: 0-based call count
    for this request's messages, so a script can fail the first k tries of one prompt)."""

    def __init__(self, script, *, lifetime: float = 60.0):
        self.script = script
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                request = json.loads(self.rfile.read(length))
                key = json.dumps(request.get("messages"))
                # header names are case-insensitive (httpx sends them in lower case): one spelling here
                headers = {k.title(): v for k, v in self.headers.items()}
                with outer._lock:
                    n = outer._counts.get(key, 0)
                    outer._counts[key] = n + 1
                    outer.requests.append(request)
                    outer.headers.append(headers)
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    reply = outer.script(request, headers, n)
                    if reply.delay:
                        time.sleep(reply.delay)
                    body = reply.body
                    if body is None:
                        body = completion(reply.text, reply.finish_reason)
                    raw = json.dumps(body).encode() if isinstance(body, dict) else body
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    if reply.truncate:
                        self.send_header("Content-Length", str(len(raw) + 100))
                        self.send_header("Connection", "close")
                        self.end_headers()
                        self.wfile.write(raw[: len(raw) // 2])
                        self.close_connection = True
                    else:
                        self.send_header("Content-Length", str(len(raw)))
                        self.end_headers()
                        self.wfile.write(raw)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout) before we answered
                finally:
                    with outer._lock:
                        outer.in_flight -= 1

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True

    def __enter__(self):
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        self._timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()


class FakeJudge(FakeServer):
    """``POST /v1/chat/completions`` answered by ``reply(messages) -> str | int`` (int: that HTTP status
    with an empty body)."""

    def __init__(self, reply, *, lifetime: float = 60.0):
        def script(request, headers, n):
            out = reply(request["messages"])
            return Reply(status=out, body=b"") if isinstance(out, int) else Reply(text=out)
        super().__init__(script, lifetime=lifetime)


def assert_no_secret(texts, *roots: str) -> None:
    """``SECRET`` appears in none of ``texts`` and in no file under ``roots``."""
    for text in texts:
        assert SECRET not in text
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for name in files:
                path = os.path.join(dirpath, name)
                with open(path, "rb") as f:
                    assert SECRET.encode() not in f.read(), path


# ---- a tiny transformers LLaVA for parity ---------------------------------------------------------------

VOCAB, IMAGE_TOKEN, IMAGE_SIZE = 120, 119, 28  # image 28 px, patch 14 → 4 patches (+1 class token)
SPEC = ImageSpec(size=IMAGE_SIZE)              # the tiny models' preprocessing (pad to square, no AnyRes)


def hf_model(*, act="gelu", layer=-2, strategy="default", kv_heads=2, tie=False, bias=True, seed=0,
             vocab=VOCAB, image_token=IMAGE_TOKEN):
    """A random tiny ``LlavaForConditionalGeneration`` (eval mode) whose norms, biases and class
    embedding are perturbed from their default initialisation so every weight matters."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=IMAGE_SIZE, patch_size=14, hidden_act="quick_gelu")
    tc = LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=kv_heads, rope_theta=500.0,
                     rms_norm_eps=1e-5, tie_word_embeddings=tie)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=image_token, projector_hidden_act=act,
                      vision_feature_layer=layer, vision_feature_select_strategy=strategy,
                      multimodal_projector_bias=bias, tie_word_embeddings=tie)
    cfg.image_seq_length = 4 + (strategy == "full")
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "class_embedding" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def perturbed_lora(base_dir: str):
    """``engine.load(base_dir)`` in fp32 with random (non-zero) LoRA adapters (r 4, alpha 8, dropout 0.05) and a
    changed projector, as after some training; eval mode."""
    import engine
    from engine.lora import LoraSettings, add_lora

    model = engine.load(base_dir, dtype=torch.float32)
    torch.manual_seed(0)
    add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.05), base=base_dir)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name or name.startswith("projector."):
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def prompts(seq_len: int, *, n_images=(0, 1, 2), lengths=(7, 12, 9), seed=1):
    """One sequence per entry: random text with ``n`` image placeholder runs spread inside."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for n, length in zip(n_images, lengths, strict=True):
        ids = torch.randint(0, IMAGE_TOKEN, (length,), generator=g).tolist()
        for i in range(n):
            at = min(len(ids), 1 + i * 3)
            ids[at:at] = [IMAGE_TOKEN] * seq_len
        seqs.append(ids)
    pixels = torch.randn(sum(n_images), 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    return seqs, pixels


def pad(seqs, side):
    """(ids, attention_mask), both [B, longest], padded with 0 on ``side`` ("left" or "right")."""
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
    return ids, mask


# ---- tiny training assets --------------------------------------------------------------------------------

@dataclass(frozen=True)
class TinyAssets:
    tok_dir: str        # HF tokenizer directory
    model_dir: str      # HF llava checkpoint (with the tokenizer files)
    image_folder: str
    image_data: str     # LLaVA JSON: multiple-choice questions, one image each
    mixed_data: str     # image records + text-only records
    image_token_id: int
    image_seq_len: int


TEXT_ONLY = [("What colour is a banana?", "A banana is yellow."), ("How many sides has a square?", "Four."),
             ("Name a shape with three corners.", "A triangle has three corners."),
             ("Is the sky green?", "No, the sky is blue.")]


def build_tiny_assets(root: str, *, num_images: int = 12) -> TinyAssets:
    """Write under ``root`` (deterministic): a locally built tokenizer, a random tiny LLaVA exported in
    the HF layout, ``num_images`` procedural shapes images (28 px, patch 14 → 4 rows per image) with
    multiple-choice questions, and a mixed file that adds the ``TEXT_ONLY`` records."""
    from transformers import AutoTokenizer

    from engine.config import tiny_config
    from engine.model import Llava
    from engine.tokenizer import build_tiny_tokenizer
    from engine.weights import export_hf
    from train.shapes import make_shapes_dataset

    tok_dir = build_tiny_tokenizer(os.path.join(root, "tokenizer"), vocab_size=400)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    image_token_id = tok.convert_tokens_to_ids("<image>")
    cfg = tiny_config(vocab_size=len(tok), image_token_id=image_token_id, image_size=IMAGE_SIZE,
                      patch_size=14)
    torch.manual_seed(0)
    model_dir = os.path.join(root, "model")
    export_hf(Llava(cfg), model_dir, tokenizer_dir=tok_dir)
    paths = make_shapes_dataset(os.path.join(root, "shapes"), num_train=num_images, num_test=0,
                                image_size=IMAGE_SIZE)
    with open(paths.train_mc) as f:
        records = json.load(f)
    text = [{"id": f"text-{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
            for i, (q, a) in enumerate(TEXT_ONLY)]
    mixed = os.path.join(root, "mixed.json")
    with open(mixed, "w") as f:
        json.dump(records + text, f)
    return TinyAssets(tok_dir=tok_dir, model_dir=model_dir, image_folder=paths.root,
                      image_data=paths.train_mc, mixed_data=mixed, image_token_id=image_token_id,
                      image_seq_len=cfg.image_seq_len)


def load_tiny(assets: TinyAssets, path: str, **kw):
    """``train.data.load_samples`` of ``path`` with the assets' tokenizer and images (vicuna_v1 template
    unless ``template`` is given): (samples, report)."""
    from transformers import AutoTokenizer

    from engine.config import from_hf
    from train.data import load_samples

    tok = AutoTokenizer.from_pretrained(assets.tok_dir)
    kw.setdefault("template", "vicuna_v1")
    kw.setdefault("image_folder", assets.image_folder)
    kw.setdefault("image_rows", from_hf(assets.model_dir).image_rows)
    return load_samples(path, tok, image_token_id=assets.image_token_id, **kw)


def write_bad_data(assets: TinyAssets, root: str) -> tuple[str, dict[str, str]]:
    """A data file with good records and one of each kind of bad record; returns (path, {id: file
    the error must name})."""
    with open(assets.image_data) as f:
        good = json.load(f)[:3]
    garbage = os.path.join(root, "garbage.png")
    with open(garbage, "wb") as f:
        f.write(b"this is not a PNG file at all")
    q = good[0]["conversations"]
    data = os.path.join(root, "bad.json")
    bad = [
        {"id": "bad-missing", "image": "train/does-not-exist.png", "conversations": q},
        {"id": "bad-unreadable", "image": garbage, "conversations": q},
        {"id": "bad-no-answer", "image": good[0]["image"], "conversations": q[:1]},
        {"id": "bad-two-markers", "image": good[0]["image"],
         "conversations": [{"from": "human", "value": "<image>\n<image>\nTwo pictures?"}, q[1]]},
    ]
    with open(data, "w") as f:
        json.dump(good[:2] + bad + good[2:], f)
    names = {"bad-missing": os.path.join(assets.image_folder, "train/does-not-exist.png"),
             "bad-unreadable": garbage, "bad-no-answer": data, "bad-two-markers": data}
    return data, names


# Multi-image records: (id, images, turns); images index the tiny assets' training images.
MULTI_IMAGE = [
    ("multi-together", [0, 1], [("<image>\n<image>\nWhich picture has more shapes?", "The second one has more.")]),
    ("multi-rounds", [2, 0], [("<image>\nWhat is in this picture?", "A few coloured shapes."),
                              ("And in <image> this one?", "Shapes on a plain background.")]),
    ("multi-three", [3, 4, 5], [("Compare <image> with <image> and <image>.", "They all show shapes.")]),
    ("multi-list-of-one", [6], [("<image>\nDescribe it.", "Some shapes.")]),
    ("multi-string", 7, [("<image>\nDescribe it briefly.", "Shapes.")]),     # a string: one image
]


def write_multi_image_data(assets: TinyAssets, root: str) -> str:
    """A LLaVA JSON of the ``MULTI_IMAGE`` records over the tiny assets' images (``"image"`` lists, and one
    plain string), plus one text-only record; returns its path."""
    with open(assets.image_data) as f:
        names = [r["image"] for r in json.load(f)]
    records = []
    for rid, which, turns in MULTI_IMAGE:
        convs = [t for q, a in turns for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
        image = names[which] if isinstance(which, int) else [names[k] for k in which]
        records.append({"id": rid, "image": image, "conversations": convs})
    q, a = TEXT_ONLY[0]
    records.append({"id": "multi-text", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]})
    path = os.path.join(root, "multi.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


# AnyRes on the tiny 28-px tower: pinpoints of 1×2, 2×1 and 2×2 tiles, and images whose sizes pick each grid
# (wide, tall, square, small) so every image has its own tile count and row count.
ANYRES_PINPOINTS = [[28, 56], [56, 28], [56, 56]]
ANYRES_IMAGE_SIZES = [(20, 60), (50, 17), (41, 41), (9, 13)]      # (height, width)


def write_anyres_data(root: str) -> str:
    """Under ``root``: PNGs of ``ANYRES_IMAGE_SIZES`` and a LLaVA JSON using them in order: two images in one
    turn, a text-only record, one image in a second round, one image; returns the JSON's path."""
    from PIL import Image

    names = []
    for k, (h, w) in enumerate(ANYRES_IMAGE_SIZES):
        img = Image.new("RGB", (w, h), (60 * k % 256, 120, 200 - 40 * k))
        img.paste((250, 30 * k, 10), (w // 4, h // 4, max(w // 2, w // 4 + 1), max(h // 2, h // 4 + 1)))
        names.append(f"anyres-{k}.png")
        img.save(os.path.join(root, names[-1]))

    def rec(rid, image, *turns):
        convs = [t for q, a in turns for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
        return {"id": rid, **({"image": image} if image else {}), "conversations": convs}

    records = [rec("anyres-two", names[:2], ("<image>\n<image>\nWhich is taller?", "The second one.")),
               rec("anyres-text", None, (TEXT_ONLY[1])),
               rec("anyres-round", [names[2]], ("Hello.", "Hello!"), ("<image>\nWhat colour?", "Blue and red.")),
               rec("anyres-small", names[3], ("<image>\nDescribe it.", "A small picture."))]
    path = os.path.join(root, "anyres.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


# ---- the training CLIs as subprocesses -------------------------------------------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One thread: the runs compared bitwise must reduce in the same order, and 2 cores are shared.
ENV = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}


# Runs train.stage2 with the checkpoint's directory swap (engine.io.replace_dir, as train.checkpoint calls
# it) wrapped so the process SIGKILLs itself inside the
# atomic write of step-000004: the temporary directory is complete (DCP shards, RNG, training_state.pt),
# the rename has not happened.
KILL_DURING_SECOND_SAVE = """
import os, signal, sys
import train.checkpoint
real = train.checkpoint.replace_dir
def replace_dir(tmp, path):
    if path.endswith("step-000004"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(tmp, path)
train.checkpoint.replace_dir = replace_dir
from train.stage import main
main(2, sys.argv[1:])
"""


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """``p`` if it exited 0; else fail showing the ends of its stdout and stderr."""
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-5000:]}"
    return p


def metrics(out: str) -> list[dict]:
    """The rows of a run's ``metrics.jsonl``."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory's ``*.safetensors`` files."""
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    return {k: v for f in files for k, v in load_file(f).items()}


def recompute_logits(model, prompt, pixels, tokens):
    """Logits after prompt + tokens[:j] for every j, by a full packed forward without cache."""
    from engine.model import PackedAttention, pack_cu_seqlens

    with torch.no_grad():
        x = torch.cat([model.embed(torch.tensor(prompt), pixels),
                       model.decoder.embed(torch.tensor(tokens, dtype=torch.long))])        # (P + n, D)
        lens = [len(prompt) + j for j in range(len(tokens) + 1)]
        xs = torch.cat([x[:n] for n in lens])
        cu, pos, max_len = pack_cu_seqlens(lens)
        hidden = model.decoder(xs, pos, PackedAttention(cu, max_len))
        return model.logits(hidden[cu[1:].long() - 1])                                     # (n + 1, V)


def original_layout(model) -> tuple[dict, dict]:
    """``model``'s weights in upstream LLaVA's layout: (LLaMA keys + ``model.mm_projector.{0,2}`` (+
    ``model.image_newline``), the CLIP tower's keys) — tests write original-LLaVA directories with it."""
    from engine import weights
    orig, clip = {}, {}
    for k, v in weights.to_hf_state(model.state_dict(), model.config).items():
        if k.startswith("language_model.model."):
            orig["model." + k[len("language_model.model."):]] = v
        elif k == "language_model.lm_head.weight":
            orig["lm_head.weight"] = v
        elif k.startswith("multi_modal_projector.linear_"):
            idx = {"1": "0", "2": "2"}[k[len("multi_modal_projector.linear_")]]
            orig[f"model.mm_projector.{idx}.{k.rsplit('.', 1)[1]}"] = v
        elif k == "image_newline":
            orig["model.image_newline"] = v
        else:
            clip[k[len("vision_tower."):]] = v
    return orig, clip


def write_original_llava(root, model, *, image_token_index: int | None = IMAGE_TOKEN) -> tuple[str, str, dict]:
    """Write ``model`` in upstream LLaVA's layout under ``root``: ``orig/`` (LLaMA keys + model.mm_projector.*, an
    ``llava_llama`` config naming the tower) and ``clip/`` (the tower apart). ``image_token_index`` None leaves it
    out of the config, as upstream does: the placeholder is then the first id past the vocabulary.
    Returns (orig dir, clip dir, the orig state)."""
    from safetensors.torch import save_file
    orig, clip = original_layout(model)
    orig_dir, clip_dir = os.path.join(root, "orig"), os.path.join(root, "clip")
    os.makedirs(orig_dir)
    os.makedirs(clip_dir)
    save_file(orig, os.path.join(orig_dir, "model.safetensors"))
    save_file(clip, os.path.join(clip_dir, "model.safetensors"))
    hf_cfg = model.config.to_hf_dict()
    with open(os.path.join(clip_dir, "config.json"), "w") as f:
        json.dump(hf_cfg["vision_config"], f)
    text = {k: v for k, v in hf_cfg["text_config"].items() if k != "rope_parameters"}
    text.update(model_type="llava_llama", mm_vision_tower=clip_dir, mm_projector_type=model.config.projector_type,
                mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                mm_hidden_size=model.config.vision.hidden_size)
    if image_token_index is not None:
        text["image_token_index"] = image_token_index
    with open(os.path.join(orig_dir, "config.json"), "w") as f:
        json.dump(text, f)
    return orig_dir, clip_dir, orig
