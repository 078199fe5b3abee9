"""Perplexity of a causal LM over fixed-length units of documents, with per-position buckets.

Protocol (``--protocol``):

* ``first`` (default): each document is cut to its first ``L`` tokens, one unit per document and
  length. Every length and every pattern sees the same text prefix, so the columns of the table
  differ only in how much context the model may use.
* ``windows``: each document is cut into non-overlapping ``L``-token windows (no overlap, no
  stride), one unit per window (``--max-windows`` caps them per document). More tokens per document;
  each window starts without context, as in the usual "non-overlapping chunks" evaluation.

A unit's input is exactly ``L`` tokens, the tokenizer's BOS first when it adds one by default; the
``L - 1`` next-token predictions are scored. A document with fewer tokens than ``L`` gives no unit
at ``L``. Token NLLs are computed in float32 from the logits; the logits are made chunk by chunk from
the final hidden states, so a long sequence never holds ``[T, vocab]`` float32 logits at once.

Each unit stores its summed NLL and token count, overall and per position bucket (``--position-buckets``
equal ranges of the context), so the report aggregates exactly: ``ppl = exp(sum nll / sum tokens)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["PplUnit", "make_units", "token_nll", "bucket_edges", "bucket_sums"]

LOGIT_CHUNK = 1024


@dataclass(frozen=True)
class PplUnit:
    doc_id: str
    item: str  # "first" or the window index
    ids: tuple[int, ...]


def make_units(docs: list[tuple[str, list[int]]], length: int, *, protocol: str, prefix: list[int],
               max_windows: int | None = None) -> list[PplUnit]:
    """The units of ``length`` tokens (``prefix`` = ``[bos]`` or ``[]`` included) the protocol asks for."""
    body = length - len(prefix)
    units = []
    for doc_id, ids in docs:
        if len(ids) < body:
            continue
        if protocol == "first":
            units.append(PplUnit(doc_id, "first", tuple(prefix + ids[:body])))
            continue
        n = len(ids) // body
        if max_windows:
            n = min(n, max_windows)
        for w in range(n):
            units.append(PplUnit(doc_id, f"w{w}", tuple(prefix + ids[w * body:(w + 1) * body])))
    return units


def _final_logit_softcap(config) -> float | None:
    cap = getattr(config, "final_logit_softcapping", None)
    return float(cap) if cap else None


def _chunked_head(model):
    """``(decoder, lm_head)`` when logits are exactly ``lm_head(decoder(ids))`` (softcap aside), else None."""
    head = model.get_output_embeddings()
    base = getattr(model, "base_model", None)
    if head is None or base is None or base is model or not isinstance(head, torch.nn.Linear):
        return None
    # models that rescale logits in their own forward: let that forward make them
    if getattr(model.config, "logit_scale", None) not in (None, 1, 1.0):
        return None
    return base, head


@torch.inference_mode()
def token_nll(model, input_ids: torch.Tensor, *, chunk: int = LOGIT_CHUNK) -> torch.Tensor:
    """``[B, T - 1]`` float32 negative log-likelihood of tokens ``1..T-1`` given those before them."""
    targets = input_ids[:, 1:]
    parts = _chunked_head(model)
    cap = _final_logit_softcap(model.config)
    if parts is None:
        logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1]
        hidden, head = None, None
    else:
        base, head = parts
        hidden = base(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
        logits = None
    out = torch.empty(targets.shape, dtype=torch.float32, device=input_ids.device)
    for s in range(0, targets.shape[1], chunk):
        e = min(s + chunk, targets.shape[1])
        lg = (head(hidden[:, s:e]) if head is not None else logits[:, s:e]).float()
        if cap is not None and parts is not None:
            lg = torch.tanh(lg / cap) * cap
        # [B * chunk, vocab] rows: cross_entropy over a transposed [B, vocab, chunk] view is ~20x slower on CUDA
        nll = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), targets[:, s:e].reshape(-1), reduction="none")
        out[:, s:e] = nll.view(targets.shape[0], e - s)
    return out


def bucket_edges(length: int, buckets: int) -> list[int]:
    """Token positions ``edges[b] <= t < edges[b + 1]`` of bucket ``b``: equal ranges of the context."""
    buckets = max(1, min(buckets, length))
    return [round(b * length / buckets) for b in range(buckets + 1)]


def bucket_sums(nll: torch.Tensor, edges: list[int]) -> tuple[list[float], list[int]]:
    """Summed NLL and token counts per bucket; ``nll[i]`` is the loss of the token at position ``i + 1``."""
    sums, counts = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        part = nll[max(lo - 1, 0):max(hi - 1, 0)]
        sums.append(float(part.double().sum()))
        counts.append(int(part.numel()))
    return sums, counts


def perplexity(nll_sum: float, tokens: int) -> float:
    return math.exp(nll_sum / tokens) if tokens else float("nan")
