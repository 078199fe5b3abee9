"""``hf-sparse-calibrate``: which KV heads keep full attention, under a budget, as a head plan file.

A plan (:class:`hf_sparse.head_plan.HeadPlan`) runs one ``streaming`` pattern (a window with sinks, say)
on every KV head except the share ``budget`` of them that stay dense. Which heads those are is decided
here, by one of two methods that both score every (layer, KV head) -- higher means "needs full
attention" -- and keep the top ``floor(budget * heads)``:

* ``mass`` (training-free, one forward per prompt): the attention mass each KV head puts outside the
  streaming pattern, ``1 - exp(lse_stream - lse_full)`` per query row (the share of a row's full softmax
  that falls on keys the pattern hides), from two ``sparse_attention(..., return_lse=True)`` calls per
  layer: ``O(T)`` memory at any length. Averaged over the query heads of the KV head's group and over the
  scored rows: every row of long text, and the question and answer rows of passkey prompts; the two kinds
  of prompt weigh equally.
* ``gates`` (DuoAttention): a gate ``a`` in [0, 1] per KV head mixes the two attentions,
  ``out = a * full + (1 - a) * streaming``; with the model's weights frozen, the gates are trained to keep
  the final hidden states of the scored rows equal to those of full attention (relative squared error)
  plus ``l1 * mean(a)``, which pushes heads that are not needed towards streaming. Gates start at 1 and
  are clipped to [0, 1] after each Adam step.

Prompts: passkey prompts of :mod:`hf_sparse.eval.passkey` (their own keys and depths, not the eval's),
half with the eval's repeated filler and half hidden in real text when there is any, plus windows of
long documents (:mod:`hf_sparse.eval.data`: books, the built-in corpus, ...). Calibration runs without
padding or cache, so the model's attention is replaced by the function of this module for its duration
(the streaming output through the ``hf_sparse`` backend itself, so it is exactly what the patched model
computes).

Python: :func:`calibrate` returns the plan; ``plan.save(path)`` writes it. See docs/calibration.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import random
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from hf_sparse.cap import uncapped
from hf_sparse.head_plan import HeadPlan, budget_heads, load_plan, model_identity
from hf_sparse.ops import sparse_attention
from hf_sparse.patterns import Dense, Pattern, parse_pattern

from . import passkey as pk
from .data import add_bos
from .errors import EvalError
from .perplexity import make_units

__all__ = ["calibrate", "mass_scores", "gate_scores", "select_dense", "make_samples", "Sample", "compare_plans",
           "dense_cap_pattern", "main", "METHODS"]

METHODS = ("mass", "gates")
CALIBRATION_NAME = "hf_sparse_calibration"  # the attention implementation registered while calibrating
_PROBE = "_hf_sparse_calibration_probe"  # attribute of each attention module while calibrating
_DENSE = Dense()


# -- prompts ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """One calibration prompt: token ids and the query rows ``[lo, hi)`` that are scored."""

    ids: tuple[int, ...]
    rows: tuple[int, int]
    kind: str  # "passkey" or "text"


def make_samples(tokenizer, lengths: list[int], *, passkeys: int, texts: list[str] | None = None,
                 text_samples: int = 0, seed: int = 0) -> list[Sample]:
    """``passkeys`` passkey prompts and ``text_samples`` text windows per length.

    Passkey prompts end with their answer (the key), and their scored rows are the question and the answer:
    the rows that must reach the key. Depths are spread evenly over [0, 1]; keys come from ``seed`` (another
    stream than the eval's). Every other prompt hides its key in a window of ``texts`` when one is left.
    Text windows are non-overlapping windows of the documents, taken in turn from each (the text samples
    first, then the haystacks: no window serves twice); all their rows are scored.
    """
    prefix = add_bos(tokenizer)
    need = pk.min_prompt_length(tokenizer, prefix)
    if passkeys and min(lengths) < need:
        raise ValueError(f"length {min(lengths)} is too short for a passkey prompt (at least {need} tokens with this "
                         "tokenizer); give longer lengths")
    docs = [(f"doc{i}", tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"])
            for i, t in enumerate(texts or [])]
    question = len(tokenizer(pk.QUESTION, add_special_tokens=False)["input_ids"])
    rng = random.Random(f"calibrate-{seed}")
    samples: list[Sample] = []
    for length in lengths:
        windows = _interleave(make_units(docs, length, protocol="windows", prefix=prefix)) if docs else []
        hay = iter(windows[text_samples:])
        for i in range(passkeys):
            depth = i / (passkeys - 1) if passkeys > 1 else 0.5
            key = str(rng.randint(10000, 99999))
            haystack = next(hay, None) if i % 2 else None
            prompt = pk.build_prompt(tokenizer, length, depth, key, prefix,
                                     haystack=None if haystack is None else list(haystack.ids[len(prefix):]))
            answer = tokenizer(" " + key, add_special_tokens=False)["input_ids"]
            ids = tuple(prompt.ids + answer)
            samples.append(Sample(ids, (len(prompt.ids) - question, len(ids)), "passkey"))
        if text_samples and not windows:
            raise ValueError(f"no document has {length} tokens for a text sample; give longer texts, shorter lengths "
                             "or no text samples")
        for unit in windows[:text_samples]:
            samples.append(Sample(unit.ids, (0, len(unit.ids)), "text"))
    return samples


def _interleave(units: list) -> list:
    """Windows taken in turn from each document (``make_units`` lists them document by document)."""
    by_doc: dict[str, list] = {}
    for u in units:
        by_doc.setdefault(u.doc_id, []).append(u)
    out = []
    for i in range(max((len(v) for v in by_doc.values()), default=0)):
        out += [v[i] for v in by_doc.values() if i < len(v)]
    return out


# -- the calibration attention ------------------------------------------------------------------------
class _Probe:
    """What the calibration attention does in each layer: ``full`` (dense output), ``mass`` (dense output,
    and the mass outside the streaming pattern accumulated per KV head) or ``mix`` (gated output)."""

    def __init__(self, streaming: Pattern, layers: int, kv_heads: int, backend: str, device) -> None:
        # the mass outside a pattern is about which keys it shows, not how a distance cap scores them
        self.streaming, self.visible, self.backend = streaming, uncapped(streaming), backend
        self.mode = "full"
        self.rows = (0, 0)
        self.gates: torch.Tensor | None = None
        self.mass = torch.zeros(layers, kv_heads, dtype=torch.float64, device=device)

    def attend(self, module, query, key, value, attention_mask, scaling, softcap, kwargs) -> torch.Tensor:
        if query.shape[2] != key.shape[2]:
            raise RuntimeError("calibration runs whole prompts without a cache (use_cache=False)")
        layer = module.layer_idx
        scale = scaling if scaling is not None else getattr(module, "scaling", None)
        common = dict(scale=scale, softcap=softcap, layer=layer, backend=self.backend)
        if self.mode == "mass":
            out, lse_full = sparse_attention(query, key, value, _DENSE, return_lse=True, **common)
            _, lse_stream = sparse_attention(query, key, value, self.visible, return_lse=True, **common)
            lo, hi = self.rows
            self.mass[layer] += outside_mass(lse_full[:, :, lo:hi], lse_stream[:, :, lo:hi], key.shape[1])
            return out
        out = sparse_attention(query, key, value, _DENSE, **common)
        if self.mode == "mix":
            from hf_sparse.patches.attention import hf_sparse_attention

            stream = hf_sparse_attention(module, query, key, value, attention_mask, scaling=scaling,
                                         softcap=softcap, **kwargs)[0].transpose(1, 2)
            gate = self.gates[layer].to(out.dtype).repeat_interleave(query.shape[1] // key.shape[1])
            out = stream + gate[None, :, None, None] * (out - stream)
        return out


def outside_mass(lse_full: torch.Tensor, lse_stream: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[Hkv]``: mean over batch, rows and the query heads of each KV head of ``1 - exp(lse_stream - lse_full)``,
    the share of each row's full softmax on keys the streaming pattern hides (``lse`` ``[B, Hq, T]``; a row
    that sees no key under the pattern has all its mass outside)."""
    inside = torch.exp(lse_stream.double() - lse_full.double()).nan_to_num(0.0).clamp(0.0, 1.0)
    per_head = (1.0 - inside).mean(dim=(0, 2))  # [Hq]
    return per_head.view(kv_heads, -1).mean(1)


def _calibration_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                           sliding_window=None, softcap=None, **kwargs):
    probe = getattr(module, _PROBE, None)
    if probe is None:
        raise RuntimeError(f"the {CALIBRATION_NAME!r} attention runs only inside hf_sparse.eval.calibrate.calibrate")
    out = probe.attend(module, query, key, value, attention_mask, scaling, softcap, kwargs)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from hf_sparse.patches._compat import AttentionInterface, AttentionMaskInterface
    from hf_sparse.patches.attention import hf_sparse_mask

    AttentionInterface.register(CALIBRATION_NAME, _calibration_attention)
    AttentionMaskInterface.register(CALIBRATION_NAME, hf_sparse_mask)  # the 2D padding mask (None: no padding)


