"""The Trainer and SFTTrainer recipes of docs/finetune.md, on a tiny model and an in-memory dataset.

Liger's convergence check: a few steps of the patched model give the same losses as the unpatched
model with the same attention expressed as HF's own mask -- a Mistral whose native ``sliding_window``
is the pattern's window, on HF's eager attention (which masks packed documents itself when there is no
cache). Padded batches and padding-free batches (``DataCollatorWithFlattening``; TRL's
``padding_free=True``) alike; the loss is finite and goes down. CPU, float32, reference backend.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from helpers import save_tiny_llama, sentences  # noqa: E402
from hf_models import tiny  # noqa: E402
from hf_sparse.patches import patch_model  # noqa: E402

W = 8
STEPS = 6


def _documents(n: int = 4, seed: int = 0) -> list[list[int]]:
    """``n`` random documents of 12 to 39 tokens; with ``n`` = the batch size every step sees them all."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (int(torch.randint(12, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _pair():
    """(reference, patched): the same weights, HF's eager sliding window vs the hf_sparse pattern."""
    reference = tiny("mistral", sliding_window=W).train()
    reference.config.use_cache = False  # training: no cache (HF's own masks only separate packed documents then)
    patched = patch_model(copy.deepcopy(reference), f"sliding_window:window={W}", backend="reference")
    return reference, patched


def _losses(trainer) -> list[float]:
    trainer.train()
    return [row["loss"] for row in trainer.state.log_history if "loss" in row]


def _args(tmp_path, name: str, **extra):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path / name), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=3e-3,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True, **extra,
    )


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
def test_trainer_recipe_equals_the_native_mask(padding_free, tmp_path, one_thread):
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening, Trainer

    train = datasets.Dataset.from_dict({"input_ids": _documents()})
    train = train.map(lambda row: {"labels": row["input_ids"]})
    if padding_free:  # one row per batch, position ids restarting at each document, no attention mask
        collator = DataCollatorWithFlattening()
    else:  # right padding with an attention mask; padded labels are -100
        tok = _Padder()
        collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    runs = {}
    for name, model in zip(("reference", "patched"), _pair()):
        torch.manual_seed(0)
        runs[name] = _losses(Trainer(model=model, args=_args(tmp_path, name), train_dataset=train,
                                     data_collator=collator))
    assert len(runs["patched"]) == STEPS and all(torch.isfinite(torch.tensor(runs["patched"])))
    torch.testing.assert_close(torch.tensor(runs["patched"]), torch.tensor(runs["reference"]), atol=1e-4, rtol=1e-4)
    assert runs["patched"][-1] < runs["patched"][0]


class _Padder:
    """The least a tokenizer must offer DataCollatorForSeq2Seq to pad pre-tokenized rows (pad id 0, right)."""

    pad_token_id = 0
    padding_side = "right"
    model_input_names = ["input_ids", "attention_mask"]

    def pad(self, features, padding=True, max_length=None, pad_to_multiple_of=None, return_tensors="pt"):
        longest = max(len(f["input_ids"]) for f in features)
        ids = torch.zeros(len(features), longest, dtype=torch.long)
        mask = torch.zeros(len(features), longest, dtype=torch.long)
        for i, f in enumerate(features):
            ids[i, :len(f["input_ids"])] = torch.tensor(f["input_ids"])
            mask[i, :len(f["input_ids"])] = 1
        out = {"input_ids": ids, "attention_mask": mask}
        if "labels" in features[0]:
            out["labels"] = torch.stack([torch.as_tensor(f["labels"]) for f in features])
        return out


def test_sft_trainer_padding_free_recipe(tmp_path, one_thread):
    """TRL's SFTTrainer with ``padding_free=True`` (cu_seq_lens and restarting positions) on the patched
    model: the same losses as the reference, finite and going down; the saved model keeps its pattern."""
    trl = pytest.importorskip("trl", reason="trl is in the test extra; without it the SFTTrainer recipe is untested")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    save_tiny_llama(tmp_path / "base", [sentences(i, 40) for i in range(4)], vocab_size=300, max_positions=256)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "base")
    texts = [sentences(100 + i, 2) for i in range(4)]  # one batch: every step sees the same documents
    train = datasets.Dataset.from_dict({"text": texts})

    def model(patched: bool):
        m = AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager")
        if patched:
            return patch_model(m, "longformer:window=6,global_tokens=2", backend="reference")
        return m

    def sft(name, m, **extra):
        args = trl.SFTConfig(
            output_dir=str(tmp_path / name), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=3e-3,
            lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
            seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True, padding_free=True, max_length=None,
            **extra,
        )
        torch.manual_seed(0)
        trainer = trl.SFTTrainer(model=m, args=args, train_dataset=train, processing_class=tokenizer)
        return trainer, _losses(trainer)

    trainer, losses = sft("patched", model(True))
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    # the same steps on HF's eager attention with the Longformer mask given explicitly to every layer
    reference = model(False)
    hooks = _explicit_longformer_masks(reference, window=6, global_tokens=2)
    _, want = sft("reference", reference)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want), atol=1e-4, rtol=1e-4)

    trainer.save_model(str(tmp_path / "final"))
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "final", attn_implementation="hf_sparse")
    assert again.config.hf_sparse["pattern"]["type"] == "longformer"


def _explicit_longformer_masks(model, *, window: int, global_tokens: int):
    """Forward pre-hooks that give every attention module of ``model`` (eager) a 4D mask built from the
    batch's position ids: per document, the window and the document's own first ``global_tokens``."""
    state = {}

    def on_model(module, args, kwargs):
        pos = kwargs.get("position_ids")
        ids = kwargs.get("input_ids")
        t = ids.shape[1]
        pos = torch.arange(t)[None] if pos is None else pos
        doc = torch.cumsum(torch.cat([torch.ones_like(pos[:, :1]), (pos.diff(dim=-1) != 1).long()], -1), -1)
        same = doc[:, :, None] == doc[:, None, :]
        i, j = pos[:, :, None], pos[:, None, :]
        ok = same & (j <= i) & ((i - j < window) | (j < global_tokens))
        state["mask"] = torch.zeros(ok.shape, dtype=torch.float32).masked_fill(~ok, torch.finfo(torch.float32).min)[:, None]
        return args, kwargs

    def on_attention(module, args, kwargs):
        kwargs["attention_mask"] = state["mask"]
        return args, kwargs

    hooks = [model.register_forward_pre_hook(on_model, with_kwargs=True)]
    hooks += [m.register_forward_pre_hook(on_attention, with_kwargs=True) for m in model.modules()
              if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
    return hooks
