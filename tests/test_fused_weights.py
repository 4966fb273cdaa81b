"""Fused q/k/v and gate/up weights and the precomputed RoPE table (engine/model.py), fp32 on the CPU.

Fusion is an inference-time layout, not a new model: the state dict keeps the HF-mapped names
and values (an HF checkpoint loaded, fused and exported gives identical tensors), the training
path (gradients on) runs the separate GEMMs so the loss is bit-identical, an optimizer step
reaches the fused weight, and a re-assigned weight is never shadowed by a stale fused one.
"""
import copy

import pytest
import torch
from helpers import hf_model, pad, prompts
from safetensors.torch import load_file

import engine
from engine.model import RopeTable, fused_weight, rope_cos_sin


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    hf_model().save_pretrained(path)
    return str(path)


def forward(model, grad=False):
    seqs, pixels = prompts(model.config.image_seq_len)
    ids, mask = pad(seqs, "right")
    with torch.set_grad_enabled(grad):
        return model(ids, pixels, attention_mask=mask)[mask.bool()]


def fused_layers(model):
    with torch.no_grad():
        return [(fused_weight(b.attn.q, b.attn.k, b.attn.v) is not None, fused_weight(b.mlp.gate, b.mlp.up) is not None)
                for b in model.decoder.layers]


def test_export_of_a_fused_model_round_trips_the_hf_checkpoint(ckpt, tmp_path):
    model = engine.load(ckpt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.fuse_weights()
    assert all(a and m for a, m in fused_layers(model))
    after = model.state_dict()
    assert list(after) == list(before)                       # same names, same order
    assert all(torch.equal(after[k], before[k]) for k in before)
    engine.export_hf(model, str(tmp_path / "out"))
    original = load_file(f"{ckpt}/model.safetensors")
    # we write the v4 spelling of the tower's keys; this transformers saved them without "vision_model."
    exported = {k.replace("vision_tower.vision_model.", "vision_tower."): v
                for k, v in load_file(str(tmp_path / "out/model.safetensors")).items()}
    assert set(exported) == set(original)
    for k, v in original.items():
        assert exported[k].dtype == v.dtype and torch.equal(exported[k], v), k


def test_fused_inference_equals_unfused_and_training_is_bit_identical(ckpt):
    plain = engine.load(ckpt)
    fused = copy.deepcopy(plain)
    fused.fuse_weights()
    want = forward(plain)
    got = forward(fused)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    # gradients on: the separate GEMMs run (no fused weight), so logits and grads are bit-identical
    with torch.enable_grad():
        assert fused_weight(fused.decoder.layers[0].attn.q, fused.decoder.layers[0].attn.k,
                            fused.decoder.layers[0].attn.v) is None
    lp, lf = forward(plain, grad=True), forward(fused, grad=True)
    assert torch.equal(lp, lf)
    lp.square().mean().backward()
    lf.square().mean().backward()
    gp, gf = dict(plain.named_parameters()), dict(fused.named_parameters())
    assert list(gp) == list(gf)
    assert all(torch.equal(gp[k].grad, gf[k].grad) for k in gp if gp[k].grad is not None)


def test_optimizer_steps_reach_the_fused_weight_and_reassignment_unfuses(ckpt):
    model = engine.load(ckpt)
    model.fuse_weights()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    forward(model, grad=True).square().mean().backward()
    opt.step()
    assert all(a and m for a, m in fused_layers(model))      # updated in place: still one tensor each
    unfused = copy.deepcopy(model)                            # deepcopy clones each weight apart
    assert not any(a or m for a, m in fused_layers(unfused))
    assert (forward(model) - forward(unfused)).abs().max().item() <= 1e-5 * forward(unfused).abs().max().item()
    # a weight re-assigned (load_state_dict(assign=True)) breaks that layer's fusion: the new value is used
    k = model.decoder.layers[1].attn.k
    new = torch.randn_like(k.weight)
    model.load_state_dict({"decoder.layers.1.attn.k.weight": new}, strict=False, assign=True)
    unfused.decoder.layers[1].attn.k.weight.data = new.clone()
    assert fused_layers(model)[1] == (False, True)
    assert (forward(model) - forward(unfused)).abs().max().item() <= 1e-5 * forward(unfused).abs().max().item()
    model.fuse_weights()                                      # and fusing again picks it up
    assert fused_layers(model)[1] == (True, True)
    assert torch.equal(model.decoder.layers[1].attn.k.weight, new)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_table_equals_per_call_computation(dtype):
    """Built once per (device, dtype), each row bit-identical to the per-call fp32 computation."""
    dh, theta = 16, 10000.0
    table = RopeTable(dh, theta, 97)
    pos = torch.tensor([0, 5, 96, 1, 1, 40, 77])
    for got, want in zip(table(pos, dtype), rope_cos_sin(pos, dh, theta, dtype), strict=True):
        assert got.dtype == dtype and torch.equal(got, want)
    assert table.tables[(pos.device, dtype)].shape[0] == 97
    long = torch.tensor([3, 1024])                            # a packed batch longer than the config says
    for got, want in zip(table(long, dtype, 1025), rope_cos_sin(long, dh, theta, dtype), strict=True):
        assert torch.equal(got, want)
