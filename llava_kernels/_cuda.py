"""The csrc/ CUDA extension as torch.library ops: loading, fake (meta) kernels, autograd, wrappers.

Letters: N projector rows, Dv vision width, Dh projector hidden width, Dt text width; T packed tokens,
D model width, V vocab, M image rows, B sequences.

CMake builds ``llava_kernels/_C.so`` (see csrc/README.md); it defines the ops ``torch.ops.llava.*`` with CUDA
kernels only. This module loads it lazily, adds what C++ does not register (``register_fake`` for
tracing/compile, ``register_autograd`` for the backward) and exposes the same functions as the public
ops minus ``backend``/``check`` (the public ops in llava_kernels/<op>.py validate inputs before calling here;
the C++ side re-checks shapes/dtypes/devices and raises RuntimeError).

``available(op)`` is what llava_kernels/dispatch.py asks; it never raises and is False when the library is
absent, cannot load (CPU-only torch), or there is no CUDA device.
"""
from __future__ import annotations

from pathlib import Path

import torch

_OP_NAMES = {"projector": "projector", "scatter": "scatter_image_tokens", "masked_loss": "masked_lm_loss"}
_LIB_PATTERNS = ("_C*.so", "libllava_ops*.so")


class _Loader:
    """Finds and loads the extension once; remembers why it could not."""

    def __init__(self, lib_dir: Path):
        self.lib_dir = lib_dir
        self.path: Path | None = None
        self.error: str | None = None
        self._tried = False

    def candidates(self) -> list[Path]:
        found = {p for pattern in _LIB_PATTERNS for p in self.lib_dir.glob(pattern)}
        return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)  # newest build first

    def load(self) -> bool:
        if self._tried:
            return self.path is not None
        self._tried = True
        try:
            if torch.version.cuda is None:
                self.error = f"torch {torch.__version__} has no CUDA support"
                return False
            found = self.candidates()
            if not found:
                self.error = (f"no {' or '.join(_LIB_PATTERNS)} in {self.lib_dir} "
                              "(build it with CMake, see csrc/README.md)")
                return False
            torch.ops.load_library(str(found[0]))
            _register_python_kernels()
            self.path = found[0]
        except Exception as e:  # noqa: BLE001 - any load failure just means "not available"
            self.error = f"loading the CUDA extension failed: {type(e).__name__}: {e}"
            return False
        return True

    def available(self, op: str) -> bool:
        try:
            return (op in _OP_NAMES and torch.cuda.is_available() and self.load()
                    and hasattr(torch.ops.llava, _OP_NAMES[op]))
        except Exception:  # noqa: BLE001 - available() must never raise
            return False


_LOADER = _Loader(Path(__file__).resolve().parent)


def available(op: str) -> bool:
    """True when the built extension is loaded and provides ``op`` (projector | scatter | masked_loss)."""
    return _LOADER.available(op)


def load_error() -> str | None:
    """Why the extension is not loaded (None when it is, or when loading was not tried yet)."""
    return _LOADER.error


def _ops():
    if not _LOADER.load():
        raise RuntimeError(f"the llava CUDA extension is not available: {_LOADER.error}")
    return torch.ops.llava


# ---- fake (meta) kernels: output shapes only, for FakeTensor / torch.compile / opcheck ------------------

def _projector_fake(x, w1, b1, w2, b2):
    n, dh = x.shape[0], w1.shape[0]
    if w2 is None:
        return x.new_empty(n, dh), x.new_empty(0)
    return x.new_empty(n, w2.shape[0]), x.new_empty(n, dh)


def _projector_backward_fake(grad_out, x, w1, w2, h, needs):
    shapes = [x.shape, w1.shape, (w1.shape[0],),
              w2.shape if w2 is not None else (0,), (w2.shape[0],) if w2 is not None else (0,)]
    return tuple(x.new_empty(s if need else (0,)) for s, need in zip(shapes, needs, strict=True))


def _scatter_fake(input_ids, embed_weight, image_rows, image_positions):
    return embed_weight.new_empty(input_ids.shape[0], embed_weight.shape[1])


