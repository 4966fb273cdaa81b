"""Composing a fresh LLaVA on the meta device (engine/meta.py).

- one process: the materialised model holds exactly the source files' weights (tower, LLM; the
  image-placeholder row is their embedding mean), the projector is the seeded fresh one, and a stage-1
  projector file replaces it; every checkpoint layout ``engine.load`` reads loads the same weights as the
  file holds, with a header-level error for a wrong shape;
- two ranks (torchrun, gloo): sharded on the meta device, each rank allocates only its FSDP2 shards
  (about half of every tensor), and the gathered model equals the one-process model bit for bit;
- LLaVA-1.5-7B sizes (CLIP ViT-L/14-336 + a Vicuna-7B-shaped LLaMA, as sparse safetensors files: real
  headers, no data on disk) compose on the meta device with a peak host RSS under 2 GB.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from helpers import ENV, REPO, hf_model, ok, rel_err, write_original_llava
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

import engine
from engine.meta import materialize, meta_compose, meta_load
from engine.model import Projector
from engine.weights import CLIP_DIR, HF_LLAVA, LLAMA_DIR, ORIGINAL_LLAVA, VOCAB_ROWS, compose, rename

VOCAB = 97


def write_sources(root: str, clip_cfg: CLIPVisionConfig, llama_cfg: LlamaConfig, *, sparse: bool = False):
    """A CLIP directory (``vision_model.*`` keys, as openai/clip-vit-* hold) and a LLaMA directory.
    ``sparse``: the models are built on the meta device and the files get real headers but no data."""
    clip_dir, llama_dir = os.path.join(root, "clip"), os.path.join(root, "llama")
    os.makedirs(clip_dir, exist_ok=True)
    os.makedirs(llama_dir, exist_ok=True)
    with torch.device("meta" if sparse else "cpu"):
        torch.manual_seed(0)
        clip, llama = CLIPVisionModel(clip_cfg), LlamaForCausalLM(llama_cfg)
    clip_cfg.to_json_file(os.path.join(clip_dir, "config.json"))
    llama_cfg.to_json_file(os.path.join(llama_dir, "config.json"))
    for directory, state in ((clip_dir, {k if k.startswith("vision_model.") else f"vision_model.{k}": v
                                         for k, v in clip.state_dict().items()}),
                             (llama_dir, llama.state_dict())):
        file = os.path.join(directory, "model.safetensors")
        if sparse:
            write_sparse_safetensors(file, {k: tuple(v.shape) for k, v in state.items()})
        else:
            save_file({k: v.contiguous() for k, v in state.items()}, file)
    return clip_dir, llama_dir


def write_sparse_safetensors(path: str, shapes: dict[str, tuple[int, ...]]) -> None:
    """A valid bf16 safetensors file whose data region is a hole (the file system stores no blocks)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape in shapes.items():
        n = 2 * int(torch.Size(shape).numel())
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)


TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28,
                 patch_size=14)
TINY_LLAMA = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return write_sources(str(tmp_path_factory.mktemp("sources")), CLIPVisionConfig(**TINY_CLIP),
                         LlamaConfig(**TINY_LLAMA))


def from_files(*dirs_tables) -> dict[str, torch.Tensor]:
    """The source directories' tensors under our names, read whole (the reference for what is built)."""
    out = {}
    for d, table in dirs_tables:
        out.update(rename(load_file(os.path.join(d, "model.safetensors")), table, d))
    return out


def check_built(got: dict, files: dict, vocab: int) -> None:
    """``got`` holds the files' tensors; the vocabulary tensors' extra rows are the mean of the file's rows."""
    for k, v in files.items():
        if k in VOCAB_ROWS and got[k].shape[0] > v.shape[0]:
            assert got[k].shape[0] == vocab and torch.equal(got[k][:v.shape[0]], v), k
            assert rel_err(got[k][v.shape[0]:], v.double().mean(0).expand_as(got[k][v.shape[0]:])) <= 1e-7, k
        else:
            assert torch.equal(got[k], v), k
    if "vision.post_norm.weight" not in files:                   # a tower without it: LLaVA never applies it
        d = got["vision.post_norm.weight"].shape[0]
        assert torch.equal(got["vision.post_norm.weight"], torch.ones(d)) and not got["vision.post_norm.bias"].any()


