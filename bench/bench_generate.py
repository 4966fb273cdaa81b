"""Generation runtime vs transformers ``generate`` on the same weights, in the same run.

Cases (each for a CPU variant — ~140M parameters, fp32 — and a GPU variant — 7B-shaped, bf16):

- ``decode b1``: one 64-token prompt, 64 new tokens;
- ``decode b32``: 32 prompts of 16–512 tokens, each with its own number of new tokens (mixed
  stop lengths; transformers gets a per-row stopping criterion, and keeps computing finished
  rows as it does);
- ``ttft``: one 336-px image + 64 text tokens, time to the first new token (cold: our runtime
  forgets its shared prefixes before each call, so nothing of an earlier call is reused);
- ``ttft shared system prompt``: a 512-token system prompt + a new image + 32 new text tokens,
  after an earlier request ran the same system prompt: ours reusing it, ours cold, and
  transformers (which recomputes every prompt);
- ``ttft behind a long prompt``: a 32-token request submitted right after a 4000-token one: its
  time to first token with chunked prefill (the default budget of 2048 tokens a step) and with
  whole-prompt prefill, and transformers running the two as one padded batch;
- ``burst``: 8 such requests arriving together (nothing cached before): time until every one has
  its first token; ours computes the system prompt once in the packed prefill, ours without
  prefix sharing computes it 8 times, transformers runs them as one batch;
- ``anyres``: the same decoder and tower as LLaVA-1.6 (NeXT) AnyRes with its grid pinpoints, vs
  transformers' ``LlavaNextForConditionalGeneration``: one 672×672 image (5 tiles of 336 px, 2,928
  rows) + 64 text tokens: time to the first token, then 32 greedy tokens (the same tokens, fp32).

Decode numbers exclude the prefill: ours from the end of the prefill step, transformers' from
the first call of its logits processors (made right after its prefill forward).

Bytes formula (per decode step, batch-wide): ``W + Σ_seq ctx · kvb`` where W is the decoder's
weight bytes (every layer + final norm + LM head; the embedding table is read one row per
token) and kvb = 2 · layers · kv_heads · head_dim · bytes per element. Achieved GB/s uses the
useful bytes for both implementations, so the GB/s ratio is the speed ratio; it is compared
with the measured copy bandwidth (``common.copy_bandwidth_gbps``: ``2 · bytes / time`` of a large
``copy_``) and, on the CPU, with a plain read of the same size (``common.read_bandwidth_gbps``, ``read_gbs``:
a decode step only reads). Peak memory (GPU): CUDA bytes above what was resident before the timed calls;
our preallocated KV cache is resident, so its size is reported beside it (``resident_kv_cache_mb``).
"""
from __future__ import annotations

import copy
import gc
import random
import time

import pytest
import torch
from common import (
    ANYRES_PINPOINTS,
    ANYRES_SIZES,
    Row,
    bench_device,
    copy_bandwidth_gbps,
    pick,
    read_bandwidth_gbps,
    save,
    track_peak_memory,
)
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from transformers import LlavaConfig as HFLlavaConfig
from transformers import (
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from engine.config import LlavaConfig, TextConfig, VisionConfig
from engine.generate import Runtime, RuntimeConfig, SamplingParams
from engine.weights import HF_LLAVA, assign_state, new_model, rename

SUITE = "generate"
VOCAB, IMAGE_TOKEN = 32064, 32000

VARIANTS = {
    # ~140M parameters: LLaMA-style 12 × 768 decoder, 32k vocab, a small 336-px ViT
    "cpu": dict(device="cpu", dtype=torch.float32, new_tokens=(4, 32), copy_mb=256,
                text=dict(hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12,
                          num_kv_heads=12, head_dim=64),
                vision=dict(image_size=336, hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4)),
    # LLaVA-1.5-7B shapes: Vicuna-7B decoder, CLIP ViT-L/14-336 (smoke: a tiny model of the same layout,
    # bf16 on the CPU, 4 image rows)
    "gpu": dict(device=bench_device(), dtype=torch.bfloat16, new_tokens=pick((32, 256), (2, 4)),
                copy_mb=pick(2048, 1),
                text=pick(dict(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                               num_kv_heads=32, head_dim=128),
                          dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                               num_kv_heads=4, head_dim=16)),
                vision=pick(dict(image_size=336, hidden_size=1024, intermediate_size=4096, num_layers=24,
                                 num_heads=16),
                            dict(image_size=28, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2))),
}
_CACHE: dict[str, tuple] = {}


