"""Stage 1, feature alignment: ``python -m train.stage1 --model DIR --data FILE --image-folder DIR``.

Only the projector trains (vision tower and LLM frozen), `plain` template; LLaVA-1.5 defaults
lr 1e-3, global batch 256, 1 epoch (``--paper``: 2e-3, 128). On a GPU the fused path (fused
kernels, varlen flash attention) is the default (``--no-fused`` for the reference path); with
several ranks FSDP2 shards the frozen parts too, stored in bf16 (train/distributed.py)."""
from engine.cli import run_main
from train.stage import main

if __name__ == "__main__":
    run_main(main, 1)
