"""Stage 2, end-to-end fine-tuning: ``python -m train.stage2 --fused [--init STAGE1] --data FILE``.

Projector + LLM train (vision tower frozen), `vicuna_v1` template; LLaVA-1.5 defaults lr 2e-5,
global batch 128, 1 epoch (``--paper``: 32, 3 epochs). With no model and no data it runs the
embedded default: a tiny LLaVA on the bundled shapes dataset, stage 1 then stage 2, then
held-out multiple-choice accuracy."""
from engine.cli import run_main
from train.stage import main

if __name__ == "__main__":
    run_main(main, 2)