def _decoder(model):
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    return decoder if decoder is not None and decoder is not model else model.base_model


@contextlib.contextmanager
def _calibrating(model, streaming: Pattern, backend: str) -> Iterator[_Probe]:
    """The model patched with ``streaming`` (so the streaming output is the ``hf_sparse`` backend's own), its
    attention switched to the probe, its weights frozen; everything put back afterwards."""
    from hf_sparse.patches import patch_model, unpatch_model
    from hf_sparse.patches.model import _attention_modules
    from hf_sparse.patches.options import ATTN_NAME

    if isinstance(getattr(model.config, "hf_sparse", None), dict):
        raise ValueError("calibrate takes the model with its own full attention; call "
                         "hf_sparse.unpatch_model(model) first")
    if model.training:
        raise ValueError("calibrate needs the model in eval mode (model.eval()): dropout would make the scores noise")
    patch_model(model, streaming, backend=backend)
    modules = _attention_modules(model)
    config = model.config.get_text_config(decoder=True)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    device = next(model.parameters()).device
    probe = _Probe(streaming, config.num_hidden_layers, kv_heads, backend, device)
    frozen = [p for p in model.parameters() if p.requires_grad]
    try:
        _register()
        model.set_attn_implementation(CALIBRATION_NAME)
        for m in modules:
            setattr(m, _PROBE, probe)
        for p in frozen:
            p.requires_grad_(False)
        yield probe
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for m in modules:
            m.__dict__.pop(_PROBE, None)
        model.set_attn_implementation(ATTN_NAME)
        unpatch_model(model)


