"""LLaVA engine: the model, checkpoints, templates and the runtime.

Public entry points: ``engine.load`` (a checkpoint directory → ``Llava``), ``engine.export_hf``,
``engine.Llava`` / ``engine.LlavaConfig``; the generation runtime adds ``engine.generate`` and
``engine.chat``.
"""
from engine.config import LlavaConfig, TextConfig, VisionConfig, from_hf, tiny_config
from engine.model import Llava
from engine.weights import compose, export_hf, load

__all__ = ["Llava", "LlavaConfig", "TextConfig", "VisionConfig", "compose", "export_hf", "from_hf", "load",
           "tiny_config"]