def _scatter_backward_fake(grad_out, input_ids, image_positions, num_embeddings, needs):
    d = grad_out.shape[1]
    d_embed = grad_out.new_empty(num_embeddings, d) if needs[0] else grad_out.new_empty(0)
    d_image = grad_out.new_empty(image_positions.shape[0], d) if needs[1] else grad_out.new_empty(0)
    return d_embed, d_image


def _masked_lm_loss_fake(hidden, head_weight, targets, cu_seqlens, num_targets, needs):
    b = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else 1
    return (hidden.new_empty((), dtype=torch.float32), hidden.new_empty(b, dtype=torch.float32),
            hidden.new_empty(b, dtype=torch.int64),
            hidden.new_empty(hidden.shape) if needs[0] else hidden.new_empty(0),
            head_weight.new_empty(head_weight.shape) if needs[1] else hidden.new_empty(0))


# ---- autograd -----------------------------------------------------------------------------------------

def _projector_setup(ctx, inputs, output):
    x, w1, _b1, w2, _b2 = inputs
    _out, h = output
    ctx.save_for_backward(x, w1, w2, h)
    ctx.mark_non_differentiable(h)  # internal saved activation; the wrapper never returns it


def _projector_backward(ctx, grad_out, _grad_h):
    x, w1, w2, h = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:5]]
    grads = torch.ops.llava.projector_backward(grad_out, x, w1, w2, h, needs)
    return tuple(g if n else None for g, n in zip(grads, needs, strict=True))


def _scatter_setup(ctx, inputs, output):
    input_ids, embed_weight, _image_rows, image_positions = inputs
    ctx.save_for_backward(input_ids, image_positions)
    ctx.num_embeddings = embed_weight.shape[0]  # only the size: the table itself is not saved


def _scatter_backward(ctx, grad_out):
    input_ids, image_positions = ctx.saved_tensors
    needs = [bool(ctx.needs_input_grad[1]), bool(ctx.needs_input_grad[2])]
    d_embed, d_image = torch.ops.llava.scatter_image_tokens_backward(
        grad_out, input_ids, image_positions, ctx.num_embeddings, needs)
    return None, d_embed if needs[0] else None, d_image if needs[1] else None, None


def _masked_lm_loss_setup(ctx, inputs, output):
    _loss, seq_sum, seq_count, d_hidden, d_head = output
    ctx.save_for_backward(d_hidden, d_head)
    # Only `loss` is differentiable: its gradients (for an upstream 1) were computed in the forward.
    ctx.mark_non_differentiable(seq_sum, seq_count, d_hidden, d_head)
    # Else autograd hands the backward a zero "gradient" for every non-differentiable output, here a [T, D]
    # and a [V, D]: a third grad-sized set at the backward's peak (the H200 bench: 848 MB vs Triton's 312).
    ctx.set_materialize_grads(False)


def _masked_lm_loss_backward(ctx, grad_loss, *_unused):
    if grad_loss is None:                                   # not materialized (see setup): no gradient
        return None, None, None, None, None, None
    d_hidden, d_head = ctx.saved_tensors
    out = []
    for need, grad in zip(ctx.needs_input_grad[:2], (d_hidden, d_head), strict=True):
        if need and grad.dim() != 2:
            raise RuntimeError("llava::masked_lm_loss was called with needs=False for an input that requires "
                               "grad; call it through llava_kernels._cuda.masked_lm_loss")
        out.append(_scale_grad_(grad, grad_loss) if need else None)
    return (*out, None, None, None, None)


