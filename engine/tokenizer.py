"""A tiny LLaMA-like tokenizer built locally (nothing downloaded), for demos and tests.

`build_tiny_tokenizer(out_dir)` trains a byte-fallback BPE with the `tokenizers` library and
writes an HF tokenizer directory (`tokenizer.json`, `tokenizer_config.json`,
`special_tokens_map.json`) that `transformers.AutoTokenizer.from_pretrained(out_dir)` loads
as a fast tokenizer. It mirrors the parts of LLaMA's tokenizer the engine depends on:

- ids 0, 1, 2 are `<unk>`, `<s>` (BOS), `</s>` (EOS); ids 3..258 are the byte tokens
  `<0x00>`..`<0xFF>` (byte fallback: every string is encodable, nothing maps to `<unk>`);
  then the learned pieces; then `<image>` and `<pad>` appended at the end, as the llava-hf
  checkpoints add them to the Vicuna vocabulary.
- SentencePiece-style spaces: a space becomes `▁` and merges with the following word
  (`" cat"` -> `"▁cat"`); a `▁` is prepended to the start of the text only
  (`prepend_scheme="first"`, as transformers' non-legacy LLaMA tokenizer does).
- BOS is added automatically by the post-processor; EOS is not (LLaMA's default).
- digits are split one by one (LLaMA's `split_digits`), and punctuation / newlines are
  isolated so template separators (`###`, `:`, `\\n`) never merge with their neighbours.

The output is deterministic: the same corpus and vocab size give byte-identical files.
"""
from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

UNK, BOS, EOS, PAD, IMAGE = "<unk>", "<s>", "</s>", "<pad>", "<image>"
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
_N_HEAD = 3 + len(BYTE_TOKENS)     # <unk>, <s>, </s>, bytes
_N_TAIL = 2                        # <image>, <pad>

_COLOURS = ["red", "blue", "green", "yellow", "orange", "purple", "black", "white", "grey", "pink", "brown"]
_SHAPES = ["circle", "square", "triangle", "star", "hexagon", "rectangle", "diamond", "cross", "oval"]
_SIZES = ["small", "large", "tiny", "big", "medium-sized"]
_PLACES = ["top left", "top right", "bottom left", "bottom right", "center", "left edge", "right edge"]
_RELATIONS = ["above", "below", "to the left of", "to the right of", "next to", "inside", "near"]
_ANIMALS = ["cat", "dog", "bird", "horse", "cow", "sheep", "zebra", "giraffe", "elephant", "bear", "person",
            "man", "woman", "child", "group of people"]
_OBJECTS = ["sofa", "table", "chair", "bed", "car", "bus", "train", "bicycle", "boat", "kite", "umbrella",
            "bench", "street", "kitchen", "window", "plate", "pizza", "banana", "laptop", "book", "clock"]
_VERBS = ["sitting", "standing", "lying", "running", "walking", "sleeping", "eating", "looking", "playing"]
_QUESTIONS = [
    "What is in the image?", "What color is the {s}?", "How many shapes are there?",
    "Where is the {c} {s}?", "Describe the image in detail.", "Is there a {c} {s} in the picture?",
    "What shape is {p}?", "Which shape is the largest?", "What is the relation between the shapes?",
]
# The words the conversation templates put around every turn, so that they are common pieces.
_TEMPLATE_TEXT = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions.",
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions.",
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language.",
    "USER: ASSISTANT: ### Human: ### Assistant: [INST] <<SYS>> <</SYS>> [/INST]",
    "The answer is A. The answer is B. The answer is C. The answer is D. Context: Options: N/A",
]


