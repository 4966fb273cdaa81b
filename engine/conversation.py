"""Conversation templates, tokenization with `<image>` expansion, and assistant-span labels.

A conversation is a LLaVA record's `conversations` list: `[{"from": "human"|"gpt", "value": str}, ...]`,
starting with a human turn and alternating. Templates reproduce upstream LLaVA's
`llava/conversation.py` `get_prompt()` strings exactly:

- `vicuna_v1` (LLaVA-1.5): `"<system> USER: <image>\\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT: A2</s>"`
- `llava_v0` (paper):      `"<system>###Human: <image>\\nQ###Assistant: A###Human: ..."`
- `plain` (stage 1):       `"<image>" + caption + "\\n"`; the instruction is dropped, one round only.
- `llava_llama_2`:         `"[INST] <<SYS>>\\n<system>\\n<</SYS>>\\n\\n<image>\\nQ [/INST] A </s>"`, then
                           `"<s>[INST] Q2 [/INST] A2 </s>"` per further round.
- `mistral_instruct` (LLaVA-1.6 Mistral): `"[INST] <image>\nQ [/INST] A </s>[INST] Q2 [/INST] A2 </s>"`.
- `chatml_direct` (LLaVA-1.6 34B): `"<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n
                           <image>\nQ<|im_end|><|im_start|>assistant\nA<|im_end|>..."` (no newline after
                           `<|im_end|>`, as upstream's MPT style writes it).

`<image>` is moved to the front of its human turn (`"<image>\\n" + rest`, stripped), as upstream's
`preprocess_multimodal` does; a turn with k images gets k placeholders (upstream would keep one).

Labels: the tokens of every assistant answer and of its stop string (`</s>` = the tokenizer's EOS,
`###`, or `\\n`) keep their ids; BOS, system text, human turns, role prefixes and image rows are
-100 (HF convention: labels are aligned with input_ids, the loss code shifts). Answer tokens are
found from the fast tokenizer's character offsets on the whole rendered text, so the ids are exactly
those the model sees at generation time; a token that straddles an answer or `<image>` boundary
with non-whitespace on the other side is an inconsistency and raises ValueError (never upstream's
silent "mask the whole sample"). The whitespace between the assistant prefix and the answer
(`"ASSISTANT: A"`) is labelled with the answer: a generation prompt ends at `"ASSISTANT:"`, so the
model generates that space, whether a SentencePiece tokenizer merges it into the first word
(`" A"` -> `"▁A"`) or emits it alone (`" 3"` -> `"▁"`, `"3"` with split digits).

Sizes: T = tokens of the rendered text after image expansion; S = image_seq_len rows per image
(one int for all images, or one per image in marker order: AnyRes images differ).
"""
from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100
HUMAN, GPT = "human", "gpt"
_STYLES = ("two", "single", "plain", "llama_2", "mpt")


@dataclass(frozen=True, kw_only=True)
class Template:
    """One conversation format.

    style: "two" (separator after human turns, `sep2` after answers), "single" (`sep` after every
    turn), "plain" (image + answer + `sep`), "llama_2" (`[INST] ... [/INST] answer </s><s>...`), "mpt"
    (ChatML: `system sep`, then `role + text + sep` per turn, the roles ending in a newline).
    stop: the string that ends an assistant answer; it is part of the labels.
    """
    name: str
    style: str
    system: str
    roles: tuple[str, str]        # (user, assistant)
    sep: str
    sep2: str
    stop: str

    def __post_init__(self):
        if self.style not in _STYLES:
            raise ValueError(f"Template {self.name!r}: style must be one of {_STYLES}, got {self.style!r}")

    @property
    def stop_is_eos(self) -> bool:
        """Answers end with the EOS token itself (the tokenizer's eos_token must be `stop`)."""
        return self.stop == "</s>"


