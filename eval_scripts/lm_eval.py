"""``hf-sparse``: a model type for lm-evaluation-harness that evaluates a Hugging Face decoder under a sparse pattern.

Importing this module registers the model type; ``python -m hf_sparse.eval.lm_eval ARGS`` imports it and runs
lm-eval's command line (same arguments as ``lm_eval``; quote ``model_args``, ``;`` ends a shell command)::

    python -m hf_sparse.eval.lm_eval --model hf-sparse \\
        --model_args 'pretrained=./my-model,pattern=longformer:window=1024;global_tokens=4,sparse_backend=auto' \\
        --tasks my_task --include_path ./tasks --device cpu --batch_size 1

The model is lm-eval's ``hf`` model (:class:`lm_eval.models.huggingface.HFLM`, every one of its arguments
works) patched after loading with :func:`hf_sparse.patch_model`. Its own arguments:

- ``pattern``: anything :func:`hf_sparse.parse_pattern` takes, per-head plans included
  (``per_head[sliding_window:window=1024;0=dense]``). lm-eval splits ``model_args`` strings on every comma,
  so inside ``pattern`` a ``;`` that is followed by an option (``name=``) stands for the comma between options:
  ``longformer:window=1024;global_tokens=4``. A ``;`` followed by a head number (``0=dense``) stays the
  separator of a per-head plan. Commas themselves still work where the value reaches the model whole (a dict
  or JSON ``model_args``). Omitted: the pattern saved in the model's config (``config.hf_sparse``).
- ``sparse_backend``: ``auto`` (default), ``reference`` or ``triton``, passed to ``patch_model`` as ``backend``
  (lm-eval's own ``backend`` argument, ``causal``/``seq2seq``, is another thing).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from hf_sparse import patch_model
from hf_sparse.patterns.base import registered_patterns

__all__ = ["HFSparseLM", "pattern_from_model_args", "main"]

# ';' then an option name (not a head number) and '=': the comma between options of one pattern
_OPTION_SEP = re.compile(r";(?=\s*[A-Za-z_]\w*\s*=)")


def pattern_from_model_args(value) -> str | None:
    """The pattern string of a ``pattern=`` model argument: ``;`` before an option becomes ``,``.

    >>> pattern_from_model_args("longformer:window=1024;global_tokens=4")
    'longformer:window=1024,global_tokens=4'
    >>> pattern_from_model_args("per_head[longformer:window=8;global_tokens=2;0=dense]")
    'per_head[longformer:window=8,global_tokens=2;0=dense]'
    """
    if value is None:
        return None
    return _OPTION_SEP.sub(",", str(value).strip())


def _pattern_option_names() -> set[str]:
    names = set()
    for cls in registered_patterns().values():
        if dataclasses.is_dataclass(cls):
            names.update(f.name for f in dataclasses.fields(cls))
    return names


class HFSparseLM(HFLM):
    """lm-eval's ``hf`` model with :func:`hf_sparse.patch_model` applied after loading (see the module doc)."""

    def __init__(self, pretrained, pattern: str | None = None, sparse_backend: str = "auto", **kwargs) -> None:
        own = set(inspect.signature(HFLM.__init__).parameters)
        leaked = sorted(k for k in kwargs if k not in own and k in _pattern_option_names())
        if leaked:
            raise ValueError(
                f"hf-sparse: model_args {leaked} look like options of the pattern, split off by lm-eval at a comma; "
                f"write them with ';' inside the pattern value, e.g. pattern=longformer:window=1024;global_tokens=4")
        self.sparse_pattern = pattern_from_model_args(pattern)
        self.sparse_backend = str(sparse_backend or "auto")
        super().__init__(pretrained, **kwargs)
        patch_model(self.model, self.sparse_pattern, backend=self.sparse_backend)


if __name__ != "__main__":  # run as a script, the import in main() registers the module's own class
    register_model("hf-sparse")(HFSparseLM)


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the ``hf-sparse`` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    from hf_sparse.eval.lm_eval import main as _main  # registers hf-sparse under the module's real name

    _main()
