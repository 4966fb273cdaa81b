"""Config loading: HF llava (v4/v5 spellings) and original LLaVA configs; unsupported fields name themselves."""
import json

import pytest

from engine.config import config_from_dict, from_hf, tiny_config


def hf_dict(**over):
    d = {
        "model_type": "llava", "image_token_index": 32000, "projector_hidden_act": "gelu",
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                          "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14},
        "text_config": {"model_type": "llama", "vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 11008,
                        "num_hidden_layers": 32, "num_attention_heads": 32, "rope_theta": 10000.0,
                        "rms_norm_eps": 1e-5},
    }
    d.update(over)
    return d


def test_llava15_shapes():
    cfg = config_from_dict(hf_dict())
    assert cfg.image_seq_len == 576 and cfg.vision_layers_needed == 23
    assert cfg.text.num_kv_heads == 32 and cfg.text.head_dim == 128 and cfg.projector_type == "mlp2x_gelu"


def test_v5_spellings():
    d = hf_dict(image_token_id=7, vision_feature_layer=[-2, -5], multimodal_projector_bias=False)
    del d["image_token_index"]
    d["text_config"] = {**d["text_config"], "rope_parameters": {"rope_type": "default", "rope_theta": 5e5},
                        "num_key_value_heads": 8, "tie_word_embeddings": True}
    del d["text_config"]["rope_theta"]
    cfg = config_from_dict(d)
    assert cfg.image_token_id == 7 and cfg.vision_feature_layer == (-2, -5) and not cfg.projector_bias
    assert cfg.text.rope_theta == 5e5 and cfg.text.num_kv_heads == 8 and cfg.text.tie_word_embeddings
    assert cfg.projector_in_features == 2048


@pytest.mark.parametrize("field, value", [
    ("projector_hidden_act", "relu"),
    ("vision_feature_select_strategy", "cls"),
    ("vision_feature_layer", "last"),
])
def test_unsupported_top_level_field_is_named(field, value):
    with pytest.raises(ValueError, match=field):
        config_from_dict(hf_dict(**{field: value}))


@pytest.mark.parametrize("field, value", [
    ("hidden_act", "gelu"), ("attention_bias", True), ("mlp_bias", True),
    ("rope_scaling", {"type": "linear", "factor": 2.0}), ("model_type", "mistral"),
])
def test_unsupported_text_field_is_named(field, value):
    d = hf_dict()
    d["text_config"] = {**d["text_config"], field: value}
    with pytest.raises(ValueError, match=field):
        config_from_dict(d)


def test_original_llava_config(tmp_path):
    d = {**hf_dict()["text_config"], "model_type": "llava_llama",
         "mm_vision_tower": "openai/clip-vit-large-patch14-336",
         "mm_projector_type": "linear", "mm_vision_select_layer": -1, "mm_vision_select_feature": "cls_patch",
         "mm_hidden_size": 1024}
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg = from_hf(str(tmp_path))
    assert cfg.projector_type == "linear" and cfg.vision_feature_layer == (-1,)
    assert cfg.vision_feature_select_strategy == "full" and cfg.image_seq_len == 577
    assert cfg.image_token_id == 32064  # first id past the vocabulary
    with pytest.raises(ValueError, match="mm_projector_type"):
        config_from_dict({**d, "mm_projector_type": "mlp3x_gelu"})
    with pytest.raises(ValueError, match="mm_vision_tower"):
        config_from_dict({**d, "mm_vision_tower": "someone/unknown-tower"})


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        from_hf(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        from_hf(str(tmp_path))


def test_feature_layer_range_checked():
    with pytest.raises(ValueError, match="vision_feature_layer"):
        tiny_config().replace(vision_feature_layer=(-9,))
