"""Conversation templates: exact upstream strings, assistant-span labels, `<image>` expansion, errors.

Two tokenizers, both built locally: the engine's tiny tokenizer (Metaspace, `▁` prepended to the
first piece only, punctuation isolated) and a legacy-LLaMA-like SentencePiece BPE built here
(normalizer prepends `▁` to every piece and turns spaces into `▁`, no pre-tokenizer, so `▁` merges
with the following word and punctuation merges with letters) to catch boundary bugs.
"""
import json

import pytest
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from engine.conversation import (
    IGNORE_INDEX,
    TEMPLATES,
    generation_prompt,
    get_template,
    render,
    stop_strings,
    tokenize_conversation,
)
from engine.tokenizer import BYTE_TOKENS, build_tiny_tokenizer, default_corpus

VICUNA_2TURN = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: <image>\nWhat is in the image? ASSISTANT: "
    "A cat on a sofa.</s>USER: What color is it? ASSISTANT: It is orange.</s>")
V0_2TURN = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions.###Human: <image>\nWhat is in the image?###"
    "Assistant: A cat on a sofa.###Human: What color is it?###Assistant: It is orange.###")
TWO_TURNS = [
    {"from": "human", "value": "What is in the image?\n<image>"},
    {"from": "gpt", "value": "A cat on a sofa."},
    {"from": "human", "value": "What color is it?"},
    {"from": "gpt", "value": "It is orange."},
]
QUESTIONS = ["What is in the image?", "How many shapes are there?", "Describe it.\nBe brief.", "Why?"]
ANSWERS = ["A red circle above a blue square.", "3 shapes: 2 circles and 1 star.",
           "(B) The large green hexagon; it is near the bottom-left corner.\nThat's all.", "Yes"]
# What ends each answer in the rendered text (written out here, independently of the module).
ANSWER_END = {"vicuna_v1": "</s>", "llava_v0": "###", "plain": "\n", "llava_llama_2": " </s>",
              "mistral_instruct": " </s>", "chatml_direct": "<|im_end|>"}
CHATML = ["<|im_start|>", "<|im_end|>"]   # special tokens of chatml_direct's tokenizers (Yi's)
S = 5          # image_seq_len: rows per image


def _sp_tokenizer(corpus, *, image_special=True):
    """A byte-fallback BPE laid out like legacy LLaMA's tokenizer.json (SentencePiece behaviour)."""
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    learner.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=700, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{t: 3 + i for i, t in enumerate(BYTE_TOKENS)}}
    for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                               fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + (["<image>"] + CHATML if image_special else [])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=specials[3:], clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def tokenizers_(tmp_path_factory):
    tiny = AutoTokenizer.from_pretrained(build_tiny_tokenizer(str(tmp_path_factory.mktemp("tiny"))))
    tiny.add_special_tokens({"additional_special_tokens": CHATML})
    sp = _sp_tokenizer(default_corpus(2000, seed=1))
    assert tiny.is_fast and sp.is_fast
    # The two really differ at the boundaries the labels depend on.
    assert tiny.tokenize("<image>A.") != sp.tokenize("<image>A.")
    return {"tiny": tiny, "sp": sp}


def _conversation(rounds, image_at):
    turns = []
    for r in range(rounds):
        q = QUESTIONS[r]
        if r == 0:
            q = {"start": "<image>\n" + q, "middle": q[:8] + " <image> " + q[8:], "end": q + "\n<image>",
                 "none": q}[image_at]
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": ANSWERS[r]}]
    return turns


def _runs(labels):
    """[start, end) index runs of consecutive labelled positions."""
    runs, start = [], None
    for i, lab in enumerate(labels + [IGNORE_INDEX]):
        if lab != IGNORE_INDEX and start is None:
            start = i
        elif lab == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_exact_strings():
    assert render(get_template("vicuna_v1"), TWO_TURNS).text == VICUNA_2TURN
    assert render(get_template("llava_v0"), TWO_TURNS).text == V0_2TURN
    plain = render(get_template("plain"), TWO_TURNS[:2])
    assert plain.text == "<image>A cat on a sofa.\n"
    assert plain.answer_spans == [(len("<image>"), len(plain.text))]
    llama2 = render(get_template("llava_llama_2"), TWO_TURNS).text
    sys2 = TEMPLATES["llava_llama_2"].system
    assert llama2 == (f"[INST] <<SYS>>\n{sys2}\n<</SYS>>\n\n<image>\nWhat is in the image? [/INST] A cat on "
                      "a sofa. </s><s>[INST] What color is it? [/INST] It is orange. </s>")
    r = render(get_template("vicuna_v1"), TWO_TURNS)
    assert [r.text[s:e] for s, e in r.answer_spans] == ["A cat on a sofa.</s>", "It is orange.</s>"]
    # upstream conv_mistral_instruct (LLaVA-1.6): llama_2 style, no system, sep "" between rounds
    assert render(get_template("mistral_instruct"), TWO_TURNS).text == (
        "[INST] <image>\nWhat is in the image? [/INST] A cat on a sofa. </s>[INST] What color is it? [/INST] It is "
        "orange. </s>")
    # upstream conv_chatml_direct (LLaVA-1.6 34B): MPT style, no newline after <|im_end|>
    assert render(get_template("chatml_direct"), TWO_TURNS).text == (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is in the image?"
        "<|im_end|><|im_start|>assistant\nA cat on a sofa.<|im_end|><|im_start|>user\nWhat color is it?<|im_end|>"
        "<|im_start|>assistant\nIt is orange.<|im_end|>")


