"""Text in, text out: the checkpoint's template and tokenizer around ``engine.generate``.

``chat(model, messages, images, tokenizer=...)`` renders the messages with a conversation
template, expands each image into the placeholder rows, preprocesses the PIL images, generates,
and decodes until the template's stop string. The server (engine/serve.py) uses the same
``encode_chat`` and ``TextDecoder``, so its completions equal ``chat``'s output exactly.

Messages: ``[{"role": "system" | "user" | "assistant", "content": str}]`` — an optional system
message first (it replaces the template's system text), then user and assistant turns
alternating, ending on a user turn. ``<image>`` in a user message marks where an image goes;
with no marker at all, the images go to the start of the first user message (LLaVA's habit).

Several images: one ``<image>`` marker per image, in order (a marker without its image, or an image
without its marker when others have one, is a ValueError). With AnyRes each image expands to its own
number of rows (``LlavaConfig.image_rows`` of its size) and tiles.

CLI: ``python -m engine.chat --model DIR [--image FILE ...] [--adapter LORA_DIR | --quantize int8] "question"``
(``--image`` repeats).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys

import torch

from engine.cli import run_main
from engine.conversation import IMAGE_TOKEN, Template, generation_prompt, get_template, stop_strings
from engine.generate import Runtime, generate
from engine.image import ImageSpec
from engine.model import Llava
from engine.quantize import SCHEMES
from engine.weights import check_adapter

_ROLES = {"user": "human", "assistant": "gpt"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # --dtype names


def to_conversation(messages) -> tuple[str | None, list[dict]]:
    """OpenAI-style messages → (system text or None, LLaVA turns ``[{"from", "value"}]``).

    ValueError naming the message when a role or content is malformed.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} objects")
    system, turns = None, []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be an object with a string 'content'")
        role = m.get("role")
        if role == "system":
            if i != 0:
                raise ValueError(f"messages[{i}]: a system message must come first")
            system = m["content"]
        elif role in _ROLES:
            turns.append({"from": _ROLES[role], "value": m["content"]})
        else:
            raise ValueError(f"messages[{i}]: unknown role {role!r} (expected system, user or assistant)")
    if not any(t["from"] == "human" for t in turns):
        raise ValueError("messages hold no user message")
    return system, turns


def encode_chat(tokenizer, template: Template, messages, images: list, model: Llava,
                image_spec: ImageSpec | None = None) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None]:
    """Prompt token ids (each image's placeholders expanded to its ``cfg.image_rows(h, w)`` rows), the
    pixels of all images' tiles [ΣK, 3, S, S] and their sizes [N, 2] (height, width) — None, None
    without images — ready for ``engine.generate(images=, image_sizes=)``.

    ``images``: PIL images in the order of their ``<image>`` markers. ValueError when the markers
    and images disagree, or the conversation is malformed (see engine/conversation.py).
    """
    system, turns = to_conversation(messages)
    if system is not None:
        template = dataclasses.replace(template, system=system)
    marks = sum(t["value"].count(IMAGE_TOKEN) for t in turns)
    if images and marks == 0:
        first = next(i for i, t in enumerate(turns) if t["from"] == "human")
        turns[first] = {"from": "human", "value": IMAGE_TOKEN * len(images) + turns[first]["value"]}
    elif marks != len(images):
        raise ValueError(f"the messages mark {marks} {IMAGE_TOKEN} placeholders but {len(images)} images "
                         "were given")
    cfg = model.config
    spec = image_spec or ImageSpec.from_config(cfg)
    if spec.pinpoints != cfg.image_grid_pinpoints:
        raise ValueError(f"the image preprocessing's pinpoints {spec.pinpoints} differ from the model's "
                         f"image_grid_pinpoints {cfg.image_grid_pinpoints}")
    rows = [cfg.image_rows(im.height, im.width) for im in images]
    ids = generation_prompt(tokenizer, template, turns, image_token_id=cfg.image_token_id, image_seq_len=rows)
    if not images:
        return ids, None, None
    pixels = torch.cat([spec.preprocess_image(im) for im in images])
    sizes = torch.tensor([[im.height, im.width] for im in images], dtype=torch.long)
    return ids, pixels, sizes


def stop_token_ids(tokenizer, model: Llava) -> list[int]:
    """The checkpoint's EOS and the tokenizer's (usually the same id)."""
    ids = {model.config.text.eos_token_id, tokenizer.eos_token_id}
    return sorted(i for i in ids if i is not None)


