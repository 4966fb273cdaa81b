"""Merge a LoRA adapter into its base: ``python -m train.merge_lora --base B --adapter A --output O``.

Loads the base in fp32, applies the adapter (engine/lora.py: a PEFT adapter directory written by a
``--lora`` run, or by PEFT for transformers' ``LlavaForConditionalGeneration``), folds every adapter
into its weight with PEFT's merge, and writes an HF llava checkpoint (atomically) in the base's stored
dtype unless ``--dtype`` says otherwise, with the tokenizer of the adapter directory (else the base's).
"""
from __future__ import annotations

import argparse
import json
import os

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.merge_lora", description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="the base checkpoint directory the adapter was trained on")
    p.add_argument("--adapter", required=True, help="the adapter directory (a --lora run's final/)")
    p.add_argument("--output", required=True, help="where to write the merged HF llava checkpoint")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="dtype written (default: the base's stored dtype)")
    return p


def stored_dtype(path: str) -> torch.dtype:
    """The dtype of a checkpoint's floating tensors, from a safetensors header (no data read)."""
    from safetensors import safe_open
    codes = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), framework="pt") as f:
                for key in f.keys():
                    code = f.get_slice(key).get_dtype()
                    if code in codes:
                        return codes[code]
    raise ValueError(f"{path}: no floating-point tensor in its safetensors files")


def merge(base: str, adapter: str, output: str, dtype: torch.dtype | None = None) -> None:
    import engine
    from engine.lora import merge_lora
    from engine.weights import write_hf_checkpoint

    model = engine.load(base, adapter=adapter, dtype=torch.float32)
    dtype = dtype or stored_dtype(base)
    merge_lora(model)
    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    tok = adapter if any(n.startswith("tokenizer") for n in os.listdir(adapter)) else base
    write_hf_checkpoint(state, model.config, output, tokenizer_dir=tok,
                        extra_files={"merge_config.json": json.dumps(
                            {"base": os.path.abspath(base), "adapter": os.path.abspath(adapter)}, indent=2)})


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    merge(args.base, args.adapter, args.output, DTYPES[args.dtype] if args.dtype else None)
    print(f"merged {args.adapter} into {args.base} → {args.output}", flush=True)


if __name__ == "__main__":
    from engine.cli import run_main
    run_main(main)
