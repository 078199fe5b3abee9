"""Head plans: which KV heads of a model stay dense and which run a streaming pattern, as a JSON file.

A :class:`HeadPlan` is the output of a calibration (``hf-sparse-calibrate``, docs/calibration.md) and an
input of :func:`hf_sparse.patch_model` and ``hf-sparse-eval --patterns plan.json``: one ``streaming``
pattern for every KV head, except the ``dense_heads`` (``(layer, kv_head)`` pairs, and the query heads of
their GQA group), which keep ``dense_pattern`` (plain causal attention unless it says otherwise:
``"dense:max_distance=auto"`` caps their distances at the trained length, :mod:`hf_sparse.cap`). It also
records the model it was made for (so it is refused on another one), the budget (the share of KV heads
allowed to stay dense), the calibration method with its per-head scores, and where it came from.

The file (``format_version`` 1)::

    {"format": "hf_sparse.head_plan", "format_version": 1,
     "model": {"name": "smollm2-135m", "architecture": "LlamaForCausalLM", "model_type": "llama",
               "num_layers": 30, "num_attention_heads": 9, "num_kv_heads": 3},
     "streaming": "longformer:window=1024,global_tokens=4", "dense_pattern": "dense",
     "budget": 0.25, "dense_heads": [[0, 1], [3, 2], ...],
     "method": "gates", "scores": [[0.98, 0.02, 0.10], ...],   # [layer][kv_head], higher = keep dense
     "details": {...}}                                          # method settings, command, versions

The number of dense heads may not exceed :func:`budget_heads` ``(budget, layers * kv_heads)`` =
``floor(budget * layers * kv_heads)``: a budget is an upper bound. No transformers import here: a model is
described by its config's attributes (:func:`model_identity`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .patterns import Dense, Pattern, parse_pattern

__all__ = ["HeadPlan", "load_plan", "as_plan", "model_identity", "budget_heads", "PLAN_FORMAT", "PLAN_VERSION"]

PLAN_FORMAT = "hf_sparse.head_plan"
PLAN_VERSION = 1
_IDENTITY_COUNTS = ("num_layers", "num_attention_heads", "num_kv_heads")
_KEYS = {"format", "format_version", "model", "streaming", "dense_pattern", "budget", "dense_heads", "method",
         "scores", "details"}


def budget_heads(budget: float, total: int) -> int:
    """How many of ``total`` KV heads a ``budget`` lets stay dense: ``floor(budget * total)``, so a plan never
    exceeds its budget (the ``1e-9`` absorbs float error: ``0.29 * 100`` is 28.999... and means 29)."""
    return int(math.floor(budget * total + 1e-9))


def _text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def model_identity(config, name: str | None = None) -> dict[str, Any]:
    """What a plan records of a model: its name, architecture, type and head layout, from a transformers
    config (read by attribute, so any object with ``num_hidden_layers`` and ``num_attention_heads`` works)."""
    text = _text_config(config)
    heads = int(text.num_attention_heads)
    archs = getattr(config, "architectures", None) or [None]
    return {
        "name": name if name is not None else (getattr(config, "_name_or_path", None) or None),
        "architecture": archs[0],
        "model_type": getattr(text, "model_type", None) or getattr(config, "model_type", None),
        "num_layers": int(text.num_hidden_layers),
        "num_attention_heads": heads,
        "num_kv_heads": int(getattr(text, "num_key_value_heads", None) or heads),
    }


def _where(source: str | None) -> str:
    return f"plan {source}" if source else "plan"


def _check_budget(budget: Any, where: str) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
        raise ValueError(f"{where}: budget must be a number in [0, 1] (the share of KV heads kept dense, e.g. 0.25), "
                         f"got {budget!r}")
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"{where}: budget {budget} is outside [0, 1]; it is the share of KV heads kept dense, "
                         "e.g. 0.25 for a quarter")
    return float(budget)


def _check_identity(model: Any, where: str) -> dict[str, Any]:
    if not isinstance(model, dict):
        raise ValueError(f"{where}: 'model' must be a dict with {', '.join(_IDENTITY_COUNTS)} (what "
                         f"hf_sparse.head_plan.model_identity(config) gives), got {model!r}")
    for key in _IDENTITY_COUNTS:
        value = model.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: model.{key} must be an integer >= 1, got {value!r}")
    if model["num_attention_heads"] % model["num_kv_heads"]:
        raise ValueError(f"{where}: model.num_attention_heads ({model['num_attention_heads']}) is not a multiple of "
                         f"model.num_kv_heads ({model['num_kv_heads']})")
    return {"name": model.get("name"), "architecture": model.get("architecture"),
            "model_type": model.get("model_type"), **{k: model[k] for k in _IDENTITY_COUNTS}}


def _check_pattern(value: Any, what: str, where: str) -> Pattern:
    try:
        pattern = parse_pattern(value)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}: {what}: {err}") from None
    if not pattern.causal or pattern.per_head:
        raise ValueError(f"{where}: {what} {pattern.spec()} must be one causal pattern (a plan is the per-head part)")
    return pattern


def _check_heads(heads: Any, model: dict[str, Any], where: str) -> tuple[tuple[int, int], ...]:
    layers, kv_heads = model["num_layers"], model["num_kv_heads"]
    if not isinstance(heads, (list, tuple)):
        raise ValueError(f"{where}: dense_heads must be a list of [layer, kv_head] pairs, got {heads!r}")
    out = []
    for item in heads:
        if not (isinstance(item, (list, tuple)) and len(item) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in item)):
            raise ValueError(f"{where}: dense_heads holds {item!r}; each entry is a [layer, kv_head] pair of integers")
        layer, head = item
        if not 0 <= layer < layers:
            raise ValueError(f"{where}: dense head {[layer, head]} names layer {layer}, but the plan's model has "
                             f"{layers} layers (0..{layers - 1}); drop the entry or calibrate again")
        if not 0 <= head < kv_heads:
            raise ValueError(f"{where}: dense head {[layer, head]} names KV head {head}, but the plan's model has "
                             f"{kv_heads} KV heads per layer (0..{kv_heads - 1}); KV heads, not query heads: query "
                             f"head h belongs to KV head h // {model['num_attention_heads'] // kv_heads}")
        out.append((layer, head))
    twice = sorted({h for h in out if out.count(h) > 1})
    if twice:
        raise ValueError(f"{where}: dense_heads lists {[list(h) for h in twice]} more than once")
    return tuple(sorted(out))


def _check_scores(scores: Any, model: dict[str, Any], where: str) -> tuple[tuple[float, ...], ...] | None:
    if scores is None:
        return None
    layers, kv_heads = model["num_layers"], model["num_kv_heads"]
    shape = f"[{layers} layers][{kv_heads} KV heads]"
    if not (isinstance(scores, (list, tuple)) and len(scores) == layers
            and all(isinstance(row, (list, tuple)) and len(row) == kv_heads for row in scores)):
        raise ValueError(f"{where}: scores must be a {shape} list of numbers (or null)")
    for row in scores:
        for x in row:
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                raise ValueError(f"{where}: scores holds {x!r}; every score must be a finite number")
    return tuple(tuple(float(x) for x in row) for row in scores)


@dataclass(frozen=True)
class HeadPlan:
    """Dense KV heads and one streaming pattern for the others, for one model (see the module docstring).

    Build one with :func:`hf_sparse.eval.calibrate.calibrate`, :func:`load_plan`, or by hand::

        plan = HeadPlan(streaming="longformer:window=1024,global_tokens=4", dense_heads=[(0, 1), (5, 0)],
                        model=model_identity(model.config), budget=0.25)
        plan.save("plan.json"); patch_model(model, "plan.json")
    """

    streaming: Pattern | str | dict
    dense_heads: tuple[tuple[int, int], ...]
    model: dict[str, Any]
    budget: float
    dense_pattern: Pattern | str | dict = field(default_factory=Dense)
    method: str | None = None
    scores: tuple[tuple[float, ...], ...] | None = None
    details: dict[str, Any] = field(default_factory=dict, compare=False)
    source: str | None = field(default=None, compare=False)  # the file it was read from, for messages

    def __post_init__(self) -> None:
        where = _where(self.source)
        model = _check_identity(self.model, where)
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (frozen dataclass)
        set_("model", model)
        set_("streaming", _check_pattern(self.streaming, "streaming", where))
        set_("dense_pattern", _check_pattern(self.dense_pattern, "dense_pattern", where))
        set_("budget", _check_budget(self.budget, where))
        set_("dense_heads", _check_heads(self.dense_heads, model, where))
        set_("scores", _check_scores(self.scores, model, where))
        if self.method is not None and not isinstance(self.method, str):
            raise ValueError(f"{where}: method must be a string or None, got {self.method!r}")
        if not isinstance(self.details, dict):
            raise ValueError(f"{where}: details must be a dict, got {type(self.details).__name__}")
        allowed = budget_heads(self.budget, self.total_heads)
        if len(self.dense_heads) > allowed:
            raise ValueError(
                f"{where}: {len(self.dense_heads)} dense heads exceed the budget {self.budget:g} of "
                f"{self.total_heads} KV heads (at most {allowed} = floor(budget x heads)); raise the budget to "
                f"{len(self.dense_heads) / self.total_heads:.4g} or drop heads")

    # -- what it says -------------------------------------------------------------------------------
    @property
    def total_heads(self) -> int:
        return self.model["num_layers"] * self.model["num_kv_heads"]

    @property
    def dense_share(self) -> float:
        """Dense KV heads over all KV heads of the model."""
        return len(self.dense_heads) / self.total_heads

    def head_patterns(self) -> dict[tuple[int, int], Pattern]:
        """``{(layer, kv_head): dense_pattern}``: the ``head_patterns=`` argument of ``patch_model``."""
        return {head: self.dense_pattern for head in self.dense_heads}

    def digest(self) -> str:
        """8 hex digits that change with anything that changes the attention (model, patterns, heads)."""
        blob = json.dumps([self.streaming.spec(), self.dense_pattern.spec(), [list(h) for h in self.dense_heads],
                           [self.model[k] for k in ("model_type", *_IDENTITY_COUNTS)]])
        return hashlib.sha1(blob.encode()).hexdigest()[:8]

    def spec(self) -> str:
        """A short canonical name: ``plan[STREAMING;dense=22/90;DIGEST]`` (a results key in hf-sparse-eval)."""
        dense = "" if self.dense_pattern == Dense() else f";dense_pattern={self.dense_pattern.spec()}"
        return (f"plan[{self.streaming.spec()};dense={len(self.dense_heads)}/{self.total_heads}{dense};"
                f"{self.digest()}]")

    def summary(self) -> dict[str, Any]:
        """What ``patch_model`` stores in ``config.hf_sparse["plan"]`` beside the heads themselves."""
        return {"model": self.model.get("name"), "method": self.method, "budget": self.budget,
                "dense_heads": len(self.dense_heads), "total_heads": self.total_heads, "digest": self.digest()}

    # -- the model ---------------------------------------------------------------------------------
    def check_model(self, config) -> None:
        """``ValueError`` unless ``config`` (a transformers config) has this plan's model type and head layout."""
        have = model_identity(config)
        want = self.model
        diff = [k for k in _IDENTITY_COUNTS if have[k] != want[k]]
        if want.get("model_type") and have.get("model_type") and want["model_type"] != have["model_type"]:
            diff.insert(0, "model_type")
        if diff:
            def shape(m):
                return (f"{m.get('model_type')} with {m['num_layers']} layers x {m['num_kv_heads']} KV heads "
                        f"({m['num_attention_heads']} query heads)")

            name = f" {want['name']!r}," if want.get("name") else ""
            raise ValueError(
                f"{_where(self.source)} was calibrated for{name} {shape(want)}, but this model is {shape(have)} "
                f"({', '.join(diff)} differ); calibrate a plan for this model: hf-sparse-calibrate --model MODEL "
                f"--streaming {self.streaming.spec()!r} --budget {self.budget:g} --out plan.json")

    # -- the file ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT, "format_version": PLAN_VERSION, "model": dict(self.model),
            "streaming": self.streaming.spec(), "dense_pattern": self.dense_pattern.spec(), "budget": self.budget,
            "dense_heads": [list(h) for h in self.dense_heads], "method": self.method,
            "scores": None if self.scores is None else [list(r) for r in self.scores], "details": self.details,
        }

    @classmethod
    def from_dict(cls, data: Any, source: str | None = None) -> HeadPlan:
        where = _where(source)
        if not isinstance(data, dict):
            raise ValueError(f"{where}: a plan is a JSON object, got {type(data).__name__}")
        if data.get("format") != PLAN_FORMAT:
            raise ValueError(f"{where}: not a head plan ('format' is {data.get('format')!r}, expected "
                             f"{PLAN_FORMAT!r}); make one with hf-sparse-calibrate")
        if data.get("format_version") != PLAN_VERSION:
            raise ValueError(f"{where}: format_version {data.get('format_version')!r} is not supported by this "
                             f"hf_sparse (it reads version {PLAN_VERSION}); upgrade hf-sparse or calibrate again")
        unknown = sorted(set(data) - _KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; a plan has {sorted(_KEYS)}")
        missing = [k for k in ("model", "streaming", "budget", "dense_heads") if k not in data]
        if missing:
            raise ValueError(f"{where}: missing key(s) {missing}")
        return cls(streaming=data["streaming"], dense_heads=data["dense_heads"], model=data["model"],
                   budget=data["budget"], dense_pattern=data.get("dense_pattern") or "dense",
                   method=data.get("method"), scores=data.get("scores"), details=data.get("details") or {},
                   source=source)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan as JSON (one dense head per line stays readable in a diff)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(_dumps(self.to_dict()), encoding="utf-8")
        os.replace(tmp, path)
        return path


def _dumps(data: dict[str, Any]) -> str:
    """JSON with one key per line, the dense heads on one line and the scores one layer per line."""
    items = []
    for key, value in data.items():
        if key == "scores" and value is not None:
            body = "[\n" + ",\n".join("  " + json.dumps(row) for row in value) + "\n ]"
        else:
            body = json.dumps(value)
        items.append(f" {json.dumps(key)}: {body}")
    return "{\n" + ",\n".join(items) + "\n}\n"


def load_plan(path: str | os.PathLike) -> HeadPlan:
    """Read and validate a plan file (``ValueError`` naming the file and what is wrong)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"plan file {path} does not exist; make one with hf-sparse-calibrate --out {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"plan {path} is not JSON ({err}); give a file written by hf-sparse-calibrate") from None
    return HeadPlan.from_dict(data, source=str(path))


def as_plan(obj: Any) -> HeadPlan | None:
    """``obj`` as a plan when it is one (a :class:`HeadPlan`, a path ending in ``.json`` or a plan dict), else
    None: what ``patch_model`` and ``hf-sparse-eval --patterns`` use to tell plans from pattern specs."""
    if isinstance(obj, HeadPlan):
        return obj
    if isinstance(obj, os.PathLike):
        return load_plan(obj)
    if isinstance(obj, str) and obj.strip().lower().endswith(".json"):
        return load_plan(obj.strip())
    if isinstance(obj, dict) and "format" in obj:
        return HeadPlan.from_dict(obj)
    return None