def _hidden(model, sample: Sample, device) -> torch.Tensor:
    """Final hidden states of the scored rows, ``[rows, hidden]`` (the input of the LM head)."""
    ids = torch.tensor([sample.ids], device=device)
    lo, hi = sample.rows
    return _decoder(model)(input_ids=ids, use_cache=False).last_hidden_state[0, lo:hi]


# -- the two methods ----------------------------------------------------------------------------------
@torch.no_grad()
def mass_scores(model, samples: list[Sample], streaming: Pattern | str, *, backend: str = "auto",
                progress: bool = False) -> tuple[torch.Tensor, dict[str, list[list[float]]]]:
    """``[layers, kv_heads]`` mean mass outside ``streaming`` (passkey and text prompts weigh equally) and
    the per-kind means (``{"passkey": ..., "text": ...}``)."""
    streaming = parse_pattern(streaming)
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    with _calibrating(model, streaming, backend) as probe:
        probe.mode = "mass"
        for i, sample in enumerate(samples):
            probe.mass.zero_()
            probe.rows = sample.rows
            _decoder(model)(input_ids=torch.tensor([sample.ids], device=device), use_cache=False)
            sums[sample.kind] = sums.get(sample.kind, 0) + probe.mass
            counts[sample.kind] = counts.get(sample.kind, 0) + 1
            _progress(progress, f"mass: prompt {i + 1}/{len(samples)} ({sample.kind}, {len(sample.ids)} tokens)")
    parts = {kind: (sums[kind] / counts[kind]).float().cpu() for kind in sorted(sums)}
    score = torch.stack(list(parts.values())).mean(0)
    return score, {kind: v.tolist() for kind, v in parts.items()}


