"""pytest plugin: every model that transformers' own tests build runs patched by hf_sparse.

Loaded by ``scripts/run_transformers_suite.sh`` (``-p conftest_patch``). ``HF_SPARSE_SUITE_PATTERN`` names the
pattern (``dense``, ``sliding_window:window=1024``, ...); unset or empty, nothing is patched (the baseline).

The hook wraps ``PreTrainedModel.post_init``, which every model constructor calls last (``Model(config)``,
``from_config``, ``from_pretrained``): a model of a family hf_sparse supports is patched there, on the reference
backend (the CPU path), whatever attention implementation the test asked for. Models of other families (a
test's helper models) are left alone.
"""

from __future__ import annotations

import os

import pytest

PATTERN = os.environ.get("HF_SPARSE_SUITE_PATTERN", "").strip()


def _install() -> None:
    from hf_sparse.patches import SUPPORTED_MODEL_TYPES, patch_model
    from transformers import PreTrainedModel

    import hf_sparse  # noqa: F401  (registers the backend)

    original = PreTrainedModel.post_init

    def post_init(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        config = getattr(self, "config", None)
        if getattr(config, "model_type", None) in SUPPORTED_MODEL_TYPES and self._can_set_attn_implementation():
            patch_model(self, PATTERN, backend="reference")
        return result

    PreTrainedModel.post_init = post_init


def pytest_configure(config):
    if PATTERN:
        _install()


def pytest_report_header(config):
    return f"hf_sparse suite pattern: {PATTERN or '(none: unpatched baseline)'}"


@pytest.fixture(autouse=True)
def _hf_sparse_pattern_in_report(record_property):
    record_property("hf_sparse_pattern", PATTERN or "none")