def config(v: dict) -> LlavaConfig:
    return LlavaConfig(vision=VisionConfig(patch_size=14, **v["vision"]),
                       text=TextConfig(vocab_size=VOCAB, max_position_embeddings=4096, **v["text"]),
                       projector_type="mlp2x_gelu", image_token_id=IMAGE_TOKEN)


def build(name: str):
    """(ours, hf, runtime, cfg) sharing one set of random weights, built once per variant."""
    if name in _CACHE:
        return _CACHE[name]
    v = VARIANTS[name]
    cfg = config(v)
    torch.manual_seed(0)
    with torch.device(v["device"]):
        hf = LlavaForConditionalGeneration._from_config(HFLlavaConfig.from_dict(cfg.to_hf_dict()),
                                                        dtype=v["dtype"]).eval()
    hf.generation_config.eos_token_id = None          # never stop early: both run the asked lengths
    hf.generation_config.pad_token_id = 0
    # the same tensors: assign_state's .to(device, dtype) returns a tensor already there unchanged (without
    # device= it would move everything to the CPU: a 7B model decoding on the host)
    ours = assign_state(new_model(cfg), rename(hf.state_dict(), HF_LLAVA, "hf"), "hf", dtype=v["dtype"],
                        device=v["device"]).eval()
    assert ours.decoder.embed.weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    rt = Runtime(ours, RuntimeConfig(max_batch=32, chunked_prefill=False, max_prefill_tokens=1 << 20,
                                     kv_cache_bytes=kv_cache_bytes(cfg, v)))
    _CACHE[name] = (ours, hf, rt, cfg)
    return _CACHE[name]


@pytest.fixture(scope="module", autouse=True)
def _free_models():
    """The 7B-shaped pair, its 16 GiB KV cache and graph pool must not stay resident for later suites."""
    yield
    _CACHE.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def kv_bytes_per_token(cfg: LlavaConfig, dtype) -> int:
    t = cfg.text
    return 2 * t.num_layers * t.num_kv_heads * t.head_dim * torch.empty(0, dtype=dtype).element_size()


def kv_cache_bytes(cfg: LlavaConfig, v: dict) -> int:
    """Our runtime's preallocated KV cache (32 sequences × 1024 tokens): resident before any timed
    call, so not in our peak memory, while transformers' cache grows inside its own."""
    return kv_bytes_per_token(cfg, v["dtype"]) * 32 * 1024


def weight_bytes(ours) -> int:
    d = ours.decoder
    params = [p for n, p in d.named_parameters() if not n.startswith("embed.")]
    if d.lm_head is None:
        params.append(d.embed.weight)
    return sum(p.numel() * p.element_size() for p in params)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


class _FirstCall(LogitsProcessor):
    """Timestamps transformers' first logits-processor call: its prefill forward has just ended."""

    def __init__(self, device):
        self.device, self.t = device, None

    def __call__(self, input_ids, scores):
        if self.t is None:
            sync(self.device)
            self.t = time.perf_counter()
        return scores


class _RowLimits(StoppingCriteria):
    """Row i is done after limits[i] new tokens (transformers pads it from then on)."""

    def __init__(self, start: int, limits: list[int]):
        self.start, self.limits = start, torch.tensor(limits)

    def __call__(self, input_ids, scores, **kwargs):
        return (input_ids.shape[1] - self.start >= self.limits.to(input_ids.device))


