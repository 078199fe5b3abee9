"""Helpers shared by the test modules (imported as ``from helpers import ...``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from hf_sparse import BigBird, Dense, Fixed, Longformer, Pattern, PerHead, SlidingWindow, Strided
from hf_sparse.patterns import option

# the Triton kernels' CPU tests run in Triton's interpreter (TRITON_INTERPRET=1) on machines without CUDA
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()
try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

needs_interpreter = pytest.mark.skipif(
    not (HAS_TRITON and INTERPRET and not HAS_CUDA), reason="needs TRITON_INTERPRET=1 on a machine without CUDA"
)


def padded_rows(b: int, t: int, right: int) -> torch.Tensor:
    """A ``[b, t]`` key padding mask (``b >= 3``): row 0 left-padded by 7, row 1 right-padded from ``right``, row 2
    padded on both sides (3 and the last 3); later rows unpadded."""
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, :7] = False
    mask[1, right:] = False
    mask[2, :3] = False
    mask[2, t - 3:] = False
    return mask


def pid(p) -> str:
    """Short readable test id: ``sw3``, ``lf4-g2-noncausal``, ``bb16-wb2-gb1-rb2`` ..."""
    if isinstance(p, Dense):
        s = "dense"
    elif isinstance(p, SlidingWindow):
        s = f"sw{p.window}"
    elif isinstance(p, Longformer):
        s = f"lf{p.window}-g{p.global_tokens}"
    elif isinstance(p, BigBird):
        s = f"bb{p.block}-wb{p.window_blocks}-gb{p.global_blocks}-rb{p.random_blocks}" + (
            f"-s{p.seed}" if p.seed else ""
        )
    else:  # any other pattern: its spec, shortened
        s = p.spec().replace("sliding_window", "sw").replace("causal=true", "").replace("window", "w")
        s = "".join(c if c.isalnum() else "-" for c in s).strip("-")
        while "--" in s:
            s = s.replace("--", "-")
    return s if p.causal else s + "-noncausal"


WORDS = ("the river ran past old stone walls while merchants argued about prices and weather in a town where "
         "every street had a name and every name had a story that children learned before they could read").split()


def sentences(seed: int, n: int) -> str:
    """``n`` random sentences of :data:`WORDS`, reproducible from ``seed``."""
    import random

    rng = random.Random(seed)
    return " ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + "."
                    for _ in range(n))


def save_tiny_llama(folder, texts: list[str], *, vocab_size: int, max_positions: int) -> None:
    """A byte-level BPE tokenizer trained on ``texts`` (BOS in front, like Llama's) and a 2-layer random
    Llama (4 query / 2 KV heads) saved together in ``folder``: a model source for the commands, offline."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(folder)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)


# strided and fixed patterns, unions and a per-head plan: the composed cases of the layout and reference tests
COMPOSED = [
    Strided(stride=5, window=3),
    Strided(stride=16, window=1),
    Fixed(block=16, summary=3),
    Fixed(block=6, summary=2),  # no power of two: predicate only
    SlidingWindow(window=9) | Strided(stride=7, window=1),
    Longformer(window=5, global_tokens=2) | BigBird(block=16, window_blocks=1, global_blocks=0, random_blocks=2),
    PerHead(SlidingWindow(window=9), ((0, Dense()), (1, Strided(stride=6, window=2)))),
]


@dataclass(frozen=True)
class Parity(Pattern):
    """Predicate only (no primitives): keys at an even distance. Tests register it as a user would."""

    causal: bool = option(True)
    name = "parity_test"

    def allowed(self, q_idx, k_idx, *, layer=0, kv_head=0, num_keys=None):
        q, k = torch.as_tensor(q_idx).long(), torch.as_tensor(k_idx).long()
        return (k >= 0) & (k <= q) & ((q - k) % 2 == 0)
