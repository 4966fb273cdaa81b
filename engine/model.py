"""The one LLaVA model definition that training and generation share.

Letters: B sequences, T packed tokens (or padded length in ``forward``), D text width,
H/Hkv query/key-value heads, Dh head dim, V vocab, N images, S rows per image, M = N·S.
AnyRes (LLaVA-1.6): image i has K_i tower tiles and R_i rows (``cfg.image_tiles/image_rows``).

A batch is packed: the tokens of all sequences concatenated (``input_ids`` [T]), described by
``cu_seqlens`` (int32 [B+1]), ``position_ids`` (restarting at 0 per sequence) and
``max_seqlen``. Image placeholders are already expanded to S ids each, so the destination
row of every image feature is known before the vision tower runs.

The fused ops (projector, image-token scatter; the masked loss lives in training) are called
through their public functions in ``llava_kernels``; ``kernel_backend`` picks their implementation
("torch" = the pure-torch reference, None = automatic by device).
"""
from __future__ import annotations

import contextlib
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import llava_kernels
from engine import anyres
from engine import linear as dense
from engine.attention import varlen_attention
from engine.config import LlavaConfig, TextConfig
from engine.vision import VisionTower
from llava_kernels import _cpu
from llava_kernels import rms_norm as cpu_rms_norm
from llava_kernels import small_gemm as cpu_small_gemm
from llava_kernels.rope import rope_ref


class AttentionContext(Protocol):
    """How a decoder layer attends: packed varlen attention here; generation plugs in a KV cache. A context
    may also offer ``whole_layer(layer, x, weights, cos, sin)``, a whole decoder layer in one call for the
    weights ``Block.whole_layer_weights`` returns (the runtime's CPU decode step, ``engine.kv_attention``)."""

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class PackedAttention:
    """Causal attention within each packed sequence, no cache (training, full recompute)."""

    def __init__(self, cu_seqlens: torch.Tensor, max_seqlen: int, backend: str | None = None):
        self.cu_seqlens, self.max_seqlen, self.backend = cu_seqlens, max_seqlen, backend

    def __call__(self, layer, q, k, v):
        return varlen_attention(q, k, v, self.cu_seqlens, self.max_seqlen, causal=True, backend=self.backend)


