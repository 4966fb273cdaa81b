"""LLaVA-1.6 checkpoints: original LLaVA-1.6 directories (``image_aspect_ratio: anyres``,
``mm_patch_merge_type: spatial_unpad``, (width, height) pinpoints, ``model.image_newline``, Mistral
text), HF llava_next configs (defaults, v5 keys) and the errors unsupported variants raise."""
import json

import pytest
import torch
from anyres_helpers import GRIDS, IMAGE_TOKEN, hf_next, make_prompts
from helpers import original_layout
from safetensors.torch import load_file, save_file

import engine
from engine.config import LLAVA_NEXT_PINPOINTS, config_from_dict


def _logits(model, seqs, pixels, sizes):
    from helpers import pad
    ids, mask = pad(seqs, "right")
    with torch.no_grad():
        return model(ids, pixels, attention_mask=mask, image_sizes=sizes)[mask.bool()]


def _original_16(tmp_path, ours, *, text_type="llava_mistral"):
    """``ours`` written in upstream LLaVA-1.6's layout: one directory, tower weights inside."""
    orig, tower = original_layout(ours)
    orig.update({"model.vision_tower.vision_tower." + k: v for k, v in tower.items()})
    hf_cfg = ours.config.to_hf_dict()
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text(json.dumps(hf_cfg["vision_config"]))
    text = {k: v for k, v in hf_cfg["text_config"].items() if k != "rope_parameters"}
    text.update(model_type=text_type, architectures=["LlavaMistralForCausalLM"], sliding_window=None,
                mm_vision_tower=str(tmp_path / "clip"), mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
                mm_vision_select_feature="patch", mm_hidden_size=32, image_token_index=IMAGE_TOKEN,
                image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
                # upstream's pinpoints are (width, height)
                image_grid_pinpoints=[[w, h] for h, w in ours.config.image_grid_pinpoints])
    out = tmp_path / "orig"
    out.mkdir()
    save_file(orig, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(text))
    return str(out), text


def test_original_llava16_directory(tmp_path):
    hf = hf_next(grid="wide", text="mistral", seed=1)      # "wide" is not symmetric under (h, w) swaps
    hf.save_pretrained(tmp_path / "hf")
    ours = engine.load(str(tmp_path / "hf"))
    path, raw = _original_16(tmp_path, ours)
    assert raw["image_grid_pinpoints"] != GRIDS["wide"]
    loaded = engine.load(path)
    assert loaded.config.image_grid_pinpoints == tuple(tuple(p) for p in GRIDS["wide"])
    seqs, pixels, sizes = make_prompts(ours.config, seed=2)
    assert torch.equal(_logits(loaded, seqs, pixels, sizes), _logits(ours, seqs, pixels, sizes))

    raw_llama = dict(raw, model_type="llava_llama")
    (tmp_path / "orig" / "config.json").write_text(json.dumps(raw_llama))
    assert engine.load(path).config == loaded.config


@pytest.mark.parametrize("change, match", [
    (dict(mm_patch_merge_type="flat"), "mm_patch_merge_type='flat' is not supported"),
    (dict(mm_patch_merge_type=None), "mm_patch_merge_type='flat' is not supported"),     # upstream's default
    (dict(image_aspect_ratio="anyres_max_9"), "image_aspect_ratio='anyres_max_9' is not supported"),
    (dict(image_grid_pinpoints=None), "image_grid_pinpoints=None must be a non-empty list"),
    (dict(image_grid_pinpoints="[(28, 56)]"), "must be a non-empty list of"),
    (dict(image_grid_pinpoints=[[28, 30]]), r"^orig/config.json: image_grid_pinpoints \[\(30, 28\)\] are not mult"),
    (dict(sliding_window=64), "sliding_window=64 < max_position_embeddings=1024 is not supported"),
    (dict(sliding_window="absent", max_position_embeddings=8192),                          # MistralConfig's default
     "sliding_window=4096 < max_position_embeddings=8192"),
], ids=["flat", "no-merge", "anyres_max", "no-pins", "str-pins", "odd-pins", "window", "default-window"])
def test_original_llava16_config_errors(tmp_path, change, match):
    hf = hf_next(seed=2)
    hf.save_pretrained(tmp_path / "hf")
    _, raw = _original_16(tmp_path, engine.load(str(tmp_path / "hf")))
    bad = dict(raw, **change)
    bad = {k: v for k, v in bad.items() if v != "absent" and not (k == "mm_patch_merge_type" and v is None)}
    with pytest.raises(ValueError, match=match):
        config_from_dict(bad, "orig/config.json")


