"""Weight-only quantized decode (engine.quantize) vs full precision, our runtime on both, same weights.

Cases:

- ``cpu decode b1 / b8`` (a CPU measurement, suite ``quantize`` → bench/results/cpu/quantize.json): fp32 vs
  int8 (torchao ``Int8WeightOnlyConfig`` weights, activations fp32; up to 64 rows a GEMM, our
  ``llava_kernels.small_gemm_int8``, each layer one ``llava_kernels.decode_layer`` call) vs int8+head (the LM
  head int8 too) on a LLaMA-shaped decoder big enough that decode streams its weights from DRAM: 8 layers ×
  1024 wide (I = 2816), 32k vocab; 411 MB of fp32 decoder linears + a 131 MB fp32 LM head (kept in full
  precision by ``quantize_model``'s int8). 64-token prompts, 32 new tokens each; the decode steps after the
  prefill step are timed, median of 3 rounds, the three models' rounds interleaved.
- ``cpu linear b1`` (same suite): why int8 decodes as it does on this CPU, one 11008 × 4096 GEMV (180 MB
  in fp32) timed five ways: fp32 ``F.linear``, torchao's int8 weight-only linear (eager: it casts the
  whole int8 weight to the activation dtype, then runs a float GEMM), ours (``engine.linear``, what
  engine.quantize's int8 runs), bf16 ``F.linear``, and ATen's fused ``torch._weight_int8pack_mm`` (bf16
  activations).

The GPU case (int4 vs our bf16, decode batch 1, 7B-shaped) is a row of bench_generate's ``gpu decode b1``
case ("ours int4"): it reuses that case's model and prompts, and its rows land in generate.json, so
bench/device_run.sh runs it without an extra file to bring back.

Bytes formula (per decode step): W = every decoder parameter's bytes except the embedding table (for a
quantized weight: the int8 / packed-int4 data plus its scales), + Σ_seq ctx · kvb for the K/V read; GB/s
uses the step's useful bytes, compared with the copy bandwidth (``common.copy_bandwidth_gbps``).
"""
from __future__ import annotations

import copy
import gc
import os
import time

import pytest
import torch
import torch.nn.functional as F
from common import Row, copy_bandwidth_gbps, cuda_time_ms, save
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from engine import linear as dense
from engine.config import LlavaConfig, TextConfig, VisionConfig
from engine.generate import Runtime, RuntimeConfig, SamplingParams
from engine.model import Llava
from engine.quantize import quantize_model

VOCAB = 32064
CPU_TEXT = dict(hidden_size=1024, intermediate_size=2816, num_layers=8, num_heads=16, num_kv_heads=16, head_dim=64)
# Other work may share the machine: the 1-minute load average before and after each case is in the rows.
CONTENTION = "1-minute load average recorded before and after each case (other processes may share the CPU)"


def model(text: dict, dtype, device) -> Llava:
    """A random LLaVA with a tiny vision tower (decode never runs it)."""
    cfg = LlavaConfig(vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                                          image_size=28, patch_size=14),
                      text=TextConfig(vocab_size=VOCAB, max_position_embeddings=4096, **text),
                      projector_type="mlp2x_gelu", image_token_id=VOCAB - 1)
    torch.manual_seed(0)
    with torch.device(device):
        return Llava(cfg).to(dtype).eval()