@pytest.mark.parametrize("name,ending", [("vicuna_v1", "USER: What color is it? ASSISTANT:"),
                                         ("llava_v0", "###Human: What color is it?###Assistant:"),
                                         ("llava_llama_2", "</s><s>[INST] What color is it? [/INST]"),
                                         ("mistral_instruct", "</s>[INST] What color is it? [/INST]"),
                                         ("chatml_direct", "<|im_start|>user\nWhat color is it?<|im_end|>"
                                                           "<|im_start|>assistant\n")])
def test_generation_prompt_ends_with_assistant_prefix(name, ending):
    r = render(get_template(name), TWO_TURNS[:3], for_generation=True)
    assert r.text.endswith(ending)
    assert r.text == render(get_template(name), TWO_TURNS).text[:len(r.text)]
    assert len(r.answer_spans) == 1


def test_plain_generation_prompt_is_the_image():
    assert render(get_template("plain"), TWO_TURNS[:1], for_generation=True).text == "<image>"
    assert stop_strings(get_template("plain")) == ("\n",)
    assert stop_strings(get_template("vicuna_v1")) == ("</s>",)


@pytest.mark.parametrize("tok_name", ["tiny", "sp"])
@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("rounds", [1, 2, 3, 4])
@pytest.mark.parametrize("image_at", ["start", "middle", "end", "none"])
def test_labels_are_exactly_the_answers(tokenizers_, tok_name, name, rounds, image_at):
    tok, template = tokenizers_[tok_name], get_template(name)
    conv = _conversation(rounds, image_at)
    image_id = tok.convert_tokens_to_ids("<image>")
    if name == "plain" and rounds > 1:
        with pytest.raises(ValueError, match="one round"):
            tokenize_conversation(tok, template, conv, image_token_id=image_id, image_seq_len=S)
        return
    out = tokenize_conversation(tok, template, conv, image_token_id=image_id, image_seq_len=S)
    ids, labels = out.input_ids, out.labels
    assert len(ids) == len(labels)
    assert ids[0] == tok.bos_token_id and labels[0] == IGNORE_INDEX

    # images: one contiguous run of S ids, all unlabelled
    n_img = 0 if image_at == "none" else 1
    assert out.num_images == n_img
    pos = [i for i, t in enumerate(ids) if t == image_id]
    assert len(pos) == n_img * S
    if n_img:
        assert pos == list(range(pos[0], pos[0] + S))
        assert all(labels[i] == IGNORE_INDEX for i in pos)

    # labelled positions: one run per answer, ids equal to the answer + its stop tokenized on its own
    runs = _runs(labels)
    assert len(runs) == rounds
    rendered = render(template, conv).text
    for r, (a, b) in enumerate(runs):
        assert labels[a:b] == ids[a:b]
        target = ANSWERS[r] + ANSWER_END[name]
        if name == "plain" and n_img:     # the caption follows the <image> special token directly
            expected = tok("<image>" + target, add_special_tokens=False).input_ids[1:]
        elif template.style == "mpt":     # the answer follows the assistant role's newline: no word start
            role = tok(template.roles[1], add_special_tokens=False).input_ids
            both = tok(template.roles[1] + target, add_special_tokens=False).input_ids
            assert both[:len(role)] == role
            expected = both[len(role):]
        else:                             # the answer follows a space: it starts a word
            expected = tok(target, add_special_tokens=False).input_ids
        assert ids[a:b] == expected, (tok.convert_ids_to_tokens(ids[a:b]), rendered)
        assert tok.decode(ids[a:b]) == target
        if template.stop_is_eos:
            assert ids[b - 1] == tok.eos_token_id
        # the prompt the model sees at generation time is exactly the training prefix
        prompt = generation_prompt(tok, template, conv[:2 * r + 1], image_token_id=image_id, image_seq_len=S)
        assert prompt == ids[:a], (rendered, r)
    # the unlabelled part decodes back to the rendered text without the answers (spaces aside)
    unlabelled = [t for t, lab in zip(ids, labels, strict=True) if lab == IGNORE_INDEX and t != image_id]
    assert tok.decode(unlabelled, skip_special_tokens=True).replace(" ", "") == _masked_text(template, conv)


def _masked_text(template, conv):
    """The rendered text with answers, special tokens and spaces removed (for the decode check above)."""
    r = render(template, conv)
    text, last = "", 0
    for s, e in r.answer_spans:
        text += r.text[last:s]
        last = e
    text += r.text[last:]
    for special in ["<image>", "</s>", "<s>", *CHATML, " "]:
        text = text.replace(special, "")
    return text


