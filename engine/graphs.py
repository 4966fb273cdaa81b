"""CUDA graphs of the runtime's decode step: one graph per (batch bucket, context-block bucket).

Letters: B decoding sequences, nb cache blocks per sequence in the step.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from engine.generate import Runtime


def pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class GraphCaptureError(RuntimeError):
    """The decode step could not be captured as a CUDA graph (the runtime then decodes eagerly)."""


class DecodeGraphs:
    """CUDA graphs of the decode forward, one per (batch bucket, context-block bucket), sharing one
    memory pool. Padded rows point at the reserved block 0 with position 0.

    Each graph reads only its static buffers (ids, positions, slot mapping, block table: copied in
    before every replay) and the runtime's preallocated KV cache, whose storage never moves; its
    logits buffer is overwritten by the next replay of the same graph, so callers consume it (the
    step samples and copies kept logits to the host) before the next step. Graphs share one pool:
    safe because they are replayed one at a time on one stream and a step's logits are consumed
    before the next replay of any graph.
    """

    def __init__(self, runtime: Runtime):
        self.rt = runtime
        self.graphs: dict[tuple[int, int], tuple] = {}
        self.pool = None

    def run(self, ids, pos, slot_mapping, slots, nb):  # all (B,) int64 on the device
        rt, b = self.rt, ids.shape[0]
        bb = min(pow2(b), rt.config.max_batch)
        nbb = min(pow2(nb), rt.max_blocks_per_seq)
        key = (bb, nbb)
        if key not in self.graphs:
            self.graphs[key] = self._capture(bb, nbb)
        graph, s_ids, s_pos, s_sm, s_bt, s_logits = self.graphs[key]
        for buf, val in ((s_ids, ids), (s_pos, pos), (s_sm, slot_mapping)):
            buf[:b].copy_(val)
            buf[b:].zero_()
        s_bt[:b].copy_(rt.block_table[slots, :nbb])
        s_bt[b:].zero_()
        graph.replay()
        return s_logits[:b]

    def _capture(self, bb: int, nbb: int):
        dev = self.rt.device
        ids, pos, sm = (torch.zeros(bb, dtype=torch.int64, device=dev) for _ in range(3))
        bt = torch.zeros(bb, nbb, dtype=torch.int32, device=dev)
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):  # warm up (lazy inits, autotuning) outside the capture
            for _ in range(2):
                self.rt._decode_forward(ids, pos, bt, sm)
        torch.cuda.current_stream(dev).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                logits = self.rt._decode_forward(ids, pos, bt, sm)
        except RuntimeError as e:  # e.g. an op that syncs with the host or is not capturable
            raise GraphCaptureError(f"capturing the decode step (batch {bb}, {nbb} blocks) failed: {e}") from e
        self.pool = graph.pool()
        return graph, ids, pos, sm, bt, logits
