"""Ranked groups through LexAlign's preference trainer (`lexalign.train.preference_trainer`, on TRL's DPOTrainer):
listwise preferences over K ranked responses, with the loss of the method (GDPO's: lexalign.methods.gdpo).

Everything but the data layout, the reference pass and the loss is shared:
DPOTrainer's PEFT wrapping, reference model (the model passed in; with PEFT, the
same model with the adapter disabled), checkpoints, resume and logging, and
LexAlign's lean LM head, padding-free batches and metrics.

Data: rows with `prompt` (str), `responses` (list[str], best first) and `scores`
(list[float], non-increasing; equal scores are ties). Rows with only
`chosen`/`rejected` are read as a group of two with scores [1, 0].

Batch layout: like TRL's concatenated batch, where rows 0..B-1 are the chosen
and rows B..2B-1 the rejected completions, a batch of B ranked groups holds K·B
rows, response-major: row k·B + b is response k (0 = best) of prompt b. All K·B
sequences go through the policy in one forward pass and through the reference
in one no-grad pass (both on packed rows, each prompt once for its K responses:
`lexalign.train.packed`); at K = 2 the batch is exactly DPO's.

The method's loss is the registry's (lexalign.methods: Method.loss), a pure function of the implicit rewards
[B, K] and the scores; the ranking metrics are GDPO's (`lexalign.methods.gdpo`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from transformers.data.data_collator import DataCollatorMixin
from trl import DPOConfig
from trl.data_utils import is_conversational
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import pad, use_adapter

from lexalign import methods
from lexalign.core.tokens import tokenize_groups
from lexalign.data.ranking import check_groups, ranked_groups
from lexalign.methods.gdpo import kendall_tau, pair_accuracy
from lexalign.train.align import dpo_arguments, tokenized_datasets, trainer_inputs
from lexalign.train.packed import padding_free_model
from lexalign.train.preference_trainer import LOSS_OPTIONS, PreferenceStep, PreferenceTrainer

# --- data --------------------------------------------------------------------------------------


def ranked_dataset(frame: pd.DataFrame, k: int, split: str = "train"):
    """A `datasets.Dataset` of prompt/responses/scores with exactly K responses per row."""
    rows, dropped = ranked_groups(frame, k)
    check_groups(len(rows), dropped, len(frame), k, split)
    return Dataset.from_list(rows) if rows else None


@dataclass
class DataCollatorForRankedPreference(DataCollatorMixin):
    """Pads tokenized groups into one batch of K·B sequences, response-major.

    Each example holds `prompt_ids` (list[int]), `completion_ids` (K lists of
    token ids, best first) and `scores` (K floats). The output has `input_ids`,
    `attention_mask` and `completion_mask` of shape [K·B, L], where row k·B + b
    is prompt b followed by its response k, and `scores` of shape [B, K]. At
    K = 2 this is TRL's DataCollatorForPreference output (chosen rows, then
    rejected rows), plus `scores`. Examples with `ref_logps` (K precomputed
    reference log-probs, see `lexalign.reference`) add `ref_logps` of shape [B, K].
    """

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        k = len(examples[0]["completion_ids"])
        if any(len(e["completion_ids"]) != k for e in examples):
            raise ValueError("every group in a batch must have the same number of responses")
        sequences, masks = [], []
        for rank in range(k):
            for e in examples:
                completion = e["completion_ids"][rank]
                sequences.append(list(e["prompt_ids"]) + list(completion))
                masks.append([0] * len(e["prompt_ids"]) + [1] * len(completion))
        if self.max_length is not None:
            if self.truncation_mode == "keep_start":
                sl = slice(None, self.max_length)
            elif self.truncation_mode == "keep_end":
                sl = slice(-self.max_length, None)
            else:
                raise ValueError(f"Unsupported truncation mode: {self.truncation_mode}")
            sequences = [s[sl] for s in sequences]
            masks = [m[sl] for m in masks]
        kw = {"padding_side": "right", "pad_to_multiple_of": self.pad_to_multiple_of}
        batch = {
            "input_ids": pad([torch.tensor(s) for s in sequences], padding_value=self.pad_token_id, **kw),
            "attention_mask": pad([torch.ones(len(s), dtype=torch.long) for s in sequences], padding_value=0, **kw),
            "completion_mask": pad([torch.tensor(m, dtype=torch.long) for m in masks], padding_value=0, **kw),
            "scores": torch.tensor([[float(s) for s in e["scores"]] for e in examples], dtype=torch.float32),
        }
        if "ref_logps" in examples[0]:
            batch["ref_logps"] = torch.tensor([[float(v) for v in e["ref_logps"]] for e in examples],
                                              dtype=torch.float32)
        return batch


# --- trainer -----------------------------------------------------------------------------------


@dataclass
class RankedConfig(DPOConfig):
    """DPOConfig plus the method, K and the method's own keys. `loss_type` must stay `["sigmoid"]`: the method's
    loss replaces it."""

    method: str = field(default="gdpo", metadata={"help": "A method that ranks K responses (lexalign.methods)."})
    group_size: int = field(default=4, metadata={"help": "K, the ranked responses per prompt (>= 2)."})
    loss_keys: dict | None = field(default=None, metadata={
        "help": "The method's own keys but K (lexalign.methods: Method.own_keys), e.g. {'group_delay_weight': 0.5}."})


class RankedTrainer(PreferenceTrainer):
    """Listwise preference optimization over K ranked responses (see the module docstring)."""

    _tag_names = ["trl", "lexalign"]
    _name = "Ranked"
    _paper = {}
    unsupported = {**LOSS_OPTIONS, "f_divergence_type": lambda args: args.f_divergence_type != "reverse_kl",
                   "padding_free": lambda args: args.padding_free}
    reference_columns = ("ref_logps",)
    non_model_keys = frozenset({"completion_mask", "scores", "ref_logps"})
    signature_columns = ("prompt_ids", "completion_ids", "scores", "ref_logps")

    def __init__(self, model, ref_model=None, args: RankedConfig | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, callbacks=None,
                 optimizers=(None, None), peft_config=None, padding_free_batches: bool = True):
        if args is None or not isinstance(args, RankedConfig):
            raise TypeError("RankedTrainer needs a RankedConfig")
        if args.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (got: {args.group_size})")
        if processing_class is None:
            raise ValueError("RankedTrainer needs processing_class (the tokenizer)")
        if processing_class.pad_token is None:
            processing_class.pad_token = processing_class.eos_token
        if data_collator is None:
            data_collator = DataCollatorForRankedPreference(
                pad_token_id=processing_class.pad_token_id,
                max_length=args.max_length,
                truncation_mode=args.truncation_mode,
                pad_to_multiple_of=args.pad_to_multiple_of,
            )
        self.group_size = args.group_size
        self.loss_fn = methods.method(args.method).loss_function()
        super().__init__(model=model, ref_model=ref_model, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                         callbacks=callbacks, optimizers=optimizers, peft_config=peft_config,
                         padding_free_batches=padding_free_batches)

    def describe(self, args) -> str:
        return args.method

    # Data ----------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """Tokenize prompt/responses/scores into prompt_ids, completion_ids (K lists) and scores.

        LexAlign's align step passes data already tokenized (`lexalign.reference`), which is only filtered.
        """
        first = next(iter(dataset))
        if "completion_ids" in first:
            return self._drop_fully_truncated(dataset, args)
        k = args.group_size

        def tokenize(example):
            if is_conversational(example):
                raise ValueError("The ranked trainer reads plain-text prompts and responses, not chat messages")
            if example.get("responses") is not None:
                responses = list(example["responses"])
                scores = example.get("scores")
                scores = [float(len(responses) - 1 - i) for i in range(len(responses))] if scores is None \
                    else [float(s) for s in scores]
            else:
                responses, scores = [example["chosen"], example["rejected"]], [1.0, 0.0]
            if len(responses) != k or len(scores) != k:
                raise ValueError(f"{dataset_name}: a group has {len(responses)} responses and {len(scores)} scores; "
                                 f"K is {k}")
            order = sorted(range(k), key=lambda i: -scores[i])  # best first; ties keep their order
            # LexAlign's rule for plain text (lexalign.core.tokens): the tokenizer's prefix once, EOS once after each
            # response, the completion starting where the prompt's ids and prompt + response's ids first differ
            # (as TRL's DPOTrainer splits them). The align step passes every method's data tokenized this way.
            (prompt_ids,), (completion_ids,) = tokenize_groups(
                processing_class, [example["prompt"]], [[responses[i] for i in order]], chat=False, workers=1)
            return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "scores": [scores[i] for i in order]}

        map_kwargs = {}
        if isinstance(dataset, Dataset):
            map_kwargs = {"num_proc": args.dataset_num_proc, "desc": f"Tokenizing {dataset_name} groups"}
        dataset = dataset.map(tokenize, **map_kwargs)
        return self._drop_fully_truncated(dataset, args)

    def _score_reference(self, dataset, name: str, batch_size: int):
        """`precompute_ref_log_probs` without the reference step: a `ref_logps` column (K values per group, best
        first), from one reference pass over the dataset before training."""
        from torch.utils.data import DataLoader

        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False,
                            num_workers=self.args.dataloader_num_workers)
        values = []
        for batch in loader:
            batch = {key: v.to(self.accelerator.device) for key, v in batch.items()}
            scores = batch["scores"]
            model_kwargs = {key: v for key, v in batch.items() if key not in self.non_model_keys}
            model_kwargs["use_cache"] = False
            completion_mask = batch["completion_mask"]
            labels = batch["input_ids"].masked_fill(completion_mask == 0, -100)
            logps = self._reference_logps(model_kwargs, labels, completion_mask.size(1) - 1, batch)
            values += logps.view(scores.size(1), scores.size(0)).T.float().cpu().tolist()
        return dataset.add_column("ref_logps", values)

    # Loss ----------------------------------------------------------------------------------------

    def _reference_logps(self, model_kwargs: dict, labels: torch.Tensor, seq_len: int,
                         inputs: dict | None = None) -> torch.Tensor:
        """Summed response log-probs of all K·B rows under the reference, in one no-grad pass: on the batch's packed
        rows as the policy's (`lexalign.train.packed`, each prompt once) given the batch's `inputs`, else padded."""
        ref_kwargs = {k: v for k, v in model_kwargs.items() if k != "output_router_logits"}
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            unwrapped = self.accelerator.unwrap_model(self.model)
            if self.ref_model is None and is_peft_model(unwrapped):
                # PEFT: the reference is the model with the adapter disabled (or a frozen "ref" copy of a
                # pre-existing adapter), exactly as in DPOTrainer.
                context = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
            else:
                # A frozen reference model; or, with precompute_ref_log_probs and full fine-tuning, the
                # policy itself before its first step (as in DPOTrainer).
                context = contextlib.nullcontext()
            with context:
                ref_model = self.model if self.ref_model is None else self.ref_model
                if inputs is not None:
                    ref_model = padding_free_model(self, ref_model, inputs)
                outputs = ref_model(**ref_kwargs, labels=labels, fused_lm_head=True)
        return outputs.log_probs[:, -seq_len:].sum(dim=1)

    def loss_arguments(self, logps, shift_mask, inputs, model_kwargs, labels):
        """(rewards [B, K], scores [B, K]): the implicit rewards β·(log π - log π_ref) of each prompt's K
        responses, best first, from rows response-major (row r·B + b is response r of prompt b)."""
        scores = inputs["scores"]
        batch, k = scores.shape
        if "ref_logps" in inputs:  # precomputed, [B, K] → response-major like `logps`
            ref_logps = inputs["ref_logps"].to(logps.dtype).T.reshape(-1)
        else:
            ref_logps = self._reference_logps(model_kwargs, labels, shift_mask.size(1), inputs)
        rewards = self.beta * (logps - ref_logps).view(k, batch).T
        return (rewards, scores), (logps.view(k, batch).T, rewards, scores)

    def preference_step(self, result, context) -> PreferenceStep:
        (loss, metrics), (logps_bk, rewards, scores) = result, context
        rewards = rewards.detach()
        return PreferenceStep(loss, scores.size(1), rewards[:, 0], rewards[:, -1], logps_bk[:, 0], logps_bk[:, -1],
                              metrics, extra=(rewards, scores))

    def own_metrics(self, mode, step) -> dict[str, float]:
        """The ranking metrics undefined for a group whose responses are all tied (NaN), averaged over the rest."""
        gather, (rewards, scores) = self.accelerator.gather_for_metrics, step.extra
        metrics = {}
        pair = gather(pair_accuracy(rewards, scores))
        if not torch.isnan(pair).all():
            metrics["rewards/pair_accuracy"] = torch.nanmean(pair).item()
        if mode == "eval":
            tau = gather(kendall_tau(rewards, scores))
            if not torch.isnan(tau).all():
                metrics["kendall_tau"] = torch.nanmean(tau).item()
        return metrics


def setup(job, device: str, model, tokenizer, interrupt, precomputed=None) -> RankedTrainer:
    """The trainer of ranked groups for an align job (lexalign.methods: a ranking method's `setup`): DPO's
    arguments and machinery, K ranked responses per prompt, the method's loss and its own keys."""
    cfg = job.cfg
    train, evaluation = precomputed or tokenized_datasets(job, tokenizer)
    args = {**dpo_arguments(job, device, evaluation is not None), "method": cfg.method,
            "group_size": cfg.of.responses(cfg.to_dict()), "loss_keys": cfg.own_keys,
            "precompute_ref_log_probs": precomputed is not None}
    return RankedTrainer(model=model, args=RankedConfig(**args),
                         **trainer_inputs(job, model, tokenizer, interrupt, train, evaluation),
                         padding_free_batches=cfg.padding_free)
