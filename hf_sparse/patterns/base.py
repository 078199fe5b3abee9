"""The pattern protocol, option checking, the registry and ``parse_pattern``.

A pattern is a frozen dataclass that validates itself and provides, in one place:

* :meth:`Pattern.allowed`: may the query at absolute position ``i`` see the key at position ``j``?
  The single definition of the pattern, the oracle every other path is tested against.
* :meth:`Pattern.primitives`: the same rule as :class:`~hf_sparse.primitives.Primitives` for the
  kernels, the block layouts, the reference path and the caches (``None``: predicate only, which runs
  on the reference path and on FlexAttention, not on the kernels).
* :meth:`Pattern.cache_policy`: what a bounded KV cache must keep when decoding (derived from the
  primitives unless a pattern says otherwise).
* The attended-pair count comes from :func:`hf_sparse.layout.attended_pairs`, for every pattern.

Options are dataclass fields declared with :func:`option`, which records the documented range;
:func:`check_options` enforces it when a pattern is built. New patterns register under a name with
:func:`register_pattern` and then parse from strings and dicts like the built-in ones.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import field
from typing import Any, ClassVar

import torch

from ..primitives import MAX_POSITION, Primitives

__all__ = [
    "Pattern",
    "option",
    "check_options",
    "register_pattern",
    "registered_patterns",
    "parse_pattern",
    "as_long",
    "ceil_div",
    "split_outside_brackets",
    "max_distance_option",
    "check_max_distance",
    "set_cap",
    "map_patterns",
    "declares_cap",
]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def as_long(x: Any, device: torch.device | None = None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.long()
    return torch.as_tensor(x, dtype=torch.long, device=device)


# ---------------------------------------------------------------------------------------------
# options
def option(default: Any, *, minimum: int | None = None, maximum: int | None = None, hint: str = "",
           power_of_two: bool = False, words: tuple = ()) -> Any:
    """A pattern option: an integer in ``[minimum, maximum]`` (or a bool when ``default`` is one). ``words``:
    other values it takes, written in specs as themselves (``"auto"``) or, for ``None``, as ``none``."""
    return field(default=default, metadata={"minimum": minimum, "maximum": maximum, "hint": hint,
                                            "power_of_two": power_of_two, "words": tuple(words)})


def _word(value: Any) -> str:
    return "none" if value is None else str(value).lower()


#: The ``max_distance`` option of the patterns with global keys (see :mod:`hf_sparse.cap`).
MAX_DISTANCE_WORDS = ("auto", None)


def max_distance_option() -> Any:
    """``max_distance``: the distance cap of global keys, an integer, ``"auto"`` (the default: the trained
    length of the model that :func:`hf_sparse.patch_model` patches) or ``None`` (off)."""
    return option("auto", minimum=1, maximum=MAX_POSITION, words=MAX_DISTANCE_WORDS,
                  hint="a global key that only the global rule shows is scored as if the query stood at "
                       "min(i, max_distance); e.g. max_distance=8192, auto (the model's trained length) or none")


def check_max_distance(pattern: Pattern) -> None:
    """A set cap needs a causal pattern: the cap moves queries back in a decoder's positions."""
    if isinstance(pattern.max_distance, int) and not pattern.causal:
        raise ValueError(f"{type(pattern).__name__}: max_distance={pattern.max_distance} caps a decoder's distances "
                         "and needs causal=true; give max_distance=none for a non-causal pattern")


def set_cap(max_distance: Any) -> int | None:
    """The cap the primitives carry: the integer, or ``None`` for ``none`` and for an unresolved ``auto``
    (on bare tensors no model says its trained length, so ``auto`` caps nothing there)."""
    return max_distance if isinstance(max_distance, int) and not isinstance(max_distance, bool) else None


def _inner(value: Any):
    """The patterns held by a field value (a pattern, or tuples that hold patterns)."""
    if isinstance(value, Pattern):
        yield value
    elif isinstance(value, tuple):
        for v in value:
            yield from _inner(v)


def _rebuild(value: Any, fn) -> Any:
    if isinstance(value, Pattern):
        return map_patterns(value, fn)
    if isinstance(value, tuple):
        return tuple(_rebuild(v, fn) for v in value)
    return value


