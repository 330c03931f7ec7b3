"""What every LexAlign preference trainer shares: one base over TRL's DPOTrainer and KTOTrainer.

`TrainerPlumbing` (DPO, GDPO, KTO, ORPO, SimPO, CPO) checks the TRL internals the
trainer depends on (`lexalign.train.trl_seam`), refuses the config options the
trainer does not support, builds TRL's trainer with the lean LM head
(`lexalign.models.logprobs`) and, on precomputed reference log-probs, without TRL's hash
of every weight, then fails if the lean head was not installed through TRL.
It reads data LexAlign tokenized (`lexalign.core.tokens`): only the rows whose prompt
fills `max_length` are dropped, as TRL drops them, and the reference step's
log-probs are read instead of recomputed.

`PreferenceTrainer` (GDPO and the reference-free methods) adds the loss step
around a method's loss: one forward pass of the policy over the batch's rows
(packed: `lexalign.train.packed`), the method's loss (its `loss_arguments` from the
batch, the pure function of lexalign.methods, its `preference_step`), the MoE
auxiliary loss, and DPO's metrics with chosen = the first response of each
prompt and rejected = the last. A batch holds K·B rows, response-major: row
k·B + b is response k of prompt b (K = 2: TRL's chosen rows, then rejected rows).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import torch
from trl import DPOTrainer

from lexalign.train import trl_seam
from lexalign.train.packed import padding_free_model

LOSS_OPTIONS = {
    "loss_type": lambda args: list(args.loss_type) != ["sigmoid"],
    "label_smoothing": lambda args: args.label_smoothing != 0.0,
    "ld_alpha": lambda args: args.ld_alpha is not None,
    "use_weighting": lambda args: args.use_weighting,
}
"""DPOConfig's options of TRL's own losses, which a LexAlign loss replaces."""


def has_columns(dataset, columns) -> bool:
    names = getattr(dataset, "column_names", None) or []
    return all(c in names for c in columns)


class TrainerPlumbing:
    """Mixed in before a TRL trainer class (DPOTrainer, KTOTrainer): see the module docstring."""

    trl_module: ClassVar[str]
    """The module whose globals the trainer is built through (`trl_seam.DPO_MODULE`, `KTO_MODULE`)."""
    trl_internals: ClassVar[tuple[trl_seam.Internal, ...]]
    trl_state: ClassVar[tuple[str, ...]] = ()
    reference_columns: ClassVar[tuple[str, ...]] = ()
    """The columns with the reference step's log-probs (none: a reference-free method)."""
    unsupported: ClassVar[dict[str, Any]] = {}
    """Config options the trainer refuses: name → predicate(args), true when set."""
    method_name: ClassVar[str] = "this trainer"

    def __init__(self, *, args, padding_free_batches: bool = True, **kwargs):
        trl_seam.check_internals(self.trl_internals)
        bad = [name for name, is_set in self.unsupported.items() if is_set(args)]
        if bad:
            raise ValueError(f"{self.describe(args)} does not support these DPOConfig options: {', '.join(bad)}")
        self.padding_free_batches = padding_free_batches  # the policy's passes on packed rows (train/packed.py)
        datasets = [d for d in (kwargs.get("train_dataset"), kwargs.get("eval_dataset")) if d is not None]
        precomputed = args.precompute_ref_log_probs and all(has_columns(d, self.reference_columns) for d in datasets)
        with trl_seam.building(self.trl_module, precomputed) as record:
            super().__init__(args=args, **kwargs)
        record.require()
        trl_seam.check_state(self, self.trl_state, next(c.__name__ for c in type(self).__mro__
                                                        if c.__module__.startswith("trl.")))

    def describe(self, args) -> str:
        return self.method_name

    def _drop_fully_truncated(self, dataset, args):
        """Drop the rows whose prompt alone fills max_length (no completion token would be left), as TRL does.
        Only with `keep_start` truncation (KTOConfig has no other)."""
        if args.max_length is not None and getattr(args, "truncation_mode", "keep_start") == "keep_start":
            dataset = dataset.filter(lambda e: len(e["prompt_ids"]) < args.max_length)
        return dataset

    def _precompute_ref_logps(self, dataset, name, batch_size):
        if has_columns(dataset, self.reference_columns):
            return dataset  # the reference step's (or, reference-free, nothing to compute)
        return self._score_reference(dataset, name, batch_size)

    def _score_reference(self, dataset, name, batch_size):
        """The reference pass over `dataset`, once, before training (TRL's by default)."""
        return super()._precompute_ref_logps(dataset, name, batch_size)


class PreferenceStep(NamedTuple):
    """What a method's loss gives the shared loss step."""

    loss: torch.Tensor
    responses: int
    """K, the responses per prompt (rows are response-major)."""
    chosen_rewards: torch.Tensor
    """[B]: the implicit reward of each prompt's first (best) response."""
    rejected_rewards: torch.Tensor
    """[B]: of its last (worst) response."""
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    metrics: dict[str, torch.Tensor]
    """The method's own metrics, each averaged over the batch on every process, in the order they are logged."""
    extra: Any = None
    """Whatever the method's `own_metrics` needs."""


