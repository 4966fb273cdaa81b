"""FSDP2's MixedPrecisionPolicy (train/distributed.py, ``shard_model(mixed_precision=True)``), on 2
gloo ranks on the CPU (bf16 runs there too).

A saved-tensor hook records every bf16 tensor shaped like a weight that autograd keeps for the
backward; after the forward and the loss, before the backward:
- under the policy none of a decoder layer's gathered bf16 weights is still allocated (FSDP2 freed
  them after the layer's forward and gathers them again for its backward); the root unit (tower,
  projector, embedding, head) stays gathered by design and is accounted in the memory plan;
- the control: autocast around the same model keeps a live bf16 copy of every weight (the test can fail);
- the loss equals that of the same model cast to bf16 without FSDP (the policy's numerics);
- gradients are fp32, trainable weights fp32 masters, the frozen tower stored in bf16.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch.distributed as dist
from helpers import ENV, IMAGE_SIZE, REPO, ok

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")

SCRIPT = """import contextlib, dataclasses, json, sys, torch, torch.distributed as dist
import engine
from transformers import AutoTokenizer
from engine.image import ImageSpec
from train.data import collate, load_samples
from train.distributed import shard_model
from train.loop import LoopConfig, micro_loss
from train.stage import freeze_for_stage

def weight_shapes(model):
    shapes = set()
    for n, p in model.named_parameters():
        if p.ndim == 2:
            shapes |= {tuple(p.shape), tuple(p.shape)[::-1]}
    return shapes

def live_weight_copies(model, mb, cfg, autocast, shapes):
    # saved-for-backward bf16 tensors shaped like a weight that are still allocated once the forward
    # and the loss are done (then the backward runs): count and bytes
    saved = []
    def pack(t):
        if t.dtype == torch.bfloat16 and tuple(t.shape) in shapes:
            saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = micro_loss(model, mb, mb.num_targets, cfg, autocast)
    # FSDP2 keeps the root unit (tower, projector, embedding, head) gathered until its backward;
    # every decoder layer's gathered weights must be freed by now
    root = {p.untyped_storage().data_ptr() for n, p in model.named_parameters()
            if not n.startswith("decoder.layers.")}
    live = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved
            if t.untyped_storage().nbytes() > 0 and t.untyped_storage().data_ptr() not in root}
    loss.backward()
    return float(loss), len(saved), len(live), sum(live.values())

dist.init_process_group("gloo")
rank = dist.get_rank()
model_dir, data, folder, out = sys.argv[1:5]
tok = AutoTokenizer.from_pretrained(model_dir)
ref = engine.load(model_dir, dtype=torch.float32, kernel_backend="torch")
samples, _ = load_samples(data, tok, template="vicuna_v1", image_token_id=ref.config.image_token_id,
                          image_rows=ref.config.image_rows, image_folder=folder, max_length=2048)
mb = collate(samples[rank * 3: rank * 3 + 3], spec=ImageSpec(size=int(sys.argv[5])))
cfg = LoopConfig(output="/tmp/unused", lr=1e-3, global_batch=3)
result = {}
for name in ("fp32", "autocast", "bf16", "fsdp_mp"):
    model = engine.load(model_dir, dtype=torch.float32, kernel_backend="torch")
    model.attention_backend = "sdpa"
    freeze_for_stage(model, 2)
    shapes = weight_shapes(model)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if name == "autocast" else contextlib.nullcontext()
    if name == "fsdp_mp":
        shard_model(model, mixed_precision=True)
    if name == "bf16":              # what the policy computes, without FSDP: the numerics reference
        model.to(torch.bfloat16)
        mb_used = dataclasses.replace(mb, pixel_values=mb.pixel_values.to(torch.bfloat16))
    used = mb_used if name == "bf16" else mb
    loss, n_saved, live, nbytes = live_weight_copies(model, used, cfg, autocast, shapes)
    grads = {n: str(p.grad.dtype) for n, p in model.named_parameters() if p.grad is not None}
    dtypes = {n: str(p.dtype) for n, p in model.named_parameters()}
    result[name] = {"loss": loss, "saved": n_saved, "live": live, "bytes": nbytes,
                    "grad_dtypes": sorted(set(grads.values())),
                    "frozen_dtypes": sorted({d for n, d in dtypes.items() if n.startswith("vision.")}),
                    "trainable_dtypes": sorted({d for n, d in dtypes.items() if n.startswith("decoder.")})}
with open(f"{out}.rank{rank}.json", "w") as f:
    json.dump(result, f, indent=1)
from train.distributed import leave_distributed
leave_distributed()
"""


def test_policy_keeps_no_bf16_weight_copies_between_forward_and_backward(assets, tmp_path):
    script, out = str(tmp_path / "mp.py"), str(tmp_path / "out")
    with open(script, "w") as f:
        f.write(SCRIPT)
    ok(subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script,
                       assets.model_dir, assets.mixed_data, assets.image_folder, out, str(IMAGE_SIZE)],
                      cwd=REPO, env=ENV, capture_output=True, text=True, timeout=180))
    layers = 2 * 7                                  # tiny decoder: 2 layers × q, k, v, o, gate, up, down
    for rank in (0, 1):
        with open(f"{out}.rank{rank}.json") as f:
            r = json.load(f)
        assert r["fp32"]["saved"] == 0                                  # fp32: no bf16 tensor at all
        assert r["autocast"]["live"] >= layers                          # the control: autocast's copies are live
        assert r["fsdp_mp"]["saved"] >= layers and r["fsdp_mp"]["live"] == 0, r["fsdp_mp"]
        assert abs(r["fsdp_mp"]["loss"] - r["bf16"]["loss"]) <= 1e-6 * abs(r["bf16"]["loss"]), r
        assert r["fsdp_mp"]["grad_dtypes"] == ["torch.float32"]
        assert r["fsdp_mp"]["trainable_dtypes"] == ["torch.float32"]
        assert r["fsdp_mp"]["frozen_dtypes"] == ["torch.bfloat16"]
