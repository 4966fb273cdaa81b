"""Logit parity with transformers' LlavaForConditionalGeneration (fp32, CPU).

HF models are built from tiny random configs, saved with ``save_pretrained`` and loaded with
``engine.load``; our exports must load back in transformers with the same logits.
"""
import pytest
import torch
from helpers import rel_err
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import engine

VOCAB, IMAGE_TOKEN, IMG = 120, 119, 28  # image 28 px, patch 14 → 4 patches (+1 class token)


def hf_model(*, act="gelu", layer=-2, strategy="default", kv_heads=2, tie=False, bias=True, seed=0):
    torch.manual_seed(seed)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=IMG, patch_size=14, hidden_act="quick_gelu")
    tc = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=kv_heads, rope_theta=500.0,
                     rms_norm_eps=1e-5, tie_word_embeddings=tie)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMAGE_TOKEN, projector_hidden_act=act,
                      vision_feature_layer=layer, vision_feature_select_strategy=strategy,
                      multimodal_projector_bias=bias, tie_word_embeddings=tie)
    cfg.image_seq_length = 4 + (strategy == "full")
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random (not default-initialised) norms and biases so every weight matters
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "class_embedding" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


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
    pixels = torch.randn(sum(n_images), 3, IMG, IMG, generator=g)
    return seqs, pixels


def pad(seqs, side):
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
    return ids, mask


def compare(hf, ours, seqs, pixels, side="right"):
    ids, mask = pad(seqs, side)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels if len(pixels) else None, attention_mask=mask).logits
        got = ours(ids, pixels if len(pixels) else None, attention_mask=mask)
    keep = mask.bool()
    err = rel_err(got[keep], ref[keep])
    assert err <= 1e-4, f"logits relative error {err:.2e}"
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
