"""Tables and plots from ``results.jsonl``: ``summary.md``, ``summary.csv`` and PNG figures.

The report shows the settings of the latest run of each task in the folder (records of older runs
with other settings stay in the file but are left out). Perplexity aggregates exactly over units,
``exp(sum nll / sum tokens)``; the change against ``full`` is computed on the units both share.
"""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import EvalError
from .results import read_results

__all__ = ["render_report", "Summary", "summarize"]

PLOTS = ("ppl_vs_length.png", "ppl_by_position.png", "passkey_accuracy.png")


@dataclass
class PplCell:
    units: dict[str, dict[str, Any]] = field(default_factory=dict)  # item -> record

    def ppl(self, items: set[str] | None = None) -> float:
        rows = [r for k, r in self.units.items() if items is None or k in items]
        tokens = sum(r["tokens"] for r in rows)
        return math.exp(sum(r["nll_sum"] for r in rows) / tokens) if tokens else float("nan")

    def buckets(self) -> list[tuple[int, int, float]]:
        """``(start, end, ppl)`` per position bucket, summed over units."""
        rows = list(self.units.values())
        edges = rows[0]["bucket_edges"]
        out = []
        for b in range(len(edges) - 1):
            nll = sum(r["bucket_nll"][b] for r in rows)
            n = sum(r["bucket_tokens"][b] for r in rows)
            out.append((edges[b], edges[b + 1], math.exp(nll / n) if n else float("nan")))
        return out

    def cost(self) -> dict[str, Any]:
        rows = list(self.units.values())
        seconds = sum(r["seconds"] for r in rows)
        peaks = [r["peak_mem_bytes"] for r in rows if r.get("peak_mem_bytes")]
        rss = [r["rss_max_bytes"] for r in rows if r.get("rss_max_bytes")]
        return {
            "density": rows[0]["density"], "dense_kv_heads": rows[0].get("dense_kv_heads"),
            "kv_heads_total": rows[0].get("kv_heads_total"),
            "tokens_per_s": sum(r["length"] for r in rows) / seconds if seconds > 0 else None,
            "peak_mem_mib": max(peaks) / 2**20 if peaks else None,
            "rss_max_mib": max(rss) / 2**20 if rss else None,
        }


@dataclass
class Summary:
    run: dict[str, Any] | None
    labels: dict[str, str]  # spec -> label
    order: list[str]  # specs
    ppl: dict[tuple[str, int], PplCell]
    passkey: dict[tuple[str, int, float], list[bool]]
    passkey_cost: dict[tuple[str, int], list[dict[str, Any]]]
    max_pos: int | None

    def lengths(self, task: str) -> list[int]:
        keys = self.ppl if task == "perplexity" else self.passkey_cost
        return sorted({k[1] for k in keys})

    def delta(self, spec: str, length: int) -> float | None:
        """Percent change of perplexity against ``full`` on the units both have."""
        base, cell = self.ppl.get(("full", length)), self.ppl.get((spec, length))
        if spec == "full" or base is None or cell is None:
            return None
        common = set(base.units) & set(cell.units)
        if not common:
            return None
        return (cell.ppl(common) / base.ppl(common) - 1.0) * 100.0

    def beyond(self, length: int) -> bool:
        return self.max_pos is not None and length > self.max_pos

    def dense_heads(self, spec: str) -> tuple[int, int] | None:
        """``(dense KV heads, KV heads)`` of the model under ``spec``, as its records say."""
        recs = [r for (sp, _), cell in self.ppl.items() if sp == spec for r in cell.units.values()]
        recs += [r for (sp, _), rows in self.passkey_cost.items() if sp == spec for r in rows]
        for r in recs:
            if r.get("kv_heads_total"):
                return r["dense_kv_heads"], r["kv_heads_total"]
        return None

    def cache_bytes(self, spec: str, length: int) -> int | None:
        """The largest KV cache that ``generate`` kept for the passkey prompts of this length."""
        sizes = [r["cache_bytes"] for r in self.passkey_cost.get((spec, length), []) if r.get("cache_bytes")]
        return max(sizes) if sizes else None

    def cache_vs_full(self, spec: str, length: int) -> float | None:
        base, mine = self.cache_bytes("full", length), self.cache_bytes(spec, length)
        return mine / base if base and mine is not None else None


