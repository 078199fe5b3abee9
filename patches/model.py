"""``patch_model`` / ``unpatch_model``: switch a pretrained decoder to the ``"hf_sparse"`` backend.

Everything goes through transformers' registries (``AttentionInterface``, ``AttentionMaskInterface``,
``set_attn_implementation``); no forward method is replaced. What the model carries while patched:

* ``model.config.hf_sparse = {"pattern": {...}, "layers": [...] | None, "backend": ...,
  "previous_attn_implementation": ...}`` -- saved by ``save_pretrained``; after ``from_pretrained``,
  ``patch_model(model)`` re-applies it. ``print(model.config)`` shows it.
* on each patched attention module: a ``hf_sparse_pattern`` string shown by ``print(model)`` (an
  instance-level ``extra_repr``) and a forward pre-hook that looks after its cache layer
  (:mod:`hf_sparse.patches.history`).
* on the model: an instance-level ``_prepare_cache_for_generation`` that runs transformers' own and
  then gives the patched layers of the ``DynamicCache`` it created their sparse cache layers
  (:func:`hf_sparse.patches.cache.install_sparse_layers`): bounded for ``SlidingWindow`` and
  ``Longformer``, full history for ``BigBird`` and ``Dense``. So ``generate`` uses a bounded cache by
  default; a cache the user passes is left as it is (pass ``SparseCache(model)`` for a bounded one).
  The method is private API of ``GenerationMixin``, with the same signature in 5.17 and 5.24; a model
  without it keeps full-history caches in ``generate``. Likewise an instance-level
  ``_prepare_static_cache``: ``cache_implementation="static"`` builds a
  :class:`~hf_sparse.patches.static_cache.SparseStaticCache` (fixed shapes, compiled decode).

Layers not in ``layers=`` keep the model's own attention, its sliding window included. ``"dense"`` is the
model's own attention on patched layers too: where the config limits a layer to a sliding window
(``config.sliding_window``, ``layer_types``), ``"dense"`` runs that window there
(:func:`~hf_sparse.patches.options.native_windows`), so ``patch_model(model, "dense")`` does not change the
model's output; any other pattern replaces the native window and says so in a one-time warning.

Loading a saved model (the pattern travels in ``config.hf_sparse``):

* ``from_pretrained(path, attn_implementation="hf_sparse")`` builds the model on our backend (registered
  once transformers is loaded, :mod:`hf_sparse._autoregister`), and :func:`on_module_registered` -- a
  torch module-registration hook installed when this package is imported -- gives its attention
  modules and its ``generate`` what ``patch_model`` gives them, while the model is being built, so the
  first forward already keeps full histories and ``generate`` its bounded cache. ``patch_model(model)``
  after a plain load does the same.
* a plain ``from_pretrained(path)`` runs the model's own attention. While the model is patched,
  ``save_pretrained`` also writes the family's own config fields where they state the pattern exactly
  (:func:`native_fields`: a causal sliding window on every layer of Mistral, Qwen 2 or Qwen 3), so a
  plain load of such a checkpoint runs the same attention in transformers alone. Otherwise a plain load
  is dense, and building it after ``import hf_sparse`` warns once (transformers offers no hook that
  could do more without our package).
"""

from __future__ import annotations

import os
import types
import warnings
import weakref
from typing import Any

import torch
from transformers.configuration_utils import PreTrainedConfig

from hf_sparse.head_plan import HeadPlan, as_plan
from hf_sparse.ops import _warn_once as _warn_message_once
from hf_sparse.patterns import Pattern, SlidingWindow, parse_pattern

from ._compat import AttentionInterface, AttentionMaskInterface
from .attention import ATTN_NAME, check_backend, hf_sparse_attention, hf_sparse_mask
from .cache import install_sparse_layers
from .history import add_history_hook, remove_history_hook
from .options import layer_plans, native_windows, options_of
from .rope import is_rotary, remember_model_rotary, remember_rotary
from .static_cache import prepare_static_cache_for_generation

__all__ = ["patch_model", "unpatch_model", "register", "check_backend_available", "native_fields",
           "on_module_registered", "install_load_hook", "SUPPORTED_MODEL_TYPES", "StoredPatternWarning"]


class StoredPatternWarning(UserWarning):
    """A model was built from a config that names an hf_sparse pattern, without the pattern: it runs full
    attention. Code that loads such a model dense on purpose (the eval's ``full``) filters this category."""