def test_multiple_images_in_a_turn_and_generation(tokenizers_):
    tok = tokenizers_["tiny"]
    image_id = tok.convert_tokens_to_ids("<image>")
    conv = [{"from": "human", "value": "Compare <image> and <image> please."}]
    text = render(get_template("vicuna_v1"), conv, for_generation=True).text
    assert text.endswith("USER: <image>\n<image>\nCompare  and  please. ASSISTANT:")
    out = tokenize_conversation(tok, get_template("vicuna_v1"), conv, image_token_id=image_id,
                                image_seq_len=3, for_generation=True)
    assert out.num_images == 2 and out.input_ids.count(image_id) == 6
    assert all(lab == IGNORE_INDEX for lab in out.labels)
    # a different id for the image rows than the tokenizer's own <image> id is honoured
    other = tokenize_conversation(tok, get_template("vicuna_v1"), conv, image_token_id=len(tok) + 7,
                                  image_seq_len=3, for_generation=True)
    assert other.input_ids == [len(tok) + 7 if t == image_id else t for t in out.input_ids]


@pytest.mark.parametrize("conv,match", [
    ([], "non-empty"),
    ([{"from": "human", "value": "<image>\nHi"}], "no assistant turn"),
    (TWO_TURNS[:3], "ends on a human turn"),
    ([{"from": "gpt", "value": "Hi"}], "alternate"),
    ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "alternate"),
    ([{"from": "human", "value": "a"}, {"from": "system", "value": "b"}], "unknown role"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "<image>"}], "assistant answer contains"),
    ([{"from": "human", "value": 3}, {"from": "gpt", "value": "b"}], "must be a str"),
])
def test_bad_conversations(tokenizers_, conv, match):
    tok = tokenizers_["tiny"]
    for name in TEMPLATES:
        with pytest.raises(ValueError, match=match):
            tokenize_conversation(tok, get_template(name), conv, image_token_id=5, image_seq_len=2)


def test_bad_arguments(tokenizers_, tmp_path):
    tok = tokenizers_["tiny"]
    vicuna = get_template("vicuna_v1")
    with pytest.raises(ValueError, match="known"):
        get_template("vicuna")
    with pytest.raises(ValueError, match="ends on 'gpt'"):
        generation_prompt(tok, vicuna, TWO_TURNS, image_token_id=5, image_seq_len=2)
    with pytest.raises(ValueError, match="image_seq_len"):
        tokenize_conversation(tok, vicuna, TWO_TURNS, image_token_id=5, image_seq_len=0)
    with pytest.raises(ValueError, match="Template"):
        render("vicuna_v1", TWO_TURNS)
    # a text token that collides with the image id would be overwritten by image features
    with pytest.raises(ValueError, match="image token id"):
        tokenize_conversation(tok, vicuna, TWO_TURNS, image_token_id=tok.eos_token_id, image_seq_len=2)
    # vicuna's stop string must be the tokenizer's EOS token
    other_eos = AutoTokenizer.from_pretrained(tok.name_or_path, eos_token="<pad>")
    with pytest.raises(ValueError, match="EOS"):
        tokenize_conversation(other_eos, vicuna, TWO_TURNS, image_token_id=5, image_seq_len=2)


def test_straddling_tokens_raise():
    """Tokenizers that merge the stop string with the next role, or `<image>` with the space before it."""
    tok = _sp_tokenizer(["A cat on a sofa.###Human: What color is it?###Assistant: It is orange.###"] * 50)
    assert "▁sofa.###Human:" in tok.tokenize("A cat on a sofa.###Human: What")
    with pytest.raises(ValueError, match="straddles the boundary"):
        tokenize_conversation(tok, get_template("llava_v0"), TWO_TURNS, image_token_id=4, image_seq_len=2)
    no_image = _sp_tokenizer(["USER: <image> ASSISTANT: ok"] * 50, image_special=False)
    assert "▁<image>" in no_image.tokenize("USER: <image> ASSISTANT: ok")
    conv = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "ok"}]
    with pytest.raises(ValueError, match="straddles the '<image>'"):
        tokenize_conversation(no_image, get_template("vicuna_v1"), conv, image_token_id=3, image_seq_len=2)


def test_scienceqa_records_tokenize(tokenizers_, upstream_dir):
    """Real LLaVA-format records (multi-line questions, unicode, `<image>` first): labels = answers + stop."""
    with open(f"{upstream_dir}/scienceqa/llava_test_CQM-A.json", encoding="utf-8") as f:
        records = json.load(f)[:300]
    assert any("image" in r for r in records)
    for tok in tokenizers_.values():
        image_id = tok.convert_tokens_to_ids("<image>")
        for name in ("vicuna_v1", "llava_v0", "llava_llama_2"):
            for rec in records:
                conv = rec["conversations"]
                out = tokenize_conversation(tok, get_template(name), conv, image_token_id=image_id,
                                            image_seq_len=S)
                assert out.num_images == ("image" in rec)
                answer = [t for t, lab in zip(out.input_ids, out.labels, strict=True) if lab != IGNORE_INDEX]
                assert tok.decode(answer) == conv[1]["value"] + ANSWER_END[name], rec["id"]