def default_corpus(n_sentences: int = 3000, seed: int = 0) -> list[str]:
    """English-like sentences about coloured shapes, plus the conversation-template words.

    Deterministic for a given (n_sentences, seed).
    """
    rng = random.Random(seed)
    lines = list(_TEMPLATE_TEXT) * 20
    for _ in range(n_sentences):
        c, c2 = rng.choice(_COLOURS), rng.choice(_COLOURS)
        s, s2 = rng.choice(_SHAPES), rng.choice(_SHAPES)
        a, o = rng.choice(_ANIMALS), rng.choice(_OBJECTS)
        kind = rng.randrange(7)
        if kind == 0:
            line = f"There is a {rng.choice(_SIZES)} {c} {s} in the {rng.choice(_PLACES)} of the image."
        elif kind == 1:
            line = f"The {c} {s} is {rng.choice(_RELATIONS)} the {c2} {s2}."
        elif kind == 2:
            line = f"I can see {rng.randint(1, 12)} shapes: a {c} {s} and a {c2} {s2}."
        elif kind == 3:
            line = rng.choice(_QUESTIONS).format(c=c, s=s, p=rng.choice(_PLACES))
        elif kind == 4:
            line = f"A {a} is {rng.choice(_VERBS)} on the {o} next to a {c} {rng.choice(_OBJECTS)}."
        elif kind == 5:
            line = f"What is the {a} doing? The {a} is {rng.choice(_VERBS)} near the {c} {o}."
        else:
            line = (f"In this picture, a {rng.choice(_SIZES)} {s} painted {c} sits {rng.choice(_RELATIONS)} "
                    f"a {s2}; it measures {rng.randint(1, 500)} pixels across.")
        lines.append(line)
    return lines


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
        pre_tokenizers.Digits(individual_digits=True),
        # Everything that is neither a word character nor the space marker stands alone.
        pre_tokenizers.Split(Regex(r"[^\w▁]"), behavior="isolated"),
    ])


def build_tiny_tokenizer(out_dir: str, corpus: Iterable[str] | None = None, vocab_size: int = 768) -> str:
    """Train a small LLaMA-like BPE tokenizer and save it as an HF tokenizer directory.

    Args:
        out_dir: directory to write (created if missing; existing tokenizer files are replaced).
        corpus: training text, one string per line; `default_corpus()` when None.
        vocab_size: total vocabulary size including the 3 leading specials, the 256 byte
            tokens and `<image>`/`<pad>`; the learned part may come out smaller when the corpus
            has too few distinct merges. Must be in [300, 65536].
    Returns:
        `out_dir`.
    Raises:
        ValueError: vocab_size out of range, or an empty corpus.
    """
    if not isinstance(vocab_size, int) or not 300 <= vocab_size <= 65536:
        raise ValueError(f"vocab_size must be an int in [300, 65536], got {vocab_size!r}")
    lines = default_corpus() if corpus is None else [str(x) for x in corpus]
    if not any(line.strip() for line in lines):
        raise ValueError("build_tiny_tokenizer: the corpus is empty")

    # 1) learn pieces and merges on Metaspace-split words (merges never cross a space).
    learner = Tokenizer(models.BPE(unk_token=UNK))
    learner.pre_tokenizer = _pre_tokenizer()
    learner.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=vocab_size - _N_HEAD - _N_TAIL, show_progress=False, special_tokens=[]))
    learned = json.loads(learner.to_str())["model"]
    pieces = sorted(learned["vocab"].items(), key=lambda kv: kv[1])

    # 2) LLaMA's id layout: <unk> <s> </s> <0x00>..<0xFF> pieces..., then <image> <pad>.
    vocab = {UNK: 0, BOS: 1, EOS: 2}
    for tok in BYTE_TOKENS:
        vocab[tok] = len(vocab)
    for piece, _ in pieces:
        if piece not in vocab:
            vocab[piece] = len(vocab)
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK, byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (UNK, BOS, EOS)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (IMAGE, PAD)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, vocab[BOS])])

    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD,
                "additional_special_tokens": [IMAGE]}
    config = {
        # The generic fast class: it keeps the pipeline of tokenizer.json as written (transformers
        # v5's LlamaTokenizer would rebuild its own pre-tokenizer from the vocabulary instead).
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 4096,
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,
        **specials,
    }
    for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", specials)):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")
    return out_dir