def ours_decode(rt: Runtime, prompts, limits, device):
    """(decode seconds, requests): prefill step first, then the decode steps are timed."""
    reqs = [rt.submit(p, params=SamplingParams(max_new_tokens=n, stop_token_ids=())) for p, n in
            zip(prompts, limits, strict=True)]
    rt.step()
    assert not rt.waiting, "all prompts must prefill in one step"
    sync(device)
    t0 = time.perf_counter()
    while rt.has_work:
        rt.step()
    sync(device)
    return time.perf_counter() - t0, reqs


def hf_decode(hf, prompts, limits, device):
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):       # left padding, as transformers' batched generate needs
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    first = _FirstCall(device)
    with torch.no_grad():
        out = hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                          max_new_tokens=max(limits),
                          do_sample=False, logits_processor=LogitsProcessorList([first]),
                          stopping_criteria=StoppingCriteriaList([_RowLimits(width, limits)]))
    sync(device)
    return time.perf_counter() - first.t, out[:, width:]


def decode_case(benchmark, name: str, batch: int):
    ours, hf, rt, cfg = build(name)
    v = VARIANTS[name]
    rng = random.Random(batch)
    lengths = [64] if batch == 1 else [rng.randint(16, 512) for _ in range(batch)]
    limits = [64] if batch == 1 else [rng.randint(*v["new_tokens"]) for _ in range(batch)]
    prompts = [[1] + [rng.randrange(3, IMAGE_TOKEN) for _ in range(n - 1)] for n in lengths]
    if name == "gpu":  # warm-up: the same workload captures every graph bucket it will use
        ours_decode(rt, prompts, limits, v["device"])
        hf_decode(hf, prompts, [2] * batch, v["device"])
    else:
        ours_decode(rt, prompts[:1], [4], v["device"])
    with track_peak_memory() as ours_peak:
        secs, reqs = benchmark.pedantic(ours_decode, args=(rt, prompts, limits, v["device"]), rounds=1,
                                        iterations=1)
    assert [len(r.tokens) for r in reqs] == limits
    with track_peak_memory() as hf_peak:
        hf_secs, hf_out = hf_decode(hf, prompts, limits, v["device"])
    if v["dtype"] == torch.float32:  # greedy, same weights: same tokens (fp32 only; bf16 may tie-break)
        assert [r.tokens for r in reqs] == [row[:n].tolist() for row, n in zip(hf_out, limits, strict=True)]
    steps = max(limits) - 1                        # decode forwards after the prefill's first token
    kv_tokens = sum(sum(len(p) + j for j in range(1, n)) for p, n in zip(prompts, limits, strict=True))
    work = steps * weight_bytes(ours) + kv_tokens * kv_bytes_per_token(cfg, v["dtype"])
    new = sum(n - 1 for n in limits)
    copy_gbs = copy_bandwidth_gbps(v["device"], v["copy_mb"])
    read = {} if v["device"] != "cpu" else {"read_gbs": read_bandwidth_gbps(v["copy_mb"])}
    formula = "steps*W + sum_seq sum_step ctx*kvb (useful bytes, same for both)"
    case = f"{name} decode b{batch}"
    rows = [Row(SUITE, case, "hf", hf_secs * 1e3, work, formula=formula, peak_mem_mb=hf_peak["mb"],
                extra=dict(tok_s=new / hf_secs, copy_gbs=copy_gbs)),
            Row(SUITE, case, "ours", secs * 1e3, work, formula=formula, ref_ms=hf_secs * 1e3,
                peak_mem_mb=ours_peak["mb"],
                extra=dict(tok_s=new / secs, copy_gbs=copy_gbs, frac_of_copy=work / secs / 1e9 / copy_gbs, **read,
                           cuda_graphs=rt.graphs is not None, resident_kv_cache_mb=kv_cache_bytes(cfg, v) / 2**20)),
            ]
    if name == "gpu" and batch == 1:  # weight-only int4 (engine.quantize) on the same weights and prompt
        rows.append(int4_row(ours, cfg, v, prompts, limits, kv_tokens, secs, case, formula, copy_gbs))
    save(SUITE, rows)
    print(f"[{SUITE}] {case}: ours {new / secs:.1f} tok/s, transformers {new / hf_secs:.1f} tok/s, "
          f"{work / secs / 1e9:.1f} GB/s of {copy_gbs:.1f} GB/s copy"
          + (f", {read['read_gbs']:.1f} GB/s read" if read else ""))
    return secs, hf_secs


