"""One decoder layer of a decode step on the CPU as one call (x [T, D] fp32, T ≤ ``small_gemm.MAX_ROWS``; fp32
weights, or int8 ones with a scale a row):

    h = rms_norm(x); q, k, v = h·W_qkvᵀ; q, k = rope(q, k); write k, v at ``slot_mapping``
    x = x + paged_decode(q)·W_oᵀ; h = rms_norm(x); g, u = h·W_gate_upᵀ; x = x + (silu(g)·u)·W_downᵀ

The reference is ``decode_layer_ref`` (the torch formulas: ``rms_norm_ref``, ``F.linear``,
``rope_ref``, ``paged_decode_attention_ref``). Ours is ``llava_kernels/cpu/decode_layer.cpp``
(``torch.ops.llava_cpu.decode_layer``, built by ``llava_kernels._cpu``): the ops ``engine.model.Block`` runs in
fp32 CPU inference (our rms_norm, small_gemm or small_gemm_int8, rope, paged_decode; ATen's index_copy_, silu,
mul, add), called
from C++, so its result and cache writes equal the module path's bit for bit (tests/test_decode_layer.py).

Why: with the GEMMs reading the weights at the machine's bandwidth, the Python between a layer's ~15 ops was
the rest of a batch-1 decode step: ~150 µs a layer, ~1.8 ms of a ~16 ms step of the CPU benchmark model on
the 2-core development machine (2026-12-05). ``engine.model.Decoder`` calls it for a decode step over a
``DecodeAttention`` on the ``cpu`` backend, for every layer whose modules are the plain ones (no hooks, no
PEFT wrapper, fused q/k/v and gate/up weights, fp32 or ``engine.quantize``'s per-row int8); anything else keeps
the module path. With int8 weights the layer reads a quarter of the bytes, and the call replaces seven GEMMs
and the ops between them in Python (the int8 module path was ~40% slower than its weights' read time: see
``bench/results/cpu/README.md``).

Weights: W_qkv [(H + 2·Hkv)·Dh, D] and W_gate_up [2·I, D] (the fused row blocks of ``fuse_linears``),
W_o [D, H·Dh], W_down [D, I], norms [D]; caches [NB, Bs, Hkv, Dh]; cos, sin [T, Dh]. Int8: the four W are
int8 and ``scales`` holds their fp32 scales [N] (W ≈ q · scale per row), all four or none.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llava_kernels import _cpu
from llava_kernels.paged_decode import paged_decode_attention_ref
from llava_kernels.rms_norm import rms_norm_ref
from llava_kernels.rope import rope_ref


def decode_layer_ref(x, attn_norm, mlp_norm, w_qkv, w_o, w_gate_up, w_down, cos, sin, k_cache, v_cache,
                     block_table, seq_lens, slot_mapping, num_heads: int, eps: float, scale: float,
                     scales: tuple | None = None) -> torch.Tensor:
    """The layer's output [T, D]; writes the new k, v into ``k_cache``/``v_cache`` at ``slot_mapping``."""
    if scales is not None:  # int8 weights: dequantized, as small_gemm_int8_ref
        w_qkv, w_o, w_gate_up, w_down = (w.to(x.dtype) * s[:, None] for w, s in
                                          zip((w_qkv, w_o, w_gate_up, w_down), scales, strict=True))
    t, hkv, dh = x.shape[0], k_cache.shape[2], k_cache.shape[3]
    qk, v = F.linear(rms_norm_ref(x, attn_norm, eps), w_qkv).split([(num_heads + hkv) * dh, hkv * dh], -1)
    q, k = rope_ref(qk.reshape(t, num_heads + hkv, dh), cos, sin).split([num_heads, hkv], 1)
    k_cache.view(-1, hkv, dh).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, hkv, dh).index_copy_(0, slot_mapping, v.reshape(t, hkv, dh))
    o = paged_decode_attention_ref(q.contiguous(), k_cache, v_cache, block_table, seq_lens, scale=scale)
    x = x + F.linear(o.reshape(t, num_heads * dh), w_o)
    g, u = F.linear(rms_norm_ref(x, mlp_norm, eps), w_gate_up).chunk(2, -1)
    return x + F.linear(F.silu(g) * u, w_down)


def decode_layer(x, attn_norm, mlp_norm, w_qkv, w_o, w_gate_up, w_down, cos, sin, k_cache, v_cache,
                 block_table, seq_lens, slot_mapping, num_heads: int, eps: float, scale: float,
                 scales: tuple | None = None) -> torch.Tensor:
    """As ``decode_layer_ref``: fp32 activations, CPU, contiguous x and weights, no autograd (an inference op).
    Raises RuntimeError when the CPU ops are not available (ask ``available()`` first) or a shape is wrong."""
    return _cpu.ops().decode_layer(x, attn_norm, mlp_norm, w_qkv, w_o, w_gate_up, w_down, cos, sin, k_cache,
                                   v_cache, block_table, seq_lens, slot_mapping, num_heads, eps, scale,
                                   *(scales or ()))


available, load_error = _cpu.available, _cpu.load_error