def test_meta_compose_builds_the_files_weights_and_a_seeded_projector(sources, tmp_path):
    clip_dir, llama_dir = sources
    meta = meta_compose(clip_dir, llama_dir, seed=3)
    assert all(p.is_meta for p in meta.model.parameters())
    got = materialize(meta, device=torch.device("cpu")).state_dict()
    files = from_files((clip_dir, CLIP_DIR), (llama_dir, LLAMA_DIR))
    assert got.keys() == set(files) | {"vision.post_norm.weight", "vision.post_norm.bias"} | {
        f"projector.{k}" for k in Projector(meta.model.config).state_dict()}
    check_built(got, files, VOCAB + 1)
    torch.manual_seed(3)
    fresh = Projector(meta.model.config).state_dict()
    assert all(torch.equal(got[f"projector.{k}"], v) for k, v in fresh.items())
    eager = compose(clip_dir, llama_dir, seed=3).state_dict()                         # the public entry
    assert eager.keys() == got.keys() and all(torch.equal(eager[k], got[k]) for k in got)

    # a stage-1 mm_projector.bin replaces the fresh projector; a wrong shape is an error naming the tensor
    proj = {"model.mm_projector.0.weight": torch.randn(64, 32), "model.mm_projector.0.bias": torch.randn(64),
            "model.mm_projector.2.weight": torch.randn(64, 64), "model.mm_projector.2.bias": torch.randn(64)}
    from engine.weights import read_projector
    torch.save(proj, tmp_path / "mm_projector.bin")
    meta = meta_compose(clip_dir, llama_dir)
    meta.overrides = read_projector(str(tmp_path))
    model = materialize(meta, device=torch.device("cpu"))
    assert torch.equal(model.projector.linear_2.weight, proj["model.mm_projector.2.weight"])
    proj["model.mm_projector.2.weight"] = torch.randn(64, 65)
    torch.save(proj, tmp_path / "mm_projector.bin")
    meta = meta_compose(clip_dir, llama_dir)
    meta.overrides = read_projector(str(tmp_path))
    with pytest.raises(ValueError, match="projector.linear_2.weight"):
        materialize(meta, device=torch.device("cpu"))


SHARDED = """
import json, sys, torch, torch.distributed as dist
from train.checkpoint import full_model_state
from train.distributed import shard_model
from engine.meta import materialize, meta_compose, meta_load
from train.stage import freeze_for_stage
dist.init_process_group("gloo")
kind, a, b, out = sys.argv[1:5]
meta = meta_compose(a, b, seed=3) if kind == "compose" else meta_load(a, vision=b)
freeze_for_stage(meta.model, 2)
shard_model(meta.model)
model = materialize(meta, device=torch.device("cpu"))
local = sum(p.to_local().numel() for p in model.parameters())
full = sum(p.numel() for p in model.parameters())
state = full_model_state(model)
if dist.get_rank() == 0:
    torch.save(state, out)
with open(out + f".rank{dist.get_rank()}.json", "w") as f:
    json.dump({"local": local, "full": full}, f)
from train.distributed import leave_distributed
leave_distributed()
"""


def _two_ranks(tmp_path, kind: str, a: str, b: str) -> dict[str, torch.Tensor]:
    """SHARDED on two gloo ranks: checks each rank holds about half of every element exactly once; returns
    the gathered full state."""
    script, out = str(tmp_path / "sharded.py"), str(tmp_path / "state.pt")
    with open(script, "w") as f:
        f.write(SHARDED)
    ok(subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script,
                       kind, a, b, out], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120))
    counts = [json.load(open(f"{out}.rank{r}.json")) for r in (0, 1)]
    full = counts[0]["full"]
    assert counts[0]["local"] + counts[1]["local"] == full          # every element on exactly one rank
    assert all(c["local"] <= 0.55 * full for c in counts)          # about half each (Shard(0) rows)
    return torch.load(out, weights_only=True)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_two_ranks_materialise_only_their_shards(sources, tmp_path):
    clip_dir, llama_dir = sources
    gathered = _two_ranks(tmp_path, "compose", clip_dir, llama_dir)
    one = materialize(meta_compose(clip_dir, llama_dir, seed=3), device=torch.device("cpu")).state_dict()
    assert gathered.keys() == one.keys() and all(torch.equal(gathered[k], one[k]) for k in one)


def _checkpoint(layout: str, root) -> tuple[str, str | None]:
    """A tiny checkpoint directory of ``layout`` and the CLIP directory it needs (or None)."""
    hf = hf_model(act="linear" if layout == "hf-linear" else "gelu")
    hf.save_pretrained(os.path.join(root, "hf"))
    if layout == "hf-linear":
        return os.path.join(root, "hf"), None
    orig_dir, clip_dir, _ = write_original_llava(root, engine.load(os.path.join(root, "hf")), image_token_index=None)
    return orig_dir, clip_dir