def int4_row(ours, cfg, v, prompts, limits, kv_tokens, ref_secs, case, formula, copy_gbs) -> Row:
    """Our runtime on an int4 weight-only copy of ``ours`` (torchao tinygemm on CUDA), the same decode;
    goal: ≥ 2× the bf16 tokens/s (batch-1 decode is weight-bandwidth bound, int4 is ~3.6× fewer bytes)."""
    from engine.quantize import quantize_model

    q = quantize_model(copy.deepcopy(ours), "int4")
    rt = Runtime(q, RuntimeConfig(max_batch=2, kv_cache_bytes=kv_bytes_per_token(cfg, v["dtype"]) * 4096))
    ours_decode(rt, prompts, limits, v["device"])                  # warm-up: captures the graphs it will use
    with track_peak_memory() as peak:
        secs, reqs = ours_decode(rt, prompts, limits, v["device"])
    assert [len(r.tokens) for r in reqs] == limits
    w = sum(quantized_bytes(p) for n, p in q.decoder.named_parameters() if not n.startswith("embed."))
    if q.decoder.lm_head is None:
        w += quantized_bytes(q.decoder.embed.weight)
    steps, new = max(limits) - 1, sum(n - 1 for n in limits)
    work = steps * w + kv_tokens * kv_bytes_per_token(cfg, v["dtype"])
    del rt, q
    gc.collect()
    print(f"[{SUITE}] {case} int4: {new / secs:.1f} tok/s, {ref_secs / secs:.2f}x bf16 (goal >= 2x)")
    return Row(SUITE, case, "ours int4", secs * 1e3, work, formula=formula, ref_ms=ref_secs * 1e3,
               peak_mem_mb=peak["mb"], extra=dict(tok_s=new / secs, copy_gbs=copy_gbs, weight_mb=w / 1e6,
                                                  frac_of_copy=work / secs / 1e9 / copy_gbs, speedup_vs="ours bf16",
                                                  goal="int4 >= 2x ours bf16 tok/s"))


