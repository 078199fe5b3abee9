"""Tiny Hugging Face models and inputs shared by the adapter and cache tests (needs transformers)."""

from __future__ import annotations

import inspect

import torch
import transformers

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=512, initializer_range=0.3,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)


def tiny(model_type: str = "llama", attn: str = "eager", seed: int = 0, **overrides):
    """A random 2-layer model of ``model_type`` from a config, float32, eval mode."""
    cfg = transformers.AutoConfig.for_model(model_type, **{**COMMON, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    return model.float().eval()


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def left_padding(lengths: list[int], total: int) -> torch.Tensor:
    return torch.stack([torch.arange(total) >= total - n for n in lengths]).long()


def cache_kwargs(cache) -> dict:
    """transformers 5.24 names the forward argument ``cache``, 5.17 ``past_key_values``."""
    params = inspect.signature(transformers.LlamaModel.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}
