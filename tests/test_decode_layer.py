"""llava_kernels.decode_layer: a whole fp32 decoder layer of a CPU decode step as one C++ call.

Two claims, two kinds of check:
- the op computes the layer: against ``decode_layer_ref`` run in fp64 on the same inputs (odd sizes: a head
  dim with a tail past the 8-float vectors, a block size of 5, GQA, several rows), within fp32 rounding
  (rel 1e-5, the paged-decode tests' bound: the softmax and three GEMMs of ≤ 100-term sums), and its cache
  writes land exactly where the reference's do;
- the runtime's use of it changes nothing: every decode step's logits with whole layers equal the module
  path's bit for bit (the same ops in the same order), and the layer falls back to the modules whenever
  one call could not do what they do (hooks, a LoRA wrapper, gradients, bf16, more rows than the GEMM takes).
"""
import pytest
import torch
from helpers import hf_model, perturbed_lora

import engine
from engine import kv_attention
from engine.generate import Runtime, RuntimeConfig, SamplingParams
from engine.lora import LoraSettings, add_lora
from llava_kernels import decode_layer as dl
from llava_kernels import small_gemm

needs_ops = pytest.mark.skipif(not dl.available(), reason=f"the CPU ops are not built: {dl.load_error()}")


def layer_case(t, *, h=6, hkv=2, dh=20, d=36, inter=44, bs=5, nblocks=17, seed=0):
    """Random inputs of one layer: t decoding sequences with cached contexts of different lengths."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, sc=0.3: torch.randn(*s, generator=g) * sc  # noqa: E731
    lens = torch.tensor([7, 1, 13, 4, 10][:t])                 # cached tokens before this step
    table = torch.randperm(nblocks, generator=g)[:t * 3].view(t, 3).to(torch.int32)
    slots = torch.stack([table[i, lens[i] // bs].long() * bs + lens[i] % bs for i in range(t)])
    pos = lens.float()[:, None] * torch.arange(1, dh // 2 + 1).float()[None] * 0.1
    ang = torch.cat([pos, pos], -1)
    return dict(x=r(t, d, sc=1.0), attn_norm=1 + r(d), mlp_norm=1 + r(d), w_qkv=r((h + 2 * hkv) * dh, d),
                w_o=r(d, h * dh), w_gate_up=r(2 * inter, d), w_down=r(d, inter), cos=ang.cos(), sin=ang.sin(),
                k_cache=r(nblocks, bs, hkv, dh, sc=1.0), v_cache=r(nblocks, bs, hkv, dh, sc=1.0), block_table=table,
                seq_lens=lens + 1, slot_mapping=slots, num_heads=h, eps=1e-5, scale=dh**-0.5)


def run(fn, case, dtype=None):
    args = {k: (v.to(dtype) if dtype is not None and torch.is_tensor(v) and v.is_floating_point() else
                v.clone() if torch.is_tensor(v) else v) for k, v in case.items()}
    out = fn(**args)
    return out, args["k_cache"], args["v_cache"]


@needs_ops
@pytest.mark.parametrize("t,hkv", [(1, 2), (3, 2), (5, 6), (2, 1)])
def test_the_op_computes_the_layer(t, hkv):
    case = layer_case(t, hkv=hkv)
    got, k, v = run(dl.decode_layer, case)
    want, k64, v64 = run(dl.decode_layer_ref, case, torch.float64)
    assert got.shape == case["x"].shape and got.dtype == torch.float32
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err <= 1e-5, f"relative error {err:.2e}"
    written = torch.zeros(k.shape[:2], dtype=torch.bool)
    written.view(-1)[case["slot_mapping"]] = True
    assert torch.equal(k[~written], case["k_cache"][~written]) and torch.equal(v[~written], case["v_cache"][~written])
    assert ((k[written].double() - k64[written]).abs() <= 1e-5 * k64[written].abs().max()).all()
    assert ((v[written].double() - v64[written]).abs() <= 1e-5 * v64[written].abs().max()).all()


@needs_ops
def test_the_op_names_a_wrong_shape():
    case = layer_case(2)
    case["w_qkv"] = case["w_qkv"][:-1]
    with pytest.raises(RuntimeError, match="W_qkv must be"):
        dl.decode_layer(**case)
    case = layer_case(2)
    case["slot_mapping"] = case["slot_mapping"].int()
    with pytest.raises(RuntimeError, match="slot_mapping int64"):
        dl.decode_layer(**case)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    hf_model().save_pretrained(path)
    return str(path)


def decode_logits(model, whole: bool, monkeypatch, prompts=(([1, 5, 9, 33], 9), ([1] + list(range(3, 40)), 12),
                                                            ([1, 7], 6))):
    """Every step's logits of a few requests decoded together (and the number of whole-layer calls)."""
    monkeypatch.setattr(kv_attention, "WHOLE_LAYER", whole)
    calls = []
    real = kv_attention.DecodeAttention._whole_layer
    monkeypatch.setattr(kv_attention.DecodeAttention, "_whole_layer",
                        lambda self, *a: calls.append(a[0]) or real(self, *a))
    rt = Runtime(model, RuntimeConfig(block_size=4, kv_cache_bytes=1 << 22, decode_attention="cpu"))
    reqs = [rt.submit(p, keep_logits=True, params=SamplingParams(max_new_tokens=n, stop_token_ids=()))
            for p, n in prompts]
    while rt.has_work:
        rt.step()
    return [torch.stack(r.logits) for r in reqs], len(calls)


