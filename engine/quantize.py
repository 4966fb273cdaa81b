"""Weight-only quantized inference: the decoder's linear layers in int8 or int4, on torchao.

Letters: N output features, K input features, G = K / group_size groups per row.

What is quantized: the seven linears of every decoder layer (q, k, v, o, gate, up, down), which hold
~97% of a 7B decoder's bytes and are what batch-1 decode streams from memory every token. Left in the
checkpoint's precision, on purpose:

- ``lm_head`` / the tied embedding, unless asked for (scheme ``int8+head``): one matrix, the logits'
  precision matters most there (a greedy argmax over 32k rows), and the embedding is a gather, not a GEMM.
  It is also the largest matrix batch-1 decode reads (a 7B model's 32k × 4096 head: 3% of its parameters, 12%
  of an int8 step's bytes; 56% of the CPU benchmark model's int8 step), which is what ``int8+head`` saves;
- the vision tower: it runs once per image at prefill on 576 rows (compute-bound GEMMs), where a
  weight-only scheme saves no time (the weight is read once per 576 rows; torchao's int8 path even
  dequantizes it first), and at 0.3 B parameters it is ~4% of a 7B model's bytes;
- the projector: two matrices fed to ``llava_kernels.projector``, which takes plain weight tensors.

Schemes (all torchao ``quantize_`` configs; the weights become torchao tensor subclasses that
``F.linear`` dispatches on, so the model code is unchanged):

- ``int8``: symmetric per-output-channel int8 (``Int8WeightOnlyConfig``, PerRow): scale s_n =
  max_k |W[n, k]| / 127, W ≈ s_n · round(W / s_n). CPU and CUDA, any float dtype. On the CPU with fp32
  activations, GEMMs of up to 64 rows run ``llava_kernels.small_gemm_int8`` (through ``engine.linear``: torchao's
  eager linear dequantizes the whole weight every call), the rest torchao's linear.
- ``int8+head``: ``int8``, and the untied LM head in the same scheme. Each logit then moves by at most
  Σ_k |h_k| · s_n / 2 (|W - Ŵ| ≤ s_n / 2 per weight, tests/test_quantize.py holds that bound); whether that
  changes a greedy token depends on the model's margins, so it is opt-in. A tied head is refused: it is the
  embedding table.
- ``int4``: asymmetric int4 in groups of ``group_size`` along K (tinygemm's scheme). CUDA (compute
  capability ≥ 8.0, bfloat16 weights): ``Int4WeightOnlyConfig`` with the ``tile_packed_to_4d`` packing
  and the ``_weight_int4pack_mm`` kernel that ships with torch. CPU: torchao's prototype
  ``PrototypeInt4WeightOnlyConfig`` (``_weight_int4pack_mm_for_cpu``; fast with bfloat16 activations).

Fusion: ``Llava.fuse_weights`` (the runtime calls it) tiles q/k/v and gate/up into one tensor each: plain
weights as one [ΣN, D] tensor, per-row int8 ones as one int8 [ΣN, D] tensor plus one scale vector, each
quantized weight keeping its object with its ``qdata`` and ``scale`` re-pointed at its rows (no value changes:
per-row scales are shared by no two projections, so one fused GEMM gives each projection's rows exactly). A CPU
decode step of fp32 activations then runs one int8 GEMM for q/k/v and one for gate/up, and every such layer as one
C++ call (``llava_kernels.decode_layer`` with scales; ``engine.model.Block.whole_layer_weights``); int4 layers
run their projections one GEMM each.
"""
from __future__ import annotations

import torch
from torch import nn

