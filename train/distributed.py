"""The process group, the FSDP2 sharding policy and the coordinated stop.

Launched by ``torchrun`` (WORLD_SIZE > 1) the loop joins a process group (NCCL on GPU, gloo on
CPU) and shards the model with FSDP2; one process runs without either. Stopping is a
collective decision: a SIGINT/SIGTERM only sets a flag on the rank that received it, and all
ranks all-reduce that flag at the same step boundary (``agreed_stop``), so they leave the loop
together, save one consistent checkpoint and exit 0. Nothing is done inside the signal handler
itself, so a signal arriving during a collective never leaves a peer waiting.
"""
from __future__ import annotations

import atexit
import os
import signal
import sys
from typing import NoReturn

import torch
import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def setup_distributed(device: torch.device) -> None:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            # before the process group: NCCL binds each rank's communicator to the current device, and
            # every later ``.to("cuda")`` (model, micro-batches, all-reduce buffers) means this GPU
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def leave_distributed() -> NoReturn:
    """End a torchrun rank after a clean run: leave the process group, run Python's exit handlers, flush, exit 0
    without the interpreter's C++ teardown. That teardown aborted a rank about 1 two-rank CPU run in 10 (torch
    2.13, gloo): "terminate called without an active exception" (SIGABRT, exit -6: a C++ thread still joinable
    when static objects are destroyed), after every step, checkpoint and export had finished. Everything is
    written by then (checkpoints atomically, fsynced), so nothing is lost by skipping it."""
    if dist.is_initialized():
        dist.destroy_process_group()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def shard_model(model, *, mixed_precision: bool = False) -> None:
    """FSDP2: each decoder block its own unit, the root (everything else) last.

    ``mixed_precision`` (the GPU default, ``uses_mixed_precision``): FSDP2's MixedPrecisionPolicy
    instead of autocast. Parameters are all-gathered in bf16 for compute and freed again after each
    unit's forward (re-gathered for its backward), so no bf16 copy of a weight lives from forward to
    backward; gradients are reduced in fp32 into the fp32 master shards the optimizer updates.
    Frozen parameters (the vision tower; the LLM in stage 1) are stored in bf16 (they never need a
    master copy) and get no optimizer state: the optimizer only sees what requires grad.

    The frozen vision tower stays in the root unit: a rank whose micro-batch has no image skips
    the tower, so per-block vision units would issue all-gathers the other ranks do not match.
    The loop calls ``model.forward_packed``, not ``model()``: it is registered so the root unit
    is gathered for it as it would be for ``forward``.

    Gradients are reduce-scattered as a *sum* (divide factor 1): each rank's loss is already its
    share of the global mean (normalised by the global target count), so the default average
    over ranks would be wrong, and undoing it by scaling the loss would make the masked loss's
    backward see grad_output != 1 (its slow path).
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    if isinstance(model, FSDPModule):      # already sharded (composed on the meta device)
        return
    kw = {}
    if mixed_precision:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    units = [fully_shard(block, **kw) for block in model.decoder.layers]
    units.append(fully_shard(model, **kw))
    for unit in units:
        unit.set_gradient_divide_factor(1.0)
        # a plain SUM collective: with factor 1 FSDP would otherwise ask for PREMUL_SUM(1), which
        # gloo lacks and NCCL does not need
        unit.set_force_sum_reduction_for_comms(True)
    register_fsdp_forward_method(model, "forward_packed")


def uses_mixed_precision(device: torch.device, world: int) -> bool:
    """bf16 compute through FSDP2's MixedPrecisionPolicy: on GPUs with several ranks. One GPU process
    (no FSDP) keeps autocast; the CPU computes in fp32."""
    return device.type == "cuda" and world > 1


class StopFlag:
    """SIGINT/SIGTERM ask the loop to save and stop at the next step boundary (see ``agreed_stop``)."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def agreed_stop(stop: StopFlag, device: torch.device) -> int:
    """The signal number any rank received (0: none), agreed by all ranks.

    Every rank must call this at the same step boundary: it is one all-reduce (MAX) of a scalar.
    """
    local = int(stop.signal or 0)
    if not dist.is_initialized():
        return local
    flag = torch.tensor([local], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())