def tensor_bytes(t: torch.Tensor) -> int:
    if is_traceable_wrapper_subclass(t):
        return sum(tensor_bytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()


def weight_bytes(m: Llava) -> int:
    """Bytes a decode step reads from the weights: all decoder parameters but the embedding table."""
    return sum(tensor_bytes(p) for n, p in m.decoder.named_parameters() if not n.startswith("embed."))


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def decode_seconds(rt: Runtime, prompts, new: int, device) -> float:
    reqs = [rt.submit(p, params=SamplingParams(max_new_tokens=new, stop_token_ids=())) for p in prompts]
    rt.step()                                                     # the prefill (and first token) is not timed
    sync(device)
    t0 = time.perf_counter()
    while rt.has_work:
        rt.step()
    sync(device)
    assert all(len(r.tokens) == new for r in reqs)
    return time.perf_counter() - t0


def decode_rows(suite: str, case: str, models: dict, batch: int, prompt_len: int, new: int, device, *,
                rounds: int, copy_mb: int, extra: dict, kv_cache_bytes: int) -> list[Row]:
    """Time ``models`` (impl → model; the first is the reference) decoding the same prompts, their rounds
    interleaved (A B A B ...) so that a shared machine's load falls on both alike; the median round each."""
    g = torch.Generator().manual_seed(batch)
    prompts = [[1] + torch.randint(3, VOCAB - 1, (prompt_len - 1,), generator=g).tolist() for _ in range(batch)]
    copy_gbs = copy_bandwidth_gbps(device, copy_mb)
    rts = {impl: Runtime(m, RuntimeConfig(max_batch=max(batch, 2), kv_cache_bytes=kv_cache_bytes,
                                          prefix_caching=False)) for impl, m in models.items()}
    for rt in rts.values():
        decode_seconds(rt, prompts, 2, device)                       # warm-up (and CUDA graph capture)
    loads, times = [os.getloadavg()[0]], {impl: [] for impl in rts}
    for _ in range(rounds):
        for impl, rt in rts.items():
            times[impl].append(decode_seconds(rt, prompts, new, device))
        loads.append(os.getloadavg()[0])
    rows, ref_ms = [], None
    for impl, m in models.items():
        secs = sorted(times[impl])[rounds // 2]
        cfg, rt = m.config.text, rts[impl]
        kvb = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * rt.cache.k.element_size()
        steps = new - 1
        work = steps * weight_bytes(m) + batch * sum(prompt_len + j for j in range(1, new)) * kvb
        row = Row(suite, case, impl, secs * 1e3, work, formula="steps*W + sum_seq sum_step ctx*kvb",
                  ref_ms=ref_ms, extra=dict(extra, tok_s=batch * steps / secs, weight_mb=weight_bytes(m) / 1e6,
                                            round_ms=[t * 1e3 for t in times[impl]], copy_gbs=copy_gbs,
                                            cuda_graphs=rt.graphs is not None, load_avg_1min=loads))
        row.extra["frac_of_copy"] = row.rate / copy_gbs
        ref_ms = ref_ms or secs * 1e3
        rows.append(row)
    rts.clear()
    gc.collect()
    return rows


@pytest.mark.parametrize("batch", [1, 8])
def test_cpu_decode_int8_vs_fp32(benchmark, batch):
    fp32 = model(CPU_TEXT, torch.float32, "cpu")
    int8 = quantize_model(copy.deepcopy(fp32), "int8")
    head = quantize_model(copy.deepcopy(fp32), "int8+head")
    note = ("int8 GEMMs of up to 64 rows run llava_kernels.small_gemm_int8 (1 byte a weight read), a layer as one "
            "llava_kernels.decode_layer call; torchao 0.18's own linear, eager on the CPU, converts the whole int8 "
            "weight to fp32 every call and lost to fp32 (see the 'cpu linear b1' rows); int8: the LM head stays "
            "fp32; int8+head: it is int8 too")
    models = {"fp32": fp32, "int8": int8, "int8+head": head}
    rows = benchmark.pedantic(decode_rows, args=("quantize", f"cpu decode b{batch}", models, batch, 64, 32, "cpu"),
                              kwargs=dict(rounds=3, copy_mb=256, kv_cache_bytes=1 << 28,
                                          extra=dict(contention=CONTENTION, note=note)),
                              rounds=1, iterations=1)
    save("quantize", rows)
    fp, q, qh = rows
    print(f"[quantize] cpu decode b{batch}: fp32 {fp.extra['tok_s']:.1f} tok/s, int8 {q.extra['tok_s']:.1f} tok/s "
          f"({fp.ms / q.ms:.2f}x), int8+head {qh.extra['tok_s']:.1f} tok/s ({fp.ms / qh.ms:.2f}x)")


def test_cpu_linear_b1_int8_paths(benchmark):
    n, k = 11008, 4096          # a 7B MLP matrix: 180 MB in fp32, far past the caches (DRAM-bound)
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=False)
    x = torch.randn(1, k)
    q = copy.deepcopy(lin)
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    quantize_(q, Int8WeightOnlyConfig(set_inductor_config=False))
    w8, scale = q.weight.qdata, q.weight.scale.flatten()                      # (N, K) int8, (N,)
    xb, sb, wb = x.bfloat16(), scale.bfloat16(), lin.weight.bfloat16()
    fns = {"fp32 F.linear": lambda: F.linear(x, lin.weight),
           "int8 torchao": lambda: q(x),
           "int8 ours (engine.quantize)": lambda: dense.linear(x, q.weight),
           "bf16 F.linear": lambda: F.linear(xb, wb),
           "int8 aten _weight_int8pack_mm, bf16 act": lambda: torch._weight_int8pack_mm(xb, w8, sb)}
    want = F.linear(x.double(), q.weight.dequantize().double())
    load = os.getloadavg()[0]
    rows, ref_ms = [], None
    with torch.inference_mode():
        for impl, fn in fns.items():
            if impl.startswith("int8"):   # each int8 path computes x · Ŵᵀ (bf16 rounding allowed)
                assert (fn().double() - want).abs().max().item() <= 2e-2 * want.abs().max().item(), impl
            ms = cuda_time_ms(fn, warmup=10, rep=100)
            wbytes = n * k * (1 if impl.startswith("int8") else 2 if impl.startswith("bf16") else 4)
            rows.append(Row("quantize", f"cpu linear b1 {n}x{k}", impl, ms, wbytes, formula="weight bytes",
                            ref_ms=ref_ms, extra=dict(contention=CONTENTION, load_avg_before=load)))
            ref_ms = ref_ms or ms
    rows[-1].extra["note"] = ("bf16 activations; not used by engine.quantize, whose fp32 models keep fp32 "
                              "activations (its fp32-activation kernel measured slower than fp32 F.linear here)")
    benchmark.pedantic(fns["int8 ours (engine.quantize)"], rounds=3, iterations=1)
    save("quantize", rows)