@needs_ops
def test_runtime_whole_layers_equal_the_modules_bit_for_bit(ckpt, monkeypatch):
    model = engine.load(ckpt, dtype=torch.float32).eval()
    modules, none = decode_logits(model, False, monkeypatch)
    whole, calls = decode_logits(model, True, monkeypatch)
    assert none == 0 and calls >= 11 * len(model.decoder.layers)  # every decode step of every layer
    for a, b in zip(modules, whole, strict=True):
        assert torch.equal(a, b)


@needs_ops
def test_layers_fall_back_to_the_modules_when_one_call_cannot_match_them(ckpt, monkeypatch):
    model = engine.load(ckpt, dtype=torch.float32).eval()
    model.fuse_weights()
    block = model.decoder.layers[0]
    x = torch.randn(3, model.config.text.hidden_size)
    with torch.no_grad():
        assert block.whole_layer_weights(x) is not None
        assert block.whole_layer_weights(x.to(torch.bfloat16)) is None
        assert block.whole_layer_weights(torch.randn(small_gemm.MAX_ROWS + 1, x.shape[1])) is None
        assert block.whole_layer_weights(torch.randn(x.shape[1], 3).t()) is None          # not contiguous
        handle = block.mlp.down.register_forward_hook(lambda *a: None)
        assert block.whole_layer_weights(x) is None
        handle.remove()
        handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda *a: None)
        assert block.whole_layer_weights(x) is None
        handle.remove()
        assert block.whole_layer_weights(x) is not None
    assert block.whole_layer_weights(x) is None                                              # gradients on
    # a hooked layer decodes through its modules, and the hook sees every step
    seen = []
    handle = model.decoder.layers[1].attn.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    hooked, calls = decode_logits(model, True, monkeypatch)
    handle.remove()
    plain, _ = decode_logits(model, False, monkeypatch)
    assert len(seen) > 11 and calls > 0
    assert all(torch.equal(a, b) for a, b in zip(hooked, plain, strict=True))


@needs_ops
def test_the_remembered_verdict_follows_every_change(ckpt):
    """The layer remembers its check between steps; re-assigning a weight, fusing again, wrapping a projection
    or changing a norm's eps after it was remembered gives the verdict the full check would."""
    model = engine.load(ckpt, dtype=torch.float32).eval()
    model.fuse_weights()
    block, d = model.decoder.layers[1], model.config.text.hidden_size
    x = torch.randn(2, d)
    with torch.no_grad():
        first = block.whole_layer_weights(x)
        assert first is not None and block.whole_layer_weights(x)[2].data_ptr() == first[2].data_ptr()
        new = torch.randn_like(block.attn.k.weight)
        model.load_state_dict({"decoder.layers.1.attn.k.weight": new}, strict=False, assign=True)
        assert block.whole_layer_weights(x) is None                 # q/k/v no longer one tensor
        model.fuse_weights()
        qkv = block.whole_layer_weights(x)[2]
        rows = block.attn.h * block.attn.dh
        assert torch.equal(qkv[rows:rows + new.shape[0]], new)      # the new k inside the new fused weight
        block.mlp_norm.eps = 1e-3                                   # one eps for both norms in the C++ layer
        assert block.whole_layer_weights(x) is None
        block.mlp_norm.eps = block.attn_norm.eps
        assert block.whole_layer_weights(x) is not None
        block.attn.o.bias = torch.nn.Parameter(torch.zeros(d))
        assert block.whole_layer_weights(x) is None
        block.attn.o.bias = None
        assert block.whole_layer_weights(x) is not None
        add_lora(model, LoraSettings(r=2, alpha=4, dropout=0.0, targets=("down",)), base=ckpt)
        assert block.whole_layer_weights(x) is None


