"""LLaVA engine: the model, checkpoints, templates and the runtime.

Public entry points: ``engine.load`` (a checkpoint directory → ``Llava``), ``engine.export_hf``,
``engine.compose``, ``engine.Llava`` / ``engine.LlavaConfig``, ``engine.generate`` and
``engine.chat``. They are imported on first use, so light modules such as ``engine.client``
do not pull in torch and the kernels.
"""
import importlib

_EXPORTS = {
    "LlavaConfig": "engine.config", "TextConfig": "engine.config", "VisionConfig": "engine.config",
    "from_hf": "engine.config", "tiny_config": "engine.config", "Llava": "engine.model",
    "compose": "engine.weights", "export_hf": "engine.weights", "load": "engine.weights",
    "generate": "engine.generate", "chat": "engine.chat",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