# model_type -> note; each is tested on a tiny model (tests/test_patches.py) with the registry path.
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "Llama 2/3",
    "mistral": "Mistral (config.sliding_window)",
    "qwen2": "Qwen 2 / 2.5",
    "qwen3": "Qwen 3 (dense)",
    "gemma": "Gemma",
    "gemma2": "Gemma 2 (logit soft-capping, local/global layers)",
    "gemma3_text": "Gemma 3 text-only (Gemma3ForCausalLM)",
    "phi3": "Phi-3",
}


def register() -> None:
    """Register the attention and mask functions under ``"hf_sparse"`` (idempotent, global)."""
    AttentionInterface.register(ATTN_NAME, hf_sparse_attention)
    AttentionMaskInterface.register(ATTN_NAME, hf_sparse_mask)


def _is_attention_module(m: torch.nn.Module) -> bool:
    return (type(m).__name__.endswith("Attention") and isinstance(getattr(m, "layer_idx", None), int)
            and hasattr(m, "config"))


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if _is_attention_module(m)]


def _check_model(model) -> Any:
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"patch_model takes a transformers PreTrainedModel, got {type(model).__name__}")
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        hint = ""
        if model_type == "gemma3":
            hint = (" For Gemma 3 text-only use Gemma3ForCausalLM (model_type 'gemma3_text'); the multimodal model "
                    "needs bidirectional attention over image tokens, which a sparse pattern does not express.")
        raise NotImplementedError(
            f"hf_sparse does not support model_type {model_type!r} ({type(model).__name__}); supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}.{hint}"
        )
    if getattr(config, "use_bidirectional_attention", False) or not getattr(config, "is_causal", True):
        raise NotImplementedError(
            f"hf_sparse patches causal decoders; this {model_type} config uses bidirectional attention "
            "(use_bidirectional_attention / is_causal=False)"
        )
    if not model._can_set_attn_implementation():
        raise NotImplementedError(
            f"{type(model).__name__} cannot switch its attention implementation at run time (its modeling file does "
            "not use ALL_ATTENTION_FUNCTIONS.get_interface), so hf_sparse cannot be installed through the registry"
        )
    return config


def _check_layers(layers, num_layers: int) -> list[int] | None:
    if layers is None:
        return None
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    try:
        items = list(layers)
    except TypeError:
        raise ValueError(f"layers must be None (all layers) or a list of layer indices, got {layers!r}") from None
    bad = [x for x in items if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < num_layers]
    if bad:
        raise ValueError(
            f"layers {bad} are not layer indices of this model (0 .. {num_layers - 1}); e.g. layers=[0, 2] or None for all"
        )
    if not items:
        raise ValueError("layers=[] patches nothing; pass None for all layers or a list of indices")
    if len(set(items)) != len(items):
        raise ValueError(f"layers {items} lists a layer twice")
    return sorted(items)


def check_backend_available(backend: str, pattern: Pattern | str | dict | None = None, *,
                            device: torch.device | str | None = None, head_dim: int | None = None,
                            kv_heads: int = 1) -> str:
    """``backend`` when it can run here, else a ``ValueError`` that names it and the fix.

    The name is checked by :func:`~hf_sparse.patches.attention.check_backend`. ``"triton"`` must also be able
    to run on ``device`` (default: the current CUDA device when there is one, else the CPU): Triton installed,
    CUDA or ``TRITON_INTERPRET=1``, a head dim and a ``pattern`` the kernels take. :func:`hf_sparse.ops.resolve_backend`
    decides that at every forward; it decides here too, for an empty probe of the model's shape, so a backend
    that cannot run fails in ``patch_model`` (or at a command's start), not at the first forward.
    """
    check_backend(backend)
    if backend == "triton":
        from hf_sparse.ops import resolve_backend

        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        probe = torch.empty(1, kv_heads, 0, head_dim or 64, device=device)
        resolve_backend(backend, probe, probe, None if pattern is None else parse_pattern(pattern))
    return backend


def _model_device(model) -> torch.device | None:
    """The model's device when it is already on CUDA; None (the default of the check) otherwise, since a model
    is often patched on the CPU and moved afterwards."""
    param = next(model.parameters(), None)
    return param.device if param is not None and param.device.type == "cuda" else None


def _extra_repr(self) -> str:
    base = type(self).extra_repr(self)
    return f"{base}, hf_sparse={self.hf_sparse_pattern}" if base else f"hf_sparse={self.hf_sparse_pattern}"


def _decorate(module: torch.nn.Module, spec: str) -> None:
    module.hf_sparse_pattern = spec
    module.extra_repr = types.MethodType(_extra_repr, module)
    add_history_hook(module)


