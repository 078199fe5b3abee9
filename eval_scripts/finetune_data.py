"""Training data of ``hf-sparse-finetune``: documents, held-out split, tokenization cache, packing, order.

The training documents are tokenized once and kept on disk (:func:`load_or_tokenize`): one file per
(tokenizer, data, options that choose the documents), holding every training document as
``BOS + ids + EOS`` concatenated into one int32 stream, and the held-out documents. The main process
writes it first; the other processes (and later runs, a resume, another ``--seq-len``) read it, memory-
mapped, instead of tokenizing again. Packing into ``--seq-len`` chunks is a view of that stream.

The order is a pure function of ``--seed`` and the sample number (:class:`PackedData`, :class:`Layout`),
so a resumed or extended run continues the order without any sampler state.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .data import BUILTIN, DataSpec, Document, add_bos, iter_documents, local_files, tokenize_documents
from .errors import FinetuneError

__all__ = ["split_heldout", "token_stream", "pack_stream", "pack_documents", "PackedData", "Layout",
           "TokenizedText", "load_or_tokenize", "cache_key", "tokenizer_fingerprint"]

CACHE_FORMAT = 1


# -- documents ---------------------------------------------------------------------------------------------
def split_heldout(docs: list[Document], fraction: float) -> tuple[list[Document], list[Document]]:
    """``(train, heldout)``: the last ``fraction`` of the documents (at least one) are held out.

    A single document is cut instead: its last ``fraction`` of characters, at a line break (or a space)
    where there is one, becomes the held-out document.
    """
    if not docs:
        return [], []
    if len(docs) >= 2:
        k = min(len(docs) - 1, max(1, round(len(docs) * fraction)))
        return docs[:-k], docs[-k:]
    doc = docs[0]
    cut = int(len(doc.text) * (1.0 - fraction))
    for sep in ("\n", " "):
        at = doc.text.rfind(sep, 0, cut)
        if at > cut // 2:
            cut = at + 1
            break
    return [Document(doc.doc_id, doc.text[:cut])], [Document(f"{doc.doc_id}#heldout", doc.text[cut:])]


def training_spec(args) -> DataSpec:
    return DataSpec(args.dataset, args.dataset_config, args.dataset_split, args.text_column, args.join_rows)


def read_training_documents(args) -> list[Document]:
    spec = training_spec(args)
    docs = list(itertools.islice(iter_documents(spec), args.max_docs or None))
    if not docs:
        raise FinetuneError(f"--dataset {spec.describe()}: no document")
    return docs


# -- packing -------------------------------------------------------------------------------------------------
def token_stream(docs: list[list[int]], *, prefix: list[int], eos: int | None) -> torch.Tensor:
    """``prefix + doc + [eos]`` for every document, concatenated into one int32 tensor."""
    tail = [eos] if eos is not None else []
    parts = [torch.tensor(prefix + ids + tail, dtype=torch.int32) for ids in docs]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int32)


def pack_stream(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``[N, seq_len]`` consecutive chunks of the stream, a view (the tail shorter than a chunk is dropped)."""
    n = stream.numel() // seq_len
    return stream[: n * seq_len].view(n, seq_len)


def pack_documents(docs: list[list[int]], seq_len: int, *, prefix: list[int], eos: int | None) -> torch.Tensor:
    """``[N, seq_len]`` chunks of ``prefix + doc + [eos]`` for every document, concatenated."""
    return pack_stream(token_stream(docs, prefix=prefix, eos=eos), seq_len).long()


class PackedData:
    """Packed chunks in a deterministic order: epoch ``e`` is a permutation seeded by ``(seed, e)``.

    Sample ``g`` of the whole run (counting over optimizer steps, micro steps, processes and batch rows)
    is chunk ``perm(g // N)[g % N]``, so a batch depends only on the step number: resuming needs no
    sampler state, and the global order does not depend on the number of processes.
    """

    def __init__(self, chunks: torch.Tensor, seed: int) -> None:
        if chunks.shape[0] == 0:
            raise FinetuneError("no packed sequence: the training text is shorter than --seq-len")
        self.chunks, self.seed = chunks, seed
        self._perms: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.chunks.shape[0]

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self), generator=gen)}  # keep one epoch: O(N) memory
        return self._perms[epoch]

    def indices(self, first: int, count: int) -> list[int]:
        out = []
        for g in range(first, first + count):
            epoch, pos = divmod(g, len(self))
            out.append(int(self._perm(epoch)[pos]))
        return out

    def batch(self, first: int, count: int) -> torch.Tensor:
        return self.chunks[self.indices(first, count)].long()


