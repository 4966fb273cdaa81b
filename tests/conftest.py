"""Test-wide setup: kernels run on the Triton interpreter when there is no GPU.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is created, i.e. before
``llava_kernels`` is imported, so it is set here at collection time.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

UPSTREAM = os.environ.get("LLAVA_UPSTREAM_DATA",
                          os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "upstream"))


@pytest.fixture
def upstream_dir():
    """Path of the public LLaVA/ScienceQA files; skips the test when they are absent."""
    path = os.path.abspath(UPSTREAM)
    if not os.path.isdir(path):
        pytest.skip(f"upstream data not found at {path} (set LLAVA_UPSTREAM_DATA)")
    return path


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is available on this machine")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random tiny LLaVA with a tiny BPE tokenizer, written in the HF llava layout."""
    from transformers import AutoTokenizer

    import engine
    from engine.tokenizer import build_tiny_tokenizer
    from engine.weights import write_hf_checkpoint

    root = tmp_path_factory.mktemp("tiny_ckpt")
    tok_dir = build_tiny_tokenizer(str(root / "tok"), vocab_size=400)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = engine.tiny_config(vocab_size=len(tok), image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    write_hf_checkpoint(engine.Llava(cfg).state_dict(), cfg, str(root / "ckpt"), tokenizer_dir=tok_dir)
    return str(root / "ckpt")


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """The tiny training assets (helpers.build_tiny_assets), built once; tests only read them."""
    from helpers import build_tiny_assets

    return build_tiny_assets(str(tmp_path_factory.mktemp("assets")))


@pytest.fixture(scope="session")
def samples(assets):
    """``assets.mixed_data`` loaded with the vicuna_v1 template: image samples, then text-only ones."""
    from helpers import load_tiny

    return load_tiny(assets, assets.mixed_data)[0]