def gate_scores(model, samples: list[Sample], streaming: Pattern | str, *, steps: int = 100, lr: float = 0.02,
                l1: float = 0.05, backend: str = "auto", seed: int = 0, max_seconds: float | None = None,
                progress: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
    """``[layers, kv_heads]`` trained gates (DuoAttention) and a record of the training (losses, steps)."""
    streaming = parse_pattern(streaming)
    device = next(model.parameters()).device
    rng = random.Random(f"gates-{seed}")
    start = time.perf_counter()
    history: list[dict[str, float]] = []
    with _calibrating(model, streaming, backend) as probe:
        with torch.no_grad():  # the teacher: every head dense (weights are frozen, so once per prompt)
            probe.mode = "full"
            targets = [_hidden(model, s, device).float() for s in samples]
        gates = torch.ones_like(probe.mass, dtype=torch.float32).requires_grad_(True)
        probe.gates, probe.mode = gates, "mix"
        opt = torch.optim.Adam([gates], lr=lr)
        order: list[int] = []
        done = 0
        gate_sum = torch.zeros_like(gates)
        for step in range(steps):
            if max_seconds is not None and time.perf_counter() - start > max_seconds:
                break
            if not order:
                order = list(range(len(samples)))
                rng.shuffle(order)
            i = order.pop()
            hidden = _hidden(model, samples[i], device).float()
            distill = (hidden - targets[i]).pow(2).sum() / targets[i].pow(2).sum().clamp_min(1e-12)
            loss = distill + l1 * gates.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                gates.clamp_(0.0, 1.0)
                gate_sum += gates
            done = step + 1
            if step % 10 == 0 or step == steps - 1:
                mean_gate = float(gates.detach().mean())
                history.append({"step": step, "distill": float(distill.detach()), "mean_gate": mean_gate})
                _progress(progress, f"gates: step {step + 1}/{steps} distill {history[-1]['distill']:.4g} "
                                    f"mean gate {mean_gate:.3f}")
    mean_gates = (gate_sum / max(done, 1)).cpu()
    record = {"steps_done": done, "history": history, "seconds": time.perf_counter() - start,
              "mean_gates": mean_gates.tolist()}
    return gates.detach().float().cpu(), record


def select_dense(scores: torch.Tensor, budget: float, tiebreak: torch.Tensor | None = None) -> list[tuple[int, int]]:
    """The ``floor(budget * heads)`` (layer, KV head) pairs of highest score; ties go to the higher ``tiebreak``
    (gates: their mean over the training), then to the lower layer and head."""
    layers, kv_heads = scores.shape
    n = budget_heads(budget, layers * kv_heads)
    second = tiebreak if tiebreak is not None else torch.zeros_like(scores)
    ranked = sorted(((float(scores[i, h]), float(second[i, h]), i, h) for i in range(layers) for h in range(kv_heads)),
                    key=lambda t: (-t[0], -t[1], t[2], t[3]))
    return sorted((i, h) for _, _, i, h in ranked[:n])


def calibrate(model, tokenizer, streaming: Pattern | str, budget: float, *, method: str = "gates",
              texts: list[str] | None = None, lengths: list[int] | tuple[int, ...] = (4096,), passkeys: int = 8,
              text_samples: int = 4, steps: int = 100, lr: float = 0.02, l1: float = 0.05, seed: int = 0,
              backend: str = "auto", max_seconds: float | None = None, name: str | None = None,
              progress: bool = False, dense_pattern: Pattern | str = "dense") -> HeadPlan:
    """A :class:`~hf_sparse.head_plan.HeadPlan` for ``model``: ``streaming`` everywhere except the
    ``floor(budget * layers * kv_heads)`` KV heads that ``method`` scores highest, which stay dense.

    Args:
        model: a supported ``*ForCausalLM``, unpatched, in eval mode (its weights are not changed).
        tokenizer: its tokenizer.
        streaming: the pattern of the other heads, e.g. ``"longformer:window=1024,global_tokens=4"``.
        budget: the share of KV heads that may stay dense, in [0, 1].
        method: ``"mass"`` (training-free) or ``"gates"`` (DuoAttention), see the module docstring.
        texts: documents for text windows and passkey haystacks (optional).
        lengths: prompt lengths in tokens; ``passkeys`` prompts and ``text_samples`` windows per length.
        steps, lr, l1, max_seconds: the gates' training (``max_seconds`` stops it early; the plan says so).
        backend: ``sparse_attention`` backend of both attentions.
        name: the model's name in the plan (default: the config's ``_name_or_path``).
        dense_pattern: what the dense heads run, written into the plan: ``"dense"``, or
            ``"dense:max_distance=auto"`` to cap their distances past the trained length. The scores always
            compare with plain dense attention (the cap changes nothing within the trained length).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: use one of {', '.join(METHODS)}")
    streaming = parse_pattern(streaming)
    plan_check = HeadPlan(streaming, (), model_identity(model.config, name), budget,  # validates budget/patterns
                          dense_pattern=dense_pattern)
    if passkeys < 0 or text_samples < 0 or passkeys + text_samples == 0:
        raise ValueError(f"passkeys={passkeys}, text_samples={text_samples}: give at least one prompt")
    if text_samples and not texts:
        raise ValueError("text_samples > 0 needs texts=[...] (documents), or pass text_samples=0")
    samples = make_samples(tokenizer, list(lengths), passkeys=passkeys, texts=texts, text_samples=text_samples,
                           seed=seed)
    start = time.perf_counter()
    settings: dict[str, Any] = {"lengths": list(lengths), "passkeys": passkeys, "text_samples": text_samples,
                                "seed": seed, "backend": backend, "prompts": len(samples)}
    tiebreak = None
    if method == "mass":
        scores, parts = mass_scores(model, samples, streaming, backend=backend, progress=progress)
        details: dict[str, Any] = {"settings": settings, "components": parts}
    else:
        settings.update(steps=steps, lr=lr, l1=l1, max_seconds=max_seconds)
        scores, record = gate_scores(model, samples, streaming, steps=steps, lr=lr, l1=l1, backend=backend,
                                     seed=seed, max_seconds=max_seconds, progress=progress)
        details = {"settings": settings, "training": record}
        tiebreak = torch.tensor(record["mean_gates"])
    details["seconds"] = time.perf_counter() - start
    return HeadPlan(streaming, select_dense(scores, budget, tiebreak), plan_check.model, plan_check.budget, method=method,
                    scores=scores.tolist(), details=details, dense_pattern=plan_check.dense_pattern)


def _progress(enabled: bool, msg: str) -> None:
    if enabled:
        print(msg, file=sys.stderr, flush=True)


# -- comparing plans ----------------------------------------------------------------------------------
def compare_plans(a: HeadPlan, b: HeadPlan) -> dict[str, Any]:
    """Overlap of two plans' dense heads and the rank correlation of their scores (same model only)."""
    if a.model["num_layers"] != b.model["num_layers"] or a.model["num_kv_heads"] != b.model["num_kv_heads"]:
        raise ValueError("the two plans are for models of different shapes; compare plans of one model")
    sa, sb = set(a.dense_heads), set(b.dense_heads)
    union = sa | sb
    out: dict[str, Any] = {
        "dense": [len(sa), len(sb)], "common": sorted(sa & sb), "only_a": sorted(sa - sb), "only_b": sorted(sb - sa),
        "jaccard": len(sa & sb) / len(union) if union else 1.0, "spearman": None,
        "per_layer": [[sum(1 for i, _ in sa if i == layer), sum(1 for i, _ in sb if i == layer)]
                      for layer in range(a.model["num_layers"])],
    }
    if a.scores is not None and b.scores is not None:
        out["spearman"] = _spearman([x for row in a.scores for x in row], [x for row in b.scores for x in row])
    return out


def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def _spearman(xs: list[float], ys: list[float]) -> float | None:
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((x - mx) * (y - my) for x, y in zip(rx, ry))
    vx, vy = sum((x - mx) ** 2 for x in rx), sum((y - my) ** 2 for y in ry)
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else None


def comparison_markdown(a: HeadPlan, b: HeadPlan, names: tuple[str, str]) -> str:
    c = compare_plans(a, b)
    lines = [f"| | {names[0]} | {names[1]} |", "| --- | --- | --- |",
             f"| method | {a.method} | {b.method} |", f"| streaming | {a.streaming.spec()} | {b.streaming.spec()} |",
             f"| dense KV heads | {c['dense'][0]}/{a.total_heads} | {c['dense'][1]}/{b.total_heads} |",
             f"| dense per layer | {' '.join(str(x[0]) for x in c['per_layer'])} | "
             f"{' '.join(str(x[1]) for x in c['per_layer'])} |", "",
             f"common dense heads: {len(c['common'])} (Jaccard {c['jaccard']:.2f}); rank correlation of the scores "
             f"(Spearman): {'-' if c['spearman'] is None else format(c['spearman'], '.2f')}",
             f"only in {names[0]}: {[list(h) for h in c['only_a']]}", f"only in {names[1]}: {[list(h) for h in c['only_b']]}"]
    return "\n".join(lines)


# -- the command --------------------------------------------------------------------------------------
PROG = "hf-sparse-calibrate"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Choose the KV heads that keep full attention under a budget; the others run a "
                               "streaming pattern. Writes a head plan file for patch_model and hf-sparse-eval. "
                               f"`{PROG} compare A.json B.json` compares two plans.",
        epilog="See docs/calibration.md.")
    p.add_argument("--model", default="smollm2-135m", help="as in hf-sparse-eval [%(default)s]")
    p.add_argument("--streaming", required=True, help="pattern of the other heads, e.g. "
                                                      "longformer:window=1024,global_tokens=4")
    p.add_argument("--budget", required=True, type=float, help="share of KV heads kept dense, in [0, 1]")
    p.add_argument("--out", required=True, help="the plan file to write (.json)")
    p.add_argument("--dense-cap", default="none",
                   help="distance cap of the dense heads, written into the plan as dense:max_distance=...: auto (the "
                        "model's trained length), none (plain dense) or N tokens [%(default)s]")
    p.add_argument("--method", default="gates", choices=METHODS,
                   help="gates (trained, keeps retrieval heads) or mass (no training, a quick first look) [%(default)s]")
    p.add_argument("--dataset", default="stdlib", help="documents for text prompts and passkey haystacks, as in "
                                                       "hf-sparse-eval (a .txt file or folder, ...) [%(default)s]")
    p.add_argument("--lengths", default="4096", help="prompt lengths, e.g. 4k,8k [%(default)s]")
    p.add_argument("--passkeys", type=int, default=8, help="passkey prompts per length [%(default)s]")
    p.add_argument("--texts", type=int, default=4, help="text windows per length; 0: passkeys only [%(default)s]")
    p.add_argument("--steps", type=int, default=100, help="gates: optimizer steps [%(default)s]")
    p.add_argument("--lr", type=float, default=0.02, help="gates: Adam learning rate [%(default)s]")
    p.add_argument("--l1", type=float, default=0.05, help="gates: weight of mean(gate) in the loss [%(default)s]")
    p.add_argument("--max-seconds", type=float, default=None, help="gates: stop training after this long")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--backend", default="auto", help="auto, triton or reference [%(default)s]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


