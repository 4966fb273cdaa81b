"""Logit parity with transformers' LlavaForConditionalGeneration (fp32, CPU).

HF models are built from tiny random configs, saved with ``save_pretrained`` and loaded with
``engine.load``; our exports must load back in transformers with the same logits.
"""
import pytest
import torch
from helpers import IMAGE_TOKEN, VOCAB, hf_model, pad, prompts, rel_err
from transformers import LlavaForConditionalGeneration

import engine


def compare(hf, ours, seqs, pixels, side="right"):
    ids, mask = pad(seqs, side)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels if len(pixels) else None, attention_mask=mask).logits
        got = ours(ids, pixels if len(pixels) else None, attention_mask=mask)
    keep = mask.bool()
    err = rel_err(got[keep], ref[keep])
    # Both sides are fp32 within ~3e-7 of an fp64 run of the same model: the fp32 rule's 1e-5 holds.
    assert err <= 1e-5, f"logits relative error {err:.2e}"
    return got, keep


@pytest.mark.parametrize("kw", [
    dict(),                                   # LLaVA-1.5: mlp2x_gelu, layer -2, default strategy, GQA
    dict(layer=-1),
    dict(strategy="full"),
    dict(kv_heads=4),                         # plain multi-head attention
    dict(layer=[-3, -1]),                     # several feature layers concatenated
    dict(tie=True, bias=False),
], ids=["llava15", "layer-1", "full", "mha", "multilayer", "tied-nobias"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_match_transformers(tmp_path, kw, side):
    hf = hf_model(**kw)
    hf.save_pretrained(tmp_path)
    ours = engine.load(str(tmp_path))
    seqs, pixels = prompts(ours.config.image_seq_len)
    compare(hf, ours, seqs, pixels, side)


def test_linear_projector_roundtrip_through_transformers(tmp_path):
    """A `linear` projector exports as linear_1 + identity activation + identity linear_2."""
    cfg = engine.tiny_config(vocab_size=VOCAB, projector_type="linear", image_token_id=IMAGE_TOKEN)
    torch.manual_seed(0)
    ours = engine.Llava(cfg).eval()
    engine.export_hf(ours, str(tmp_path / "exp"))
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "exp").eval()
    seqs, pixels = prompts(cfg.image_seq_len)
    compare(hf, ours, seqs, pixels)
    back = engine.load(str(tmp_path / "exp"))
    assert back.config.projector_type == "linear" and back.projector.linear_2 is None
    compare(hf, back, seqs, pixels, "left")


def test_export_loads_in_transformers_with_same_logits(tmp_path):
    hf = hf_model(kv_heads=2)
    hf.save_pretrained(tmp_path / "hf")
    ours = engine.load(str(tmp_path / "hf"))
    engine.export_hf(ours, str(tmp_path / "exp"), max_shard_bytes=100_000)  # forces several shards
    hf2 = LlavaForConditionalGeneration.from_pretrained(tmp_path / "exp").eval()
    seqs, pixels = prompts(ours.config.image_seq_len)
    compare(hf2, ours, seqs, pixels)
    assert rel_err(engine.load(str(tmp_path / "exp"))(*pad(seqs, "right")[:1], pixels),
                   ours(*pad(seqs, "right")[:1], pixels)) == 0.0


def test_packing_isolates_sequences(tmp_path):
    """Changing one sequence of a batch leaves the others' logits bit-identical."""
    hf = hf_model()
    hf.save_pretrained(tmp_path)
    ours = engine.load(str(tmp_path))
    seqs, pixels = prompts(ours.config.image_seq_len)
    ids, mask = pad(seqs, "right")
    with torch.no_grad():
        a = ours(ids, pixels, attention_mask=mask)
        ids2 = ids.clone()
        ids2[0, : len(seqs[0])] = (ids2[0, : len(seqs[0])] + 1) % IMAGE_TOKEN
        b = ours(ids2, pixels, attention_mask=mask)
    assert torch.equal(a[1:], b[1:]) and not torch.equal(a[0], b[0])