def map_patterns(pattern: Pattern, fn) -> Pattern:
    """``pattern`` with ``fn`` applied to every single pattern inside it (the members of a union, the patterns
    of a per-head plan, recursively); a pattern that holds no other is passed to ``fn`` itself."""
    fields = dataclasses.fields(pattern)
    if not any(True for f in fields for _ in _inner(getattr(pattern, f.name))):
        return fn(pattern)
    new = {f.name: _rebuild(getattr(pattern, f.name), fn) for f in fields}
    return dataclasses.replace(pattern, **new)


def _declares_cap(pattern: Pattern) -> bool:
    if set_cap(getattr(pattern, "max_distance", None)) is not None:
        return True
    return any(_declares_cap(p) for f in dataclasses.fields(pattern) for p in _inner(getattr(pattern, f.name)))


_declares_cap_cached = functools.lru_cache(maxsize=1024)(_declares_cap)  # asked on every sparse_attention call


def declares_cap(pattern: Pattern) -> bool:
    """True when the pattern, or a pattern inside it, sets an integer ``max_distance``."""
    if torch.compiler.is_compiling():  # as in Pattern.spec: no lru_cache while tracing
        return _declares_cap(pattern)
    return _declares_cap_cached(pattern)


def check_options(pattern: Pattern) -> None:
    """Check every field declared with :func:`option`; ``ValueError`` quoting the value and the range."""
    owner = type(pattern).__name__
    for f in dataclasses.fields(pattern):
        meta, value = f.metadata, getattr(pattern, f.name)
        if "minimum" not in meta:
            continue
        if isinstance(f.default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"{owner}: {f.name} must be True or False, got {value!r}")
            continue
        lo, hi, hint = meta["minimum"], meta["maximum"], meta["hint"]
        words = meta.get("words", ())
        if any(value is w or (isinstance(w, str) and value == w) for w in words):
            continue
        if words and not isinstance(value, int):
            raise ValueError(f"{owner}: {f.name} must be an integer in [{lo}, {hi}] or one of "
                             f"{', '.join(map(_word, words))}, got {value!r}; {hint}")
        if meta["power_of_two"]:
            if isinstance(value, bool) or not isinstance(value, int) or value < lo or value > hi or value & (value - 1):
                raise ValueError(f"{owner}: {f.name} must be a power of two >= {lo} and <= {hi}, got {value!r}; {hint}")
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"{owner}: {f.name} must be an integer >= {lo}, got {value!r}; {hint}")
        if value > hi:
            raise ValueError(f"{owner}: {f.name} must be at most {hi}, got {value!r}; {hint}")


def option_ranges(cls: type[Pattern]) -> dict[str, str]:
    """The documented range of each option of a pattern class, for help texts and docs."""
    out = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "minimum" not in meta:
            continue
        if isinstance(f.default, bool):
            out[f.name] = "true or false"
        elif meta["power_of_two"]:
            out[f.name] = f"power of two in [{meta['minimum']}, {meta['maximum']}]"
        else:
            out[f.name] = f"integer in [{meta['minimum']}, {meta['maximum']}]"
        if meta.get("words"):
            out[f.name] += "".join(f", {_word(w)}" for w in meta["words"])
    return out


def _build_spec(pattern: Pattern) -> str:
    opts = ",".join(f"{f.name}={_word(v) if isinstance(v, bool) or v is None else v}"
                    for f in dataclasses.fields(pattern) for v in (getattr(pattern, f.name),))
    return f"{pattern.name}:{opts}" if opts else pattern.name


_spec = functools.lru_cache(maxsize=1024)(_build_spec)  # every sparse_attention call names its pattern