def _latest_settings(records: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """The latest run record (its dataset facts from the latest run that had perplexity) and, per task,
    the settings hash of the latest run of that task."""
    runs = [r for r in records if r.get("task") == "run"]
    settings: dict[str, str] = {}
    for r in reversed(runs):
        for task, h in r.get("settings", {}).items():
            if task in r.get("tasks", []):
                settings.setdefault(task, h)
    if not runs:
        return None, settings
    run = dict(runs[-1])
    ppl_runs = [r for r in runs if "perplexity" in r.get("tasks", [])]
    if ppl_runs:
        for k in ("dataset", "docs", "protocol"):
            run[k] = ppl_runs[-1].get(k)
    return run, settings


def summarize(records: list[dict[str, Any]]) -> Summary:
    run, settings = _latest_settings(records)
    labels: dict[str, str] = {}
    order: list[str] = [p["spec"] for p in run["patterns"]] if run else []
    ppl: dict[tuple[str, int], PplCell] = defaultdict(PplCell)
    passkey: dict[tuple[str, int, float], dict[str, bool]] = defaultdict(dict)
    passkey_cost: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    max_pos = run.get("max_position_embeddings") if run else None
    for r in records:
        task = r.get("task")
        if task not in ("perplexity", "passkey") or "key" not in r:
            continue
        if settings and r.get("setting") != settings.get(task):
            continue
        spec = r["pattern_spec"]
        labels[spec] = r["pattern"]
        if spec not in order:
            order.append(spec)
        max_pos = max_pos or r.get("max_position_embeddings")
        if task == "perplexity":
            ppl[(spec, r["length"])].units[f"{r['doc']}#{r['item']}"] = r
        else:
            passkey[(spec, r["length"], r["depth"])][r["key"]] = bool(r["correct"])
            passkey_cost[(spec, r["length"])].append(r)
    for p in run["patterns"] if run else []:
        labels.setdefault(p["spec"], p["label"])
    return Summary(run, labels, order, dict(ppl), {k: list(v.values()) for k, v in passkey.items()},
                   dict(passkey_cost), max_pos)


# -- markdown ---------------------------------------------------------------------------------------
def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


def _len_header(s: Summary, length: int) -> str:
    return f"L={length}" + (" †" if s.beyond(length) else "")


def markdown(s: Summary) -> str:
    lines = ["# hf-sparse-eval summary", ""]
    run = s.run or {}
    env = run.get("env", {})
    if run:
        lines += [
            f"- model: `{run.get('model')}` (max_position_embeddings={run.get('max_position_embeddings')})",
            f"- dataset: {run.get('dataset') or '-'}",
            f"- device: {env.get('device_name')}, dtype {run.get('dtype')}, backend {run.get('backend')}",
            f"- versions: torch {env.get('torch')}, transformers {env.get('transformers')}, "
            f"triton {env.get('triton')}, hf_sparse {env.get('hf_sparse')}; commit {env.get('commit')}",
        ]
        docs = run.get("docs")
        if docs:
            per = ", ".join(f"{n} at L={L}" for L, n in docs.get("per_length", {}).items())
            lines.append(f"- documents: {docs['used']} used ({per}); {docs['skipped_short']} skipped as shorter "
                         f"than every context length")
        lines.append("")
    lengths = s.lengths("perplexity")
    if lengths:
        proto = (run.get("protocol") or "first")
        what = ("each document cut to its first L tokens" if proto == "first"
                else "non-overlapping L-token windows of each document")
        lines += [f"## Perplexity ({what}; change against full in brackets)", ""]
        rows = []
        for spec in s.order:
            cells = []
            for L in lengths:
                cell = s.ppl.get((spec, L))
                if cell is None:
                    cells.append("-")
                    continue
                d = s.delta(spec, L)
                cells.append(_fmt(cell.ppl()) + (f" ({d:+.1f}%)" if d is not None else ""))
            if any(c != "-" for c in cells):
                rows.append([s.labels[spec], *cells])
        lines += _table(["pattern", *(_len_header(s, L) for L in lengths)], rows)
        if any(s.beyond(L) for L in lengths):
            lines += ["", f"† beyond the model's trained length ({s.max_pos} positions)"]
        L = lengths[-1]
        present = [spec for spec in s.order if (spec, L) in s.ppl]
        if present:
            buckets = s.ppl[(present[0], L)].buckets()
            lines += ["", f"### Perplexity by position at L={L}", ""]
            rows = [[s.labels[spec], *(_fmt(b[2]) for b in s.ppl[(spec, L)].buckets())] for spec in present]
            lines += _table(["pattern", *(f"{a}-{b}" for a, b, _ in buckets)], rows)
        lines += ["", "### Cost (perplexity forward passes)", ""]
        rows = []
        for spec in s.order:
            for L in lengths:
                cell = s.ppl.get((spec, L))
                if cell is None:
                    continue
                c = cell.cost()
                rows.append([s.labels[spec], str(L), str(len(cell.units)), _fmt(c["density"], ".3f"),
                             _fmt(c["tokens_per_s"], ".0f"), _fmt(c["peak_mem_mib"], ".0f"),
                             _fmt(c["rss_max_mib"], ".0f")])
        lines += _table(["pattern", "L", "units", "density", "tokens/s", "peak GPU MiB", "process RSS max MiB"], rows)
        lines.append("")
    pk_lengths = s.lengths("passkey")
    if pk_lengths:
        lines += ["## Passkey retrieval accuracy (mean over depths and trials)", ""]
        rows = []
        for spec in s.order:
            cells = []
            for L in pk_lengths:
                hits = [h for (sp, ln, _), v in s.passkey.items() if sp == spec and ln == L for h in v]
                cells.append(_fmt(sum(hits) / len(hits)) if hits else "-")
            if any(c != "-" for c in cells):
                rows.append([s.labels[spec], *cells])
        lines += _table(["pattern", *(_len_header(s, L) for L in pk_lengths)], rows)
        depths = sorted({k[2] for k in s.passkey})
        lines += ["", "### By depth (0 = key at the start of the filler)", ""]
        rows = []
        for spec in s.order:
            for L in pk_lengths:
                cells = []
                for d in depths:
                    v = s.passkey.get((spec, L, d))
                    cells.append(f"{sum(v)}/{len(v)}" if v else "-")
                if any(c != "-" for c in cells):
                    rows.append([s.labels[spec], str(L), *cells])
        lines += _table(["pattern", "L", *(f"depth {d:g}" for d in depths)], rows)
        lines.append("")
    return "\n".join(lines + _heads_and_cache(s))


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def _heads_and_cache(s: Summary) -> list[str]:
    """Dense KV heads per pattern or plan, and the KV cache that ``generate`` kept after the passkey prompts
    (measured on the cache object) against full attention's."""
    heads = {spec: s.dense_heads(spec) for spec in s.order}
    if not any(heads.values()):
        return []
    lengths = s.lengths("passkey")
    rows = []
    for spec in s.order:
        if heads[spec] is None:
            continue
        n, total = heads[spec]
        cells = []
        for L in lengths:
            size, share = s.cache_bytes(spec, L), s.cache_vs_full(spec, L)
            cells.append("-" if size is None else _bytes(size) + (f" ({share:.0%})" if share is not None
                                                                  and spec != "full" else ""))
        rows.append([s.labels[spec], f"{n}/{total} ({n / total:.0%})", *cells])
    what = "; the KV cache that generate kept for the passkey prompt, share of full in brackets" if lengths else ""
    return [f"## Dense KV heads{' and KV cache' if lengths else ''} (dense heads over all KV heads{what})", "",
            *_table(["pattern", "dense KV heads", *(f"cache L={L}" for L in lengths)], rows), ""]


# -- csv --------------------------------------------------------------------------------------------
CSV_FIELDS = ["task", "pattern", "pattern_spec", "length", "depth", "position_start", "position_end", "units",
              "tokens", "ppl", "delta_vs_full_pct", "density", "tokens_per_s", "peak_mem_mib", "rss_max_mib",
              "accuracy", "correct", "trials", "dense_kv_heads", "kv_heads_total", "cache_bytes", "cache_vs_full"]


def csv_rows(s: Summary) -> list[dict[str, Any]]:
    rows = []
    for (spec, L), cell in sorted(s.ppl.items(), key=lambda kv: (s.order.index(kv[0][0]), kv[0][1])):
        base = {"pattern": s.labels[spec], "pattern_spec": spec, "length": L, "units": len(cell.units)}
        rows.append({**base, "task": "perplexity", "tokens": sum(r["tokens"] for r in cell.units.values()),
                     "ppl": cell.ppl(), "delta_vs_full_pct": s.delta(spec, L), **cell.cost()})
        for a, b, p in cell.buckets():
            rows.append({**base, "task": "perplexity_by_position", "position_start": a, "position_end": b, "ppl": p})
    for (spec, L, d), hits in sorted(s.passkey.items(), key=lambda kv: (s.order.index(kv[0][0]), kv[0][1:])):
        recs = [r for r in s.passkey_cost[(spec, L)] if r["depth"] == d]
        secs = sum(r["seconds"] for r in recs)
        rows.append({"task": "passkey", "pattern": s.labels[spec], "pattern_spec": spec, "length": L, "depth": d,
                     "accuracy": sum(hits) / len(hits), "correct": sum(hits), "trials": len(hits),
                     "density": recs[0]["density"],
                     "tokens_per_s": sum(r["prompt_tokens"] for r in recs) / secs if secs > 0 else None})
    for (spec, L) in sorted(s.passkey_cost, key=lambda k: (s.order.index(k[0]), k[1])):
        size, heads = s.cache_bytes(spec, L), s.dense_heads(spec)
        if size is not None:
            rows.append({"task": "kv_cache", "pattern": s.labels[spec], "pattern_spec": spec, "length": L,
                         "cache_bytes": size, "cache_vs_full": s.cache_vs_full(spec, L),
                         "dense_kv_heads": heads[0] if heads else None, "kv_heads_total": heads[1] if heads else None})
    return rows


# -- plots ------------------------------------------------------------------------------------------
def _save(fig, path: Path) -> None:
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def plots(s: Summary, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    lengths = s.lengths("perplexity")
    if lengths:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for spec in s.order:
            pts = [(L, s.ppl[(spec, L)].ppl()) for L in lengths if (spec, L) in s.ppl]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=s.labels[spec])
        if s.max_pos is not None and lengths[-1] > s.max_pos:
            ax.axvline(s.max_pos, color="grey", linestyle="--", linewidth=1, label="trained length")
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(L) for L in lengths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("perplexity")
        ax.set_title("Perplexity vs context length")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        _save(fig, out / PLOTS[0])
        plt.close(fig)
        written.append(out / PLOTS[0])

        fig, axes = plt.subplots(1, len(lengths), figsize=(4.6 * len(lengths), 3.8), squeeze=False)
        for ax, L in zip(axes[0], lengths):
            for spec in s.order:
                if (spec, L) not in s.ppl:
                    continue
                b = s.ppl[(spec, L)].buckets()
                ax.plot([(x + y) / 2 for x, y, _ in b], [p for _, _, p in b], marker=".", label=s.labels[spec])
            ax.set_title(f"L={L}" + (" (beyond trained length)" if s.beyond(L) else ""))
            ax.set_xlabel("token position")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("perplexity")
        axes[0][-1].legend(fontsize=7)
        fig.suptitle("Perplexity by position")
        _save(fig, out / PLOTS[1])
        plt.close(fig)
        written.append(out / PLOTS[1])

    pk_lengths = s.lengths("passkey")
    if pk_lengths:
        specs = [spec for spec in s.order if any(k[0] == spec for k in s.passkey)]
        depths = sorted({k[2] for k in s.passkey})
        fig, axes = plt.subplots(1, len(specs), figsize=(1.0 + 0.9 * len(pk_lengths) * len(specs) + 1.2 * len(specs),
                                                         1.2 + 0.45 * len(depths)), squeeze=False)
        for ax, spec in zip(axes[0], specs):
            grid = [[_acc(s.passkey.get((spec, L, d))) for L in pk_lengths] for d in depths]
            ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            for i, row in enumerate(grid):
                for j, v in enumerate(row):
                    ax.text(j, i, "-" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(pk_lengths)), [str(L) for L in pk_lengths], fontsize=8)
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=8)
            ax.set_xlabel("context length")
            ax.set_title(s.labels[spec], fontsize=8)
        axes[0][0].set_ylabel("key depth")
        fig.suptitle("Passkey retrieval accuracy")
        _save(fig, out / PLOTS[2])
        plt.close(fig)
        written.append(out / PLOTS[2])
    return written


def _acc(hits: list[bool] | None) -> float:
    return sum(hits) / len(hits) if hits else float("nan")


def render_report(out_dir: str | Path, *, make_plots: bool = True) -> str:
    """Write ``summary.md``, ``summary.csv`` and the PNGs into ``out_dir``; return the markdown."""
    out = Path(out_dir)
    records = read_results(out / "results.jsonl")
    if not any(r.get("task") in ("perplexity", "passkey") for r in records):
        raise EvalError(f"{out / 'results.jsonl'} has no results to report; run perplexity or passkey first")
    s = summarize(records)
    text = markdown(s)
    (out / "summary.md").write_text(text, encoding="utf-8")
    with (out / "summary.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(csv_rows(s))
    if make_plots:
        plots(s, out)
    return text