def quantized_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor, or of the plain tensors inside a tensor subclass (a quantized weight)."""
    if is_traceable_wrapper_subclass(t):
        return sum(quantized_bytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()


def ours_ttft(rt: Runtime, prompt, pixels, device, *, cold=True) -> float:
    """Seconds from submit to the first new token; ``cold`` forgets every shared prefix first."""
    if cold:
        rt.cache.forget_prefixes()
    sync(device)
    t0 = time.perf_counter()
    req = rt.submit(prompt, pixel_values=pixels, params=SamplingParams(max_new_tokens=1))
    while rt.has_work:
        rt.step()
    sync(device)
    assert len(req.tokens) == 1
    return time.perf_counter() - t0


def hf_ttft(hf, prompt, pixels, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        hf.generate(input_ids=torch.tensor([prompt], device=device), pixel_values=pixels, max_new_tokens=1,
                    do_sample=False)
    sync(device)
    return time.perf_counter() - t0


def shared_prefix_case(benchmark, name: str):
    """Chat requests that share a 512-token system prompt, each with its own image and question."""
    ours, hf, rt, cfg = build(name)
    v = VARIANTS[name]
    rng = random.Random(11)
    system = [1] + [rng.randrange(3, IMAGE_TOKEN) for _ in range(511)]

    def request():
        question = [rng.randrange(3, IMAGE_TOKEN) for _ in range(32)]
        pixels = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size, device=v["device"], dtype=v["dtype"])
        return system + [IMAGE_TOKEN] * cfg.image_seq_len + question, pixels

    ours_ttft(rt, *request(), v["device"]), hf_ttft(hf, *request(), v["device"])  # warm-up
    cold = min(ours_ttft(rt, *request(), v["device"]) for _ in range(3))
    ours_ttft(rt, *request(), v["device"])                                # the earlier request: prefix cached
    before = rt.reused_tokens
    warm = min(benchmark.pedantic(lambda: [ours_ttft(rt, *request(), v["device"], cold=False) for _ in range(3)],
                                  rounds=1, iterations=1))
    reused = (rt.reused_tokens - before) // 3
    assert reused == len(system) // rt.cache.block_size * rt.cache.block_size
    hf_secs = min(hf_ttft(hf, *request(), v["device"]) for _ in range(3))
    case = f"{name} ttft shared 512-token system prompt + 1 image + 32 tokens"
    prompt_tokens = len(system) + cfg.image_seq_len + 32
    save(SUITE, [Row(SUITE, case, "hf", hf_secs * 1e3),
                 Row(SUITE, case, "ours cold", cold * 1e3, ref_ms=hf_secs * 1e3,
                     extra=dict(prompt_tokens=prompt_tokens)),
                 Row(SUITE, case, "ours", warm * 1e3, ref_ms=hf_secs * 1e3,
                     extra=dict(prompt_tokens=prompt_tokens, reused_tokens=reused,
                                speedup_vs_ours_cold=cold / warm))])
    print(f"[{SUITE}] {case}: ours {warm * 1e3:.0f} ms reusing {reused} tokens, ours cold {cold * 1e3:.0f} ms, "
          f"transformers {hf_secs * 1e3:.0f} ms")


def burst_case(benchmark, name: str, n: int = 8):
    ours, hf, rt, cfg = build(name)
    v = VARIANTS[name]
    rng = random.Random(13)
    system = [1] + [rng.randrange(3, IMAGE_TOKEN) for _ in range(511)]
    size = cfg.vision.image_size

    def burst():
        prompts = [system + [IMAGE_TOKEN] * cfg.image_seq_len + [rng.randrange(3, IMAGE_TOKEN) for _ in range(32)]
                   for _ in range(n)]
        return prompts, torch.randn(n, 3, size, size, device=v["device"], dtype=v["dtype"])

    def ours_burst(runtime, prompts, pixels) -> float:
        runtime.cache.forget_prefixes()                # nothing from an earlier call: only in-batch sharing
        sync(v["device"])
        t0 = time.perf_counter()
        reqs = [runtime.submit(p, pixel_values=pixels[i:i + 1], params=SamplingParams(max_new_tokens=1))
                for i, p in enumerate(prompts)]
        while runtime.has_work:
            runtime.step()
        sync(v["device"])
        assert all(len(r.tokens) == 1 for r in reqs)
        return time.perf_counter() - t0

    def hf_burst(prompts, pixels) -> float:                 # equal lengths: no padding
        sync(v["device"])
        t0 = time.perf_counter()
        with torch.no_grad():
            hf.generate(input_ids=torch.tensor(prompts, device=v["device"]), pixel_values=pixels, max_new_tokens=1,
                        do_sample=False)
        sync(v["device"])
        return time.perf_counter() - t0

    tokens = len(burst()[0][0]) + 1
    plain = Runtime(ours, RuntimeConfig(max_batch=n, chunked_prefill=False, max_prefill_tokens=1 << 20,
                                        prefix_caching=False,
                                        cuda_graphs=False, kv_cache_bytes=kv_bytes_per_token(cfg, v["dtype"])
                                        * n * (tokens + 64)))
    ours_burst(rt, *burst()), ours_burst(plain, *burst()), hf_burst(*burst())    # warm-up
    before = rt.reused_tokens
    shared = min(benchmark.pedantic(lambda: [ours_burst(rt, *burst()) for _ in range(2)], rounds=1, iterations=1))
    assert rt.reused_tokens - before == 2 * (n - 1) * (len(system) // rt.cache.block_size * rt.cache.block_size)
    alone = min(ours_burst(plain, *burst()) for _ in range(2))
    hf_secs = min(hf_burst(*burst()) for _ in range(2))
    case = f"{name} burst {n} x (shared 512-token system prompt + 1 image + 32 tokens), first tokens"
    save(SUITE, [Row(SUITE, case, "hf", hf_secs * 1e3),
                 Row(SUITE, case, "ours no sharing", alone * 1e3, ref_ms=hf_secs * 1e3),
                 Row(SUITE, case, "ours", shared * 1e3, ref_ms=hf_secs * 1e3,
                     extra=dict(requests=n, prompt_tokens=tokens - 1, speedup_vs_no_sharing=alone / shared))])
    print(f"[{SUITE}] {case}: ours {shared * 1e3:.0f} ms, without sharing {alone * 1e3:.0f} ms, "
          f"transformers {hf_secs * 1e3:.0f} ms")
    del plain


def behind_long_case(benchmark, name: str):
    """TTFT of a short request queued right behind a long prompt: chunked prefill vs whole prompts."""
    ours, hf, _, cfg = build(name)
    v = VARIANTS[name]
    rng = random.Random(17)
    n_long, budget = pick(4000, 200), pick(RuntimeConfig().max_step_tokens, 64)
    long_prompt = [1] + [rng.randrange(3, IMAGE_TOKEN) for _ in range(n_long - 1)]
    short_prompt = [1] + [rng.randrange(3, IMAGE_TOKEN) for _ in range(31)]
    kv = kv_bytes_per_token(cfg, v["dtype"]) * (n_long + 32 + 4 * 16)
    runtimes = {chunked: Runtime(ours, RuntimeConfig(max_batch=2, chunked_prefill=chunked, max_step_tokens=budget,
                                                     max_prefill_tokens=1 << 20, prefix_caching=False,
                                                     cuda_graphs=False, kv_cache_bytes=kv))
                for chunked in (True, False)}

    def ours_pair(runtime) -> tuple[float, float, int]:
        """(short's TTFT, long's TTFT, steps until short's first token), both submitted at t0."""
        sync(v["device"])
        t0 = time.perf_counter()
        long = runtime.submit(long_prompt, params=SamplingParams(max_new_tokens=1))
        short = runtime.submit(short_prompt, params=SamplingParams(max_new_tokens=1))
        t_short = t_long = None
        steps = 0
        while runtime.has_work:
            runtime.step()                                  # ends with the step's host sync
            steps += 1 if t_short is None else 0
            now = time.perf_counter() - t0
            t_short = now if t_short is None and short.tokens else t_short
            t_long = now if t_long is None and long.tokens else t_long
        return t_short, t_long, steps

    def hf_pair() -> float:
        width = len(long_prompt)
        ids = torch.zeros(2, width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        ids[0], mask[0] = torch.tensor(long_prompt), 1
        ids[1, width - len(short_prompt):], mask[1, width - len(short_prompt):] = torch.tensor(short_prompt), 1
        sync(v["device"])
        t0 = time.perf_counter()
        with torch.no_grad():
            hf.generate(input_ids=ids.to(v["device"]), attention_mask=mask.to(v["device"]), max_new_tokens=1,
                        do_sample=False)
        sync(v["device"])
        return time.perf_counter() - t0

    if v["device"] == "cuda":                               # warm-up (one 4k prefill each: skipped on the CPU)
        ours_pair(runtimes[True]), ours_pair(runtimes[False]), hf_pair()
    chunked, chunked_long, steps = benchmark.pedantic(ours_pair, args=(runtimes[True],), rounds=1, iterations=1)
    whole, whole_long, _ = ours_pair(runtimes[False])
    hf_secs = hf_pair()
    case = f"{name} ttft 32-token request behind a {n_long}-token prompt"
    save(SUITE, [Row(SUITE, case, "hf", hf_secs * 1e3, extra=dict(note="one padded batch of the two prompts")),
                 Row(SUITE, case, "ours whole prefill", whole * 1e3, ref_ms=hf_secs * 1e3,
                     extra=dict(long_ttft_ms=whole_long * 1e3)),
                 Row(SUITE, case, "ours", chunked * 1e3, ref_ms=hf_secs * 1e3,
                     extra=dict(long_ttft_ms=chunked_long * 1e3, max_step_tokens=budget, steps_to_first_token=steps,
                                speedup_vs_whole_prefill=whole / chunked))])
    print(f"[{SUITE}] {case}: chunked {chunked * 1e3:.0f} ms (long prompt {chunked_long * 1e3:.0f} ms), whole "
          f"prefill {whole * 1e3:.0f} ms (long {whole_long * 1e3:.0f} ms), transformers {hf_secs * 1e3:.0f} ms")
    del runtimes


def ttft_case(benchmark, name: str):
    ours, hf, rt, cfg = build(name)
    v = VARIANTS[name]
    rng = random.Random(7)
    prompt = [1] + [IMAGE_TOKEN] * cfg.image_seq_len + [rng.randrange(3, IMAGE_TOKEN) for _ in range(63)]
    pixels = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size, device=v["device"], dtype=v["dtype"])

    ours_ttft(rt, prompt, pixels, v["device"]), hf_ttft(hf, prompt, pixels, v["device"])  # warm-up
    with track_peak_memory() as ours_peak:
        secs = min(benchmark.pedantic(lambda: [ours_ttft(rt, prompt, pixels, v["device"]) for _ in range(3)],
                                      rounds=1, iterations=1))
    with track_peak_memory() as hf_peak:
        hf_secs = min(hf_ttft(hf, prompt, pixels, v["device"]) for _ in range(3))
    case = f"{name} ttft 1 image + 64 tokens"
    save(SUITE, [Row(SUITE, case, "hf", hf_secs * 1e3, peak_mem_mb=hf_peak["mb"]),
                 Row(SUITE, case, "ours", secs * 1e3, ref_ms=hf_secs * 1e3, peak_mem_mb=ours_peak["mb"],
                     extra=dict(prompt_tokens=len(prompt), resident_kv_cache_mb=kv_cache_bytes(cfg, v) / 2**20))])


def build_anyres(name: str):
    """(ours, hf LlavaNext, cfg) of the variant's shapes with LLaVA-1.6's grid pinpoints, one set of weights."""
    key = f"{name}-anyres"
    if key in _CACHE:
        return _CACHE[key]
    v = VARIANTS[name]
    cfg = config(v).replace(image_grid_pinpoints=ANYRES_PINPOINTS)
    torch.manual_seed(0)
    with torch.device(v["device"]):
        hf = LlavaNextForConditionalGeneration._from_config(LlavaNextConfig.from_dict(cfg.to_hf_dict()),
                                                            dtype=v["dtype"]).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    ours = assign_state(new_model(cfg), rename(hf.state_dict(), HF_LLAVA, "hf"), "hf", dtype=v["dtype"],
                        device=v["device"]).eval()
    _CACHE[key] = (ours, hf, cfg)
    return _CACHE[key]


def anyres_case(benchmark, name: str, new_tokens: int = 32):
    """One AnyRes image + 64 tokens: TTFT (cold) and the whole greedy generation, ours vs LlavaNext."""
    ours, hf, cfg = build_anyres(name)
    v = VARIANTS[name]
    height, width = ANYRES_SIZES[0]
    rows, tiles = cfg.image_rows(height, width), cfg.image_tiles(height, width)
    rng = random.Random(19)
    prompt = [1] + [IMAGE_TOKEN] * rows + [rng.randrange(3, IMAGE_TOKEN) for _ in range(63)]
    size = cfg.vision.image_size
    pixels = torch.randn(tiles, 3, size, size, device=v["device"], dtype=v["dtype"])        # (K, 3, S, S)
    sizes = torch.tensor([[height, width]], device=v["device"])
    kv = kv_bytes_per_token(cfg, v["dtype"]) * (len(prompt) + new_tokens + 64)
    rt = Runtime(ours, RuntimeConfig(max_batch=1, chunked_prefill=False, max_prefill_tokens=1 << 20,
                                     cuda_graphs=v["device"] == "cuda", kv_cache_bytes=kv))

    def ours_run(n: int) -> tuple[float, float, list[int]]:
        """(TTFT, total seconds, tokens) of one cold request for n tokens."""
        rt.cache.forget_prefixes()
        sync(v["device"])
        t0 = time.perf_counter()
        req = rt.submit(prompt, pixel_values=pixels, image_sizes=sizes,
                        params=SamplingParams(max_new_tokens=n, stop_token_ids=()))
        ttft = None
        while rt.has_work:
            rt.step()
            ttft = ttft if ttft is not None or not req.tokens else time.perf_counter() - t0
        sync(v["device"])
        return ttft, time.perf_counter() - t0, req.tokens

    def hf_run(n: int) -> tuple[float, float, list[int]]:
        first = _FirstCall(v["device"])
        sync(v["device"])
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(input_ids=torch.tensor([prompt], device=v["device"]), pixel_values=pixels[None],
                              image_sizes=sizes, max_new_tokens=n, do_sample=False,
                              logits_processor=LogitsProcessorList([first]))
        sync(v["device"])
        return first.t - t0, time.perf_counter() - t0, out[0, len(prompt):].tolist()

    ours_run(2), hf_run(2)                                                 # warm-up
    ttft, secs, tokens = benchmark.pedantic(ours_run, args=(new_tokens,), rounds=1, iterations=1)
    hf_ttft_s, hf_secs, hf_tokens = hf_run(new_tokens)
    if v["dtype"] == torch.float32:
        assert tokens == hf_tokens
    case = f"{name} anyres {height}x{width} image ({tiles} tiles, {rows} rows) + 64 tokens"
    extra = dict(prompt_tokens=len(prompt), image_rows=rows, tiles=tiles, new_tokens=new_tokens)
    save(SUITE, [Row(SUITE, f"{case}: ttft", "hf", hf_ttft_s * 1e3, extra=extra),
                 Row(SUITE, f"{case}: ttft", "ours", ttft * 1e3, ref_ms=hf_ttft_s * 1e3, extra=extra),
                 Row(SUITE, f"{case}: {new_tokens} tokens", "hf", hf_secs * 1e3, extra=extra),
                 Row(SUITE, f"{case}: {new_tokens} tokens", "ours", secs * 1e3, ref_ms=hf_secs * 1e3, extra=extra)])
    print(f"[{SUITE}] {case}: ttft ours {ttft * 1e3:.0f} ms, transformers {hf_ttft_s * 1e3:.0f} ms; "
          f"{new_tokens} tokens ours {secs * 1e3:.0f} ms, transformers {hf_secs * 1e3:.0f} ms")


# the CPU variant is not marked gpu: it runs (only) with `pytest bench/ --benchmark-only`
@pytest.mark.parametrize("name", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_decode_batch1(benchmark, name):
    decode_case(benchmark, name, 1)


@pytest.mark.parametrize("name", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_decode_batch32_mixed(benchmark, name):
    decode_case(benchmark, name, 32)


@pytest.mark.parametrize("name", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_ttft_image(benchmark, name):
    ttft_case(benchmark, name)


@pytest.mark.parametrize("name", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_ttft_shared_system_prompt(benchmark, name):
    shared_prefix_case(benchmark, name)


@pytest.mark.parametrize("name", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_burst_shared_system_prompt(benchmark, name):
    burst_case(benchmark, name)


@pytest.mark.parametrize("name", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_ttft_behind_a_long_prompt(benchmark, name):
    behind_long_case(benchmark, name)


@pytest.mark.parametrize("name", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_anyres_image(benchmark, name):
    anyres_case(benchmark, name, new_tokens=pick(32, 4))
