"""Documents for the evaluation: the built-in offline corpus, local files, or a hub dataset.

``--dataset`` accepts

* ``stdlib`` (the default): the longest ``.py`` files of the running Python's standard library,
  found through ``sysconfig`` -- real, long, human-written text that every machine with Python has,
  so the default run needs no download. Code is a fair long-context test (a function uses names
  defined thousands of tokens earlier). Tests, GUI demos and data tables are left out. The corpus
  depends on the Python version, which every record stores.
* a local ``.txt``/``.md``/``.rst`` file (one document), a ``.jsonl`` file (one document per line, the
  text in ``--text-column``), or a folder of those (searched recursively, in sorted order);
* anything else (or ``hf:NAME``) is a ``datasets`` hub name read with ``datasets.load_dataset(NAME,
  --dataset-config, split=--dataset-split, streaming=True)``, e.g. ``pg19``, ``wikitext`` with config
  ``wikitext-103-raw-v1`` and ``--join-rows`` (its rows are lines), or ``ccdv/arxiv-summarization``
  with ``--text-column article``. ``datasets`` is imported only then.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EvalError

__all__ = ["Document", "DataSpec", "iter_documents", "tokenize_documents", "TokenizedCorpus", "add_bos",
           "check_dataset", "check_out_outside_dataset", "local_files", "read_text_file"]

BUILTIN = "stdlib"
_TEXT_SUFFIXES = (".txt", ".md", ".rst")
_JSONL_SUFFIXES = (".jsonl",)
# Not prose or code a reader would write: tests, GUI demos, generated tables.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "tkinter",
                     "turtledemo", "ensurepip", "pydoc_data", "encodings", "__pycache__", "config-3"}
_STDLIB_SKIP_FILES = {"html/entities.py", "locale.py", "unicodedata.py"}
# Characters that text does not contain: C0/C1 controls other than tab, newlines and form feed, and U+FFFD
# (bytes that were already undecodable). A file with more than 1% of them is not text.
_NOT_TEXT = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f\ufffd]")
_MAX_NOT_TEXT = 0.01


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str



def add_dataset_arguments(group, *, split: str, max_docs: int, max_docs_help: str) -> None:
    """``--dataset`` and its companion options (the fields of :class:`DataSpec`, plus ``--max-docs``), shared by
    the commands; each gives the split and document limit that suit it."""
    group.add_argument("--dataset", default=BUILTIN,
                       help="'stdlib' (built-in offline corpus: the longest .py files of Python's standard library), "
                            "a .txt/.md/.jsonl file or folder, or a `datasets` hub name such as pg19 [%(default)s]")
    group.add_argument("--dataset-config", default=None, help="hub dataset config, e.g. wikitext-103-raw-v1")
    group.add_argument("--dataset-split", default=split, help="hub dataset split [%(default)s]")
    group.add_argument("--text-column", default="text", help="text field of .jsonl rows and hub rows [%(default)s]")
    group.add_argument("--join-rows", action="store_true",
                       help="concatenate all rows of a hub dataset into one document (for line-per-row sets: wikitext)")
    group.add_argument("--max-docs", type=int, default=max_docs, help=f"{max_docs_help} [%(default)s]")

@dataclass(frozen=True)
class DataSpec:
    """What ``--dataset`` and its companion options asked for."""

    name: str = BUILTIN
    config: str | None = None
    split: str = "test"
    text_column: str = "text"
    join_rows: bool = False

    def describe(self) -> str:
        if self.name == BUILTIN:
            return f"stdlib (longest .py files of Python {sysconfig.get_python_version()})"
        extra = [x for x in (self.config, self.split if self._is_hub() else None) if x]
        return self.name + (f" [{'/'.join(extra)}]" if extra else "")

    def _is_hub(self) -> bool:
        return self.name != BUILTIN and not Path(self.name).expanduser().exists()

    def identity(self) -> dict:
        """What makes the documents what they are (part of the resume fingerprint)."""
        ident = {"name": self.name, "config": self.config, "split": self.split, "text_column": self.text_column,
                 "join_rows": self.join_rows}
        if self.name == BUILTIN:
            ident["python"] = sysconfig.get_python_version()
        return ident


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files, longest first (ties by path, so the order is stable)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[tuple[int, str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        if any(part in _STDLIB_SKIP_DIRS or part.startswith("config-") for part in rel_dir.parts):
            dirnames[:] = []
            continue
        for name in filenames:
            rel = (rel_dir / name).as_posix()
            if name.endswith(".py") and rel not in _STDLIB_SKIP_FILES:
                p = Path(dirpath) / name
                found.append((p.stat().st_size, rel, p))
    found.sort(key=lambda t: (-t[0], t[1]))
    return [p for _, _, p in found]


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def read_text_file(path: Path) -> str:
    """A document file's text; :class:`EvalError` naming the file when it is not UTF-8 text (a binary file,
    random bytes, another encoding), instead of scoring replacement characters as if they were words."""
    data = path.read_bytes()
    if b"\x00" in data:
        raise EvalError(f"--dataset: {path} is not a text file (it has NUL bytes at byte {data.index(0)}); "
                        "give UTF-8 .txt/.md/.rst files")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise EvalError(f"--dataset: {path} is not UTF-8 text (byte {err.start} is {data[err.start]:#04x}); "
                        "convert it first (e.g. iconv -t utf-8) or leave it out") from None
    bad = len(_NOT_TEXT.findall(text))
    if bad > _MAX_NOT_TEXT * len(text):
        raise EvalError(f"--dataset: {path} is not text ({bad} of its {len(text)} characters are control "
                        "characters); give UTF-8 .txt/.md/.rst files")
    return text


def _run_output(path: Path) -> str | None:
    """What ``path`` is when a run of ours wrote it (``results.jsonl`` and ``summary.md`` of hf-sparse-eval,
    ``metrics.jsonl`` of hf-sparse-finetune), else None. Judged by the file's first line,
    so a corpus file that only shares the name is read as usual."""
    if path.name not in ("results.jsonl", "metrics.jsonl", "summary.md") or not path.is_file():
        return None
    try:
        with path.open(encoding="utf-8") as f:
            first = f.readline().strip()
    except (OSError, UnicodeDecodeError):
        return None
    if path.suffix == ".jsonl":
        try:
            row = json.loads(first)
        except json.JSONDecodeError:
            return None
        if isinstance(row, dict) and "task" in row and "time" in row:
            return "results of an earlier hf-sparse-eval run"
        if isinstance(row, dict) and {"step", "loss", "lr"} <= row.keys():
            return "training metrics of an earlier hf-sparse-finetune run"
        return None
    if first.startswith("# hf-sparse-eval summary"):
        return "summary of an earlier hf-sparse-eval run"
    return None


def _refuse_run_output(path: Path, root: Path) -> None:
    what = _run_output(path)
    if what is None:
        return
    if path == root:
        where = "give a file of your own documents"
    elif path.parent == root:
        where = "the folder is an earlier run's output folder; give a folder of your own documents"
    else:
        where = f"move {path.parent.relative_to(root).as_posix()} out of it, or give a folder of documents only"
    rel = path.name if path == root else path.relative_to(root).as_posix()
    raise EvalError(f"--dataset {root}: {rel} holds the {what}, not documents ({where})")


def check_out_outside_dataset(spec: DataSpec, out: str | Path, option: str = "--out") -> None:
    """An output folder inside a ``--dataset`` folder would make this run's results the next run's documents."""
    if spec.name == BUILTIN:
        return
    data = Path(spec.name).expanduser()
    if not data.is_dir():
        return
    data, target = data.resolve(), Path(out).expanduser().resolve()
    if target == data or data in target.parents:
        raise EvalError(f"{option} {out} is inside --dataset {spec.name}: the next run would read this run's "
                        f"results as documents; choose an {option} outside the dataset folder")


def _iter_jsonl(path: Path, column: str, label: str) -> Iterator[Document]:
    try:
        yield from _iter_jsonl_rows(path, column, label)
    except UnicodeDecodeError as err:
        raise EvalError(f"--dataset: {path} is not UTF-8 text (byte {err.start}); give UTF-8 .jsonl files") from None


def _iter_jsonl_rows(path: Path, column: str, label: str) -> Iterator[Document]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvalError(f"{path}:{n + 1}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict) or column not in row:
                keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                raise EvalError(f"{path}:{n + 1}: no {column!r} field (has: {keys}); choose one with --text-column")
            if isinstance(row[column], str):
                yield Document(f"{label}:{n}", row[column])


def local_files(path: Path) -> list[Path]:
    """The document files of a local ``--dataset``: the file, or the folder's files (recursively, sorted).
    Refused before any is read: a folder without documents, a file type we do not read, and the output of an
    earlier run (its ``results.jsonl`` would be read as data otherwise)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _TEXT_SUFFIXES + _JSONL_SUFFIXES)
        if not files:
            raise EvalError(f"--dataset {path}: the folder has no .txt, .md, .rst or .jsonl file")
    else:
        if path.suffix.lower() not in _TEXT_SUFFIXES + _JSONL_SUFFIXES:
            raise EvalError(f"--dataset {path}: unsupported file type {path.suffix!r}; use .txt, .md, .rst or .jsonl")
        files = [path]
    for p in files:
        _refuse_run_output(p, path)
    return files