@needs_ops
@pytest.mark.parametrize("targets", [None, ("o", "down")])
def test_lora_layers_keep_their_adapters(ckpt, monkeypatch, targets):
    """A PEFT-wrapped projection (all of them, or only the unfused o and down) sends its layer through the
    modules, so no whole-layer call drops what the adapter adds."""
    if targets is None:
        model = perturbed_lora(ckpt)
    else:
        model = engine.load(ckpt, dtype=torch.float32)
        add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0, targets=targets), base=ckpt)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_B." in name:
                    p.add_(torch.randn_like(p) * 0.05)
        model.eval()
    with torch.no_grad():
        assert all(b.whole_layer_weights(torch.randn(1, model.config.text.hidden_size)) is None
                   for b in model.decoder.layers)
    got, calls = decode_logits(model, True, monkeypatch)
    want, _ = decode_logits(model, False, monkeypatch)
    assert calls == 0 and all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 (engine.quantize's scheme): q = round(w / s), s = max |w_row| / 127."""
    s = w.abs().amax(1) / 127
    return torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8), s


@needs_ops
@pytest.mark.parametrize("t,hkv", [(1, 2), (3, 1)])
def test_the_op_computes_an_int8_layer(t, hkv):
    """int8 weights with a scale a row: against the reference on the dequantized weights in fp64."""
    case = layer_case(t, hkv=hkv, seed=4)
    names = ("w_qkv", "w_o", "w_gate_up", "w_down")
    scales = []
    for name in names:
        case[name], s = quantize_rows(case[name])
        scales.append(s)
    got, k, _ = run(lambda **a: dl.decode_layer(**a, scales=tuple(scales)), case)
    want, k64, _ = run(lambda **a: dl.decode_layer_ref(**a, scales=tuple(s.double() for s in scales)),
                       {**case, **{n: case[n].double() for n in names}}, torch.float64)
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err <= 1e-5, f"relative error {err:.2e}"
    written = case["slot_mapping"]
    assert ((k.view(-1, *k.shape[2:])[written].double() - k64.view(-1, *k.shape[2:])[written]).abs()
            <= 1e-5 * k64.abs().max()).all()
    with pytest.raises(RuntimeError, match="scales of all four weights"):
        dl.decode_layer(**case, scales=tuple(scales[:3]) + (None,))


@needs_ops
def test_runtime_int8_layers_equal_the_separate_int8_projections_bit_for_bit(ckpt, monkeypatch):
    """engine.quantize's int8: fused q/k/v and gate/up (one int8 tensor each), then whole layers in C++, give every
    step the logits of seven separate int8 GEMMs a layer, bit for bit; fusing changes no quantized value."""
    from engine import model as model_module
    from engine.quantize import quantize_model
    model = quantize_model(engine.load(ckpt, dtype=torch.float32).eval(), "int8")
    before = {n: (p.qdata.clone(), p.scale.clone()) for n, p in model.named_parameters() if hasattr(p, "qdata")}
    real = model_module.fused_int8
    monkeypatch.setattr(model_module, "fused_int8", lambda *a: None)
    separate, _ = decode_logits(model, False, monkeypatch)           # the runtime fused them: not used here
    monkeypatch.setattr(model_module, "fused_int8", real)
    after = {n: (p.qdata, p.scale) for n, p in model.named_parameters() if hasattr(p, "qdata")}
    assert before.keys() == after.keys() and len(before) == 7 * len(model.decoder.layers)
    assert all(torch.equal(before[n][0], after[n][0]) and torch.equal(before[n][1], after[n][1]) for n in before)
    layer = model.decoder.layers[0]
    q, k, v = (layer.attn.get_submodule(n).weight.qdata for n in "qkv")
    assert k.data_ptr() == q.data_ptr() + q.numel() and v.data_ptr() == k.data_ptr() + k.numel()   # one tensor
    fused, none = decode_logits(model, False, monkeypatch)
    whole, calls = decode_logits(model, True, monkeypatch)
    assert none == 0 and calls >= 11 * len(model.decoder.layers)
    with torch.no_grad():
        x = torch.randn(2, model.config.text.hidden_size)
        assert layer.whole_layer_weights(x)[8] is not None                  # the int8 form: four scale vectors
        assert layer.whole_layer_weights(torch.randn(65, x.shape[1])) is None
    for a, b, c in zip(separate, fused, whole, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    # a prefill of more rows than our int8 kernel takes still runs torchao's linear on the re-pointed weights
    ids = torch.randint(3, 100, (1, 80))
    with torch.no_grad():
        got = model(ids)
    monkeypatch.setattr(model_module, "fused_int8", lambda *a: None)
    for n, p in model.named_parameters():
        if n in before:
            p.qdata, p.scale = before[n]                                     # separate tensors again
    with torch.no_grad():
        assert torch.equal(got, model(ids))
        monkeypatch.setattr(model_module, "fused_int8", real)
        assert layer.whole_layer_weights(x) is None                        # the remembered verdict follows
        model.fuse_weights()
        assert layer.whole_layer_weights(x) is not None