@dataclass
class Layout:
    """How samples are numbered: ``g = ((step * grad_accum + micro) * processes + rank) * batch_size + row``."""

    batch_size: int
    grad_accum: int
    processes: int
    rank: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.processes

    def first_sample(self, step: int, micro: int) -> int:
        return ((step * self.grad_accum + micro) * self.processes + self.rank) * self.batch_size


# -- the tokenization cache -------------------------------------------------------------------------------------
@dataclass
class TokenizedText:
    """The training documents as one token stream, and the held-out documents (when split from the data)."""

    stream: torch.Tensor
    documents: int
    heldout: list[Document]
    path: Path
    tokenized_here: bool  # False: read from the cache

    def packed(self, seq_len: int, seed: int) -> PackedData:
        return PackedData(pack_stream(self.stream, seq_len), seed)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides the ids: the fast tokenizer's serialized pipeline (vocabulary,
    merges, normalizer, pre-tokenizer), else the vocabulary, plus the class and the special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    head = json.dumps([type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id])
    return hashlib.sha256(f"{head}\n{body}".encode()).hexdigest()


def data_identity(spec: DataSpec, max_docs: int) -> dict[str, Any]:
    """What the training documents are: the ``--dataset`` options, and for local data every file's path, size
    and modification time (an edited file is tokenized again; a hub dataset is keyed by its name)."""
    ident = spec.identity() | {"max_docs": max_docs}
    path = Path(spec.name).expanduser()
    if spec.name != BUILTIN and path.exists():
        ident["name"] = str(path.resolve())
        ident["files"] = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in local_files(path)]
    return ident


def cache_key(args, tokenizer) -> dict[str, Any]:
    held = None if args.eval_dataset else args.eval_fraction  # with --eval-dataset every document trains
    return {"format": CACHE_FORMAT, "tokenizer": tokenizer_fingerprint(tokenizer), "bos": add_bos(tokenizer),
            "eos": tokenizer.eos_token_id, "data": data_identity(training_spec(args), args.max_docs),
            "heldout_fraction": held}


def _cache_path(cache_dir: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir / f"{digest}.pt"


def _read_cache(path: Path, key: dict[str, Any]) -> TokenizedText | None:
    if not path.is_file():
        return None
    try:  # memory-mapped: every process of a machine shares the page cache, none holds a copy
        blob = torch.load(path, mmap=True, weights_only=True)
    except Exception:  # unreadable (another torch, a damaged file): tokenize again
        return None
    if blob.get("key") != json.dumps(key, sort_keys=True):
        return None
    heldout = [Document(d["id"], d["text"]) for d in blob["heldout"]]
    return TokenizedText(blob["stream"], blob["documents"], heldout, path, tokenized_here=False)


def _write_cache(path: Path, key: dict[str, Any], text: TokenizedText) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"key": json.dumps(key, sort_keys=True), "stream": text.stream, "documents": text.documents,
            "heldout": [{"id": d.doc_id, "text": d.text} for d in text.heldout]}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(blob, tmp)
        os.replace(tmp, path)  # whole or absent: a reader never sees half a file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_or_tokenize(args, tokenizer, *, progress: bool) -> TokenizedText:
    """The cached training text for these options, or read, split, tokenize (with a progress bar) and cache it."""
    key = cache_key(args, tokenizer)
    path = _cache_path(Path(args.cache_dir), key)
    cached = _read_cache(path, key)
    if cached is not None:
        return cached
    docs = read_training_documents(args)
    train_docs, heldout = (docs, []) if args.eval_dataset else split_heldout(docs, args.eval_fraction)
    corpus = tokenize_documents(iter(train_docs), tokenizer, 1, max_docs=None, progress=progress,
                                total=len(train_docs))
    stream = token_stream([ids for _, ids in corpus.docs], prefix=key["bos"], eos=key["eos"])
    text = TokenizedText(stream, len(corpus.docs), heldout, path, tokenized_here=True)
    try:
        _write_cache(path, key, text)
    except OSError as err:
        raise FinetuneError(f"--cache-dir {args.cache_dir}: cannot write the tokenized text there ({err}); give "
                            "a writable folder") from None
    return text
