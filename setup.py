"""Packaging for the LLaVA engine.

The CUDA extension (csrc/) is built by CMake, not here: `pip install .` stays a pure
Python install on CPU-only machines, and `cmake -S . -B build && cmake --build build`
builds `llava_kernels/_C*.so` where torch has CUDA (see README, "CUDA ops").
"""
from setuptools import find_packages, setup

setup(
    name="llava-engine",
    version="0.1.0",
    description="A kernel-first LLaVA engine: training, generation, serving and evaluation",
    python_requires=">=3.10",
    packages=find_packages(include=["engine*", "llava_kernels*", "train*", "llava_evals*"]),
    package_data={"train": ["prompts/*/*.txt"], "llava_kernels": ["cpu/*.cpp", "cpu/*.h"]},
    install_requires=[
        # torch 2.11 (GPU machine) .. 2.14 (CPU pip cap); an open range would pull a CUDA build here.
        "torch>=2.10,<2.15",
        "triton>=3.5",
        "safetensors>=0.4",
        "transformers>=4.45",
        "tokenizers>=0.20",
        "pillow>=10",
        "numpy>=1.26",
        "peft>=0.21",  # LoRA adapters (engine/lora.py): injection, merge and the adapter format
        # the 4-bit NF4 base of --qlora (engine.lora.quantize_base_nf4) and weight-only int8/int4 inference
        # (engine.quantize): 0.18 is the release tested (its NF4 tensor, int8 PerRow config, int4
        # tile_packed_to_4d packing and the CPU int4 prototype config)
        "torchao>=0.18",
        # serving (engine.serve): the stack of vLLM's and SGLang's OpenAI servers
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "pydantic>=2.6",
        # the teacher (train.make_instruct) and the judge (llava_evals) call OpenAI-compatible endpoints
        "openai>=1.50",
        "tqdm>=4.66",   # progress bars of the evaluators' answer runs
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-benchmark>=4", "ruff>=0.6"],
        "flash": ["flash-attn>=2.6"],
        "xformers": ["xformers>=0.0.28"],
        "nvtx": ["nvtx>=0.2.10"],
    },
)
