"""Shared test fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for modules of tiny tensors: on a busy 2-core machine OpenMP threads only spin
    against each other (a 3x slowdown was measured here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _uses_the_adapter(module) -> bool:
    """Whether a test module uses hf_sparse.patches (the code that touches transformers) directly."""
    for value in vars(module).values():
        name = getattr(value, "__module__", None) or getattr(value, "__name__", "")
        if isinstance(name, str) and name.startswith("hf_sparse.patches"):
            return True
    return False


def pytest_collection_modifyitems(config, items):
    """Mark the tests of modules that use hf_sparse.patches ``transformers``: CI runs them on the transformers
    floor too (``pytest -m transformers``)."""
    seen: dict[str, bool] = {}
    for item in items:
        module = getattr(item, "module", None)
        if module is None:
            continue
        if module.__name__ not in seen:
            seen[module.__name__] = _uses_the_adapter(module)
        if seen[module.__name__]:
            item.add_marker(pytest.mark.transformers)
