"""The one error type of the evaluation command: a message for the user, printed without a traceback."""

from __future__ import annotations


class EvalError(Exception):
    """A bad option, model or dataset, found before any work where possible. ``str(err)`` says what to do."""
