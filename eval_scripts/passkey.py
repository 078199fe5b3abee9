"""Passkey retrieval (the prompt of Landmark Attention and LongLoRA).

A 5-digit key sits at a relative ``depth`` of a long stretch of repeated filler; the model must
repeat it after "The pass key is". The prompt is built from token ids (each piece tokenized once),
with as many filler repetitions as fit in ``L`` tokens, so a prompt has between ``L - 24`` and ``L``
tokens (one filler repetition is ~24 tokens). The answer is read by greedy generation; it is correct
when the first number in the generated text is the key.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

__all__ = ["PasskeyPrompt", "build_prompt", "make_passkey", "read_answer", "generate_answer", "generate_with_cache",
           "min_prompt_length"]

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
NEW_TOKENS = 8


@dataclass(frozen=True)
class PasskeyPrompt:
    ids: list[int]
    passkey: str
    depth: float
    key_position: int  # token index where the key sentence starts


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def make_passkey(seed: int, length: int, depth: float, trial: int) -> str:
    """The same key for every pattern at one (length, depth, trial), different across them."""
    return str(random.Random(f"passkey-{seed}-{length}-{depth:.4f}-{trial}").randint(10000, 99999))


def min_prompt_length(tokenizer, prefix: list[int]) -> int:
    fixed = prefix + _encode(tokenizer, TASK) + _encode(tokenizer, KEY_LINE.format(key="12345"))
    return len(fixed) + len(_encode(tokenizer, QUESTION)) + len(_encode(tokenizer, FILLER))


def build_prompt(tokenizer, length: int, depth: float, passkey: str, prefix: list[int],
                 haystack: list[int] | None = None) -> PasskeyPrompt:
    """At most ``length`` tokens: task, filler, the key line at ``depth`` of the filler, filler, question.

    ``haystack``: token ids to hide the key in instead of the repeated filler (as many of its first tokens as
    fit, cut at ``depth`` of them): real text, which ``hf-sparse-calibrate`` mixes in.
    """
    head = prefix + _encode(tokenizer, TASK)
    key = _encode(tokenizer, KEY_LINE.format(key=passkey))
    question = _encode(tokenizer, QUESTION)
    room = length - len(head) - len(key) - len(question)
    if haystack is None:
        filler = _encode(tokenizer, FILLER)
        reps = max(room // len(filler), 0)
        before = round(depth * reps)
        body_before, body_after = filler * before, filler * (reps - before)
    else:
        body = list(haystack[:max(room, 0)])
        cut = round(depth * len(body))
        body_before, body_after = body[:cut], body[cut:]
    ids = head + body_before
    key_position = len(ids)
    ids += key + body_after + question
    return PasskeyPrompt(ids, passkey, depth, key_position)


def read_answer(text: str) -> str | None:
    """The first run of digits in the generated text."""
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


@torch.inference_mode()
def generate_answer(model, tokenizer, ids: list[int], device: torch.device, new_tokens: int = NEW_TOKENS) -> str:
    """Greedy continuation of the prompt, decoded."""
    return generate_with_cache(model, tokenizer, ids, device, new_tokens)[0]


@torch.inference_mode()
def generate_with_cache(model, tokenizer, ids: list[int], device: torch.device,
                        new_tokens: int = NEW_TOKENS) -> tuple[str, object]:
    """Greedy continuation of the prompt, decoded, and the KV cache ``generate`` kept (the one it builds by
    default: bounded layers for patched sliding-window and Longformer heads)."""
    input_ids = torch.tensor([ids], device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                         do_sample=False, temperature=None, top_p=None, top_k=None,
                         pad_token_id=pad, return_dict_in_generate=True)
    from hf_sparse.patches.cache import generated_cache

    return tokenizer.decode(out.sequences[0, input_ids.shape[1]:], skip_special_tokens=True), generated_cache(out)
