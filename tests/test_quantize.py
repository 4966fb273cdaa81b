"""Weight-only quantized inference (engine/quantize.py) on the CPU, tiny models.

Two checks per scheme:

1. The quantized model computes what it should: its logits equal those of an fp32 model holding the
   dequantized weights Ŵ (≤ 1e-5, the fp32 rule). Ŵ is read back through the quantized weight's own
   ``F.linear`` (Ŵᵀ = linear(I, Ŵ)), and the fp32 reference is fused (one q/k/v, one gate/up GEMM).
2. Tolerance rule for Ŵ against fp32: quantization replaces every weight by a rounding of it, an error of
   at most half a quantization step per element (int8 per output row: step = max_k |W[n, k]| / 127;
   int4 per group of g inputs: step = (max − min) / 15). The reference error scale is that of the fp32
   model with every quantized weight perturbed by uniform noise U(−step/2, step/2) of the same steps (the
   standard model of rounding error), mean over 3 seeds. The quantized logits must be within 2× that
   reference's relative error + 1e-6 of the fp32 logits (the ~2× rule of CONVENTIONS habit 6).

Greedy tokens (int8, parity prompts with images, 12 tokens each through the KV-cached runtime): the tiny
random model's top-2 logit margins are small (down to ~2e-3), so equality is required where the fp32 top-2
margin exceeds δ = 2 × the largest |logit difference| the noise reference causes on the parity prompts:
teacher-forced on fp32's tokens at every such step, and for the generated tokens up to the first step at or
under δ (after which the two trajectories may part legitimately).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import IMAGE_SIZE, IMAGE_TOKEN, hf_model, pad, prompts, recompute_logits, rel_err

import engine
from engine.generate import Runtime, RuntimeConfig, SamplingParams, generate
from engine.model import fused_int8, fused_weight
from engine.quantize import decoder_linears, is_quantized, quantize_model
from engine.weights import new_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("parity")
    hf_model().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def fp32(ckpt):
    return engine.load(ckpt).eval()


@pytest.fixture(scope="module")
def int8(ckpt):
    return engine.load(ckpt, quantize="int8").eval()


def dequantized(model, quantized):
    """A copy of fp32 ``model`` holding ``quantized``'s dequantized decoder weights, fused."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for m, q in zip(decoder_linears(out).values(), decoder_linears(quantized).values(), strict=True):
            m.weight.copy_(F.linear(torch.eye(q.in_features), q.weight).T)   # (N, K)
    out.fuse_weights()
    return out


def int8_step(w):                    # (N, K) → (N, 1)
    return w.abs().amax(1, keepdim=True) / 127


