"""The error types of the commands: a message for the user, printed without a traceback."""

from __future__ import annotations


class EvalError(Exception):
    """A bad option, model or dataset, found before any work where possible. ``str(err)`` says what to do."""


class FinetuneError(EvalError):
    """A bad option or an impossible resume of ``hf-sparse-finetune``: one line, exit status 2."""
