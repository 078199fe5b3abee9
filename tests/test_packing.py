"""Packed sequences: several documents in one row, each with its own pattern from its own start.

A row of three documents of different lengths, marked as transformers and TRL mark them (position ids
that restart, and/or ``cu_seq_lens_q/k``), gives the logits and the parameter gradients of running
each document alone: its own window, its own global tokens, its own BigBird random blocks, its own
per-head plan. Tiny Llama and Qwen 2, float32, ``backend="reference"``; the Triton kernels in the
interpreter on a tiny shape; ``DataCollatorWithFlattening`` end to end; the layout's memory bound.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import needs_interpreter  # noqa: E402
from hf_models import cache_kwargs, tiny, tokens  # noqa: E402
from hf_sparse.patches import patch_model  # noqa: E402
from hf_sparse.patches.packing import _group, packed_layout  # noqa: E402

LENGTHS = [37, 18, 53]  # BigBird (block 16) draws random blocks in the first and the last document
PATTERNS = {
    "window": ("sliding_window:window=6", None),
    "longformer": ("longformer:window=5,global_tokens=3", None),
    "bigbird": ("bigbird:block=16,window_blocks=1,global_blocks=1,random_blocks=1,seed=3", None),
    "plan": ("sliding_window:window=6", {(0, 0): "dense"}),
}


def documents(lengths=LENGTHS, seed: int = 7) -> list[torch.Tensor]:
    return [tokens(1, n, seed=seed + i) for i, n in enumerate(lengths)]


def packed(docs: list[torch.Tensor]) -> dict:
    """One row, as DataCollatorWithFlattening and TRL's padding-free collator build it."""
    lengths = [d.shape[1] for d in docs]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return dict(input_ids=torch.cat(docs, 1), position_ids=torch.cat([torch.arange(n) for n in lengths])[None],
                cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))


