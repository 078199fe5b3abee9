"""Register the ``"hf_sparse"`` attention backend with transformers once transformers is loaded.

``import hf_sparse`` must not import transformers (the core runs without it, and transformers takes
seconds to import), yet ``AutoModelForCausalLM.from_pretrained(path, attn_implementation="hf_sparse")``
needs the backend registered before the model is built. So: if ``transformers.modeling_utils`` (where
the attention registry lives) is already loaded, import :mod:`hf_sparse.patches` now, which registers;
otherwise wait for it with an import hook that runs the same import right after
``transformers.modeling_utils`` has executed, and then removes itself. No module of the core imports
transformers; only that deferred import does.
"""

from __future__ import annotations

import sys

__all__ = ["install", "load_error"]

_TARGET = "transformers.modeling_utils"

# Why the deferred import failed (transformers < 5.4, say), or None. A failure never breaks the
# user's own import of transformers: hf_sparse.patches raises the same error when imported directly.
load_error: BaseException | None = None


def _load_patches() -> None:
    global load_error
    try:
        import hf_sparse.patches  # noqa: F401  (registers the backend when it is imported)
    except Exception as err:  # pragma: no cover - depends on the installed transformers
        load_error = err


class _AfterTransformersLoads:
    """A meta path finder that only wraps the loader of ``transformers.modeling_utils``."""

    def __init__(self) -> None:
        self._busy = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TARGET or self._busy:
            return None
        self._busy = True
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._busy = False
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _uninstall()
            _load_patches()

        loader.exec_module = exec_then_register  # this loader object serves this one module
        return spec


_FINDER = _AfterTransformersLoads()


def _uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def install() -> None:
    """Register now if transformers' registries are loaded, else as soon as they are (idempotent)."""
    if _TARGET in sys.modules:
        _load_patches()
    elif _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
