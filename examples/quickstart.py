"""hf-sparse in one minute: patch a (tiny, random) Llama with a sparse pattern, run it, generate.

    python examples/quickstart.py

Runs on the CPU in seconds, offline: the model is built from a config, not downloaded. With a real
model, replace the first lines by ``AutoModelForCausalLM.from_pretrained(name)`` and a tokenizer.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_sparse import patch_model, unpatch_model

WINDOW = 64

config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
torch.manual_seed(0)
model = LlamaForCausalLM(config).eval()
input_ids = torch.randint(3, config.vocab_size, (1, 256))

with torch.no_grad():
    full = model(input_ids).logits

# Longformer: every query sees the last WINDOW keys (its own included) and the first 4 tokens.
# backend="auto" runs the Triton kernels on CUDA and the block-wise PyTorch reference on the CPU.
patch_model(model, f"longformer:window={WINDOW},global_tokens=4")
with torch.no_grad():
    sparse = model(input_ids).logits

# Up to position WINDOW + 3 a query still sees every earlier key, so the logits agree with full attention.
inside = (sparse[:, : WINDOW + 4] - full[:, : WINDOW + 4]).abs().max().item()
beyond = (sparse[:, WINDOW + 4 :] - full[:, WINDOW + 4 :]).abs().max().item()
print(f"max |logit difference| vs full attention: {inside:.2e} within the window, {beyond:.2e} beyond it")

generated = model.generate(input_ids[:, :100], max_new_tokens=8, do_sample=False, pad_token_id=0)
print("generated token ids:", generated[0, 100:].tolist())

print(model.model.layers[0].self_attn)  # each patched attention module shows its pattern
print(model.config)                     # "hf_sparse": pattern, layers, backend (saved by save_pretrained)

unpatch_model(model)                    # back to the model's own attention
assert not hasattr(model.config, "hf_sparse")