def test_mistral_window_covering_every_position_is_llama():
    hf = hf_next(seed=0)
    d = hf.config.to_dict()
    d["text_config"] = dict(d["text_config"], model_type="mistral", sliding_window=1024,
                            max_position_embeddings=1024)
    assert config_from_dict(d).text == config_from_dict(hf.config.to_dict()).text


def test_hf_llava_next_config_default_pinpoints():
    hf = hf_next(seed=0)
    d = hf.config.to_dict()
    d.pop("image_grid_pinpoints")
    d["vision_config"] = dict(d["vision_config"], image_size=336, patch_size=14)
    cfg = config_from_dict(d)
    assert cfg.image_grid_pinpoints == LLAVA_NEXT_PINPOINTS
    # 480x640 → 672x672 (2x2 tiles), a 48x48 map unpadded to 36 rows x 48 columns (+1 newline each) + base 24².
    assert cfg.image_rows(480, 640) == 36 * 49 + 576 and cfg.image_tiles(480, 640) == 5
    d["vision_config"].update(image_size=32, patch_size=16)
    with pytest.raises(ValueError, match="not multiples of the vision tower's image_size=32"):
        config_from_dict(d)


def test_v5_keys_and_missing_image_newline(tmp_path):
    hf = hf_next(seed=3)
    hf.save_pretrained(tmp_path)
    ours = engine.load(str(tmp_path))
    state = load_file(str(tmp_path / "model.safetensors"))
    key = next(k for k in state if k.endswith("image_newline"))
    renamed = {("model.image_newline" if k == key else k): v for k, v in state.items()}
    save_file(renamed, str(tmp_path / "model.safetensors"))
    assert torch.equal(engine.load(str(tmp_path)).image_newline, ours.image_newline)
    save_file({k: v for k, v in state.items() if k != key}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \['image_newline'\]"):
        engine.load(str(tmp_path))


# llava-hf/llava-v1.6-mistral-7b-hf's config.json (transformers 4.39): the text_config lists only what differs
# from MistralConfig's defaults (no hidden_size, layers or heads).
LLAVA16_MISTRAL_HF = {
    "architectures": ["LlavaNextForConditionalGeneration"], "ignore_index": -100,
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "image_token_index": 32000, "model_type": "llava_next", "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "mistralai/Mistral-7B-Instruct-v0.2", "architectures": ["MistralForCausalLM"],
                    "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral",
                    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None,
                    "torch_dtype": "bfloat16", "vocab_size": 32064},
    "torch_dtype": "float16", "transformers_version": "4.39.0.dev0", "use_image_newline_parameter": True,
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
}


@pytest.mark.parametrize("text", ["mistral", "llama"])
def test_transformers4_diff_configs_read_like_transformers(text):
    """Fields a transformers-4.x text_config leaves out take LlamaConfig's / MistralConfig's defaults."""
    from transformers import LlavaNextConfig

    d = json.loads(json.dumps(LLAVA16_MISTRAL_HF))
    if text == "llama":   # a vicuna-style diff config
        d["text_config"] = {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096,
                            "model_type": "llama", "pad_token_id": 0, "rms_norm_eps": 1e-05, "vocab_size": 32064}
    ours = config_from_dict(d)
    hf = LlavaNextConfig(**d)
    t, ht = ours.text, hf.text_config
    assert (t.vocab_size, t.hidden_size, t.intermediate_size, t.num_layers, t.num_heads, t.num_kv_heads, t.head_dim,
            t.max_position_embeddings, t.rms_norm_eps, t.rope_theta) == (
        ht.vocab_size, ht.hidden_size, ht.intermediate_size, ht.num_hidden_layers, ht.num_attention_heads,
        ht.num_key_value_heads, ht.head_dim, ht.max_position_embeddings, ht.rms_norm_eps,
        ht.rope_parameters["rope_theta"])
    v, hv = ours.vision, hf.vision_config
    assert (v.hidden_size, v.num_layers, v.num_heads, v.image_size, v.patch_size) == (
        hv.hidden_size, hv.num_hidden_layers, hv.num_attention_heads, hv.image_size, hv.patch_size)
    assert ours.image_grid_pinpoints == tuple(tuple(p) for p in hf.image_grid_pinpoints)
    if text == "mistral":
        assert t.hidden_size == 4096 and t.num_kv_heads == 8 and t.max_position_embeddings == 32768
        d["text_config"].pop("sliding_window")          # MistralConfig's default window 4096 < 32768 positions
        with pytest.raises(ValueError, match="sliding_window=4096 < max_position_embeddings=32768"):
            config_from_dict(d)