def _undecorate(module: torch.nn.Module) -> None:
    for name in ("hf_sparse_pattern", "extra_repr"):
        if name in module.__dict__:
            delattr(module, name)
    remove_history_hook(module)


_PREPARE_CACHE = "_prepare_cache_for_generation"
_PREPARE_STATIC = "_prepare_static_cache"  # (cache_implementation, batch_size, max_cache_len, ...) 5.4-5.25
_CACHE_KWARGS = ("cache", "past_key_values")  # generate's name for the cache: 5.24, 5.17


def _prepare_sparse_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
    """``generate``'s own cache preparation, then sparse cache layers for the patched layers of a new cache."""
    from transformers import DynamicCache

    before = {name: model_kwargs.get(name) for name in _CACHE_KWARGS}
    result = type(self)._prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs)
    if isinstance(getattr(self.config, "hf_sparse", None), dict) and self.config._attn_implementation == ATTN_NAME:
        for name in _CACHE_KWARGS:
            cache = model_kwargs.get(name)
            # only a plain DynamicCache that generate has just built; offloaded caches keep full history
            if (cache is not None and cache is not before[name] and type(cache) is DynamicCache
                    and not getattr(cache, "offloading", False)):
                install_sparse_layers(cache, self.config)
    return result


def _wrap_generate_cache(model) -> None:
    if hasattr(type(model), _PREPARE_CACHE):
        model.__dict__[_PREPARE_CACHE] = types.MethodType(_prepare_sparse_cache_for_generation, model)
    if hasattr(type(model), _PREPARE_STATIC):  # cache_implementation="static": a SparseStaticCache
        model.__dict__[_PREPARE_STATIC] = types.MethodType(prepare_static_cache_for_generation, model)


def _unwrap_generate_cache(model) -> None:
    model.__dict__.pop(_PREPARE_CACHE, None)
    model.__dict__.pop(_PREPARE_STATIC, None)


# -- saving: the family's own fields where they state the pattern exactly ------------------------------
def _sliding_window_of(opts) -> int | None:
    """``W`` when every layer runs one causal ``sliding_window:window=W`` (no per-head plan), else None."""
    if not opts.all_layers or opts.by_layer:
        return None
    d = opts.pattern.to_dict()
    if d.get("type") != "sliding_window" or not d.get("causal", True):
        return None
    return int(d["window"])


def native_fields(config) -> dict[str, Any]:
    """The config fields with which transformers alone runs the pattern of ``config.hf_sparse`` exactly, or ``{}``.

    A causal sliding window ``W`` on every layer: Mistral's ``sliding_window = W`` (HF's convention is ours:
    the window counts the query); Qwen 2 and Qwen 3 also need ``use_sliding_window`` and every layer typed
    ``"sliding_attention"``. Nothing else (global tokens, BigBird, strides, per-head plans, ``layers=``) has
    a native field.
    """
    if not isinstance(getattr(config, "hf_sparse", None), dict):
        return {}
    window = _sliding_window_of(options_of(config))
    if window is None:
        return {}
    model_type = getattr(config, "model_type", None)
    if model_type == "mistral" and getattr(config, "layer_types", None) is None:
        return {"sliding_window": window}
    if model_type in ("qwen2", "qwen3"):
        return {"use_sliding_window": True, "sliding_window": window, "max_window_layers": 0,
                "layer_types": ["sliding_attention"] * config.num_hidden_layers}
    return {}


_MISSING = object()


def _save_pretrained_with_native_fields(self, *args, **kwargs):
    """``save_pretrained`` that also writes :func:`native_fields` (and lists them in ``hf_sparse``), then
    puts the live config back: the running model keeps its own fields, only the saved file changes."""
    config = self.config
    fields = native_fields(config) if config._attn_implementation == ATTN_NAME else {}
    if not fields:
        return type(self).save_pretrained(self, *args, **kwargs)
    before = {name: config.__dict__.get(name, _MISSING) for name in (*fields, "hf_sparse")}
    try:
        for name, value in fields.items():
            setattr(config, name, value)
        config.hf_sparse = {**before["hf_sparse"], "native_fields": dict(fields)}
        return type(self).save_pretrained(self, *args, **kwargs)
    finally:
        for name, value in before.items():
            if value is _MISSING:
                config.__dict__.pop(name, None)
            else:
                config.__dict__[name] = value