def _iter_local(path: Path, column: str) -> Iterator[Document]:
    for p in local_files(path):
        yield from _iter_local_file(p, p.relative_to(path).as_posix() if path.is_dir() else path.name, column)


def _iter_local_file(path: Path, label: str, column: str) -> Iterator[Document]:
    suffix = path.suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        yield from _iter_jsonl(path, column, label)
    elif suffix in _TEXT_SUFFIXES:
        yield Document(label, read_text_file(path))
    else:
        raise EvalError(f"--dataset {path}: unsupported file type {suffix!r}; use .txt, .md, .rst or .jsonl")


def _needs_datasets(name: str) -> str:
    return (f"--dataset {name} is a hub dataset and needs the 'datasets' package: pip install datasets "
            f"(or pip install -e \".[hub]\"; or use --dataset {BUILTIN}, or local .txt/.jsonl files)")


def _iter_hub(spec: DataSpec) -> Iterator[Document]:
    name = spec.name.removeprefix("hf:")
    if importlib.util.find_spec("datasets") is None:
        raise EvalError(_needs_datasets(name))
    import datasets

    try:
        ds = datasets.load_dataset(name, spec.config, split=spec.split, streaming=True)
    except Exception as err:
        raise EvalError(f"cannot load dataset {name!r} (config={spec.config!r}, split={spec.split!r}): {err}") from err
    rows = iter(ds)
    if spec.join_rows:
        parts = []
        for row in rows:
            _check_column(row, spec.text_column, name)
            parts.append(row[spec.text_column])
        # wikitext-style rows are lines that keep their "\n"
        yield Document(f"{name}:{spec.split}:joined", "".join(parts))
        return
    for n, row in enumerate(rows):
        _check_column(row, spec.text_column, name)
        if isinstance(row[spec.text_column], str):
            yield Document(f"{name}:{spec.split}:{n}", row[spec.text_column])