@pytest.mark.parametrize("layout", ["original", "hf-linear"])
def test_engine_load_reads_every_layout_a_tensor_at_a_time(layout, tmp_path):
    """Original LLaVA (the tower from a CLIP directory; the image placeholder, the first id past the vocabulary,
    gets the embedding mean as its row) and an HF ``linear`` projector (two stored matrices, folded into one): on
    the meta device, then materialised (what ``engine.load`` does), the files' weights."""
    path, vision = _checkpoint(layout, tmp_path)
    meta = meta_load(path, vision=vision)
    assert all(p.is_meta for p in meta.model.parameters())
    got = materialize(meta, device=torch.device("cpu")).state_dict()
    loaded = engine.load(path, vision=vision).state_dict()                          # the stored dtype: fp32
    assert loaded.keys() == got.keys() and all(torch.equal(loaded[k], got[k]) for k in got)
    bf16 = engine.load(path, vision=vision, dtype=torch.bfloat16).state_dict()      # every parameter cast
    assert all(bf16[k].dtype == torch.bfloat16 and torch.equal(bf16[k], got[k].bfloat16()) for k in got)
    if layout == "original":
        vocab = json.load(open(os.path.join(path, "config.json")))["vocab_size"]
        assert meta.model.config.image_token_id == vocab
        check_built(got, from_files((path, ORIGINAL_LLAVA), (vision, CLIP_DIR)), vocab + 1)
        return
    files = from_files((path, HF_LLAVA))
    w1, b1, w2, b2 = (files.pop(f"projector.linear_{i}.{p}").double() for i in (1, 2) for p in ("weight", "bias"))
    assert meta.model.projector.linear_2 is None
    assert rel_err(got.pop("projector.linear_1.weight"), w2 @ w1) <= 1e-6
    assert rel_err(got.pop("projector.linear_1.bias"), w2 @ b1 + b2) <= 1e-6
    check_built(got, files, 0)


def test_a_wrong_shape_is_named_from_the_header_before_any_weight_is_read(tmp_path, monkeypatch):
    """A checkpoint tensor of the wrong shape is an error naming the tensor, its file key and both shapes, raised
    from the headers (no tensor is read); a vocabulary tensor's rows are checked alike."""
    import engine.meta as meta_module
    path, _ = _checkpoint("hf-linear", tmp_path)
    file = os.path.join(path, "model.safetensors")
    state = load_file(file)
    key = "language_model.model.layers.1.mlp.up_proj.weight"
    state[key] = state[key][:-1].clone()
    save_file(state, file)
    monkeypatch.setattr(meta_module, "read_rows", lambda *a: pytest.fail("a weight was read"))
    with pytest.raises(ValueError, match=r"decoder.layers.1.mlp.up.weight has shape \(95, 48\) in the checkpoint "
                                         r"\(.*model.safetensors: language_model.model.layers.1.mlp.up_proj.weight\) "
                                         r"but the config implies \(96, 48\)"):
        engine.load(path)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_two_ranks_materialise_an_original_llava_checkpoint(tmp_path):
    """Each rank reads only its rows of an original-LLaVA checkpoint, the placeholder row included."""
    path, vision = _checkpoint("original", tmp_path)
    gathered = _two_ranks(tmp_path, "load", path, vision)
    ref = engine.load(path, vision=vision, dtype=torch.float32).state_dict()
    assert gathered.keys() == ref.keys() and all(torch.equal(gathered[k], ref[k]) for k in ref)


