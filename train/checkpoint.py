"""Checkpoint I/O of the training loop: sharded resume checkpoints and the final HF export.

``OUTPUT/checkpoints/step-NNNNNN/`` is a ``torch.distributed.checkpoint`` (DCP) directory:

- ``.metadata`` + ``__R_0.distcp``: the model and optimizer state, each rank writing only its own
  FSDP2 shards (no rank ever holds the full model or optimizer state), keyed by parameter name
  so that DCP reshards on load: a checkpoint of W ranks resumes on any number of ranks;
- ``rng-RRRRR.pt``: each rank's RNG state (a resume on another world size takes rank r's if it
  exists, else rank 0's: all ranks start from the same seed);
- ``training_state.pt`` (rank 0, written last): step (the data position: the step plan is a
  function of the seed), scheduler, world size, the loop and run configs.

Atomic: every rank writes into one temporary sibling ``.step-NNNNNN.tmp-*`` (its name chosen by
rank 0 and broadcast), files are fsynced, and after a barrier rank 0 renames it into place. A
run killed at any point leaves complete checkpoints and, at worst, a temporary directory that
the next start removes. The final model stays an HF llava directory (``export_final``).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import random
import shutil
import tempfile
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from engine.io import fsync_dir, replace_dir
from engine.weights import write_hf_checkpoint
from train.distributed import rank_world


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def remove_stale_temporaries(output: str) -> None:
    """Delete the temporary directories of checkpoint writes that a killed run left behind
    (named ``.NAME.tmp-*``); they never hold a complete checkpoint."""
    for pattern in (os.path.join("checkpoints", ".step-*.tmp-*"), ".final.tmp-*"):
        for path in glob.glob(os.path.join(output, pattern)):
            shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(output: str) -> str | None:
    """The newest complete checkpoint (directories appear only by atomic rename)."""
    found = sorted(glob.glob(os.path.join(output, "checkpoints", "step-*", "training_state.pt")))
    return os.path.dirname(found[-1]) if found else None


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _dcp(fn, *args, **kw):
    """``dcp.save``/``dcp.load``; in one process without a process group that is what we mean, so
    DCP's warning that it assumes so is silenced (only that one)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        return fn(*args, **kw)