def _check_column(row: dict, column: str, name: str) -> None:
    if column not in row:
        raise EvalError(f"dataset {name!r} has no column {column!r} (columns: {', '.join(row)}); use --text-column")


def _is_hub_name(name: str) -> bool:
    return name.startswith("hf:") or not (Path(name).suffix or name.startswith((".", "/", "~")))


def check_dataset(spec: DataSpec) -> None:
    """What can be said of ``--dataset`` before a tokenizer or model loads: a local path that does not exist,
    holds no documents or is an earlier run's output, or a hub name without the ``datasets`` package. (A
    file that is not UTF-8 text is refused when it is read, still before any model loads.)"""
    if spec.name == BUILTIN:
        return
    path = Path(spec.name).expanduser()
    if path.exists():
        local_files(path)
    elif not _is_hub_name(spec.name):
        raise EvalError(f"--dataset {spec.name}: no such file or folder")
    elif importlib.util.find_spec("datasets") is None:
        raise EvalError(_needs_datasets(spec.name.removeprefix("hf:")))


def iter_documents(spec: DataSpec) -> Iterator[Document]:
    """Documents in a fixed order (lazy: a hub dataset is streamed, only as far as needed)."""
    if spec.name == BUILTIN:
        for p in stdlib_files():
            yield Document(p.relative_to(sysconfig.get_paths()["stdlib"]).as_posix(), _read_text(p))
        return
    path = Path(spec.name).expanduser()
    if path.exists():
        yield from _iter_local(path, spec.text_column)
        return
    if _is_hub_name(spec.name):
        yield from _iter_hub(spec)
        return
    raise EvalError(f"--dataset {spec.name}: no such file or folder")


def add_bos(tokenizer) -> list[int]:
    """``[bos_id]`` when the tokenizer puts a BOS token in front of its text by default, else ``[]``."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


@dataclass
class TokenizedCorpus:
    """Usable documents as token ids (BOS not included), and what was left out."""

    docs: list[tuple[str, list[int]]] = field(default_factory=list)
    examined: int = 0
    skipped_short: int = 0
    skipped_ids: list[str] = field(default_factory=list)

    def count_at(self, length: int, prefix: int) -> int:
        return sum(1 for _, ids in self.docs if len(ids) + prefix >= length)


def tokenize_documents(docs: Iterator[Document], tokenizer, min_length: int, *, max_docs: int | None,
                       prefix: int = 0, progress: bool = True, total: int | None = None) -> TokenizedCorpus:
    """Tokenize until ``max_docs`` documents of at least ``min_length`` tokens (BOS counted) are found.

    Shorter documents are skipped and counted. ``max_docs`` of None or 0 takes every document. ``total``:
    how many documents ``docs`` holds, when known (the progress bar's end).
    """
    from tqdm.auto import tqdm

    corpus = TokenizedCorpus()
    bar = tqdm(desc="tokenize", unit="doc", total=max_docs or total, disable=not progress, leave=False)
    for doc in docs:
        corpus.examined += 1
        ids = tokenizer(doc.text, add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) + prefix < min_length:
            corpus.skipped_short += 1
            corpus.skipped_ids.append(doc.doc_id)
            continue
        corpus.docs.append((doc.doc_id, ids))
        bar.update(1)
        if max_docs and len(corpus.docs) >= max_docs:
            break
    bar.close()
    return corpus