def dense_cap_pattern(value: str) -> Pattern:
    """The plan's ``dense_pattern`` for ``--dense-cap VALUE`` (``auto``, ``none`` or a number of tokens)."""
    try:
        return parse_pattern(f"dense:max_distance={value.strip()}")
    except ValueError as err:
        raise EvalError(f"--dense-cap {value!r}: {err}") from None


def _checked(args) -> tuple[Pattern, list[int]]:
    from hf_sparse.ops import BACKENDS

    from .options import parse_lengths

    try:
        streaming = parse_pattern(args.streaming)
    except ValueError as err:
        raise EvalError(f"--streaming: {err}") from None
    if not streaming.causal or streaming.per_head:
        raise EvalError(f"--streaming {streaming.spec()}: give one causal pattern for every non-dense head")
    if not 0.0 <= args.budget <= 1.0:
        raise EvalError(f"--budget {args.budget} is outside [0, 1]; it is the share of KV heads kept dense, e.g. 0.25")
    if not args.out.lower().endswith(".json"):
        raise EvalError(f"--out {args.out}: a plan file name ends in .json (patch_model and hf-sparse-eval tell "
                        "plans from patterns by it)")
    for name in ("passkeys", "texts", "steps"):
        if getattr(args, name) < 0:
            raise EvalError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.passkeys + args.texts == 0:
        raise EvalError("--passkeys 0 --texts 0 leaves no prompt to calibrate on")
    if args.method == "gates" and args.steps < 1:
        raise EvalError("--method gates needs --steps >= 1")
    if not (args.lr > 0 and args.l1 >= 0):
        raise EvalError(f"--lr must be > 0 and --l1 >= 0, got {args.lr} and {args.l1}")
    if args.backend not in BACKENDS or args.backend == "dense":
        raise EvalError(f"--backend {args.backend!r}: use auto, triton or reference")
    return streaming, parse_lengths(args.lengths)


