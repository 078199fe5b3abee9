"""Context parallel: one long sequence sharded across processes, a training step, checked against one process.

    torchrun --nproc-per-node 2 examples/context_parallel.py            # CPU (gloo), a tiny random Llama
    torchrun --nproc-per-node 8 examples/context_parallel.py --model meta-llama/Llama-3.1-8B \\
        --tokens 1048576 --pattern "sliding_window:window=4096" --dtype bfloat16   # 8 GPUs (NCCL)

Each process holds ``tokens / world`` consecutive tokens. Embeddings, norms and MLPs run on the local
tokens; attention fetches from the other processes only the keys the pattern shows (the window's
halo, the global tokens, BigBird's random blocks). The mean over processes of the loss and of the
gradients is the loss and the gradient of the whole sequence on one process: DDP or FSDP average
them for you when the context processes are part of their group (docs/parallel.md shows the 2-D
mesh); here a plain all-reduce does it. ``--check`` (tiny model only) runs the whole sequence on
every process too and prints the largest differences.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from hf_sparse.patches.parallel import context_parallel

from hf_sparse import patch_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a Hugging Face model name or path (default: a tiny random Llama)")
    ap.add_argument("--pattern", default="longformer:window=64,global_tokens=4,max_distance=none")
    ap.add_argument("--tokens", type=int, default=1000, help="length of the whole sequence")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--check", action="store_true", help="compare with the unsharded model (tiny model only)")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    dtype = getattr(torch, args.dtype)

    torch.manual_seed(0)  # the same weights and tokens on every process
    if args.model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device)
        model.gradient_checkpointing_enable()
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=4096)).to(device, dtype)
    model.config.attention_dropout = 0.0
    patch_model(model, args.pattern)
    ids = torch.randint(3, model.config.vocab_size, (1, args.tokens), device=device)

    with context_parallel(model) as cp:
        batch = cp.shard(ids, labels=ids)  # this process's tokens, positions and next-token labels
        out = model(**batch)
        out.loss.backward()
        lengths = cp.lengths
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    for p in model.parameters():  # the mean over processes (what DDP / FSDP do)
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world
    if rank == 0:
        print(f"{world} processes, shards of {lengths} tokens, pattern {args.pattern}")
        print(f"loss {float(loss) / world:.6f} (mean over processes = loss of the whole sequence)")

    if args.check and not args.model:
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        whole = model(input_ids=ids, labels=ids)  # the whole sequence on this process
        whole.loss.backward()
        s = sum(lengths[:rank])
        logits = (out.logits - whole.logits[:, s : s + lengths[rank]]).detach().abs().max()
        grad = max(float((grads[n] - p.grad).abs().max()) for n, p in model.named_parameters())
        print(f"rank {rank}: max |difference| vs one process: logits {float(logits):.2e}, gradients {grad:.2e}, "
              f"loss {abs(float(loss) / world - float(whole.loss.detach())):.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
