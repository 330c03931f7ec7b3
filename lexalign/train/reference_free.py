"""ORPO, SimPO and CPO: the reference-free methods, through a subclass of TRL's DPOTrainer.

Everything but the loss is DPOTrainer's (PEFT wrapping, the fused log-prob LM
head, the pair collator with its chosen rows then rejected rows, checkpoints,
resume, logging); the losses are pure functions in
`lexalign.losses.reference_free`. There is no reference model: the trainer is
built with `precompute_ref_log_probs` and nothing to precompute, so DPOTrainer
neither loads a second model for full fine-tuning nor runs a reference pass,
and each step is one forward pass of the policy over the 2·B sequences.

Data arrive tokenized by LexAlign (`lexalign.reference.tokenized_dataset`:
prompt_ids, chosen_ids, rejected_ids), never by TRL from rendered chat text.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from trl import DPOConfig, DPOTrainer
from trl.trainer import dpo_trainer

from lexalign.logprobs import lean_heads
from lexalign.losses.reference_free import chosen_nll, cpo_loss, log_odds, mean_logps, orpo_loss, simpo_loss
from lexalign.train.gdpo import skip_reference_hash
from lexalign.train.packed import padding_free_model

METHODS = ("orpo", "simpo", "cpo")


@dataclass
class ReferenceFreeConfig(DPOConfig):
    """DPOConfig plus the method and its keys. `beta` is SimPO's and CPO's β (ORPO's λ is `orpo_lambda`)."""

    method: str = field(default="simpo", metadata={"help": "orpo, simpo or cpo."})
    gamma: float = field(default=0.5, metadata={"help": "SimPO: the target reward margin."})
    orpo_lambda: float = field(default=0.1, metadata={"help": "ORPO: the weight of the odds-ratio term."})
    cpo_alpha: float = field(default=1.0, metadata={"help": "CPO: the weight of the NLL term."})


class ReferenceFreeTrainer(DPOTrainer):
    """ORPO, SimPO or CPO (`args.method`) on pre-tokenized pairs, with one model and no reference."""

    _tag_names = ["trl", "lexalign"]
    _name = "ReferenceFree"
    _paper = {}

    def __init__(self, model, args: ReferenceFreeConfig, train_dataset=None, eval_dataset=None,
                 processing_class=None, callbacks=None, optimizers=(None, None), peft_config=None,
                 padding_free_batches: bool = True):
        if not isinstance(args, ReferenceFreeConfig):
            raise TypeError("ReferenceFreeTrainer needs a ReferenceFreeConfig")
        if args.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)} (got: {args.method})")
        unsupported = {
            "loss_type": list(args.loss_type) != ["sigmoid"],
            "label_smoothing": args.label_smoothing != 0.0,
            "ld_alpha": args.ld_alpha is not None,
            "use_weighting": args.use_weighting,
            "padding_free": args.padding_free,
            "sync_ref_model": args.sync_ref_model,
        }
        bad = [name for name, is_set in unsupported.items() if is_set]
        if bad:
            raise ValueError(f"{args.method} does not support these DPOConfig options: {', '.join(bad)}")
        # Nothing to precompute, and no reference model: DPOTrainer loads none when log-probs are precomputed.
        args.precompute_ref_log_probs = True
        self.method = args.method
        self.padding_free_batches = padding_free_batches  # the policy's passes on packed rows (train/packed.py)
        # lean_heads: log-probs of the scored tokens only, in tiles (lexalign/logprobs.py)
        with skip_reference_hash(True), lean_heads(dpo_trainer):
            super().__init__(model=model, ref_model=None, args=args, train_dataset=train_dataset,
                             eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks,
                             optimizers=optimizers, peft_config=peft_config)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "prompt_ids" not in dataset.column_names:
            raise ValueError(f"{dataset_name}: {self.method} reads data tokenized by LexAlign "
                             "(lexalign.reference.tokenized_dataset: prompt_ids, chosen_ids, rejected_ids)")
        # Drop only what DPOTrainer drops: pairs whose prompt fills max_length.
        if args.max_length is not None and args.truncation_mode == "keep_start":
            dataset = dataset.filter(lambda e: len(e["prompt_ids"]) < args.max_length)
        return dataset

    def _precompute_ref_logps(self, dataset, name, batch_size):
        return dataset  # no reference

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt_ids", "chosen_ids", "rejected_ids"]

    def pair_loss(self, chosen_logps, rejected_logps, chosen_lengths, rejected_lengths):
        """The method's loss (`lexalign.losses.reference_free`) from the policy's summed log-probs [B]."""
        args = self.args
        if self.method == "simpo":
            return simpo_loss(mean_logps(chosen_logps, chosen_lengths), mean_logps(rejected_logps, rejected_lengths),
                              self.beta, args.gamma)
        nll = chosen_nll(chosen_logps, chosen_lengths)
        if self.method == "orpo":
            return orpo_loss(mean_logps(chosen_logps, chosen_lengths), mean_logps(rejected_logps, rejected_lengths),
                             nll, args.orpo_lambda)
        return cpo_loss(chosen_logps, rejected_logps, nll, self.beta, args.cpo_alpha)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items() if k != "completion_mask"}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        completion_mask = inputs["completion_mask"]
        shift_mask = completion_mask[..., 1:]
        seq_len = shift_mask.size(1)
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        # One forward pass of the policy over the 2·B sequences (chosen rows, then rejected rows).
        outputs = padding_free_model(self, model, inputs)(**model_kwargs, labels=labels, fused_lm_head=True)
        logps = outputs.log_probs[:, -seq_len:].sum(dim=1)
        lengths = shift_mask.sum(dim=1)
        chosen_logps, rejected_logps = logps.chunk(2, dim=0)
        chosen_lengths, rejected_lengths = lengths.chunk(2, dim=0)
        result = self.pair_loss(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths)
        loss = result.loss
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())
        self._log_metrics(mode, inputs, outputs, shift_mask, seq_len, chosen_logps, rejected_logps,
                          chosen_lengths, rejected_lengths, result)
        if return_outputs:
            warnings.warn("return_outputs=True recomputes the logits with an extra forward pass", FutureWarning,
                          stacklevel=2)
            with torch.no_grad():
                outputs = model(**model_kwargs)
        return (loss, outputs) if return_outputs else loss

    def _log_metrics(self, mode, inputs, outputs, shift_mask, seq_len, chosen_logps, rejected_logps,
                     chosen_lengths, rejected_lengths, result):
        """DPO's metrics (rewards are each method's implicit rewards), plus the NLL and ORPO's log odds."""
        gather, metrics = self.accelerator.gather_for_metrics, self._metrics[mode]

        def mean(values: torch.Tensor) -> float:
            return gather(values.detach().float()).mean().item()

        entropy = outputs.entropy[:, -seq_len:].detach()
        tokens = gather(shift_mask.sum()).sum()
        metrics["entropy"].append((gather((entropy * shift_mask).sum()).sum() / tokens).item() if tokens > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        chosen_mask, rejected_mask = shift_mask.chunk(2, dim=0)
        chosen_logits, rejected_logits = outputs.mean_logits[:, -seq_len:].chunk(2, dim=0)
        for name, logits, mask in (("chosen", chosen_logits, chosen_mask),
                                   ("rejected", rejected_logits, rejected_mask)):
            total, count = gather(logits[mask.bool()].sum()).sum().item(), gather(mask.sum()).sum().item()
            metrics[f"logits/{name}"].append(total / count if count > 0 else 0.0)
        chosen_top1, _ = outputs.is_top1[:, -seq_len:].chunk(2, dim=0)
        correct, count = gather((chosen_top1 & chosen_mask.bool()).sum()).sum(), gather(chosen_mask.sum()).sum()
        metrics["mean_token_accuracy"].append((correct / count).item() if count > 0 else 0.0)

        chosen, rejected = result.chosen_rewards, result.rejected_rewards
        metrics["rewards/chosen"].append(mean(chosen))
        metrics["rewards/rejected"].append(mean(rejected))
        metrics["rewards/accuracies"].append(mean(chosen > rejected))
        metrics["rewards/margins"].append(mean(chosen - rejected))
        metrics["logps/chosen"].append(mean(chosen_logps))
        metrics["logps/rejected"].append(mean(rejected_logps))
        metrics["loss/preference"].append(mean(result.preference))
        if self.method != "simpo":
            metrics["nll_loss"].append(mean(result.nll))
        if self.method == "orpo":
            ratio = log_odds(mean_logps(chosen_logps, chosen_lengths)) - \
                log_odds(mean_logps(rejected_logps, rejected_lengths))
            metrics["log_odds_ratio"].append(mean(ratio))
