"""Parsing and checking the options, before any model is loaded or any result written."""

from __future__ import annotations

from dataclasses import dataclass, field

from hf_sparse import Pattern, parse_pattern
from hf_sparse.head_plan import HeadPlan, load_plan
from hf_sparse.patterns.base import split_outside_brackets

from .errors import EvalError

__all__ = ["PatternChoice", "parse_patterns", "parse_lengths", "parse_depths", "RunOptions", "DEFAULT_PATTERNS",
           "DEFAULT_LENGTHS", "DEFAULT_DEPTHS", "DEFAULT_MAX_DOCS"]

# The bare `hf-sparse-eval` must finish in a few minutes on a 2-core CPU (it is the README's first
# command and CI runs it), so its lengths are short and bigger runs are flags. Windows are a quarter of the
# longest length; BigBird's block of 16 gives it a density close to the windows' (0.37 against 0.44 at 512).
DEFAULT_PATTERNS = "full,sliding_window:window=128,longformer:window=128,global_tokens=4,bigbird:block=16"
DEFAULT_LENGTHS = "256,512"
DEFAULT_DEPTHS = "0,0.5,1"
DEFAULT_MAX_DOCS = 4
BASELINE = "full"


@dataclass(frozen=True)
class PatternChoice:
    """One entry of ``--patterns``: ``pattern`` is None for the bare word ``full`` (the model unpatched). A head
    plan file (``plan.json``) is a choice with ``plan`` set and its streaming pattern as ``pattern``."""

    label: str
    spec: str
    pattern: Pattern | None
    plan: HeadPlan | None = field(default=None, compare=False)

    @property
    def is_baseline(self) -> bool:
        return self.pattern is None

    @property
    def patch_target(self) -> Pattern | HeadPlan | None:
        """What ``patch_model`` applies: the plan, else the pattern."""
        return self.plan if self.plan is not None else self.pattern


def _split_patterns(text: str) -> list[str]:
    # Pattern options are comma-separated too: "longformer:window=1024,global_tokens=4,bigbird".
    # An item with "=" but no ":" continues the previous pattern; anything else starts a new one.
    # Separators inside brackets belong to a per-head plan: "per_head[sliding_window:window=4096;0=dense]".
    items: list[str] = []
    for raw in (t for part in split_outside_brackets(text, ";") for t in split_outside_brackets(part, ",")):
        tok = raw.strip()
        if not tok:
            continue
        if "=" in tok and ":" not in tok:
            if not items:
                raise EvalError(f"--patterns {text!r}: option {tok!r} comes before any pattern name")
            items[-1] += "," + tok
        else:
            items.append(tok)
    return items


def parse_patterns(text: str) -> list[PatternChoice]:
    """``--patterns`` into choices; unknown names, bad options and repeats raise :class:`EvalError`."""
    choices: list[PatternChoice] = []
    for item in _split_patterns(text):
        if item.lower() == BASELINE:
            choice = PatternChoice(BASELINE, BASELINE, None)
        elif item.lower().endswith(".json"):
            choice = _plan_choice(item)
        else:
            try:
                pattern = parse_pattern(item)
            except ValueError as err:
                raise EvalError(f"--patterns: {err}") from None
            if not pattern.causal:
                raise EvalError(f"--patterns: {item!r} is non-causal; decoders need causal patterns (drop causal=false)")
            choice = PatternChoice(item, pattern.spec(), pattern)
        if any(c.spec == choice.spec for c in choices):
            raise EvalError(f"--patterns: {item!r} is given twice (as {choice.spec})")
        choices.append(choice)
    if not choices:
        raise EvalError("--patterns is empty; e.g. --patterns full,sliding_window:window=1024")
    return choices


def _plan_choice(path: str) -> PatternChoice:
    """A head plan file of ``hf-sparse-calibrate``, read and checked now (its model is checked after loading)."""
    try:
        plan = load_plan(path)
    except (ValueError, FileNotFoundError) as err:
        raise EvalError(f"--patterns: {err}") from None
    return PatternChoice(path, plan.spec(), plan.streaming, plan)


def parse_lengths(text: str) -> list[int]:
    """``"2048,4k,8192"`` -> ``[2048, 4096, 8192]`` (sorted, unique, each >= 16)."""
    out = set()
    for raw in filter(None, (s.strip().lower() for s in text.split(","))):
        mult = 1024 if raw.endswith("k") else 1
        try:
            value = int(raw.removesuffix("k")) * mult
        except ValueError:
            raise EvalError(f"--context-lengths: {raw!r} is not an integer (e.g. 2048,4096 or 2k,4k)") from None
        if value < 16:
            raise EvalError(f"--context-lengths: {value} is too short; use at least 16 tokens")
        out.add(value)
    if not out:
        raise EvalError("--context-lengths is empty; e.g. --context-lengths 2048,4096,8192")
    return sorted(out)


def parse_depths(text: str) -> list[float]:
    out = []
    for raw in filter(None, (s.strip() for s in text.split(","))):
        try:
            value = float(raw)
        except ValueError:
            raise EvalError(f"--depths: {raw!r} is not a number; give fractions in [0, 1], e.g. 0,0.5,1") from None
        if not 0.0 <= value <= 1.0:
            raise EvalError(f"--depths: {value} is outside [0, 1] (0 = key at the start, 1 = at the end)")
        if value not in out:
            out.append(value)
    if not out:
        raise EvalError("--depths is empty; e.g. --depths 0,0.25,0.5,0.75,1")
    return sorted(out)


@dataclass
class RunOptions:
    """Everything one evaluation run needs, already checked."""

    model: str
    patterns: list[PatternChoice]
    lengths: list[int]
    out: str
    dataset: str = "stdlib"
    dataset_config: str | None = None
    dataset_split: str = "test"
    text_column: str = "text"
    join_rows: bool = False
    max_docs: int | None = DEFAULT_MAX_DOCS
    protocol: str = "first"
    max_windows: int | None = None
    position_buckets: int = 8
    batch_size: int = 1
    device: str = "auto"
    dtype: str = "auto"
    backend: str = "auto"
    seed: int = 0
    depths: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    trials: int = 1
    progress: bool = True

    def check(self) -> None:
        from hf_sparse.ops import BACKENDS

        for name in ("batch_size", "position_buckets", "trials"):
            if getattr(self, name) < 1:
                raise EvalError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("max_docs", "max_windows"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise EvalError(f"--{name.replace('_', '-')} must be >= 0 (0 = no limit), got {value}")
        if self.protocol not in ("first", "windows"):
            raise EvalError(f"--protocol {self.protocol!r}: use 'first' or 'windows'")
        if self.backend not in BACKENDS:
            raise EvalError(f"--backend {self.backend!r}: use auto, triton or reference (dense: the O(T^2) oracle)")