def _scale_grad_(grad: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """grad * grad_loss IN PLACE: the forward's grads (for an upstream 1) are saved tensors nothing else
    holds, and a scaled copy of d_head would hold a second [V, D] (the H200 run: 1130 MB peak at T=4096).
    grad_loss is multiplied as a CPU scalar so the kernel reads it in fp32 (a CUDA 0-dim tensor would be
    cast to bf16 first: 0.7 -> 0.69921875). An exact 1 (plain training) skips the pass. Under tracing
    (fake or functional tensors: opcheck, torch.compile) the value cannot be read and the product is out
    of place, as graph capture wants (no mutation of a backward input). The in-place change bumps the
    saved tensor's version, so a second backward through a retained graph fails autograd's check
    instead of scaling twice."""
    g = grad_loss.detach().to("cpu", torch.float32)
    if type(g) is not torch.Tensor:                            # FakeTensor, FunctionalTensor: subclasses
        return grad * g
    return grad if g.item() == 1.0 else grad.mul_(g)


_REGISTERED = False


def _register_python_kernels() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    lib = torch.library
    lib.register_fake("llava::projector", _projector_fake)
    lib.register_fake("llava::projector_backward", _projector_backward_fake)
    lib.register_fake("llava::scatter_image_tokens", _scatter_fake)
    lib.register_fake("llava::scatter_image_tokens_backward", _scatter_backward_fake)
    lib.register_fake("llava::masked_lm_loss", _masked_lm_loss_fake)
    lib.register_autograd("llava::projector", _projector_backward, setup_context=_projector_setup)
    lib.register_autograd("llava::scatter_image_tokens", _scatter_backward, setup_context=_scatter_setup)
    lib.register_autograd("llava::masked_lm_loss", _masked_lm_loss_backward,
                          setup_context=_masked_lm_loss_setup)
    _REGISTERED = True


# ---- public wrappers (same contracts as llava_kernels.projector / scatter_image_tokens / masked_lm_loss) -------

def projector(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor | None = None,
              b2: torch.Tensor | None = None) -> torch.Tensor:
    """x[N,Dv] → Linear(w1[Dh,Dv], b1) → exact GELU → Linear(w2[Dt,Dh], b2) → [N,Dt].

    w2 None: the linear projector, [N,Dh] without GELU.

    CUDA tensors of one dtype (bf16/fp16: our tensor-core kernel; fp32: cuBLAS + our GELU). Differentiable
    w.r.t. every tensor argument; saves the pre-activation x @ w1ᵀ + b1 ([N,Dh]) for the backward.
    """
    out, _h = _ops().projector(x, w1, b1, w2, b2)
    return out


def scatter_image_tokens(input_ids: torch.Tensor, embed_weight: torch.Tensor, image_rows: torch.Tensor,
                         image_positions: torch.Tensor) -> torch.Tensor:
    """Row t of the [T,D] result = image_rows[j] if image_positions[j] == t else embed_weight[input_ids[t]].

    Unchecked on the device (no sync): a text id outside [0, V) gives a NaN row, a position outside [0, T)
    is dropped, duplicated positions take the last j. Backward: gathered image-row grads and a
    deterministic (sorted segment-sum) embedding-table grad.
    """
    return _ops().scatter_image_tokens(input_ids, embed_weight, image_rows, image_positions)


def masked_lm_loss(hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor,
                   cu_seqlens: torch.Tensor | None = None, num_targets: int | torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, seq_loss_sum[B] f32, seq_count[B] i64) of cross-entropy on rows with targets != -100.

    loss (f32 scalar) = sum of per-row CE / num_targets (default: the local target count; 0 → loss 0, zero
    grads). One host sync (compacting the target rows). Gradients w.r.t. hidden and head_weight are computed
    in the forward when they require grad; only ``loss`` is differentiable. A target outside
    [-100] ∪ [0, V) gives NaN.
    """
    if num_targets is not None and not isinstance(num_targets, torch.Tensor):
        num_targets = torch.full((), float(num_targets), dtype=torch.float32, device=hidden.device)
    grad_on = torch.is_grad_enabled()
    needs = [grad_on and hidden.requires_grad, grad_on and head_weight.requires_grad]
    loss, seq_sum, seq_count, _dh, _dw = _ops().masked_lm_loss(hidden, head_weight, targets, cu_seqlens,
                                                               num_targets, needs)
    return loss, seq_sum, seq_count