SCHEMES = ("int8", "int8+head", "int4")
DECODER_LINEARS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")
INT4_GROUP_SIZES = (128, 64, 32)  # what both int4 kernels accept, coarsest (fewest scale bytes) first


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linears ``quantize_model`` quantizes, by their name under ``model.decoder``."""
    out = {}
    for i, layer in enumerate(model.decoder.layers):
        for name in DECODER_LINEARS:
            out[f"layers.{i}.{name}"] = layer.get_submodule(name)
    return out


def is_quantized(model: nn.Module) -> bool:
    """Whether any decoder linear holds a quantized (tensor-subclass) weight."""
    return any(type(m.weight.data) is not torch.Tensor for m in decoder_linears(model).values())


def quantize_model(model: nn.Module, scheme: str, *, group_size: int | None = None) -> nn.Module:
    """Quantize ``model``'s decoder linears in place (weights only; activations stay in the model's
    dtype) and return it. ``scheme``: "int8", "int8+head" (also the untied LM head) or "int4"; ``group_size``
    (int4 only): 32, 64 or 128, default the largest that divides every decoder linear's K.

    The quantized weights are frozen (``requires_grad=False``): this is for inference (generation, the
    runtime, the server); training a quantized base is QLoRA's job. Raises ValueError for an unknown
    scheme, a model on the meta device, one already quantized, "int8+head" on a model whose head is tied to
    its embedding, a device the scheme has no kernel for,
    int4 on CUDA without bfloat16 weights or below compute capability 8.0, or an int4 group size that
    does not divide the decoder's widths; ImportError naming torchao when it is missing.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"quantize={scheme!r} is not a known scheme; choose one of {', '.join(SCHEMES)}")
    linears = decoder_linears(model)
    weights = [m.weight for m in linears.values()]
    if any(w.is_meta for w in weights):
        raise ValueError("quantize_model: the model's weights are on the meta device (not loaded); load "
                         "them first, e.g. engine.load(path, quantize=...)")
    if is_quantized(model):
        raise ValueError(f"quantize_model: the decoder is already quantized ({type(weights[0].data).__name__} "
                         f"weights); quantize a model loaded in full precision, once")
    device, dtype = weights[0].device, weights[0].dtype
    if group_size is not None and scheme != "int4":
        raise ValueError(f"group_size is an int4 setting; {scheme} quantizes per output channel")
    if scheme == "int8+head":
        if model.decoder.lm_head is None:
            raise ValueError("quantize='int8+head': this model's LM head is tied to its input embedding (one "
                             "matrix), which stays in full precision; use quantize='int8'")
        linears["lm_head"] = model.decoder.lm_head
        scheme = "int8"
    try:
        from torchao.quantization import quantize_
    except ImportError as e:
        raise ImportError(f"quantize={scheme!r} needs torchao (pip install torchao): {e}") from e
    config = _config(scheme, device, dtype, group_size, {m.in_features for m in linears.values()})
    quantize_(model.decoder, config, filter_fn=lambda module, fqn: fqn in linears)
    left = [name for name, m in linears.items() if type(m.weight.data) is torch.Tensor]
    if left:  # torchao skips (logs, does not raise) a weight whose shape its kernel cannot take
        raise ValueError(f"quantize_model: torchao left {len(left)} linears unquantized ({left[:4]}) "
                         f"for scheme {scheme} on {device}")
    return model


def _config(scheme: str, device: torch.device, dtype: torch.dtype, group_size: int | None, ks: set[int]):
    """The torchao config of ``scheme`` for weights on ``device`` in ``dtype`` with input widths ``ks``."""
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"quantize={scheme!r}: weights on {device}; torchao's weight-only kernels cover cpu and cuda")
    if scheme == "int8":
        from torchao.quantization import Int8WeightOnlyConfig
        from torchao.quantization.granularity import PerRow
        return Int8WeightOnlyConfig(granularity=PerRow(), set_inductor_config=False)
    fits = [g for g in INT4_GROUP_SIZES if all(k % g == 0 for k in ks)]
    if group_size is None:
        if not fits:
            raise ValueError(f"quantize='int4': no group size in {INT4_GROUP_SIZES} divides every decoder input "
                             f"width {sorted(ks)}; use quantize='int8'")
        group_size = fits[0]
    elif group_size not in fits:
        raise ValueError(f"quantize='int4': group_size={group_size} must be one of {INT4_GROUP_SIZES} and divide "
                         f"every decoder input width {sorted(ks)}")
    if device.type == "cuda":
        if dtype != torch.bfloat16:
            raise ValueError(f"quantize='int4' on CUDA needs bfloat16 weights (tinygemm's kernel), got {dtype}; "
                             f"load with dtype=torch.bfloat16 (--dtype bfloat16)")
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            raise ValueError(f"quantize='int4' on CUDA needs compute capability >= 8.0 (tinygemm's tensor-core "
                             f"kernel); {torch.cuda.get_device_name(device)} is {major}.{minor}; use "
                             f"quantize='int8'")
        from torchao.quantization import Int4WeightOnlyConfig
        from torchao.quantization.quantize_.workflows import Int4PackingFormat
        return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D,
                                    set_inductor_config=False)
    from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
    return PrototypeInt4WeightOnlyConfig(group_size=group_size, set_inductor_config=False)