def _wrap_save(model) -> None:
    if hasattr(type(model), "save_pretrained"):
        model.__dict__["save_pretrained"] = types.MethodType(_save_pretrained_with_native_fields, model)


def _unwrap_save(model) -> None:
    model.__dict__.pop("save_pretrained", None)


# -- loading: models built with attn_implementation="hf_sparse" ------------------------------------
_WARNED: dict[int, weakref.ref] = {}  # id -> config whose plain load has been warned about (configs are unhashable)


def _warn_once(config) -> bool:
    ref = _WARNED.get(id(config))
    if ref is not None and ref() is config:
        return False
    if len(_WARNED) > 64:
        _WARNED.clear()
    _WARNED[id(config)] = weakref.ref(config)
    return True


def on_module_registered(parent: torch.nn.Module, name: str, child: torch.nn.Module):
    """torch's global module-registration hook (``register_module_module_registration_hook``).

    While transformers builds a model (``from_pretrained`` / ``from_config``) whose config carries
    ``hf_sparse``: with ``attn_implementation="hf_sparse"``, each patched attention module is decorated as
    ``patch_model`` does it (history hook, ``print(model)``), and the model that holds the decoder gets the
    ``generate`` and ``save_pretrained`` wrappers -- all before the first forward, which a lazy setup in the
    attention function could not do (it runs after the cache update). With another implementation, the
    model runs dense attention while its config names a pattern: warn once. Any other module costs a dict
    lookup. Returns None: no module is replaced.
    """
    # vars(): no Module.__getattr__ (a wrapper such as torch.compile's OptimizedModule forwards it to a child
    # that is not registered yet while this hook runs)
    config = vars(child).get("config")
    if not isinstance(config, PreTrainedConfig):
        return None
    stored = getattr(config, "hf_sparse", None)
    ours = config._attn_implementation == ATTN_NAME
    if ours and is_rotary(child):
        remember_rotary(config, child)
    if _is_attention_module(child):
        if ours:
            opts = options_of(config)  # a config without a pattern fails here, with the fix in the message
            if opts.patches(child.layer_idx):
                _decorate(child, opts.pattern_for(child.layer_idx).spec())
        elif isinstance(stored, dict) and "native_fields" not in stored and _warn_once(config):
            try:
                spec = parse_pattern(stored.get("pattern")).spec()
            except Exception:  # a pattern class registered in another process: name it as stored
                spec = stored.get("pattern")
            warnings.warn(
                f"this {getattr(config, 'model_type', '')} config carries an hf_sparse pattern ({spec}), "
                f"but the model is built with attn_implementation={config._attn_implementation!r}, so it runs full "
                "attention. Load it with from_pretrained(path, attn_implementation='hf_sparse') or call "
                "hf_sparse.patch_model(model)",
                StoredPatternWarning, stacklevel=2,
            )
    elif ours and isinstance(stored, dict) and vars(parent).get("config") is config:
        _wrap_generate_cache(parent)
        _wrap_save(parent)
    return None


_LOAD_HOOK = []


def install_load_hook() -> None:
    """Install :func:`on_module_registered` (once per process)."""
    if not _LOAD_HOOK:
        from torch.nn.modules.module import register_module_module_registration_hook

        _LOAD_HOOK.append(register_module_module_registration_hook(on_module_registered))