def _texts(dataset: str, tokenizer, min_length: int, wanted: int) -> list[str]:
    from .data import DataSpec, check_dataset, iter_documents

    spec = DataSpec(dataset)
    check_dataset(spec)
    texts = []
    for doc in iter_documents(spec):
        if len(tokenizer(doc.text, add_special_tokens=False, verbose=False)["input_ids"]) >= min_length:
            texts.append(doc.text)
        if len(texts) >= wanted:
            break
    if not texts:
        raise EvalError(f"--dataset {dataset}: no document has {min_length} tokens; give longer texts or --texts 0")
    return texts


def run(args, argv: list[str]) -> HeadPlan:
    from .models import load_model, load_tokenizer, resolve_device, resolve_dtype, resolve_model
    from .results import environment_info

    streaming, lengths = _checked(args)
    dense_pattern = dense_cap_pattern(args.dense_cap)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    source = resolve_model(args.model)
    tokenizer = load_tokenizer(source)
    # enough documents for a window each: the text samples, then a haystack for every other passkey prompt
    wanted = args.texts + (args.passkeys + 1) // 2
    texts = _texts(args.dataset, tokenizer, lengths[-1], wanted) if (args.texts or args.dataset != "stdlib") else None
    model = load_model(source, device, dtype)
    try:
        plan = calibrate(model, tokenizer, streaming, args.budget, method=args.method, texts=texts, lengths=lengths,
                         passkeys=args.passkeys, text_samples=args.texts, steps=args.steps, lr=args.lr, l1=args.l1,
                         seed=args.seed, backend=args.backend, max_seconds=args.max_seconds, name=source.label,
                         progress=not args.no_progress, dense_pattern=dense_pattern)
    except ValueError as err:
        raise EvalError(str(err)) from None
    env = environment_info(device)
    details = {**plan.details, "command": shlex.join([PROG, *argv]), "dataset": args.dataset,
               "dtype": str(dtype).removeprefix("torch."), "env": env}
    plan = dataclasses.replace(plan, details=details)
    plan.save(args.out)
    return plan


def _compare(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=f"{PROG} compare", description="compare the dense heads of two plans")
    p.add_argument("a")
    p.add_argument("b")
    args = p.parse_args(argv)
    try:
        a, b = load_plan(args.a), load_plan(args.b)
        print(comparison_markdown(a, b, (args.a, args.b)))
    except (ValueError, FileNotFoundError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        return _compare(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        plan = run(args, argv)
    except EvalError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no plan written", file=sys.stderr)
        return 130
    print(f"{args.out}: {len(plan.dense_heads)}/{plan.total_heads} KV heads dense ({plan.method}, budget "
          f"{plan.budget:g}), the others {plan.streaming.spec()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