# ---------------------------------------------------------------------------------------------
class Pattern:
    """Base class of the patterns. Subclasses are frozen dataclasses, registered by name.

    A subclass defines :meth:`allowed` and, to run on the kernels, :meth:`primitives`.
    """

    name: ClassVar[str]
    causal: bool

    def allowed(self, q_idx, k_idx, *, layer: int = 0, kv_head=0, num_keys: int | None = None) -> torch.Tensor:
        """Boolean tensor, broadcast over ``q_idx`` and ``k_idx`` (absolute positions, causality included).

        ``kv_head`` may be an int or a tensor broadcasting with the others. ``num_keys`` is only needed
        by patterns whose rule depends on the sequence length (non-causal BigBird's random draw).
        """
        raise NotImplementedError

    def primitives(self) -> Primitives | None:
        """The rule as kernel primitives, or ``None`` when only :meth:`allowed` defines it."""
        return None

    def head_primitives(self, kv_heads: int) -> tuple[Primitives | None, ...]:
        """The primitives of each KV head (patterns that differ per head override this)."""
        return (self.primitives(),) * kv_heads

    def rule_sets(self) -> list[Primitives | None]:
        """The distinct primitives among the KV heads, whatever their number (one for a head-free pattern)."""
        return [self.primitives()]

    def cache_policy(self) -> tuple[int, int] | None:
        """``(sinks, window)``: the first ``sinks`` and last ``window`` tokens are all that later queries
        can see, so a bounded cache keeps ``sinks + window - 1`` past tokens; ``None``: the full history."""
        prims = self.primitives()
        return None if prims is None else prims.bounded_cache()

    @property
    def per_head(self) -> bool:
        """True when the rule differs between KV heads (it then needs ``kv_head`` in :meth:`allowed`)."""
        return False

    def mask_mod(self, *, layer: int = 0, kv_heads: int = 1, group: int = 1, q_offset: int = 0,
                 num_keys: int | None = None, device=None):
        """This pattern as a FlexAttention ``mask_mod`` (see :func:`hf_sparse.flex.mask_mod`)."""
        from ..flex import mask_mod

        return mask_mod(self, layer=layer, kv_heads=kv_heads, group=group, q_offset=q_offset, num_keys=num_keys,
                        device=device)

    def __or__(self, other: Pattern) -> Pattern:
        from .union import Union

        if not isinstance(other, Pattern):
            return NotImplemented
        return Union.of(self, other)

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"type": self.name, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    def spec(self) -> str:
        """The canonical string that :func:`parse_pattern` turns back into this pattern."""
        if torch.compiler.is_compiling():  # traced once: no cache (dynamo warns about lru_cache)
            return _build_spec(self)
        return _spec(self)

    def __str__(self) -> str:
        return self.spec()

    @property
    def global_tokens_total(self) -> int:
        """Number of leading key positions every query sees (0 for none)."""
        prims = self.primitives()
        return prims.global_tokens if prims is not None else 0


# ---------------------------------------------------------------------------------------------
# registry
_REGISTRY: dict[str, type[Pattern]] = {}
_ALIASES: dict[str, str] = {}


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def register_pattern(name: str, cls: type[Pattern], *, aliases: tuple[str, ...] = (), replace: bool = False) -> None:
    """Make ``cls`` parse from ``"name:opt=value,..."`` strings and ``{"type": name, ...}`` dicts.

    ``cls`` must be a frozen dataclass subclass of :class:`Pattern` whose ``name`` class attribute is
    ``name``. Registering a taken name raises unless ``replace=True``.
    """
    key = _key(name)
    if not (isinstance(cls, type) and issubclass(cls, Pattern) and dataclasses.is_dataclass(cls)):
        raise ValueError(f"register_pattern({name!r}, {cls!r}): give a frozen dataclass subclass of hf_sparse.Pattern")
    if not cls.__dataclass_params__.frozen:
        raise ValueError(f"register_pattern({name!r}, {cls.__name__}): the dataclass must be frozen (@dataclass(frozen=True))")
    if getattr(cls, "name", None) != name:
        raise ValueError(f"register_pattern({name!r}, {cls.__name__}): set the class attribute name = {name!r} "
                         f"(it has {getattr(cls, 'name', None)!r}), so spec() round-trips")
    if not key.replace("_", "").isalnum():
        raise ValueError(f"register_pattern: name {name!r} must be letters, digits and '_'")
    for k in (key, *map(_key, aliases)):
        taken = _REGISTRY.get(k) or (_REGISTRY.get(_ALIASES[k]) if k in _ALIASES else None)
        if taken is not None and taken is not cls and not replace:
            raise ValueError(f"pattern name {k!r} is taken by {taken.__name__}; pass replace=True to override it")
    _REGISTRY[key] = cls
    for a in aliases:
        _ALIASES[_key(a)] = key


def registered_patterns() -> dict[str, type[Pattern]]:
    """Registered names and their classes (aliases not included)."""
    return dict(_REGISTRY)