@contextlib.contextmanager
def nvtx_range(name: str, enabled: bool):
    """An NVTX range for profilers (``--nvtx``); free when disabled or without CUDA."""
    if enabled and torch.cuda.is_available():
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()
    else:
        yield


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 == self.weight.dtype and not torch.is_grad_enabled():
            # Inference in fp32: one fused op instead of six (a decode step is 2 norms × layers of them), ours
            # on the CPU (llava_kernels.rms_norm), else torch's; the formula below within its rounding
            # (tests/test_linear.py, tests/test_rms_norm.py).
            w = self.weight
            if x.device.type == "cpu" and type(w) is nn.Parameter and x.is_contiguous() and cpu_rms_norm.available():
                return cpu_rms_norm.rms_norm(x, w, self.eps)
            return torch.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return cpu_rms_norm.rms_norm_ref(x, self.weight, self.eps)  # fp32 normalisation, scale in x's dtype


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin [T, Dh] for RoPE at ``position_ids`` [T], computed in fp32 (the oracle of ``RopeTable``)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device)
                                .float() / head_dim))
    freqs = position_ids.float()[:, None] * inv_freq[None, :]  # (T, Dh/2)
    emb = torch.cat([freqs, freqs], dim=-1)                     # (T, Dh)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class RopeTable:
    """cos/sin of every position, computed once (per device and dtype) instead of per forward: a
    lookup is one gather. Rows equal ``rope_cos_sin`` bit for bit (the same fp32 ops, then the cast).
    Not module state (no buffer), so ``.to()`` never casts it and ``state_dict`` never sees it."""

    def __init__(self, head_dim: int, theta: float, length: int):
        self.head_dim, self.theta, self.length = head_dim, theta, length
        self.tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def __call__(self, position_ids: torch.Tensor, dtype: torch.dtype, max_position: int = 0):
        """cos, sin [T, Dh] at ``position_ids`` [T] (all < max(length, ``max_position``))."""
        key = (position_ids.device, dtype)
        table = self.tables.get(key)                                          # (P, 2, Dh)
        if table is None or table.shape[0] < max_position:
            self.length = max(self.length, max_position)
            pos = torch.arange(self.length, device=position_ids.device)
            table = self.tables[key] = torch.stack(rope_cos_sin(pos, self.head_dim, self.theta, dtype), 1)
        return table.index_select(0, position_ids).unbind(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, Dh]; rotate-half convention of the HF LLaMA weights."""
    if (x.dtype == torch.float32 == cos.dtype and x.device.type == "cpu" and not torch.is_grad_enabled()
            and x.is_contiguous() and _cpu.available()):
        return _cpu.ops().rope(x, cos, sin)  # one pass instead of six ops, equal bit for bit (llava_kernels.rope)
    return rope_ref(x, cos, sin)


def fuse_linears(*linears: nn.Linear) -> None:
    """Move the weights of bias-free ``linears`` (each [N_i, D]) into one new [ΣN_i, D] tensor, each
    Parameter becoming a view of its rows (``.data`` re-pointed: the same Parameter objects, names,
    ``requires_grad`` and state-dict entries; memory-neutral once the old storage is dropped). A no-op
    when already fused, for sharded (DTensor) or meta parameters, or unless every module is exactly
    ``nn.Linear`` (see ``_plain``)."""
    if not _plain(linears):
        return
    ws = [m.weight for m in linears]
    if all(type(w) is not nn.Parameter and dense.int8_rows(w) is not None for w in ws):
        _fuse_int8(ws)
        return
    if any(type(w.data) is not torch.Tensor or w.is_meta for w in ws) or _tiled(ws):
        return
    with torch.no_grad(), torch.inference_mode(False):  # plain tensors: training may resume on them
        fused = torch.cat([w.detach() for w in ws])                           # (ΣN, D)
        for w, rows in zip(ws, fused.split([w.shape[0] for w in ws]), strict=True):
            w.data = rows


def _fuse_int8(ws: list[torch.Tensor]) -> None:
    """``fuse_linears`` for torchao per-row int8 weights (``engine.quantize``'s int8): their int8 rows and their
    scales each move into one new tensor, every weight keeping its object with ``qdata`` and ``scale`` re-pointed
    to views of its rows (the zero points, all 0, stay). Per-row scales make the fused GEMM's rows the separate
    GEMMs' rows exactly. A no-op when already fused."""
    qs, ss = _int8_parts(ws)
    if _tiled(qs) and _tiled(ss):
        return
    n = [q.shape[0] for q in qs]
    with torch.no_grad(), torch.inference_mode(False):  # as fuse_linears: plain tensors, whatever mode calls it
        fused_q, fused_s = torch.cat(qs).split(n), torch.cat(ss).split(n)
    for w, q, s in zip(ws, fused_q, fused_s, strict=True):
        shape = w.scale.shape
        w.qdata, w.scale = q, s.view(shape)


def _int8_parts(ws: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """The int8 rows [N_i, D] and the scales as [N_i, 1] (``_tiled``'s shape) of per-row int8 weights; None when one
    is not (``dense.int8_rows``)."""
    rows = [dense.int8_rows(w) for w in ws]
    if any(r is None for r in rows):
        return None
    return [q for q, _ in rows], [s.view(-1, 1) for _, s in rows]


def fused_int8(x: torch.Tensor, *linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``fused_weight`` for per-row int8 weights: (q [ΣN_i, D], scale [ΣN_i]) when ``fuse_linears`` tiled them and
    the GEMM on ``x`` runs our int8 kernel (``dense.int8_route``); None otherwise (one GEMM per projection, the
    same numbers: our kernel sums each output element alike whatever its neighbours)."""
    if not _plain(linears) or not dense.int8_route(x):
        return None
    parts = _int8_parts([m._parameters["weight"] for m in linears])
    if parts is None or not (_tiled(parts[0]) and _tiled(parts[1])):
        return None
    qs, ss = parts
    n, d = sum(q.shape[0] for q in qs), qs[0].shape[1]
    return qs[0].as_strided((n, d), (d, 1)), ss[0].as_strided((n,), (1,))


def _plain(linears) -> bool:
    """Whether every module is exactly ``nn.Linear``. A wrapped linear (a PEFT LoRA layer, a quantized
    linear) exposes its base layer's ``.weight``, so one GEMM of the fused weights would silently drop
    what the wrapper adds: such modules always run their own forward."""
    return all(type(m) is nn.Linear for m in linears)


def _tiled(ws: list[torch.Tensor]) -> bool:
    """Whether weights [N_i, D] lie back to back, in order, inside the first one's storage (separate
    live allocations never overlap, so consecutive addresses within that storage mean one tensor)."""
    w0 = ws[0]
    if w0.is_meta or type(w0.data) is not torch.Tensor or w0.dim() != 2:
        return False
    storage = w0.untyped_storage()
    at, d = w0.data_ptr(), w0.shape[1]
    for w in ws:  # each contiguous [N_i, D], starting where the previous one ends
        if w.data_ptr() != at or w.dim() != 2 or w.stride() != (d, 1) or w.shape[1] != d:
            return False
        at += w.numel() * w.element_size()
    return at <= storage.data_ptr() + storage.nbytes()


def fused_weight(*linears: nn.Linear) -> torch.Tensor | None:
    """The [ΣN_i, D] weight of ``linears`` as one tensor when ``fuse_linears`` tiled them and no
    gradient is wanted (inference: one GEMM); None otherwise, and the caller runs them one by one
    (training: autograd and the separate GEMMs, the loss bit-identical to the unfused model). An
    external re-assignment of a weight (``load_state_dict(assign=True)``, ``.to()``) breaks the tiling,
    so a stale fused weight is never used."""
    if torch.is_grad_enabled() or not _plain(linears):
        return None
    ws = [m._parameters["weight"] for m in linears]   # not m.weight: nn.Module.__getattr__ is slow per decode step
    if not _tiled(ws):
        return None
    d = ws[0].shape[1]
    return ws[0].detach().as_strided((sum(w.shape[0] for w in ws), d), (d, 1))


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.h, self.hkv, self.dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q = nn.Linear(cfg.hidden_size, self.h * self.dh, bias=False)
        self.k = nn.Linear(cfg.hidden_size, self.hkv * self.dh, bias=False)
        self.v = nn.Linear(cfg.hidden_size, self.hkv * self.dh, bias=False)
        self.o = nn.Linear(self.h * self.dh, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, attn: AttentionContext, layer: int):  # x (T, D)
        t = x.shape[0]
        qkv = fused_weight(self.q, self.k, self.v)
        qkv8 = fused_int8(x, self.q, self.k, self.v) if qkv is None else None
        if qkv is None and qkv8 is None:  # each projection through dense.apply (a quantized one: its own GEMM)
            q, k, v = dense.apply(self.q, x), dense.apply(self.k, x), dense.apply(self.v, x)
            q = apply_rope(q.view(t, self.h, self.dh), cos, sin)    # (T, H, Dh)
            k = apply_rope(k.view(t, self.hkv, self.dh), cos, sin)  # (T, Hkv, Dh)
        else:  # one GEMM, and RoPE once over q and k side by side: (T, (H + Hkv)·Dh) as (T, H + Hkv, Dh)
            out = dense.linear(x, qkv) if qkv8 is None else dense.linear_int8(x, *qkv8)
            qk, v = out.split([(self.h + self.hkv) * self.dh, self.hkv * self.dh], -1)
            q, k = apply_rope(qk.view(t, self.h + self.hkv, self.dh), cos, sin).split([self.h, self.hkv], 1)
        return dense.apply(self.o, attn(layer, q, k, v.view(t, self.hkv, self.dh)).reshape(t, self.h * self.dh))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate_up = fused_weight(self.gate, self.up)
        gate_up8 = fused_int8(x, self.gate, self.up) if gate_up is None else None
        if gate_up is None and gate_up8 is None:
            return dense.apply(self.down, F.silu(dense.apply(self.gate, x)) * dense.apply(self.up, x))
        out = dense.linear(x, gate_up) if gate_up8 is None else dense.linear_int8(x, *gate_up8)
        g, u = out.chunk(2, -1)  # one GEMM: (T, 2·I) → two (T, I) views
        return dense.apply(self.down, F.silu(g) * u)


class Block(nn.Module):
    def __init__(self, cfg: TextConfig, index: int):
        super().__init__()
        self.index = index
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn: AttentionContext):
        x = x + self.attn(self.attn_norm(x), cos, sin, attn, self.index)
        return x + self.mlp(self.mlp_norm(x))

    def whole_layer_weights(self, x: torch.Tensor) -> tuple | None:
        """(attn_norm, mlp_norm, W_qkv, W_o, W_gate_up, W_down, heads, eps, scales) for
        ``llava_kernels.decode_layer`` when that one call computes exactly what ``forward`` would on ``x``: fp32 CPU
        inference of at most ``small_gemm.MAX_ROWS`` rows through the plain modules (no hooks, no PEFT wrapper,
        q/k/v and gate/up fused by ``fuse_linears``) with fp32 weights (``scales`` None) or torchao per-row int8
        ones (the W are their int8 rows, ``scales`` their four scale vectors), every op of ``forward`` then
        being the one the C++ layer calls. None otherwise: ``forward`` runs.

        Called per layer and decode step, so the full check (~25 µs a call, timed alone; ~15 with the verdict
        remembered) runs only when something it depends on changed: the layer
        remembers its verdict under a key of the modules' and parameters' identities, the parameters' data
        pointers and the fused ones' shapes and strides (an int8 weight's: those of its int8 rows and scales;
        never the tensors: a re-assigned weight's old storage must not stay alive here). Hooks are looked at on
        every call."""
        if (torch.is_grad_enabled() or x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous()
                or x.shape[0] > cpu_small_gemm.MAX_ROWS or not dense.SMALL_GEMM or _global_hooks()):
            return None
        mods = self._modules
        a, m, n1, n2 = mods["attn"], mods["mlp"], mods["attn_norm"], mods["mlp_norm"]
        if type(a) is not Attention or type(m) is not MLP or type(n1) is not RMSNorm or type(n2) is not RMSNorm:
            return None
        am, mm = a._modules, m._modules
        lin = (am["q"], am["k"], am["v"], am["o"], mm["gate"], mm["up"], mm["down"])
        o, down = lin[3], lin[6]
        if (self._forward_hooks or self._forward_pre_hooks or a._forward_hooks or a._forward_pre_hooks
                or m._forward_hooks or m._forward_pre_hooks or n1._forward_hooks or n1._forward_pre_hooks
                or n2._forward_hooks or n2._forward_pre_hooks or o._forward_hooks or o._forward_pre_hooks
                or down._forward_hooks or down._forward_pre_hooks):
            return None
        ps = (n1._parameters.get("weight"), n2._parameters.get("weight"),
              *(p for mod in lin for p in (mod._parameters.get("weight"), mod._parameters.get("bias"))))
        fused = (ps[2], ps[4], ps[6], ps[10], ps[12])       # the weights of q, k, v, gate, up
        key = (n1.eps, n2.eps, *map(id, lin), *map(id, ps), *[_data_key(p) for p in ps if p is not None],
               *[(p.shape, p.stride()) for p in fused if type(p) in _PLAIN])
        seen = self.__dict__.get("_whole_layer_key")
        if seen is None or seen[0] != key:
            seen = self.__dict__["_whole_layer_key"] = (key, self._whole_layer_check(n1, n2, lin, x))
        if seen[1] is None:
            return None
        n_qkv = (a.h + 2 * a.hkv) * a.dh
        if seen[1] == "int8":           # the fused int8 rows and scales as the views fused_int8 checked
            (wq, sq), (wo, so), (wg, sg), (wd, sd) = (dense.int8_rows(ps[i]) for i in (2, 8, 10, 14))
            d, n_gu = wq.shape[1], 2 * wg.shape[0]          # (not the quantized tensors' .shape: a dispatch each)
            return (ps[0], ps[1], wq.as_strided((n_qkv, d), (d, 1)), wo, wg.as_strided((n_gu, d), (d, 1)), wd, a.h,
                    n1.eps, (sq.as_strided((n_qkv,), (1,)), so, sg.as_strided((n_gu,), (1,)), sd))
        d = ps[2].shape[1]                                  # the fused weights as the views fused_weight checked
        qkv = ps[2].detach().as_strided((n_qkv, d), (d, 1))
        gate_up = ps[10].detach().as_strided((2 * ps[10].shape[0], d), (d, 1))
        return ps[0], ps[1], qkv, ps[8], gate_up, ps[14], a.h, n1.eps, None

    @staticmethod
    def _whole_layer_check(n1: RMSNorm, n2: RMSNorm, lin: tuple, x: torch.Tensor) -> str | None:
        """"fp32", "int8" (the weights the C++ layer takes in that form) or None."""
        q, k, v, o, gate, up, down = lin
        if n1.eps != n2.eps or not all(type(w) is nn.Parameter and w.dtype == torch.float32
                                       for w in (n1.weight, n2.weight)):
            return None
        qkv, gate_up = fused_weight(q, k, v), fused_weight(gate, up)
        if qkv is not None and gate_up is not None and _dense_plain(o) and _dense_plain(down):
            ws = (qkv, o.weight, gate_up, down.weight)
            return "fp32" if all(w.dtype == torch.float32 for w in ws) else None
        if (fused_int8(x, q, k, v) is not None and fused_int8(x, gate, up) is not None and _int8_plain(o)
                and _int8_plain(down)):
            return "int8"
        return None


_PLAIN = (nn.Parameter, torch.Tensor)


def _data_key(p: torch.Tensor) -> object:
    """What identifies a parameter's data for ``whole_layer_weights``' remembered verdict: its data pointer, or
    for a quantized weight (a tensor subclass, no storage of its own) its int8 rows' and scales' objects."""
    if type(p) in _PLAIN:
        return p.data_ptr()
    q, s = getattr(p, "qdata", None), getattr(p, "scale", None)
    if q is None or s is None:
        return id(q), id(s)
    return id(q), q.data_ptr(), q.shape, q.stride(), id(s), s.data_ptr(), s.shape, s.stride()


def _dense_plain(m: nn.Module) -> bool:
    """Whether ``dense.apply(m, x)`` runs ``dense.linear`` on a plain contiguous weight (the C++ layer's GEMM)."""
    if type(m) is not nn.Linear:  # a PEFT or quantized wrapper runs its own forward
        return False
    w = m._parameters["weight"]
    return (m._parameters["bias"] is None and not m._forward_hooks and not m._forward_pre_hooks
            and type(w) is nn.Parameter and w.is_contiguous())


def _int8_plain(m: nn.Module) -> bool:
    """Whether ``dense.apply(m, x)`` runs our int8 kernel on a per-row int8 weight (the C++ layer's int8 GEMM)."""
    return (type(m) is nn.Linear and m._parameters["bias"] is None and not m._forward_hooks
            and not m._forward_pre_hooks and dense.int8_rows(m._parameters["weight"]) is not None)


def _global_hooks() -> bool:
    """Whether hooks registered for every module are set (``forward`` would call them; one C++ call cannot)."""
    g = nn.modules.module
    return bool(g._global_forward_hooks or g._global_forward_pre_hooks)


class Decoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.rope = RopeTable(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings)

    @property
    def head_weight(self) -> torch.Tensor:  # (V, D)
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, attn: AttentionContext,
                max_position: int = 0) -> torch.Tensor:
        """Embedded tokens x [T, D] at ``position_ids`` [T] → final-normed hidden states [T, D].
        Positions must stay below max(max_position_embeddings, ``max_position``)."""
        cos, sin = self.rope(position_ids, x.dtype, max_position)
        # A CPU decode step: each layer as one C++ call where it can. The layers are checked together before the
        # first runs (what x must be holds for every layer's input: each keeps x's shape and dtype); all the
        # checks cost ~0.35 ms of a ~16 ms batch-1 step of the CPU bench model (A/B against precomputed weights).
        whole = getattr(attn, "whole_layer", None)
        plan = [layer.whole_layer_weights(x) for layer in self.layers] if whole is not None else None
        for i, layer in enumerate(self.layers):
            if plan is not None and plan[i] is not None:
                x = whole(layer.index, x, plan[i], cos, sin)
            elif self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, attn, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attn)
        return self.norm(x)


class Projector(nn.Module):
    """``linear`` (one matrix, LLaVA v1) or ``mlp2x_gelu`` (Linear → GELU → Linear, LLaVA-1.5)."""

    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        d_in, d = cfg.projector_in_features, cfg.text.hidden_size
        self.linear_1 = nn.Linear(d_in, d, bias=cfg.projector_bias)
        self.linear_2 = nn.Linear(d, d, bias=cfg.projector_bias) if cfg.projector_type == "mlp2x_gelu" else None

    def forward(self, x: torch.Tensor, backend: str | None) -> torch.Tensor:  # (M, Dv) -> (M, D)
        l2 = self.linear_2
        return llava_kernels.projector(x, self.linear_1.weight, self.linear_1.bias, None if l2 is None else l2.weight,
                                 None if l2 is None else l2.bias, backend=backend)


def pack_cu_seqlens(lengths: list[int], device=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sequence lengths → (cu_seqlens int32 [B+1], position_ids int64 [T], max_seqlen)."""
    lens = torch.tensor(lengths, dtype=torch.int64, device=device)
    cu = F.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
    starts = torch.repeat_interleave(cu[:-1].long(), lens)
    pos = torch.arange(int(lens.sum()), device=device) - starts
    return cu, pos, max(lengths, default=0)


class Llava(nn.Module):
    def __init__(self, config: LlavaConfig, *, kernel_backend: str | None = "torch",
                 attention_backend: str | None = None):
        super().__init__()
        self.config = config
        self.kernel_backend = kernel_backend
        self.attention_backend = attention_backend
        self.nvtx = False  # NVTX ranges around vision, projector, scatter and decoder (profiling)
        self.lora = None   # engine.lora.LoraSettings once PEFT adapters wrap decoder linears (engine/lora.py)
        self.lora_base: str | None = None  # the checkpoint directory those adapters are trained on
        self.vision = VisionTower(config.vision)
        self.projector = Projector(config)
        self.decoder = Decoder(config.text)
        # AnyRes (LLaVA-1.6): the row that ends every feature row of an image's tile grid; none otherwise.
        d = config.text.hidden_size
        self.image_newline = nn.Parameter(torch.randn(d) * d**-0.5) if config.anyres else None

    @property
    def head_weight(self) -> torch.Tensor:
        return self.decoder.head_weight

    def fuse_weights(self) -> None:
        """One q/k/v and one gate/up weight per decoder layer for inference (see ``fuse_linears``);
        the state dict, parameter names and training are unchanged. Idempotent; the runtime calls it."""
        for layer in self.decoder.layers:
            fuse_linears(layer.attn.q, layer.attn.k, layer.attn.v)
            fuse_linears(layer.mlp.gate, layer.mlp.up)

    def encode_images(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """Image tiles [ΣK, 3, S_px, S_px] → projected image rows [ΣR, D] in the decoder's dtype.

        Without AnyRes K = 1 per image, R = image_seq_len and ``image_sizes`` is ignored. With it,
        ``image_sizes`` [N, 2] gives each image's original (height, width); image i owns the next
        K_i = cfg.image_tiles(h_i, w_i) tiles (base first, then its grid row-major) and yields
        R_i = cfg.image_rows(h_i, w_i) rows: the base tile's rows, then the unpadded grid with
        ``image_newline`` after every feature row (engine/anyres.py). All tiles of all images go
        through the tower and the projector in one call each.

        The tower runs without autograd unless one of its weights trains, so a frozen tower
        never keeps activations.
        """
        cfg = self.config
        tiles = self._tiles_per_image(pixel_values, image_sizes) if cfg.anyres else None
        train_tower = torch.is_grad_enabled() and any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(train_tower), nvtx_range("vision", self.nvtx):
            feats = self.vision(pixel_values, cfg.vision_feature_layer,
                                cfg.vision_feature_select_strategy)  # (ΣK, P, Dv·layers)
        with nvtx_range("projector", self.nvtx):
            rows = self.projector(feats.flatten(0, 1).to(self.projector.linear_1.weight.dtype), self.kernel_backend)
        rows = rows.to(self.decoder.embed.weight.dtype)                                  # (ΣK·P, D)
        if tiles is None:
            return rows
        per_tile = rows.view(pixel_values.shape[0], feats.shape[1], -1)                  # (ΣK, P, D)
        out = []
        for (h, w), image in zip(image_sizes.tolist(), per_tile.split(tiles), strict=True):
            out.append(anyres.pack_features(image[0], image[1:], h, w, cfg.image_grid_pinpoints,
                                            cfg.vision.image_size, self.image_newline))  # (R_i, D)
        return torch.cat(out)

    def _tiles_per_image(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None) -> list[int]:
        """K_i per image from ``image_sizes`` [N, 2]; ValueError unless they sum to the tiles given."""
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be the tiles of all images concatenated, [ΣK, 3, H, W]; got "
                             f"{tuple(pixel_values.shape)}")
        if image_sizes is None:
            raise ValueError("this model is AnyRes (image_grid_pinpoints): image_sizes [N, 2] of (height, width) "
                             "per image is required with pixel_values")
        if not isinstance(image_sizes, torch.Tensor) or image_sizes.dim() != 2 or image_sizes.shape[1] != 2 \
                or image_sizes.dtype.is_floating_point or image_sizes.dtype == torch.bool:
            raise ValueError(f"image_sizes must be an integer tensor [N, 2] of (height, width); got "
                             f"{getattr(image_sizes, 'dtype', type(image_sizes).__name__)} "
                             f"{tuple(getattr(image_sizes, 'shape', ()))}")
        sizes = image_sizes.tolist()
        tiles = []
        for i, (h, w) in enumerate(sizes):
            try:
                tiles.append(self.config.image_tiles(h, w))
            except ValueError as err:
                raise ValueError(f"image_sizes[{i}]: {err}") from None
        if sum(tiles) != pixel_values.shape[0]:
            raise ValueError(f"image_sizes {sizes} need {sum(tiles)} tiles (per image {tiles}) but pixel_values "
                             f"holds {pixel_values.shape[0]}")
        return tiles

    def rows_per_image(self, pixel_values: torch.Tensor | None, image_sizes: torch.Tensor | None) -> list[int]:
        """Rows per image the placeholders must hold for these inputs (validated as ``encode_images``)."""
        if pixel_values is None:
            if self.config.anyres and image_sizes is not None and len(image_sizes):
                raise ValueError(f"image_sizes lists {len(image_sizes)} images but pixel_values is None")
            return []
        if not self.config.anyres:
            return [self.config.image_seq_len] * pixel_values.shape[0]
        self._tiles_per_image(pixel_values, image_sizes)
        return [self.config.image_rows(h, w) for h, w in image_sizes.tolist()]

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """Packed ids [T] (+ image tiles for the placeholders, images in order; ``image_sizes``
        [N, 2] with AnyRes, see ``encode_images``) → input embeddings [T, D]. Image i's rows fill
        the next R_i placeholder positions."""
        is_image = input_ids == self.config.image_token_id
        positions = is_image.nonzero().flatten()                                    # (M,)
        rows = self.rows_per_image(pixel_values, image_sizes)
        if positions.numel() != sum(rows):
            if self.config.anyres:
                need = f"rows per image {rows} for image_sizes {image_sizes.tolist() if rows else []}"
            else:
                need = f"{self.config.image_seq_len} rows each"
            raise ValueError(f"the prompt holds {positions.numel()} image placeholder tokens but {len(rows)} images "
                             f"were given ({need}: {sum(rows)} rows)")
        w = self.decoder.embed.weight
        feats = self.encode_images(pixel_values, image_sizes) if rows else w.new_empty(0, w.shape[1])
        with nvtx_range("scatter", self.nvtx):
            return llava_kernels.scatter_image_tokens(input_ids, w, feats, positions, backend=self.kernel_backend)

    def forward_packed(self, input_ids: torch.Tensor, *, cu_seqlens: torch.Tensor, position_ids: torch.Tensor,
                       max_seqlen: int, pixel_values: torch.Tensor | None = None,
                       image_sizes: torch.Tensor | None = None, attn: AttentionContext | None = None) -> torch.Tensor:
        """The training/prefill entry point: packed ids [T] → final hidden states [T, D] (no head).

        ``attn`` defaults to causal varlen attention over ``cu_seqlens``; the generation runtime
        passes a context that also writes its KV cache.
        """
        if input_ids.dim() != 1 or position_ids.shape != input_ids.shape:
            raise ValueError(f"packed input_ids and position_ids must both be [T]; got {tuple(input_ids.shape)} "
                             f"and {tuple(position_ids.shape)}")
        x = self.embed(input_ids, pixel_values, image_sizes)
        attn = attn or PackedAttention(cu_seqlens, max_seqlen, self.attention_backend)
        with nvtx_range("decoder", self.nvtx):  # sequences from position 0: positions < max_seqlen
            return self.decoder(x, position_ids, attn, max_seqlen)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., D] → [..., V] (full logits: generation and tests; training uses the masked loss)."""
        return dense.linear(hidden, self.head_weight)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """HF-style entry: padded ids [B, T] (left or right padding via ``attention_mask``) →
        logits [B, T, V]; rows at padding positions are zero. Sequences are packed internally,
        so padding costs nothing; positions restart at each sequence's first real token (RoPE
        is relative, so this equals transformers' logits for either padding side)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T]; got {tuple(input_ids.shape)}")
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
        lengths = mask.sum(1).tolist()
        cu, pos, max_len = pack_cu_seqlens(lengths, input_ids.device)
        hidden = self.forward_packed(input_ids[mask], cu_seqlens=cu, position_ids=pos, max_seqlen=max_len,
                                     pixel_values=pixel_values, image_sizes=image_sizes)
        logits = self.logits(hidden)                                                 # (T_packed, V)
        out = logits.new_zeros(*input_ids.shape, logits.shape[-1])
        out[mask] = logits
        return out