def patch_model(
    model,
    pattern: Pattern | str | dict | HeadPlan | os.PathLike | None = None,
    *,
    layers: list[int] | None = None,
    backend: str = "auto",
    head_patterns: dict[tuple[int, int], Pattern | str | dict] | None = None,
):
    """Make ``model`` attend with a sparse ``pattern``, in place, and return it.

    Args:
        model: a supported ``*ForCausalLM`` (see ``SUPPORTED_MODEL_TYPES``), transformers >= 5.4.
        pattern: anything :func:`hf_sparse.parse_pattern` takes (``"longformer:window=1024,global_tokens=4"``,
            a dict, a :class:`~hf_sparse.Pattern`); causal patterns only. ``None`` re-applies the pattern
            stored in ``model.config.hf_sparse`` (e.g. after ``from_pretrained``), with its ``layers`` and
            ``backend`` unless given here. A head plan -- a :class:`~hf_sparse.head_plan.HeadPlan`, or the path
            of a plan file ``"plan.json"`` written by ``hf-sparse-calibrate`` -- is checked against the model and
            applied as its streaming pattern plus ``head_patterns`` for its dense heads (docs/calibration.md).
        layers: indices of the layers to patch (``None``: all). The others keep the model's own
            attention implementation, sliding window included.
        backend: ``"auto"`` (Triton on CUDA, else the PyTorch reference), ``"triton"``, ``"reference"`` or
            ``"dense"`` (tests only), see :func:`hf_sparse.sparse_attention`. ``"triton"`` where it cannot
            run (no Triton, no CUDA nor ``TRITON_INTERPRET=1``) raises ``ValueError`` here, before any forward.
        head_patterns: ``{(layer, kv_head): pattern}``: these KV heads (and the query heads of their GQA
            group) use their own pattern (``"dense"`` keeps a retrieval head exact); the others use
            ``pattern``. All heads of a layer still run in one kernel launch. Saved in the config.

    Patching again replaces the pattern; :func:`unpatch_model` restores the previous implementation.
    Under left padding, pass ``position_ids = attention_mask.cumsum(-1) - 1`` (as ``generate`` does):
    the patterns count real tokens. ``generate`` then keeps a bounded KV cache for ``SlidingWindow`` and
    ``Longformer`` layers (``G + W`` slots each, see :mod:`hf_sparse.patches.cache` and docs/generation.md).

    Example::

        model = AutoModelForCausalLM.from_pretrained("mistralai/Mistral-7B-v0.1", dtype=torch.bfloat16)
        patch_model(model, "longformer:window=1024,global_tokens=4")
        print(model.config.hf_sparse)
    """
    config = _check_model(model)
    stored = getattr(config, "hf_sparse", None)
    backend_from_config = False
    plan = as_plan(pattern)
    plan_info = None
    if plan is not None:
        if head_patterns is not None:
            raise ValueError("patch_model: a head plan already names its dense heads; pass the plan or "
                             "pattern + head_patterns=, not both")
        plan.check_model(config)
        pattern, head_patterns, plan_info = plan.streaming, plan.head_patterns(), plan.summary()
    elif pattern is None and head_patterns is None and isinstance(stored, dict):
        plan_info = stored.get("plan")  # re-applying a stored plan: keep what it says of itself
    if pattern is None:
        if not isinstance(stored, dict) or "pattern" not in stored:
            raise ValueError(
                "patch_model(model) without a pattern re-applies the one stored in model.config.hf_sparse, but this "
                "model has none; pass a pattern, e.g. patch_model(model, 'sliding_window:window=4096')"
            )
        pattern = stored["pattern"]
        if layers is None:
            layers = stored.get("layers")
        if backend == "auto":
            backend = stored.get("backend", "auto")
            backend_from_config = backend != "auto"
        if head_patterns is None:
            head_patterns = {(int(i), int(h)): p for i, h, p in stored.get("head_patterns") or []}
    pat = parse_pattern(pattern)
    if not pat.causal:
        raise ValueError(f"pattern {pat.spec()} is non-causal; decoders need causal patterns (causal=true)")
    check_backend(backend)
    layer_list = _check_layers(layers, config.num_hidden_layers)
    heads_stored = _check_head_patterns(head_patterns, pat, layer_list, config)
    modules = _attention_modules(model)
    try:  # before any forward: the base pattern and each layer's per-head plan, as the layers will run them
        for plan in (pat, *(p for _, p in layer_plans(pat, heads_stored))):
            check_backend_available(backend, plan, device=_model_device(model), kv_heads=_kv_heads(config),
                                    head_dim=getattr(modules[0], "head_dim", None) if modules else None)
    except ValueError as err:
        if backend_from_config:
            raise ValueError(f"{err} (backend={backend!r} is the one stored in model.config.hf_sparse; pass "
                             "patch_model(model, backend='reference') to run it here)") from None
        raise

    current = config._attn_implementation
    if current == ATTN_NAME:
        previous = stored.get("previous_attn_implementation") if isinstance(stored, dict) else None
        previous = previous or ("sdpa" if getattr(model, "_supports_sdpa", False) else "eager")
    else:
        previous = current or "eager"

    register()
    if len({m.layer_idx for m in modules}) != config.num_hidden_layers:
        raise NotImplementedError(
            f"found {len(modules)} attention modules with a layer_idx in {type(model).__name__} for "
            f"{config.num_hidden_layers} layers; hf_sparse cannot tell which module is which layer"
        )
    config.hf_sparse = {
        "pattern": pat.to_dict(),
        "layers": layer_list,
        "backend": backend,
        "previous_attn_implementation": previous,
    }
    if heads_stored:
        config.hf_sparse["head_patterns"] = heads_stored
    if plan_info is not None:
        config.hf_sparse["plan"] = plan_info
    try:
        options_of(config)  # parse once, outside any torch.compile trace
        model.set_attn_implementation(ATTN_NAME)
    except Exception:
        _restore_config(config, stored)
        raise
    if config._attn_implementation != ATTN_NAME:
        _restore_config(config, stored)
        raise RuntimeError(
            f"set_attn_implementation({ATTN_NAME!r}) left {type(model).__name__} on {config._attn_implementation!r}"
        )
    opts = options_of(config)
    _warn_replaced_windows(config, opts)
    remember_model_rotary(model, config)  # the distance cap rotates queries with the model's own frequencies
    for module in modules:
        if layer_list is None or module.layer_idx in layer_list:
            _decorate(module, opts.pattern_for(module.layer_idx).spec())
        else:
            _undecorate(module)
    _wrap_generate_cache(model)
    _wrap_save(model)
    return model