RSS = """
import resource, sys
from engine.meta import meta_compose
meta = meta_compose(sys.argv[1], sys.argv[2])
n = sum(p.numel() for p in meta.model.parameters())
assert all(p.is_meta for p in meta.model.parameters())
print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def test_llava15_7b_composes_on_the_meta_device_in_under_2gb(tmp_path):
    clip = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=336, patch_size=14)
    llama = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=32)
    clip_dir, llama_dir = write_sources(str(tmp_path), clip, llama, sparse=True)
    assert os.path.getsize(os.path.join(llama_dir, "model.safetensors")) > 13e9     # 6.7e9 bf16 values
    p = ok(subprocess.run([sys.executable, "-c", RSS, clip_dir, llama_dir], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=120))
    params, rss = (int(x) for x in p.stdout.split())
    assert abs(params - 7.06e9) <= 0.01 * 7.06e9            # LLaVA-1.5-7B: Vicuna-7B + 64 rows, tower, projector
    assert rss < 2 * 2**30, rss / 2**30                      # eager compose: > 28 GB (fp32 model) + the files


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_stage1_from_vision_and_llm_on_two_ranks_follows_one_process(assets, tmp_path):
    """``train.stage1 --vision --llm``: composed on the meta device, sharded, materialised per rank,
    trained; the same loss curve as one process (fp32; the 1-vs-2-rank tolerance of the loop tests)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(assets.tok_dir)
    clip_dir, llama_dir = write_sources(str(tmp_path), CLIPVisionConfig(**TINY_CLIP),
                                        LlamaConfig(**{**TINY_LLAMA, "vocab_size": len(tok)}))
    tok.save_pretrained(llama_dir)
    runs = {}
    for world in (1, 2):
        out = str(tmp_path / f"run{world}")
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if world == 2 else []
        ok(subprocess.run([sys.executable, *launcher, "-m", "train.stage1", "--vision", clip_dir, "--llm", llama_dir,
                           "--data", assets.image_data, "--image-folder", assets.image_folder, "--output", out,
                           "--max-steps", "2", "--global-batch", "3", "--device", "cpu", "--num-workers", "0",
                           "--lr", "1e-3"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240))
        with open(os.path.join(out, "metrics.jsonl")) as f:
            runs[world] = [json.loads(line) for line in f]
    assert [m["step"] for m in runs[2]] == [m["step"] for m in runs[1]] == [1, 2]
    for a, b in zip(runs[1], runs[2], strict=True):
        assert abs(b["loss"] - a["loss"]) <= 1e-5 * abs(a["loss"]) and b["tokens"] == a["tokens"], (a, b)


def test_meta_load_materialises_the_files_weights(assets):
    """An HF llava directory (here the tiny assets' model, our own export) on the meta device: its files' weights."""
    meta = meta_load(assets.model_dir)
    assert all(p.is_meta for p in meta.model.parameters())
    got = materialize(meta, device=torch.device("cpu")).state_dict()
    files = {k: v for k, v in from_files((assets.model_dir, HF_LLAVA)).items()}
    assert got.keys() == set(files)
    check_built(got, files, 0)


LOAD_RSS = """
import sys, torch
import engine
from engine.meta import meta_load

def status(key):                                             # bytes
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

meta_load(sys.argv[1])                  # the code's own one-time cost (imports, first model build) goes first
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")                                             # VmHWM (peak RSS) restarts from VmRSS
before = status("VmRSS")
model = engine.load(sys.argv[1], dtype=torch.float32)
print(sum(p.numel() * p.element_size() for p in model.parameters()), status("VmHWM") - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc peak-RSS reset")
def test_engine_load_holds_the_model_and_one_tensor_not_the_checkpoint(tmp_path):
    """``engine.load`` of a bf16 checkpoint as fp32 (many ~3 MB tensors): the host's peak grows by the model it
    builds plus about one tensor. Reading the checkpoint whole first, as it used to, adds the file (0.5× the fp32
    model) on top."""
    torch.manual_seed(0)
    cfg = engine.tiny_config(vocab_size=2048, hidden_size=512, intermediate_size=1408, num_layers=12, num_heads=8,
                             num_kv_heads=8)
    engine.export_hf(engine.Llava(cfg).to(torch.bfloat16), str(tmp_path / "ckpt"))
    p = ok(subprocess.run([sys.executable, "-c", LOAD_RSS, str(tmp_path / "ckpt")], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=120))
    model_bytes, grew = (int(x) for x in p.stdout.split())
    assert model_bytes > 100e6
    # measured 1.09-1.15 (one tensor, allocator slack); the whole bf16 file read first as before: 1.53
    assert grew < 1.3 * model_bytes, (grew / 1e6, model_bytes / 1e6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="loading onto a GPU needs a CUDA device")
@pytest.mark.parametrize("layout", ["original", "hf-linear"])
def test_engine_load_onto_a_gpu_equals_the_cpu_load(layout, tmp_path):
    """The parameters are allocated on the GPU in the dtype asked for and filled a tensor at a time: the same
    values as the CPU load, cast."""
    path, vision = _checkpoint(layout, tmp_path)
    cpu = engine.load(path, vision=vision).state_dict()
    gpu = engine.load(path, vision=vision, device="cuda", dtype=torch.bfloat16).state_dict()
    assert gpu.keys() == cpu.keys()
    assert all(v.is_cuda and v.dtype == torch.bfloat16 and torch.equal(v.cpu(), cpu[k].bfloat16())
               for k, v in gpu.items())