def _stateful(model, opt) -> tuple[dict, dict]:
    """(model, optimizer) state dicts keyed by parameter name; FSDP2 parameters stay sharded DTensors.

    A LoRA run (``model.lora``) keeps only what trains (adapters, projector): its frozen base is the
    checkpoint it started from, read again on resume, so a checkpoint is megabytes, not the whole LLM
    (and a 4-bit base never has to go through DCP)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_sd, optim_sd = get_state_dict(model, opt)
    if model.lora is not None:
        trains = {n for n, p in model.named_parameters() if p.requires_grad}
        model_sd = {k: v for k, v in model_sd.items() if k in trains}
    return model_sd, optim_sd


def save_checkpoint(model, opt, sched, step: int, cfg, run_config: dict | None) -> str:
    """Write ``OUTPUT/checkpoints/step-NNNNNN`` (see the module docstring). Collective: every rank calls it."""
    rank, world = rank_world()
    parent = os.path.join(cfg.output, "checkpoints")
    path = os.path.join(parent, f"step-{step:06d}")
    box = [None]
    if rank == 0:
        os.makedirs(parent, exist_ok=True)
        box[0] = tempfile.mkdtemp(prefix=f".step-{step:06d}.tmp-", dir=parent)
        os.chmod(box[0], 0o755)      # mkdtemp's 0700 would make the published checkpoint private
    if world > 1:
        dist.broadcast_object_list(box, src=0)
    tmp = box[0]
    model_sd, optim_sd = _stateful(model, opt)
    # sync_files: each rank fsyncs what it wrote; dcp.save returns once rank 0 wrote .metadata.
    _dcp(dcp.save, {"model": model_sd, "optim": optim_sd},
         storage_writer=dcp.FileSystemWriter(tmp, sync_files=True))
    rng_file = os.path.join(tmp, f"rng-{rank:05d}.pt")
    torch.save(rng_state(), rng_file)
    _fsync_file(rng_file)
    _barrier()
    if rank == 0:
        training = {"step": step, "world_size": world, "scheduler": sched.state_dict(),
                    "loop": dataclasses.asdict(cfg), "run": run_config or {},
                    "lora": None if model.lora is None else dataclasses.asdict(model.lora)}
        state_file = os.path.join(tmp, "training_state.pt")
        torch.save(training, state_file)
        _fsync_file(state_file)
        _fsync_file(os.path.join(tmp, ".metadata"))
        fsync_dir(tmp)
        replace_dir(tmp, path)
    _barrier()
    return path


def restore_checkpoint(model, opt, sched, ckpt: str) -> int:
    """Load model, optimizer, scheduler and RNG from ``ckpt`` on the current world size (any: DCP
    reshards). Collective. Returns the step to run next."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    training_file = os.path.join(ckpt, "training_state.pt")
    if not os.path.isfile(training_file):
        raise FileNotFoundError(f"{ckpt}: not a complete training checkpoint (no training_state.pt)")
    training = torch.load(training_file, map_location="cpu", weights_only=True)
    saved = training.get("lora")
    ours = None if model.lora is None else dataclasses.asdict(model.lora)
    if saved != ours:
        raise ValueError(f"{ckpt}: written by a run with LoRA settings {saved} (None: full-parameter), but this run "
                         f"has {ours}; resume with the same --lora flags, or start a new --output")
    model_sd, optim_sd = _stateful(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    _dcp(dcp.load, state, storage_reader=dcp.FileSystemReader(ckpt))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=model.lora is None))   # LoRA: the base is not in it
    sched.load_state_dict(training["scheduler"])
    rank = rank_world()[0]
    rng_file = os.path.join(ckpt, f"rng-{rank:05d}.pt")
    if not os.path.isfile(rng_file):
        rng_file = os.path.join(ckpt, "rng-00000.pt")
    set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    return int(training["step"])


def read_model_state(ckpt: str) -> dict[str, torch.Tensor]:
    """The full model state dict (our names, CPU) of a checkpoint, in one process without a process
    group: for inspection, tests and exporting an intermediate step. Holds the whole model in RAM."""
    meta = dcp.FileSystemReader(ckpt).read_metadata()
    state = {}
    for key, md in meta.state_dict_metadata.items():
        if key.startswith("model.") and hasattr(md, "size"):
            state[key] = torch.empty(md.size, dtype=md.properties.dtype)
    _dcp(dcp.load, {"model": {k.removeprefix("model."): v for k, v in state.items()}}, checkpoint_id=ckpt,
         no_dist=True)
    return {k.removeprefix("model."): v for k, v in state.items()}


def full_model_state(model) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on CPU; under FSDP2 only rank 0's is complete. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    if not dist.is_initialized():
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_final(model, output: str, tokenizer_dir: str | None, run_config: dict | None) -> str:
    """``OUTPUT/final``: the trained model as an HF llava directory, or for a LoRA run its PEFT adapter
    directory (engine/lora.py), written by rank 0. Collective."""
    final = os.path.join(output, "final")
    state = full_model_state(model)
    if rank_world()[0] == 0 and model.lora is not None:   # a LoRA run: the PEFT adapter directory
        from engine.lora import save_adapter
        save_adapter(state, model.config, model.lora, final, base=model.lora_base, tokenizer_dir=tokenizer_dir,
                     extra_files={"run_config.json": json.dumps(run_config or {}, indent=2, default=str)})
    elif rank_world()[0] == 0:
        write_hf_checkpoint(state, model.config, final, tokenizer_dir=tokenizer_dir,
                            extra_files={"run_config.json": json.dumps(run_config or {}, indent=2, default=str)})
    _barrier()
    return final


def truncate_metrics(path: str, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (they will be redone)."""
    if not os.path.exists(path) or rank_world()[0] != 0:
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)
