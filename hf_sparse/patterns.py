"""Sparse attention patterns.

A pattern is a frozen dataclass that validates itself and answers one question through
:meth:`Pattern.allowed`: may the query at absolute position ``i`` see the key at absolute position
``j``? That predicate is the single definition of the pattern. The block layouts in
:mod:`hf_sparse.layout`, the reference attention and the Triton kernels are all tested against it.

Positions count real tokens from 0 (padding is not a position). The window convention is the one
of Hugging Face Mistral: a causal window ``W`` lets query ``i`` see key ``j`` when
``i - W < j <= i`` -- ``W`` keys, the query's own key included. ``W = 3`` over 6 tokens::

    k: 0 1 2 3 4 5
    q0 x . . . . .
    q1 x x . . . .
    q2 x x x . . .
    q3 . x x x . .
    q4 . . x x x .
    q5 . . . x x x

Non-causal (encoder) variants use the symmetric rule ``|i - j| < W``.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

__all__ = [
    "Pattern",
    "Dense",
    "SlidingWindow",
    "Longformer",
    "BigBird",
    "parse_pattern",
    "bigbird_random_blocks",
    "PATTERN_NAMES",
]

_MASK32 = 0xFFFFFFFF


def _check_int(owner: str, name: str, value: Any, minimum: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an integer >= {minimum}, got {value!r}; {hint}")


def _check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: {name} must be True or False, got {value!r}")


def _as_long(x: Any, device: torch.device | None = None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.long()
    return torch.as_tensor(x, dtype=torch.long, device=device)


def _build_spec(pattern: Pattern) -> str:
    # built from the fields directly (dataclasses.asdict deep-copies)
    opts = ",".join(f"{f.name}={str(v).lower() if isinstance(v, bool) else v}"
                    for f in dataclasses.fields(pattern) for v in (getattr(pattern, f.name),))
    return f"{pattern.name}:{opts}" if opts else pattern.name


_spec = functools.lru_cache(maxsize=1024)(_build_spec)  # every sparse_attention call names its pattern so


class Pattern:
    """Base class of the patterns. Subclasses are frozen dataclasses."""

    name: ClassVar[str]
    causal: bool

    def allowed(self, q_idx, k_idx, *, layer: int = 0, kv_head=0, num_keys: int | None = None) -> torch.Tensor:
        """Boolean tensor, broadcast over ``q_idx`` and ``k_idx`` (absolute positions, causality included).

        ``kv_head`` may be an int or a tensor broadcasting with the others. ``num_keys`` is only needed
        by non-causal BigBird, whose random blocks are drawn from the whole sequence.
        """
        raise NotImplementedError

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"type": self.name, **dataclasses.asdict(self)}

    def spec(self) -> str:
        """The canonical string that :func:`parse_pattern` turns back into this pattern."""
        if torch.compiler.is_compiling():  # traced once: no cache (dynamo warns about lru_cache)
            return _build_spec(self)
        return _spec(self)

    def __str__(self) -> str:
        return self.spec()

    # -- helpers used by layouts and kernels ---------------------------------------------------
    @property
    def global_tokens_total(self) -> int:
        """Number of leading key positions every query sees (0 for none)."""
        return 0


@dataclass(frozen=True)
class Dense(Pattern):
    """Plain attention: causal (``j <= i``) or, with ``causal=False``, every key."""

    causal: bool = True
    name: ClassVar[str] = "dense"

    def __post_init__(self) -> None:
        _check_bool("Dense", "causal", self.causal)

    def allowed(self, q_idx, k_idx, *, layer: int = 0, kv_head=0, num_keys: int | None = None) -> torch.Tensor:
        q, k = _as_long(q_idx), _as_long(k_idx)
        ok = (k >= 0) & (q >= 0)
        return ok & (k <= q) if self.causal else ok


@dataclass(frozen=True)
class SlidingWindow(Pattern):
    """Local attention over ``window`` keys, the query's own key included.

    Causal: ``i - window < j <= i``. Non-causal: ``|i - j| < window``.
    """

    window: int = 4096
    causal: bool = True
    name: ClassVar[str] = "sliding_window"

    def __post_init__(self) -> None:
        _check_int("SlidingWindow", "window", self.window, 1, "the window counts the query itself, e.g. window=4096")
        _check_bool("SlidingWindow", "causal", self.causal)

    def allowed(self, q_idx, k_idx, *, layer: int = 0, kv_head=0, num_keys: int | None = None) -> torch.Tensor:
        q, k = _as_long(q_idx), _as_long(k_idx)
        ok = (k >= 0) & (q >= 0)
        if self.causal:
            return ok & (k <= q) & (k > q - self.window)
        return ok & ((q - k).abs() < self.window)


@dataclass(frozen=True)
class Longformer(Pattern):
    """A local window plus ``global_tokens`` leading tokens that every query sees.

    In a decoder the global tokens act as attention sinks. Causal:
    ``(i - window < j or j < global_tokens) and j <= i``. Non-causal: ``|i - j| < window``, or
    ``j < global_tokens``, or ``i < global_tokens`` (global rows see everything).
    """

    window: int = 4096
    global_tokens: int = 4
    causal: bool = True
    name: ClassVar[str] = "longformer"

    def __post_init__(self) -> None:
        _check_int("Longformer", "window", self.window, 1, "the window counts the query itself, e.g. window=4096")
        _check_int("Longformer", "global_tokens", self.global_tokens, 0, "use 0 for none, e.g. global_tokens=4")
        _check_bool("Longformer", "causal", self.causal)

    @property
    def global_tokens_total(self) -> int:
        return self.global_tokens

    def allowed(self, q_idx, k_idx, *, layer: int = 0, kv_head=0, num_keys: int | None = None) -> torch.Tensor:
        q, k = _as_long(q_idx), _as_long(k_idx)
        ok = (k >= 0) & (q >= 0)
        g = self.global_tokens
        if self.causal:
            return ok & (k <= q) & ((k > q - self.window) | (k < g))
        return ok & (((q - k).abs() < self.window) | (k < g) | (q < g))


@dataclass(frozen=True)
class BigBird(Pattern):
    """Block-sparse attention: window blocks, global blocks and random blocks.

    In blocks of ``block`` tokens, query block ``qb`` sees key block ``kb`` when
    ``qb - window_blocks < kb <= qb`` (window), ``kb < global_blocks`` (global), or ``kb`` is one of
    ``random_blocks`` blocks drawn from the earlier blocks not already seen (fewer when fewer exist).
    Causal inside the diagonal block. The random draw is a pure function of
    ``(seed, layer, kv_head, qb)``, shared by the query heads of one GQA group.

    Non-causal: ``|qb - kb| < window_blocks``, global blocks as keys and as queries (a global query
    block sees every block), and random blocks drawn from all other blocks of the sequence (the draw
    then also depends on the number of key blocks).
    """

    block: int = 64
    window_blocks: int = 3
    global_blocks: int = 1
    random_blocks: int = 3
    seed: int = 0
    causal: bool = True
    name: ClassVar[str] = "bigbird"

    def __post_init__(self) -> None:
        b = self.block
        if isinstance(b, bool) or not isinstance(b, int) or b < 16 or b & (b - 1):
            raise ValueError(
                f"BigBird: block must be a power of two >= 16, got {b!r}; e.g. block=64 (16, 32, 64, 128, 256 ...)"
            )
        _check_int("BigBird", "window_blocks", self.window_blocks, 1, "it counts the query's own block, e.g. 3")
        _check_int("BigBird", "global_blocks", self.global_blocks, 0, "use 0 for none, e.g. global_blocks=1")
        _check_int("BigBird", "random_blocks", self.random_blocks, 0, "use 0 for none, e.g. random_blocks=3")
        _check_int("BigBird", "seed", self.seed, 0, "any non-negative integer, e.g. seed=0")
        _check_bool("BigBird", "causal", self.causal)

    @property
    def global_tokens_total(self) -> int:
        return self.global_blocks * self.block

    def random_table(
        self, *, layer: int, kv_heads: int, num_q_blocks: int, num_k_blocks: int | None = None, device=None
    ) -> torch.Tensor:
        """``[kv_heads, num_q_blocks, random_blocks]`` int32 key-block indices, ``-1`` where fewer exist."""
        heads = torch.arange(kv_heads, device=device).view(-1, 1)
        qb = torch.arange(num_q_blocks, device=device).view(1, -1)
        return bigbird_random_blocks(self, layer, heads, qb, num_k_blocks=num_k_blocks).to(torch.int32)

    def allowed(self, q_idx, k_idx, *, layer: int = 0, kv_head=0, num_keys: int | None = None) -> torch.Tensor:
        q, k = _as_long(q_idx), _as_long(k_idx)
        ok = (k >= 0) & (q >= 0)
        qb, kb = q.div(self.block, rounding_mode="floor"), k.div(self.block, rounding_mode="floor")
        head = _as_long(kv_head, device=q.device)
        if self.causal:
            base = ((kb > qb - self.window_blocks) | (kb < self.global_blocks)) & (k <= q)
            nkb = None
        else:
            if num_keys is None:
                raise ValueError("BigBird(causal=False).allowed needs num_keys= (the random draw covers the sequence)")
            nkb = -(-num_keys // self.block)
            base = ((qb - kb).abs() < self.window_blocks) | (kb < self.global_blocks) | (qb < self.global_blocks)
        if self.random_blocks:
            rnd = bigbird_random_blocks(self, layer, head, qb.clamp_min(0), num_k_blocks=nkb)
            base = base | (rnd == kb.unsqueeze(-1)).any(-1)
        return ok & base


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # A 32-bit integer finaliser (lowbias32 shape). Constants stay below 2**31 so every product of a
    # 32-bit value fits in int64 and the result is the same on every device.
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x4F6CDD1D) & _MASK32
    return x ^ (x >> 16)


def bigbird_random_blocks(
    pattern: BigBird, layer: int, kv_head, q_block, *, num_k_blocks: int | None = None
) -> torch.Tensor:
    """Random key blocks of BigBird: ``[..., random_blocks]`` int64, ``-1`` where fewer exist.

    A pure function of ``(seed, layer, kv_head, q_block)`` (and ``num_k_blocks`` when non-causal):
    the same on every device, process, forward, backward, prefill and decode. It draws, without
    replacement, from the blocks the window and global blocks do not already cover, with Floyd's
    algorithm (one hash per draw, so the cost is ``O(random_blocks)`` per query block).
    """
    head = _as_long(kv_head)
    qb = _as_long(q_block, device=head.device)
    head, qb = torch.broadcast_tensors(head, qb)
    r_count, wb, gb = pattern.random_blocks, pattern.window_blocks, pattern.global_blocks
    out = torch.full((*qb.shape, r_count), -1, dtype=torch.long, device=qb.device)
    if r_count == 0:
        return out
    if pattern.causal:
        # candidates: gb <= kb <= qb - wb  (earlier than the window, not global)
        n_cand = (qb - wb + 1 - gb).clamp_min(0)
    else:
        if num_k_blocks is None:
            raise ValueError("non-causal BigBird needs num_k_blocks to draw random blocks")
        win_lo = (qb - wb + 1).clamp_min(gb)
        win_hi = (qb + wb - 1).clamp_max(num_k_blocks - 1)
        n_cand = (num_k_blocks - gb - (win_hi - win_lo + 1).clamp_min(0)).clamp_min(0)
        n_cand = torch.where(qb < gb, torch.zeros_like(n_cand), n_cand)  # a global query block sees every block
    h = _mix32(torch.full_like(qb, pattern.seed & _MASK32) ^ 0x2545F491)
    h = _mix32(h ^ (layer & _MASK32))
    h = _mix32(h ^ head)
    h = _mix32(h ^ qb)
    picks = []
    for r in range(r_count):
        j = n_cand - r_count + r  # Floyd: draw t in [0, j], take j if t was already drawn
        t = _mix32(h ^ (r + 1)) % (j.clamp_min(0) + 1)
        if picks:
            seen = (torch.stack(picks, -1) == t.unsqueeze(-1)).any(-1)
            t = torch.where(seen, j, t)
        # fewer candidates than draws: take them all, in order
        t = torch.where(n_cand <= r_count, torch.full_like(t, r), t)
        picks.append(t)
    idx = torch.stack(picks, -1)
    valid = idx < n_cand.unsqueeze(-1)
    # map candidate index -> block index
    kb = idx + gb
    if not pattern.causal:
        win_lo = (qb - wb + 1).clamp_min(gb).unsqueeze(-1)
        win_len = ((qb + wb - 1).clamp_max(num_k_blocks - 1).unsqueeze(-1) - win_lo + 1).clamp_min(0)
        kb = torch.where(kb >= win_lo, kb + win_len, kb)
    return torch.where(valid, kb, out)


# ---------------------------------------------------------------------------------------------
_REGISTRY: dict[str, type[Pattern]] = {
    "dense": Dense,
    "full": Dense,
    "causal": Dense,
    "sliding_window": SlidingWindow,
    "sliding": SlidingWindow,
    "window": SlidingWindow,
    "longformer": Longformer,
    "bigbird": BigBird,
}
PATTERN_NAMES = ("dense", "sliding_window", "longformer", "bigbird")


def _parse_value(owner: str, key: str, raw: str) -> Any:
    low = raw.strip().lower()
    if key == "causal":
        if low in ("true", "yes", "1"):
            return True
        if low in ("false", "no", "0"):
            return False
        raise ValueError(f"{owner}: option causal={raw!r} must be true or false")
    try:
        return int(low)
    except ValueError:
        pass
    try:
        return int(float(low)) if float(low).is_integer() else raw
    except ValueError:
        raise ValueError(f"{owner}: option {key}={raw!r} is not a number; give an integer, e.g. {key}=4") from None


def parse_pattern(spec: Pattern | str | dict) -> Pattern:
    """Turn a pattern object, a spec string or a dict into a pattern.

    >>> parse_pattern("longformer:window=1024,global_tokens=4")
    Longformer(window=1024, global_tokens=4, causal=True)
    >>> parse_pattern({"type": "sliding_window", "window": 512})
    SlidingWindow(window=512, causal=True)

    Names: ``dense`` (alias ``full``), ``sliding_window``, ``longformer``, ``bigbird``.
    """
    if isinstance(spec, Pattern):
        return spec
    if isinstance(spec, dict):
        opts = dict(spec)
        kind = opts.pop("type", opts.pop("name", None))
        if kind is None:
            raise ValueError(f"pattern dict {spec!r} has no 'type'; e.g. {{'type': 'bigbird', 'block': 64}}")
        return _build(str(kind), opts, repr(spec))
    if isinstance(spec, str):
        text = spec.strip()
        kind, _, rest = text.partition(":")
        opts: dict[str, Any] = {}
        for item in filter(None, (s.strip() for s in rest.split(","))):
            key, eq, raw = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"pattern {spec!r}: option {item!r} must look like name=value, e.g. 'bigbird:block=64'")
            opts[key.strip()] = _parse_value(kind, key.strip(), raw)
        return _build(kind.strip(), opts, repr(spec))
    raise ValueError(f"cannot make a pattern from {spec!r} ({type(spec).__name__}); give a string, dict or Pattern")


def _build(kind: str, opts: dict[str, Any], shown: str) -> Pattern:
    cls = _REGISTRY.get(kind.lower().replace("-", "_"))
    if cls is None:
        raise ValueError(f"unknown pattern {kind!r} in {shown}; known patterns: {', '.join(PATTERN_NAMES)} (and 'full')")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(opts) - fields)
    if unknown:
        raise ValueError(
            f"pattern {shown}: unknown option(s) {', '.join(unknown)} for {cls.name}; allowed: {', '.join(sorted(fields))}"
        )
    return cls(**opts)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