def int4_step(group):
    def step(w):                     # (N, K) → (N, K): each group's (max − min) / 15, per element
        g = w.unflatten(1, (-1, group))
        return ((g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / 15).expand_as(g).flatten(1)
    return step


def noisy(model, step, seed):
    """fp32 ``model`` with each decoder weight plus U(−step/2, step/2) (the rounding-error model)."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in decoder_linears(out).values():
            m.weight.add_((torch.rand(m.weight.shape, generator=g) - 0.5) * step(m.weight))
    return out


def check_rule(ref, quant, step, run):
    """Both checks of the module docstring; ``run(model)`` → logits. Returns (error, bound, noise models)."""
    want, got = run(ref), run(quant)
    exact = rel_err(got, run(dequantized(ref, quant)))
    assert exact <= 1e-5, f"quantized logits differ from the dequantized fp32 model's by {exact:.2e}"
    noise = [noisy(ref, step, seed) for seed in range(3)]
    ref_err = sum(rel_err(run(m), want) for m in noise) / len(noise)
    err, bound = rel_err(got, want), 2 * ref_err + 1e-6
    assert err <= bound, f"relative logit error {err:.3e} > 2 × rounding-noise reference {ref_err:.3e} + 1e-6"
    return err, bound, noise


def parity_logits(seqs, pixels):
    ids, mask = pad(seqs, "right")

    def run(model):
        with torch.no_grad():
            return model(ids, pixels, attention_mask=mask)[mask.bool()]   # (T, V)
    return run


def test_int8_logits_within_the_rounding_rule_of_fp32_and_greedy_tokens_match(fp32, int8):
    seqs, pixels = prompts(fp32.config.image_seq_len)
    run = parity_logits(seqs, pixels)
    err, bound, noise = check_rule(fp32, int8, int8_step, run)
    assert err > 0                                  # the weights really changed
    want = run(fp32)
    delta = 2 * max((run(m) - want).abs().max().item() for m in noise)

    kw = dict(images=pixels, max_new_tokens=12, stop_token_ids=[], output_logits=True)
    ref, got = generate(fp32, seqs, **kw), generate(int8, seqs, **kw)
    per_prompt = [pixels[:0], pixels[:1], pixels[1:]]   # prompts() gives 0, 1 and 2 images
    clear = 0
    for seq, px, r, g in zip(seqs, per_prompt, ref, got, strict=True):
        top2 = r.logits.topk(2, -1).values
        margins = (top2[:, 0] - top2[:, 1]).tolist()
        # teacher-forced on fp32's tokens: int8's argmax at every step where fp32's margin is clear
        forced = recompute_logits(int8, seq, px if len(px) else None, r.tokens)[:len(r.tokens)].argmax(-1)
        for t, margin in enumerate(margins):
            if margin > delta:
                clear += 1
                assert forced[t].item() == r.tokens[t], f"step {t}: int8 argmax {forced[t]} != fp32 {r.tokens[t]}"
        # generated: the same tokens up to the first step whose fp32 margin is within δ
        for t, margin in enumerate(margins):
            if margin <= delta:
                break
            assert g.tokens[t] == r.tokens[t], f"step {t}: int8 {g.tokens[t]} != fp32 {r.tokens[t]} (margin {margin})"
    assert clear >= 24, f"only {clear} of 36 greedy steps had an fp32 top-2 margin above δ={delta:.2e}"


def test_int4_on_cpu_within_the_rounding_rule_of_fp32():
    torch.manual_seed(0)
    ref = engine.Llava(engine.tiny_config(vocab_size=200)).eval()          # widths 64 / 128: groups of 64
    quant = quantize_model(copy.deepcopy(ref), "int4")
    assert is_quantized(quant) and quant.decoder.lm_head.weight.dtype == torch.float32
    ids = torch.randint(0, 198, (3, 21), generator=torch.Generator().manual_seed(1))

    def run(model):
        with torch.no_grad():
            return model(ids)
    err, _, _ = check_rule(ref, quant, int4_step(64), run)
    assert err > 0


def test_fusion_of_quantized_weights(fp32, int8):
    """int8 q/k/v and gate/up fuse into one int8 tensor each (fused_int8, for our CPU kernel's few rows), never into
    a plain weight; fusing changes no value (tests/test_decode_layer.py: the same logits, bit for bit)."""
    int8.fuse_weights()
    ref = copy.deepcopy(fp32)
    ref.fuse_weights()
    x = torch.randn(3, fp32.config.text.hidden_size)
    with torch.no_grad():
        for model, fused in ((ref, True), (int8, False)):
            for layer in model.decoder.layers:
                assert (fused_weight(layer.attn.q, layer.attn.k, layer.attn.v) is not None) == fused
                assert (fused_weight(layer.mlp.gate, layer.mlp.up) is not None) == fused
                assert (fused_int8(x, layer.attn.q, layer.attn.k, layer.attn.v) is not None) != fused
                assert (fused_int8(x, layer.mlp.gate, layer.mlp.up) is not None) != fused
                assert fused_int8(torch.randn(65, x.shape[1]), layer.mlp.gate, layer.mlp.up) is None  # torchao's
    untouched = {n: p for n, p in int8.named_parameters() if type(p.data) is torch.Tensor}
    assert "decoder.lm_head.weight" in untouched and not any(n.startswith("decoder.layers.") and "norm" not in n
                                                             for n in untouched)
    assert all(p.dtype == torch.float32 for n, p in untouched.items() if n.startswith(("vision.", "projector.")))


def test_int8_head_logits_within_the_rounding_bound(ckpt, int8):
    """``int8+head``: the decoder as ``int8`` (the same quantized values), and each logit of the LM head within the
    rounding bound of per-row int8: |h·Wᵀ − h·Ŵᵀ| ≤ Σ_k |h_k| · s_n / 2 (+ the fp32 sums' rounding), at few rows
    (our kernel) and many (torchao's linear). A tied head is refused."""
    head8 = engine.load(ckpt, quantize="int8+head").eval()
    w = engine.load(ckpt).decoder.lm_head.weight.detach().double()                   # (V, D) fp32 head
    q = head8.decoder.lm_head.weight
    assert type(q).__name__ == "Int8Tensor"
    for (n, a), b in zip(decoder_linears(int8).items(), decoder_linears(head8).values(), strict=True):
        assert torch.equal(a.weight.qdata, b.weight.qdata) and torch.equal(a.weight.scale, b.weight.scale), n
    s = q.scale.double().reshape(-1)                                                  # (V,)
    g = torch.Generator().manual_seed(7)
    for rows in (3, 70):
        h = torch.randn(rows, w.shape[1], generator=g)
        with torch.no_grad():
            got = head8.logits(h).double()
        exact = h.double() @ w.T
        rounding = 1e-6 * (h.double().abs() @ w.abs().T)                              # fp32 sums, generously
        bound = h.double().abs().sum(1, keepdim=True) * s[None] / 2 + rounding
        assert ((got - exact).abs() <= bound).all(), rows
        assert (got - exact).abs().max() > 0                                          # the head really changed
    torch.manual_seed(0)
    tied = engine.Llava(engine.tiny_config(vocab_size=200, tie_word_embeddings=True)).eval()
    with pytest.raises(ValueError, match="tied to its input embedding"):
        quantize_model(tied, "int8+head")
    assert not is_quantized(tied)
    out = generate(head8, [[1, 5, 9, 33]], max_new_tokens=5, stop_token_ids=[])      # the runtime decodes with it
    assert len(out[0].tokens) == 5


def test_int8_runtime_prefix_reuse_equals_recompute_and_uncached_runtime(int8):
    def runtime(caching):
        return Runtime(int8, RuntimeConfig(max_batch=4, block_size=4, kv_cache_bytes=1 << 22,
                                           prefix_caching=caching))

    g = torch.Generator().manual_seed(3)
    system = [1] + torch.randint(3, IMAGE_TOKEN, (15,), generator=g).tolist()   # 4 blocks, then the image's
    img = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    n_img = int8.config.image_seq_len
    prompts_ = [(system + [IMAGE_TOKEN] * n_img + torch.randint(3, IMAGE_TOKEN, (n,), generator=g).tolist(), img)
                for n in (3, 6, 9)]

    def run(rt):
        out = []
        for p, px in prompts_:   # one after another: each later prompt finds the earlier prefix cached
            r = rt.submit(p, pixel_values=px, keep_logits=True,
                          params=SamplingParams(max_new_tokens=8, stop_token_ids=()))
            while rt.has_work:
                rt.step()
            out.append(r)
        return out

    cached, plain = run(runtime(True)), run(runtime(False))
    shared = len(system) + n_img                          # whole blocks: system prompt + image
    assert shared % 4 == 0 and [r.reused for r in cached] == [0, shared, shared]
    assert all(r.reused == 0 for r in plain)
    for r, p in zip(cached, plain, strict=True):
        assert r.tokens == p.tokens
        got = torch.stack(r.logits)
        want = recompute_logits(int8, r.prompt, r.pixel_values, r.tokens)[:got.shape[0]]
        assert (got - want).abs().max().item() <= 1e-5


def test_quantizing_or_changing_quantized_weights_drops_runtime_prefixes(ckpt):
    model = engine.load(ckpt).eval()
    rt = Runtime(model, RuntimeConfig(max_batch=2, block_size=4, kv_cache_bytes=1 << 22))
    prompt = [1] + torch.randint(3, IMAGE_TOKEN, (21,), generator=torch.Generator().manual_seed(4)).tolist()

    def run():
        r = rt.submit(prompt, keep_logits=True, params=SamplingParams(max_new_tokens=4, stop_token_ids=()))
        while rt.has_work:
            rt.step()
        want = recompute_logits(model, prompt, None, r.tokens)[:len(r.logits)]
        assert (torch.stack(r.logits) - want).abs().max().item() <= 1e-5
        return r.reused

    assert run() == 0 and run() == 20
    quantize_model(model, "int8")                         # a runtime built on fp32 weights, quantized under it
    assert run() == 0 and run() == 20
    with torch.no_grad():
        model.decoder.layers[1].mlp.down.weight.qdata.mul_(-1)   # an in-place change inside a quantized weight
    assert run() == 0


def test_clear_errors(ckpt, fp32, tmp_path):
    with pytest.raises(ValueError, match=r"quantize='int3' is not a known scheme; choose one of int8, int8\+head, "
                                         r"int4"):
        engine.load(ckpt, quantize="int3")
    with pytest.raises(ValueError, match=r"an adapter \(adapter= / --adapter .*\) with quantize='int8' is not "
                                         r"supported; merge the adapter first \(python -m train.merge_lora"):
        engine.load(ckpt, adapter=str(tmp_path), quantize="int8")   # refused before anything is read
    with pytest.raises(ValueError, match="meta device"):
        quantize_model(new_model(fp32.config), "int8")
    twice = quantize_model(copy.deepcopy(fp32), "int8")
    with pytest.raises(ValueError, match=r"already quantized \(Int8Tensor"):
        quantize_model(twice, "int4")
    with pytest.raises(ValueError, match=r"no group size in \(128, 64, 32\) divides every decoder input width "
                                         r"\[48, 96\]; use quantize='int8'"):
        quantize_model(copy.deepcopy(fp32), "int4")         # hidden 48: no int4 kernel group fits
    with pytest.raises(ValueError, match="group_size is an int4 setting"):
        quantize_model(copy.deepcopy(fp32), "int8", group_size=32)
    with pytest.raises(ValueError, match=r"group_size=16 must be one of \(128, 64, 32\)"):
        quantize_model(engine.Llava(engine.tiny_config()), "int4", group_size=16)
    assert not is_quantized(fp32)                          # a failed call leaves the model as it was
    with pytest.raises(ValueError, match="the model's decoder is quantized; export the full-precision model"):
        engine.export_hf(twice, str(tmp_path / "export"))
    assert not (tmp_path / "export").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="int4 on CUDA (tinygemm) needs a CUDA device")
def test_int4_cuda_bf16_within_the_rounding_rule_and_rejects_fp32():
    torch.manual_seed(0)
    ref = engine.Llava(engine.tiny_config(vocab_size=200, hidden_size=128, intermediate_size=256)).eval().cuda()
    with pytest.raises(ValueError, match="needs bfloat16 weights"):
        quantize_model(copy.deepcopy(ref), "int4")
    quant = quantize_model(copy.deepcopy(ref).bfloat16(), "int4")
    ids = torch.randint(0, 198, (3, 21), device="cuda")
    with torch.no_grad():
        want, got = ref(ids), quant(ids).float()
        bf16 = ref.bfloat16()(ids).float()                 # the bf16 model's own error, for scale
    noise = rel_err(bf16, want)
    err = rel_err(got, want)
    # int4's rounding (step/2 of a 64..128-wide group) dominates bf16's; a wrong kernel gives O(1) errors.
    assert noise < err < 0.1, f"int4 relative logit error {err:.3e} (bf16 alone: {noise:.3e})"


def test_chat_and_serve_command_lines_load_quantized(tmp_path, capsys):
    from engine.chat import chat, load_tokenizer, main
    from engine.serve import ServerConfig, build_server
    from engine.tokenizer import build_tiny_tokenizer

    tok_dir = build_tiny_tokenizer(str(tmp_path / "tok"))
    tok = load_tokenizer(tok_dir)
    torch.manual_seed(0)
    cfg = engine.tiny_config(vocab_size=len(tok), image_token_id=tok.convert_tokens_to_ids("<image>"))
    path = str(tmp_path / "ckpt")
    engine.export_hf(engine.Llava(cfg), path, tokenizer_dir=tok_dir)

    assert main(["--model", path, "--quantize", "int8", "--max-new-tokens", "6", "Hi?"]) == 0
    model = engine.load(path, quantize="int8").eval()
    assert capsys.readouterr().out == chat(model, [{"role": "user", "content": "Hi?"}], tokenizer=tok,
                                           max_new_tokens=6) + "\n"
    with pytest.raises(SystemExit):
        main(["--model", path, "--quantize", "int3", "Hi?"])
    assert "invalid choice: 'int3'" in capsys.readouterr().err

    srv = build_server(ServerConfig(model=path, port=0, quantize="int8+head", max_batch=2))
    try:
        assert is_quantized(srv.state.model) and type(srv.state.model.decoder.lm_head.weight).__name__ == "Int8Tensor"
    finally:
        srv.server_close()
    with pytest.raises(ValueError, match=r"quantize='int3' is not one of int8, int8\+head, int4"):
        ServerConfig(model=path, quantize="int3")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("scheme,dtype,tol", [("int8", torch.float32, 1e-4), ("int4", torch.bfloat16, 3e-2)])
def test_cuda_graph_decode_of_a_quantized_model_equals_eager(scheme, dtype, tol):
    """4 prompts decoding together (a full batch bucket: the graph's GEMMs have the eager shapes); int4 on
    CUDA needs bf16, where tol is a few bf16 ulps of the logits' magnitude."""
    torch.manual_seed(0)
    model = engine.Llava(engine.tiny_config(vocab_size=200, hidden_size=128, intermediate_size=256))
    model = quantize_model(model.eval().to("cuda", dtype), scheme)
    prompts_ = [[1] + torch.randint(3, 198, (n,)).tolist() for n in (5, 17, 30, 9)]

    def run(graphs):
        rt = Runtime(model, RuntimeConfig(max_batch=4, block_size=4, kv_cache_bytes=1 << 24, cuda_graphs=graphs))
        reqs = [rt.submit(p, keep_logits=True, params=SamplingParams(max_new_tokens=12, stop_token_ids=()))
                for p in prompts_]
        while rt.has_work:
            rt.step()
        return rt, reqs

    rt, graphed = run(True)
    assert rt.graphs is not None and rt.graphs.graphs, "the decode step fell back to eager"
    _, eager = run(False)
    for g, e in zip(graphed, eager, strict=True):
        assert g.tokens == e.tokens
        assert (torch.stack(g.logits) - torch.stack(e.logits)).abs().max().item() <= tol