def _lookup(kind: str, shown: str) -> type[Pattern]:
    key = _key(kind)
    cls = _REGISTRY.get(_ALIASES.get(key, key))
    if cls is None:
        raise ValueError(f"unknown pattern {kind.strip()!r} in {shown}; known patterns: {', '.join(_REGISTRY)} "
                         "(register your own with hf_sparse.register_pattern)")
    return cls


# ---------------------------------------------------------------------------------------------
# parsing
def _parse_value(owner: str, key: str, raw: str, default: Any, words: tuple = ()) -> Any:
    low = raw.strip().lower()
    for w in words:
        if low == _word(w):
            return w
    if isinstance(default, bool):
        if low in ("true", "yes", "1"):
            return True
        if low in ("false", "no", "0"):
            return False
        raise ValueError(f"{owner}: option {key}={raw!r} must be true or false")
    try:
        return int(low)
    except ValueError:
        pass
    try:
        return int(float(low)) if float(low).is_integer() and abs(float(low)) < MAX_POSITION else raw
    except ValueError:
        also = "".join(f" or {_word(w)}" for w in words)
        raise ValueError(f"{owner}: option {key}={raw!r} is not a number; give an integer{also}, e.g. {key}=4") from None


def _build(kind: str, opts: dict[str, Any], shown: str) -> Pattern:
    cls = _lookup(kind, shown)
    if hasattr(cls, "from_options"):
        return cls.from_options(opts, shown)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(opts) - set(fields))
    if unknown:
        raise ValueError(
            f"pattern {shown}: unknown option(s) {', '.join(unknown)} for {cls.name}; allowed: {', '.join(sorted(fields))}"
        )
    return cls(**opts)


def _parse_one(text: str, shown: str) -> Pattern:
    kind, _, rest = text.strip().partition(":")
    cls = _lookup(kind, shown)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    opts: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"pattern {shown}: option {item!r} must look like name=value, e.g. 'bigbird:block=64'")
        if key in opts:
            raise ValueError(f"pattern {shown}: option {key!r} is given twice; give each option once")
        f = fields.get(key)
        opts[key] = _parse_value(cls.name, key, raw, None if f is None else f.default,
                                 () if f is None else f.metadata.get("words", ()))
    return _build(kind, opts, shown)


def split_outside_brackets(text: str, sep: str) -> list[str]:
    """Split at ``sep`` outside brackets (a per-head plan's members may hold unions)."""
    parts, depth, cur = [], 0, []
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def parse_pattern(spec: Pattern | str | dict) -> Pattern:
    """Turn a pattern object, a spec string or a dict into a pattern.

    >>> parse_pattern("longformer:window=1024,global_tokens=4")
    Longformer(window=1024, global_tokens=4, causal=True)
    >>> parse_pattern({"type": "sliding_window", "window": 512})
    SlidingWindow(window=512, causal=True)
    >>> parse_pattern("sliding_window:window=256|strided:stride=64")   # a union: either rule
    Union(members=(SlidingWindow(window=256, causal=True), Strided(stride=64, window=64)))

    Names: see :func:`registered_patterns` (``dense``/``full``, ``sliding_window``, ``longformer``,
    ``bigbird``, ``strided``, ``fixed``, and whatever :func:`register_pattern` added).
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
        parts = split_outside_brackets(spec, "|")
        text = spec.strip()
        kind, bracket, _ = text.partition("[")
        if len(parts) == 1 and bracket and ":" not in kind:
            # a pattern made of patterns: NAME[...] (per_head[DEFAULT;H=PATTERN;...], without_globals[PATTERN])
            cls = _lookup(kind, repr(spec))
            if not hasattr(cls, "from_string"):
                raise ValueError(f"pattern {spec!r}: {cls.name} takes options after ':', not brackets")
            if not text.endswith("]"):
                raise ValueError(f"pattern {spec!r}: it must end with ']', as in {cls.bracket_form}")
            return cls.from_string(text[len(kind) + 1:-1], repr(spec))
        if len(parts) > 1:
            from .union import Union

            if any(not p.strip() for p in parts):
                raise ValueError(f"pattern {spec!r}: an empty member around '|'; e.g. 'sliding_window:window=256|strided:stride=64'")
            return Union.of(*(_parse_one(p, repr(spec)) for p in parts))
        return _parse_one(spec, repr(spec))
    raise ValueError(f"cannot make a pattern from {spec!r} ({type(spec).__name__}); give a string, dict or Pattern")