def loss_sum(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token loss inside one document."""
    return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")


def alone(model, docs):
    """Logits of each document run alone, concatenated, and the parameter gradients of their summed loss."""
    model.zero_grad()
    outs, total = [], 0.0
    for d in docs:
        logits = model(d, use_cache=False).logits
        total = total + loss_sum(logits, d)
        outs.append(logits.detach())
    total.backward()
    return torch.cat(outs, 1), {n: p.grad.clone() for n, p in model.named_parameters()}


def together(model, docs, **marks):
    """The packed row's logits and the gradients of the same summed loss (documents cut at their bounds)."""
    model.zero_grad()
    logits = model(use_cache=False, **marks).logits
    total, start = 0.0, 0
    for d in docs:
        n = d.shape[1]
        total = total + loss_sum(logits[:, start:start + n], d)
        start += n
    total.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_grads_close(got: dict, want: dict, atol=2e-5, rtol=1e-4) -> None:
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


CASES = [(mt, name) for mt in ("llama", "qwen2") for name in PATTERNS]


@pytest.mark.parametrize("marks", ["position_ids", "cu_seq_lens"])
@pytest.mark.parametrize(("model_type", "name"), CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_packed_row_equals_documents_alone(model_type, name, marks, one_thread):
    pattern, heads = PATTERNS[name]
    model = patch_model(tiny(model_type), pattern, head_patterns=heads, backend="reference").train()
    docs = documents()
    want_logits, want_grads = alone(model, docs)
    batch = packed(docs)
    if marks == "position_ids":  # the position restarts alone mark the documents
        batch = {k: batch[k] for k in ("input_ids", "position_ids")}
    got_logits, got_grads = together(model, docs, **batch)
    torch.testing.assert_close(got_logits, want_logits, atol=2e-5, rtol=2e-5)
    assert_grads_close(got_grads, want_grads)


@pytest.mark.parametrize("name", ["longformer", "bigbird"])
def test_documents_do_not_share_the_pattern_of_the_row(name, one_thread):
    """Sanity of the tests above: the same row taken as one sequence (positions 0..T-1) differs in the later
    documents -- their global tokens and random blocks would be the row's."""
    pattern, _ = PATTERNS[name]
    model = patch_model(tiny("llama"), pattern, backend="reference")
    batch = packed(documents())
    with torch.no_grad():
        per_doc = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        one_seq = model(input_ids=batch["input_ids"], use_cache=False).logits
    first = LENGTHS[0]
    torch.testing.assert_close(per_doc[:, :first], one_seq[:, :first])
    assert (per_doc[:, first:] - one_seq[:, first:]).abs().max() > 1e-3


def test_partly_patched_model_packs_its_other_layers_the_transformers_way(one_thread):
    """``layers=[1]``: layer 0 runs HF's eager attention with transformers' own packed mask (no cache)."""
    model = patch_model(tiny("llama"), PATTERNS["longformer"][0], layers=[1], backend="reference").train()
    docs = documents()
    want_logits, want_grads = alone(model, docs)
    got_logits, got_grads = together(model, docs, **{k: v for k, v in packed(docs).items()
                                                      if k in ("input_ids", "position_ids")})
    torch.testing.assert_close(got_logits, want_logits, atol=2e-5, rtol=2e-5)
    assert_grads_close(got_grads, want_grads)


@needs_interpreter
@pytest.mark.parametrize("name", ["longformer", "bigbird", "plan"])
def test_packed_row_on_the_triton_kernels(name, one_thread):
    """The kernels (forward, dQ, dK/dV) in Triton's interpreter, on right-padded document batches."""
    pattern, heads = PATTERNS[name]
    model = patch_model(tiny("llama"), pattern, head_patterns=heads, backend="triton").train()
    docs = documents([21, 9, 34])
    got_logits, got_grads = together(model, docs, **packed(docs))
    patch_model(model, pattern, head_patterns=heads, backend="reference")
    want_logits, want_grads = alone(model, docs)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)
    assert_grads_close(got_grads, want_grads, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
def test_data_collator_with_flattening_end_to_end(flash_kwargs, one_thread):
    """transformers' padding-free collator: its batch goes straight into the patched model; the loss is the
    mean over the documents' own next-token predictions (the collator masks each document's first label)."""
    from transformers import DataCollatorWithFlattening

    model = patch_model(tiny("qwen2"), PATTERNS["longformer"][0], backend="reference").train()
    docs = documents()
    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)
    batch = collator([{"input_ids": d[0].tolist()} for d in docs])
    assert ("cu_seq_lens_q" in batch) == flash_kwargs and "attention_mask" not in batch
    model.zero_grad()
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    _, want_grads = alone(model, docs)
    predicted = sum(n - 1 for n in LENGTHS)
    with torch.no_grad():
        want_loss = sum(loss_sum(model(d, use_cache=False).logits, d) for d in docs) / predicted
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
    assert_grads_close(got, {n: g / predicted for n, g in want_grads.items()})


def test_two_packed_rows_and_documents_across_rows(one_thread):
    """Rows of packed documents; ``cu_seq_lens`` counts over the flattened batch, as flash-attention's varlen
    functions do, so a document may even run over a row's end."""
    model = patch_model(tiny("llama"), PATTERNS["bigbird"][0], backend="reference")
    docs = documents([30, 20, 14, 36])
    want, _ = alone(model, docs)
    flat = packed(docs)
    with torch.no_grad():
        by_rows = model(input_ids=flat["input_ids"].view(2, 50), position_ids=flat["position_ids"].view(2, 50),
                        use_cache=False).logits
        across = model(input_ids=flat["input_ids"].view(2, 50), cu_seq_lens_q=torch.tensor([0, 30, 50, 64, 100]),
                       position_ids=flat["position_ids"].view(2, 50), use_cache=False).logits
    torch.testing.assert_close(by_rows.reshape(1, 100, -1), want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(across.reshape(1, 100, -1), want, atol=2e-5, rtol=2e-5)
    # documents 2 and 3 (14 + 36 tokens) start mid-row: only cu_seq_lens can say where one runs over a row end
    docs = documents([30, 34, 36])
    want, _ = alone(model, docs)
    flat = packed(docs)
    with torch.no_grad():  # (RoPE needs each document's own positions, the second row starting at 20)
        got = model(input_ids=flat["input_ids"].view(2, 50), position_ids=flat["position_ids"].view(2, 50),
                    cu_seq_lens_q=flat["cu_seq_lens_q"], use_cache=False).logits
    torch.testing.assert_close(got.reshape(1, 100, -1), want, atol=2e-5, rtol=2e-5)


def test_packing_refusals(one_thread):
    from transformers import DynamicCache

    model = patch_model(tiny("llama"), PATTERNS["window"][0], backend="reference")
    batch = packed(documents())
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids=tokens(1, 5), use_cache=True, **cache_kwargs(cache))
        with pytest.raises(NotImplementedError, match="after 5 cached keys"):
            model(input_ids=batch["input_ids"], position_ids=batch["position_ids"] + 5,
                  cu_seq_lens_q=batch["cu_seq_lens_q"], use_cache=True, **cache_kwargs(cache))
        with pytest.raises(NotImplementedError, match="together with a padding attention_mask"):
            mask = torch.ones_like(batch["input_ids"])
            mask[0, :3] = 0
            model(input_ids=batch["input_ids"], attention_mask=mask, cu_seq_lens_q=batch["cu_seq_lens_q"],
                  use_cache=False)
        with pytest.raises(NotImplementedError, match="cu_seq_lens_k differs"):
            model(input_ids=batch["input_ids"], cu_seq_lens_q=batch["cu_seq_lens_q"],
                  cu_seq_lens_k=torch.tensor([0, 10, 108], dtype=torch.int32), use_cache=False)
        with pytest.raises(ValueError, match="must rise from 0 to the 108 tokens"):
            model(input_ids=batch["input_ids"], cu_seq_lens_q=torch.tensor([0, 10, 100]), use_cache=False)


def test_layout_memory_is_linear_and_groups_few():
    """Adversarial lengths (one long document and many short ones): the groups hold at most twice the
    tokens, in at most log2(longest) + 1 groups, and every token is gathered back to its own slot."""
    for lengths in ([4096] + [1] * 4096, [1000, 3, 500, 257, 256, 2, 1, 77] * 5, [7] * 50):
        groups = _group(lengths)
        padded = sum(len(g) * lengths[g[0]] for g in groups)
        assert padded <= 2 * sum(lengths), lengths[:4]
        assert len(groups) <= max(lengths).bit_length() + 1
    lengths = [5, 1, 9, 3, 3, 11]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    layout = packed_layout(1, sum(lengths), position_ids=pos)
    slots = torch.cat([g.index.masked_fill(~g.valid, -1).flatten() for g in layout.groups])
    assert torch.equal(slots[layout.scatter], torch.arange(sum(lengths)))
    assert packed_layout(1, 10, position_ids=torch.arange(10)[None]) is None  # one document: not packed
