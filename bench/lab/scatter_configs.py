"""Experiment (not in the import path): sweep the scatter launch shape on the GPU.

Run from the repo root: ``python bench/lab/scatter_configs.py``. Prints ms and the fraction of the
measured device copy bandwidth for forward (scatter_fwd), image-grad gather and embedding grad,
at T=16384, D=4096, bf16, 16 images of 576 rows, for each (block_d, num_warps).
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import copy_bandwidth_gbps, cuda_time_ms  # noqa: E402

from llava_kernels.scatter import (  # noqa: E402
    ScatterConfig,
    build_row_map,
    default_config,
    embed_grad,
    gather_rows,
    scatter_fwd,
)


def main() -> None:
    T, D, V, k = 16384, 4096, 32064, 16
    dt = torch.bfloat16
    pos = torch.cat([torch.arange(1 + i * (T // k), 1 + i * (T // k) + 576) for i in range(k)]).cuda()
    ids = torch.randint(0, V, (T,), device="cuda")
    ids[pos] = V
    w = torch.randn(V, D, device="cuda", dtype=dt)
    img = torch.randn(pos.numel(), D, device="cuda", dtype=dt)
    g = torch.randn(T, D, device="cuda", dtype=dt)
    row_img = build_row_map(pos, T)
    out = torch.empty(T, D, device="cuda", dtype=dt)

    copy_bw = copy_bandwidth_gbps()
    fwd_bytes = 2 * T * D * 2 + 16 * T + 8 * pos.numel()
    print(f"copy bandwidth {copy_bw:.0f} GB/s; default {default_config(D, 2)}")
    ms = cuda_time_ms(lambda: build_row_map(pos, T), rep=50)
    print(f"row map alone: {ms * 1e3:.1f} us")
    for block_d in (512, 1024, 2048, 4096):
        for warps in (4, 8):
            cfg = ScatterConfig(block_d=block_d, num_warps=warps)
            f = cuda_time_ms(lambda c=cfg: scatter_fwd(ids, w, img, pos, out=out, row_img=row_img, config=c),
                             rep=50)
            gi = cuda_time_ms(lambda c=cfg: gather_rows(g, pos, config=c), rep=50)
            ge = cuda_time_ms(lambda c=cfg: embed_grad(g, ids, row_img, V, config=c), rep=20)
            print(f"block_d={block_d:5d} warps={warps:2d}  fwd {f:7.4f} ms "
                  f"({fwd_bytes / (f * 1e-3) / 1e9 / copy_bw:5.1%} of copy)  gather {gi:7.4f} ms  "
                  f"embed_grad {ge:7.4f} ms")


if __name__ == "__main__":
    main()