TEMPLATES: dict[str, Template] = {t.name: t for t in (
    Template(
        name="vicuna_v1", style="two",
        system="A chat between a curious user and an artificial intelligence assistant. "
               "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        roles=("USER", "ASSISTANT"), sep=" ", sep2="</s>", stop="</s>"),
    Template(
        name="llava_v0", style="single",
        system="A chat between a curious human and an artificial intelligence assistant. "
               "The assistant gives helpful, detailed, and polite answers to the human's questions.",
        roles=("Human", "Assistant"), sep="###", sep2="###", stop="###"),
    Template(
        name="plain", style="plain", system="", roles=("", ""), sep="\n", sep2="\n", stop="\n"),
    Template(
        name="llava_llama_2", style="llama_2",
        system="You are a helpful language and vision assistant. You are able to understand the visual "
               "content that the user provides, and assist the user with a variety of tasks using natural "
               "language.",
        roles=("USER", "ASSISTANT"), sep="<s>", sep2="</s>", stop="</s>"),
    Template(   # LLaVA-1.6 Mistral-7B: llama_2 without a system prompt and without "<s>" between rounds
        name="mistral_instruct", style="llama_2", system="", roles=("USER", "ASSISTANT"), sep="", sep2="</s>",
        stop="</s>"),
    Template(   # LLaVA-1.6 34B (Nous-Hermes-2-Yi): ChatML; the tokenizer must know <|im_start|>/<|im_end|>
        name="chatml_direct", style="mpt", system="<|im_start|>system\nAnswer the questions.",
        roles=("<|im_start|>user\n", "<|im_start|>assistant\n"), sep="<|im_end|>", sep2="<|im_end|>",
        stop="<|im_end|>"),
)}


def get_template(name: str) -> Template:
    """The template called `name`; ValueError listing the known names otherwise."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def stop_strings(template: Template) -> tuple[str, ...]:
    """Strings that end an assistant answer in generation (the template's stop string)."""
    return (template.stop,)


@dataclass(frozen=True)
class Rendered:
    """The prompt text and the [start, end) character span of each assistant answer + its stop."""
    text: str
    answer_spans: list[tuple[int, int]]


@dataclass(frozen=True)
class TokenizedConversation:
    """input_ids and labels have the same length T; labels are -100 outside the answer spans."""
    input_ids: list[int]
    labels: list[int]
    num_images: int


def _check_template(template) -> None:
    if not isinstance(template, Template):
        raise ValueError(f"expected a Template (use get_template(name)), got {type(template).__name__}")


def _turns(conversations, for_generation: bool) -> list[str]:
    """Validate the turns and return their values, `<image>` moved to the front of human turns."""
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise ValueError("conversation must be a non-empty list of {'from', 'value'} turns")
    values = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"turn {i}: expected a dict with 'from' and 'value', got {turn!r}")
        role, value = turn["from"], turn["value"]
        if role not in (HUMAN, GPT):
            raise ValueError(f"turn {i}: unknown role {role!r} (expected 'human' or 'gpt')")
        expected = HUMAN if i % 2 == 0 else GPT
        if role != expected:
            raise ValueError(f"turn {i}: roles must alternate starting with 'human'; got {role!r}, "
                             f"expected {expected!r}")
        if not isinstance(value, str):
            raise ValueError(f"turn {i}: 'value' must be a str, got {type(value).__name__}")
        n_img = value.count(IMAGE_TOKEN)
        if role == GPT and n_img:
            raise ValueError(f"turn {i}: an assistant answer contains {IMAGE_TOKEN!r}")
        if n_img:
            value = (IMAGE_TOKEN + "\n") * n_img + value.replace(IMAGE_TOKEN, "").strip()
            value = value.strip()
        values.append(value)
    last = conversations[-1]["from"]
    if for_generation and last != HUMAN:
        raise ValueError("a generation prompt must end on a human turn; this conversation ends on 'gpt'")
    if not for_generation and last != GPT:
        raise ValueError("a training conversation must end on an assistant ('gpt') turn; this one ends on "
                         "a human turn" + ("" if len(conversations) > 1 else " and has no assistant turn"))
    return values


def render(template: Template, conversations, *, for_generation: bool = False) -> Rendered:
    """The template's text for a conversation, and the character span of every answer + stop string.

    for_generation: the conversation ends on a human turn and the text ends with the assistant
    prefix (`" ASSISTANT:"`, `"###Assistant:"`, `" [/INST]"`; plain: the image placeholders).
    Raises ValueError: empty list, unknown role, roles not alternating from 'human', ending on the
    wrong role, `<image>` in an answer, more than one round for `plain`.
    """
    _check_template(template)
    values = _turns(conversations, for_generation)
    user, assistant = template.roles
    spans: list[tuple[int, int]] = []
    text = ""

    def answer(prefix: str, value: str, suffix: str) -> None:
        nonlocal text
        text += prefix
        start = len(text)
        text += value + suffix
        spans.append((start, len(text)))

    if template.style == "plain":
        if len(values) > 2:
            raise ValueError(f"the plain template takes one round (image, caption); got {len(values)} turns")
        text = IMAGE_TOKEN * values[0].count(IMAGE_TOKEN)      # the instruction is dropped
        if len(values) == 2:
            answer("", values[1], template.sep)
    elif template.style in ("two", "single"):
        end_answer = template.sep2 if template.style == "two" else template.sep
        text = template.system + template.sep
        for i, value in enumerate(values):
            if i % 2 == 0:
                text += f"{user}: {value}{template.sep}"
            else:
                answer(f"{assistant}: ", value, end_answer)
        if for_generation:
            text += f"{assistant}:"
    elif template.style == "mpt":
        text = template.system + template.sep
        for i, value in enumerate(values):
            if i % 2 == 0:
                text += user + value + template.sep
            else:
                answer(assistant, value, template.sep)
        if for_generation:
            text += assistant
    else:  # llama_2
        for i, value in enumerate(values):
            if i % 2 == 0:
                if i == 0 and template.system:
                    value = f"<<SYS>>\n{template.system}\n<</SYS>>\n\n{value}"
                text += ("" if i == 0 else template.sep) + f"[INST] {value} [/INST]"
            else:
                answer(" ", value, " " + template.sep2)
    return Rendered(text, spans)


def _span_at(spans: list[tuple[int, int]], starts: list[int], a: int, b: int) -> int:
    """Index of the span overlapping the characters [a, b) (for a == b: containing a), or -1."""
    k = bisect.bisect_right(starts, max(a, b - 1)) - 1
    if k < 0:
        return -1
    s, e = spans[k]
    return k if (a < e and b > s) or (a == b and s <= a < e) else -1


def _where(tokenizer, text: str, tid: int, a: int, b: int) -> str:
    return f"token {tokenizer.convert_ids_to_tokens(tid)!r} at characters {a}:{b} of {text!r}"


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _check_rows(image_seq_len) -> None:
    if _is_count(image_seq_len):
        return
    if isinstance(image_seq_len, (str, bytes)) or not isinstance(image_seq_len, Sequence):
        raise ValueError(f"image_seq_len must be a positive int or a sequence of them (rows per image), "
                         f"got {image_seq_len!r}")
    for i, v in enumerate(image_seq_len):
        if not _is_count(v):
            raise ValueError(f"image_seq_len[{i}] must be a positive int, got {v!r}")


def _rows_per_image(image_seq_len: int | Sequence[int], n_images: int) -> list[int]:
    """Rows of each `<image>` marker, in order (image_seq_len already checked by `_check_rows`)."""
    if isinstance(image_seq_len, int):
        return [image_seq_len] * n_images
    if len(image_seq_len) != n_images:
        raise ValueError(f"image_seq_len gives rows for {len(image_seq_len)} images but the conversation has "
                         f"{n_images} {IMAGE_TOKEN!r} markers")
    return list(image_seq_len)


def tokenize_conversation(tokenizer, template: Template, conversations, *, image_token_id: int,
                          image_seq_len: int | Sequence[int],
                          for_generation: bool = False) -> TokenizedConversation:
    """Token ids and labels of a conversation, each `<image>` expanded to its rows.

    image_seq_len: an int = every image has that many rows (S); a sequence = rows per image in
    `<image>` marker order (AnyRes: ``LlavaConfig.image_rows(h, w)`` of each image).

    tokenizer: the checkpoint's own HF fast tokenizer (offsets are needed); BOS is added as the
    tokenizer adds it. Labels (aligned with input_ids) keep the ids of the answer tokens and their
    stop tokens; everything else is -100.
    Raises ValueError: bad conversation (see `render`), a slow tokenizer, a stop string `</s>` that is
    not the tokenizer's single EOS token, a token straddling an answer or `<image>` boundary, a text
    token equal to image_token_id, an answer with no token, image_seq_len not a positive int nor a
    sequence of them with one entry per `<image>` marker.
    """
    _check_template(template)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenize_conversation needs a fast tokenizer (character offsets); got "
                         f"{type(tokenizer).__name__}")
    if not isinstance(image_token_id, int) or image_token_id < 0:
        raise ValueError(f"image_token_id must be a non-negative int, got {image_token_id!r}")
    _check_rows(image_seq_len)
    eos_id = None
    if template.stop_is_eos:
        if tokenizer.eos_token != template.stop or tokenizer.eos_token_id is None:
            raise ValueError(f"template {template.name!r} ends answers with {template.stop!r}, but the "
                             f"tokenizer's EOS token is {tokenizer.eos_token!r}")
        eos_id = tokenizer.eos_token_id

    rendered = render(template, conversations, for_generation=for_generation)
    text, answers = rendered.text, rendered.answer_spans
    images = [(m.start(), m.end()) for m in re.finditer(re.escape(IMAGE_TOKEN), text)]
    rows = _rows_per_image(image_seq_len, len(images))
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets, seq_ids = enc["input_ids"], enc["offset_mapping"], enc.sequence_ids(0)
    # Label spans: each answer + stop, extended left over the whitespace the model generates first
    # (none for "mpt": its assistant role ends with the newline, which the generation prompt holds).
    if template.style != "mpt":
        answers = [(len(text[:s].rstrip()), e) for s, e in answers]

    ans_starts, img_starts = [s for s, _ in answers], [s for s, _ in images]
    input_ids: list[int] = []
    labels: list[int] = []
    last_image = -1
    answer_tokens: list[list[tuple[int, int, int]]] = [[] for _ in answers]   # (id, a, b) per answer
    for tid, (a, b), sid in zip(ids, offsets, seq_ids, strict=True):
        if sid is not None:
            k = _span_at(images, img_starts, a, b)
            if k >= 0:
                s, e = images[k]
                if a < s or b > e or a == b:
                    raise ValueError(f"{_where(tokenizer, text, tid, a, b)} straddles the {IMAGE_TOKEN!r} at "
                                     f"{s}:{e}; add {IMAGE_TOKEN!r} to the tokenizer as a special token")
                if k != last_image:        # the first token of this placeholder emits all its rows
                    if k != last_image + 1:
                        raise ValueError(f"{IMAGE_TOKEN!r} placeholders tokenized out of order at "
                                         f"{_where(tokenizer, text, tid, a, b)}")
                    input_ids += [image_token_id] * rows[k]
                    labels += [IGNORE_INDEX] * rows[k]
                    last_image = k
                continue
        if tid == image_token_id:
            raise ValueError(f"{_where(tokenizer, text, tid, a, b)} has the image token id {image_token_id} "
                             f"but is not an {IMAGE_TOKEN!r} placeholder")
        k = -1 if sid is None else _span_at(answers, ans_starts, a, b)
        if k >= 0:
            s, e = answers[k]
            if a < s and text[a:s].strip() or b > e and text[e:b].strip():
                raise ValueError(f"{_where(tokenizer, text, tid, a, b)} straddles the boundary of the "
                                 f"assistant answer at {s}:{e}; labels would be ambiguous")
            answer_tokens[k].append((tid, a, b))
        input_ids.append(tid)
        labels.append(tid if k >= 0 else IGNORE_INDEX)

    if last_image != len(images) - 1:
        raise ValueError(f"{len(images)} {IMAGE_TOKEN!r} placeholders in the text but only {last_image + 1} "
                         f"were found in the tokenization")
    for k, ((s, e), toks) in enumerate(zip(answers, answer_tokens, strict=True)):
        if not toks:
            raise ValueError(f"assistant answer {k} ({text[s:e]!r}) has no token")
        if eos_id is not None and toks[-1] != (eos_id, e - len(template.stop), e):
            last = tokenizer.convert_ids_to_tokens(toks[-1][0])
            raise ValueError(f"assistant answer {k} must end with the single EOS token {template.stop!r} "
                             f"(id {eos_id}); the tokenizer ends it with {last!r} at "
                             f"{toks[-1][1]}:{toks[-1][2]}")
    return TokenizedConversation(input_ids, labels, len(images))


def generation_prompt(tokenizer, template: Template, messages, *, image_token_id: int,
                      image_seq_len: int | Sequence[int]) -> list[int]:
    """Token ids of a prompt that ends on a human turn, ending with the assistant prefix.

    Same tokenization as `tokenize_conversation` (images expanded), so a prompt's ids equal the
    prefix of the training ids of the same conversation up to the answer. ValueError as there.
    """
    return tokenize_conversation(tokenizer, template, messages, image_token_id=image_token_id,
                                 image_seq_len=image_seq_len, for_generation=True).input_ids
