"""Padding-free training batches for TRL-style preference trainers.

DPOTrainer (and our GDPO and reference-free trainers, built on it) compute the
loss from a right-padded batch: `model(**padded, labels=labels,
fused_lm_head=True)`, then per-token log-probabilities of shape [N, L - 1]
summed per sequence. `padding_free_model` hands the loss a stand-in for the
model that runs the batch's sequences repacked into fewer rows
(`lexalign.models.packing.pack_rows`: position_ids restart per sequence, so attention
stays within each) and returns the per-token outputs in the padded batch's
shape. The trainer's loss, metrics and gradients are unchanged (equal to the
padded computation, tests/test_padding_free_training.py); the model computes only the real
tokens and the row-end padding.

The sequences of one prompt (DPO's chosen and rejected rows, GDPO's K, the
reference-free methods' pairs) share it (`packing.pack_rows(...,
share_prefixes=True)`: the prompt once, each response after it behind an
explicit attention mask), where the model's attention takes such a mask
(`packing.sharing_mask_kind`); with SDPA attention runs unit by unit and a
batch is one row with no padding (`packing.WIDE_ROW_TOKENS`). `PREFIX_SHARING`
(or a trainer's `share_prompts`) switches it off. Each response's log-probs are still those of
prompt + response alone (tests/test_prefix_sharing.py).

The policy's passes are packed, and so is the ranked trainer's own reference
pass (GDPO without a reference file); DPO's online reference pass is TRL's
and keeps its padded batch.
"""

from __future__ import annotations

from lexalign.models import packing

PER_TOKEN_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")

PREFIX_SHARING = True
"""Whether training batches share each prompt among its responses where the model can (a switch for comparisons:
benchmarks/bench_job_vs_trl.py --ablation)."""


class PackedModel:
    """Stands in for `model` in a loss: a call with `fused_lm_head=True` runs the packed rows."""

    def __init__(self, model, rows: packing.PackedRows, base=None):
        # `base`: the bare transformers model whose config says how attention runs (`model` may be wrapped in
        # DistributedDataParallel or PEFT, which do not pass `config` on).
        self.model, self.rows, self.base = model, rows, model if base is None else base

    def __call__(self, *args, fused_lm_head: bool = False, **kwargs):
        if not fused_lm_head:  # e.g. return_outputs' plain forward: the padded batch as it is
            return self.model(*args, **kwargs)
        extra = {k: kwargs[k] for k in ("output_router_logits",) if k in kwargs}
        rows = self.rows
        # Shared prompts: the explicit mask, and the units where attention runs unit by unit.
        extra.update(packing.packed_forward_kwargs(self.base, rows.allowed, rows.spans))
        outputs = self.model(input_ids=rows.input_ids, position_ids=rows.position_ids, labels=rows.labels,
                             use_cache=False, fused_lm_head=True, **extra)
        for name in PER_TOKEN_FIELDS:
            value = getattr(outputs, name, None)
            if value is not None:
                setattr(outputs, name, rows.unpack(value))
        return outputs

    def __getattr__(self, name):
        return getattr(self.model, name)


def padding_free_model(trainer, model, inputs: dict):
    """`model` for this batch's loss: packed when the trainer packs and the architecture takes packed input."""
    if not getattr(trainer, "padding_free_batches", False):
        return model
    unwrapped = trainer.accelerator.unwrap_model(model)
    base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
    if not packing.supports_packing(base):
        return model
    pad = trainer.processing_class.pad_token_id
    attention = inputs["attention_mask"]
    share = PREFIX_SHARING and getattr(trainer, "share_prompts", True) and \
        packing.unit_shareable(base, [int(attention.sum(dim=1).max())])
    wide = packing.WIDE_ROW_TOKENS if share and packing.unit_attention_available(base) else None
    rows = packing.pack_rows(inputs["input_ids"], attention, inputs["completion_mask"], 0 if pad is None else pad,
                             share_prefixes=share, row_tokens=wide)
    return PackedModel(model, rows, base)