def _warn_replaced_windows(config, opts) -> None:
    """Warn (once per message) where the pattern replaces the model's own sliding window on patched layers;
    ``"dense"`` keeps it (:func:`~hf_sparse.patches.options.native_windows`)."""
    replaced = {}
    for i, window in native_windows(config).items():
        if opts.patches(i) and opts.pattern_for(i).spec() != SlidingWindow(window=window).spec():
            replaced.setdefault(window, []).append(i)
    for window, layers in replaced.items():
        _warn_message_once(
            f"hf_sparse: this {config.model_type} model limits layers {layers} to its own sliding window of "
            f"{window} tokens (config.sliding_window); the pattern {opts.pattern_for(layers[0]).spec()} replaces it "
            "there. patch_model(model, 'dense') keeps the model's own window"
        )


def _kv_heads(config) -> int:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return getattr(text, "num_key_value_heads", None) or text.num_attention_heads


def _check_head_patterns(head_patterns, pattern: Pattern, layer_list, config) -> list:
    """Validate ``head_patterns=`` against the model: ``[[layer, kv_head, pattern dict], ...]`` to store."""
    kv_heads = _kv_heads(config)
    if pattern.per_head:
        pattern.check_heads(kv_heads)
    if not head_patterns:
        return []
    if not isinstance(head_patterns, dict):
        raise ValueError(f"head_patterns must be a dict {{(layer, kv_head): pattern}}, got {type(head_patterns).__name__}")
    n_layers = config.num_hidden_layers
    out = []
    for key, p in sorted(head_patterns.items(), key=lambda kv: tuple(kv[0]) if isinstance(kv[0], tuple) else (0, 0)):
        if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                 for x in key)):
            raise ValueError(f"head_patterns keys are (layer, kv_head) pairs of integers, got {key!r}")
        layer, head = key
        if not 0 <= layer < n_layers:
            raise ValueError(f"head_patterns names layer {layer}, but the model has {n_layers} layers (0..{n_layers - 1})")
        if layer_list is not None and layer not in layer_list:
            raise ValueError(f"head_patterns names layer {layer}, which layers={layer_list} leaves unpatched; "
                             "patch it too or drop the entry")
        if not 0 <= head < kv_heads:
            raise ValueError(f"head_patterns names KV head {head} of layer {layer}, but the model has {kv_heads} KV "
                             f"heads (0..{kv_heads - 1}); query heads h map to KV head h // {max(1, _q_per_kv(config))}")
        hp = parse_pattern(p)
        if not hp.causal or hp.per_head:
            raise ValueError(f"head_patterns[{key}] = {hp.spec()}: give one causal pattern per head")
        out.append([layer, head, hp.to_dict()])
    layer_plans(pattern, out)  # the same checks the stored form gets on load
    return out


def _q_per_kv(config) -> int:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return text.num_attention_heads // _kv_heads(config)


def _restore_config(config, stored) -> None:
    if stored is None:
        if hasattr(config, "hf_sparse"):
            del config.hf_sparse
    else:
        config.hf_sparse = stored


def unpatch_model(model):
    """Undo :func:`patch_model`: restore the previous attention implementation, drop ``config.hf_sparse``."""
    config = model.config
    stored = getattr(config, "hf_sparse", None)
    if config._attn_implementation == ATTN_NAME:
        previous = stored.get("previous_attn_implementation") if isinstance(stored, dict) else None
        model.set_attn_implementation(previous or "eager")
    for module in _attention_modules(model):
        _undecorate(module)
    _unwrap_generate_cache(model)
    _unwrap_save(model)
    if hasattr(config, "hf_sparse"):
        del config.hf_sparse
    return model
