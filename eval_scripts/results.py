"""``results.jsonl``: one JSON line per finished unit, written as soon as the unit is done.

A unit is one (task, pattern, context length, document/window or passkey depth/trial) under one run
setting (model, dataset, dtype, protocol ...). Its :func:`unit_key` identifies it, so rerunning the same
command reads the file back and skips the units already there: an interrupted run resumes where it
stopped, and a run with more documents or lengths only computes what is new.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

__all__ = ["ResultStore", "unit_key", "fingerprint", "environment_info", "read_results"]


def fingerprint(setting: dict[str, Any]) -> str:
    """A short stable hash of the settings that change a unit's numbers (not of lengths or --max-docs)."""
    blob = json.dumps(setting, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def unit_key(task: str, setting_hash: str, pattern_spec: str, length: int, item: str) -> str:
    return f"{task}|{setting_hash}|{pattern_spec}|{length}|{item}"


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """All records of a results file; a torn last line (a run killed mid-write) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


class ResultStore:
    """Appends records to ``DIR/results.jsonl`` and knows which unit keys are already there."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "results.jsonl"
        self._repair_torn_tail()
        self.done: set[str] = {r["key"] for r in read_results(self.path) if "key" in r}

    def _repair_torn_tail(self) -> None:
        # A run killed mid-line leaves a line without "\n"; the next append must start on a new line.
        if self.path.exists() and self.path.stat().st_size:
            with self.path.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                last = f.read(1)
            if last != b"\n":
                with self.path.open("a", encoding="utf-8") as f:
                    f.write("\n")

    def has(self, key: str) -> bool:
        return key in self.done

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")
            f.flush()
        if "key" in record:
            self.done.add(record["key"])

    def extend(self, records: Iterable[dict[str, Any]]) -> None:
        for r in records:
            self.append(r)


def _json_default(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, (torch.dtype, torch.device, Path)):
        return str(x)
    raise TypeError(f"cannot store {type(x).__name__} in results.jsonl")


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the hf_sparse checkout (with ``+dirty`` when it has local changes), or None.

    ``HF_SPARSE_COMMIT`` overrides it: a copy of the tree without ``.git`` (a GPU machine) sets it.
    """
    import hf_sparse

    if os.environ.get("HF_SPARSE_COMMIT"):
        return os.environ["HF_SPARSE_COMMIT"]

    root = Path(hf_sparse.__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def environment_info(device: torch.device) -> dict[str, Any]:
    """Versions, device and commit, stored with every record."""
    import hf_sparse

    return {
        "device": str(device),
        "device_name": device_name(device),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "datasets": _version("datasets"),
        "hf_sparse": getattr(hf_sparse, "__version__", None),
        "commit": git_commit(),
    }


def show_table(markdown: str, path: str | None) -> None:
    """Print a benchmark's markdown table and, with a path, write it there too."""
    print(markdown)
    if path:
        Path(path).write_text(markdown + "\n")