class PreferenceTrainer(TrainerPlumbing, DPOTrainer):
    """DPOTrainer with a LexAlign loss (the method's, lexalign.methods) on rows LexAlign tokenized."""

    trl_module = trl_seam.DPO_MODULE
    trl_internals = trl_seam.DPO
    trl_state = trl_seam.DPO_STATE
    unsupported = {**LOSS_OPTIONS, "padding_free": lambda args: args.padding_free}
    non_model_keys: ClassVar[frozenset[str]] = frozenset({"completion_mask"})
    """Batch entries that are not the model's inputs."""
    signature_columns: ClassVar[tuple[str, ...]] = ()
    """The dataset columns the collator reads."""

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(self.signature_columns)

    loss_fn: Callable
    """The method's loss (lexalign.methods: Method.loss), a pure function: set by the subclass."""

    def loss_arguments(self, logps: torch.Tensor, shift_mask: torch.Tensor, inputs: dict, model_kwargs: dict,
                       labels: torch.Tensor) -> tuple[tuple, Any]:
        """The method's loss's positional arguments from the policy's summed response log-probs `logps` [K·B]
        (the method's own keys follow by name), and what `preference_step` needs beside the loss's result."""
        raise NotImplementedError

    def preference_step(self, result, context) -> PreferenceStep:
        """The loss step's view of the loss's `result`: the loss, the rewards and log-probs, the metrics."""
        raise NotImplementedError

    def own_metrics(self, mode: str, step: PreferenceStep) -> dict[str, float]:
        """Metrics that need more than a batch mean (e.g. NaN for undefined values)."""
        return {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        model_kwargs = {key: v for key, v in inputs.items() if key not in self.non_model_keys}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        completion_mask = inputs["completion_mask"]
        shift_mask = completion_mask[..., 1:]
        seq_len = shift_mask.size(1)
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        # One forward pass of the policy over all K·B rows (packed: lexalign.train.packed).
        outputs = padding_free_model(self, model, inputs)(**model_kwargs, labels=labels, fused_lm_head=True)
        logps = outputs.log_probs[:, -seq_len:].sum(dim=1)
        arguments, context = self.loss_arguments(logps, shift_mask, inputs, model_kwargs, labels)
        # The method's loss, called from here: the trainer's loop, this step, the pure function.
        step = self.preference_step(self.loss_fn(*arguments, **(self.args.loss_keys or {})), context)
        loss = step.loss
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())
        self._log_metrics(mode, inputs, outputs, shift_mask, seq_len, step)
        if return_outputs:
            warnings.warn("return_outputs=True recomputes the logits with an extra forward pass", FutureWarning,
                          stacklevel=2)
            with torch.no_grad():
                outputs = model(**model_kwargs)
        return (loss, outputs) if return_outputs else loss

    def _log_metrics(self, mode, inputs, outputs, shift_mask, seq_len, step: PreferenceStep):
        """DPO's metrics, with chosen = each prompt's first response and rejected = its last, then the method's."""
        gather, metrics = self.accelerator.gather_for_metrics, self._metrics[mode]

        def mean(values: torch.Tensor) -> float:
            return gather(values.detach().float()).mean().item()

        entropy = outputs.entropy[:, -seq_len:].detach()
        tokens = gather(shift_mask.sum()).sum()
        metrics["entropy"].append((gather((entropy * shift_mask).sum()).sum() / tokens).item() if tokens > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]

        k = step.responses
        batch = shift_mask.size(0) // k
        masks = shift_mask.view(k, batch, -1)
        mean_logits = outputs.mean_logits[:, -seq_len:].view(k, batch, -1)
        for name, rank in (("chosen", 0), ("rejected", k - 1)):
            m = masks[rank].bool()
            total, count = gather(mean_logits[rank][m].sum()).sum().item(), gather(m.sum()).sum().item()
            metrics[f"logits/{name}"].append(total / count if count > 0 else 0.0)
        best_mask = masks[0].bool()
        top1 = outputs.is_top1[:, -seq_len:].view(k, batch, -1)[0]
        correct, count = gather((top1 & best_mask).sum()).sum(), gather(best_mask.sum()).sum()
        metrics["mean_token_accuracy"].append((correct / count).item() if count > 0 else 0.0)

        chosen, rejected = step.chosen_rewards, step.rejected_rewards
        metrics["rewards/chosen"].append(mean(chosen))
        metrics["rewards/rejected"].append(mean(rejected))
        metrics["rewards/accuracies"].append(mean(chosen > rejected))
        metrics["rewards/margins"].append(mean(chosen - rejected))
        metrics["logps/chosen"].append(mean(step.chosen_logps))
        metrics["logps/rejected"].append(mean(step.rejected_logps))
        for name, values in step.metrics.items():
            metrics[name].append(mean(values))
        for name, value in self.own_metrics(mode, step).items():
            metrics[name].append(value)
