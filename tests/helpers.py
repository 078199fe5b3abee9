"""Helpers shared by the test modules (imported as ``from helpers import ...``)."""

from __future__ import annotations

from hf_sparse import BigBird, Dense, Longformer, SlidingWindow


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
    else:
        s = type(p).__name__
    return s if p.causal else s + "-noncausal"