class TextDecoder:
    """Incremental detokenization that stops at the first stop string.

    Text is committed in pieces (the offsets scheme of vLLM's detokenizer): a piece is the text
    the newest tokens add to the last committed ones, taken once it does not end in an
    incomplete character (U+FFFD); committed text never changes afterwards, so a streamed
    answer and a collected one are the same string. ``push(token)`` returns the newly
    committed text that is safe to show — a tail that could start a stop string is held back;
    ``finish()`` flushes the rest when generation ends without a stop string. ``text`` is the
    answer so far (the final answer after ``finish`` or a stop), the stop string excluded.
    """

    def __init__(self, tokenizer, stops: tuple[str, ...] | list[str] = ()):
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        self.ids: list[int] = []
        self.text = ""           # committed text (the stop string and what follows it cut off)
        self.sent = ""           # the prefix of ``text`` already returned
        self.stopped = False
        self._prefix = self._read = 0   # ids[_prefix:_read] are the last committed piece's tokens

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _commit(self, force: bool) -> str:
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and (force or not after.endswith("\ufffd")):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
        cuts = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.stopped = True
            self.text = self.text[:min(cuts)]
            return self._emit(len(self.text))
        if force:
            return self._emit(len(self.text))
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return self._emit(len(self.text) - hold)

    def _emit(self, upto: int) -> str:
        delta = self.text[len(self.sent):upto]
        self.sent += delta
        return delta

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        return self._commit(force=False)

    def finish(self) -> str:
        return "" if self.stopped else self._commit(force=True)


def chat(model: Llava, messages, images: list | None = None, *, tokenizer,
         template: Template | str = "vicuna_v1", image_spec: ImageSpec | None = None,
         max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
         repetition_penalty: float = 1.0, seed: int | None = None, runtime: Runtime | None = None) -> str:
    """One assistant answer for ``messages`` (see the module docstring) and PIL ``images``.

    Stops at the EOS token, the template's stop string or ``max_new_tokens``; returns the text
    before the stop. ValueError for malformed messages, images or settings.
    """
    template = get_template(template) if isinstance(template, str) else template
    images = list(images or [])
    ids, pixels, sizes = encode_chat(tokenizer, template, messages, images, model, image_spec)
    decoder = TextDecoder(tokenizer, stop_strings(template))
    events = generate(model, [ids], images=pixels, image_sizes=sizes, max_new_tokens=max_new_tokens,
                      temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
                      stop_token_ids=stop_token_ids(tokenizer, model), seed=seed, stream=True,
                      runtime=runtime)
    with contextlib.closing(events):
        for ev in events:
            if ev.token is not None:
                decoder.push(ev.token)
                if decoder.stopped:
                    break
    decoder.finish()
    return decoder.text


def load_model(path: str, *, device: str | None = None, dtype: str | None = None,
               quantize: str | None = None, adapter: str | None = None) -> Llava:
    """``engine.load`` for the command lines, in eval mode: ``dtype`` is a name in ``DTYPES`` (None keeps
    the checkpoint's); ``quantize`` "int8" | "int4" (weight-only, engine.quantize); ``adapter`` a PEFT LoRA
    adapter directory trained on ``path`` (engine/lora.py), served unmerged. ValueError naming an unknown
    dtype; engine.load's errors for the checkpoint and the adapter."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    import engine
    return engine.load(path, device=device, dtype=DTYPES[dtype] if dtype else None, quantize=quantize,
                       adapter=adapter).eval()


def load_tokenizer(path: str):
    """The checkpoint directory's own HF tokenizer (FileNotFoundError when it has none)."""
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model")):
        raise FileNotFoundError(f"{path} has no tokenizer (tokenizer.json or tokenizer.model)")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def image_spec_for(path: str, model: Llava) -> ImageSpec:
    """The checkpoint's preprocessor_config.json when present (its pinpoints, else the model's), else the
    tower's image size and the model's pinpoints."""
    if os.path.isfile(os.path.join(path, "preprocessor_config.json")):
        spec = ImageSpec.from_hf_dir(path)
        if not spec.pinpoints and model.config.anyres:
            spec = dataclasses.replace(spec, pinpoints=model.config.image_grid_pinpoints)
        return spec
    return ImageSpec.from_config(model.config)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.chat",
                                description="Ask a LLaVA checkpoint one question.")
    p.add_argument("question", help="the user message: one <image> marker per --image "
                   "where each goes, or none (the images then go before it)")
    p.add_argument("--model", required=True, help="checkpoint directory (HF llava layout with a tokenizer)")
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    p.add_argument("--template", default="vicuna_v1")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=tuple(DTYPES))
    p.add_argument("--quantize", default=None, choices=SCHEMES, help="weight-only quantized decoder linears")
    p.add_argument("--adapter", default=None,
                   help="a LoRA adapter directory trained on --model (train.stage2 --lora), applied unmerged")
    args = p.parse_args(argv)
    print(json.dumps({"config": vars(args)}), file=sys.stderr)
    check_adapter(args.model, args.adapter, args.quantize)   # before any image or weight is read

    from PIL import Image

    images = []
    for f in args.image:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"--image {f}: no such file")
        images.append(Image.open(f).convert("RGB"))
    model = load_model(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize,
                       adapter=args.adapter)
    text = chat(model, [{"role": "user", "content": args.question}], images,
                tokenizer=load_tokenizer(args.model), template=args.template,
                image_spec=image_spec_for(args.model, model), max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    print(text)
    return 0


if __name__ == "__main__":
    run_main(main)
