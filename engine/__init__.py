"""LLaVA engine: the model, checkpoints, templates and the runtime.

Public entry points: ``engine.load`` (a checkpoint directory → ``Llava``), ``engine.export_hf``,
``engine.compose``, ``engine.Llava`` / ``engine.LlavaConfig``, ``engine.generate`` and
``engine.chat``. They are imported on first use, so light modules such as ``engine.client``
do not pull in torch and the kernels.

``engine.generate`` and ``engine.chat`` are functions that live in submodules of the same
name; importing a submodule normally rebinds the package attribute to the module, so the
package keeps those two names bound to the functions (the modules stay in ``sys.modules``).
"""
import importlib
import sys
import types

_EXPORTS = {
    "LlavaConfig": "engine.config", "TextConfig": "engine.config", "VisionConfig": "engine.config",
    "from_hf": "engine.config", "tiny_config": "engine.config", "Llava": "engine.model",
    "compose": "engine.weights", "export_hf": "engine.weights", "load": "engine.weights",
    "generate": "engine.generate", "chat": "engine.chat",
}
_FUNCTION_OVER_MODULE = ("generate", "chat")
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        if name in _FUNCTION_OVER_MODULE and isinstance(value, types.ModuleType):
            return  # the import system binding the submodule: keep the public function name lazy
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
