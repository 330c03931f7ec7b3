"""ORPO, SimPO and CPO: the reference-free methods, through LexAlign's preference trainer (on TRL's DPOTrainer).

Everything but the loss is shared (`lexalign.train.preference_trainer`: PEFT wrapping,
the lean LM head, the pair collator with its chosen rows then rejected rows,
padding-free batches, metrics, checkpoints, resume, logging); the losses are
pure functions in `lexalign.methods.reference_free`, named by each method's registry
entry (lexalign.methods: Method.loss). There is no reference model: the trainer is built with
`precompute_ref_log_probs` and nothing to precompute, so DPOTrainer neither
loads a second model for full fine-tuning nor runs a reference pass, and each
step is one forward pass of the policy over the 2·B sequences.

Data arrive tokenized by LexAlign (`lexalign.reference.tokenized_dataset`:
prompt_ids, chosen_ids, rejected_ids), never by TRL from rendered chat text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import DPOConfig

from lexalign import methods
from lexalign.methods.reference_free import PairLogps
from lexalign.reference.layout import TRUNCATION_MODE
from lexalign.train.align import tokenized_datasets, trainer_inputs, training_arguments
from lexalign.train.preference_trainer import PreferenceStep, PreferenceTrainer


@dataclass
class ReferenceFreeConfig(DPOConfig):
    """DPOConfig plus the method and its own keys. `beta` is SimPO's and CPO's β (ORPO's λ is `orpo_lambda`)."""

    method: str = field(default="simpo", metadata={"help": "A reference-free method: orpo, simpo or cpo."})
    loss_keys: dict | None = field(default=None, metadata={
        "help": "The method's own keys (lexalign.methods: Method.keys), e.g. SimPO's {'gamma': 0.5}."})


class ReferenceFreeTrainer(PreferenceTrainer):
    """ORPO, SimPO or CPO (`args.method`) on pre-tokenized pairs, with one model and no reference."""

    _tag_names = ["trl", "lexalign"]
    _name = "ReferenceFree"
    _paper = {}
    unsupported = {**PreferenceTrainer.unsupported, "sync_ref_model": lambda args: args.sync_ref_model}
    signature_columns = ("prompt_ids", "chosen_ids", "rejected_ids")

    def __init__(self, model, args: ReferenceFreeConfig, train_dataset=None, eval_dataset=None,
                 processing_class=None, callbacks=None, optimizers=(None, None), peft_config=None,
                 padding_free_batches: bool = True):
        if not isinstance(args, ReferenceFreeConfig):
            raise TypeError("ReferenceFreeTrainer needs a ReferenceFreeConfig")
        method = methods.method(args.method)
        if method.needs_reference or method.loss is None:
            raise ValueError(f"method {args.method} is not a reference-free pair method (lexalign.methods)")
        self.method, self.loss_fn = args.method, method.loss_function()
        # Nothing to precompute, and no reference model: DPOTrainer loads none when log-probs are precomputed.
        args.precompute_ref_log_probs = True
        super().__init__(model=model, ref_model=None, args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks,
                         optimizers=optimizers, peft_config=peft_config, padding_free_batches=padding_free_batches)

    def describe(self, args) -> str:
        return args.method

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "prompt_ids" not in dataset.column_names:
            raise ValueError(f"{dataset_name}: {self.method} reads data tokenized by LexAlign "
                             "(lexalign.reference.tokenized_dataset: prompt_ids, chosen_ids, rejected_ids)")
        return self._drop_fully_truncated(dataset, args)

    def loss_arguments(self, logps, shift_mask, inputs, model_kwargs, labels):
        """(the pairs' summed log-probs and token counts, β): chosen rows, then rejected rows."""
        chosen_logps, rejected_logps = logps.chunk(2, dim=0)
        chosen_lengths, rejected_lengths = shift_mask.sum(dim=1).chunk(2, dim=0)
        pairs = PairLogps(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths)
        return (pairs, self.beta), pairs

    def preference_step(self, result, context) -> PreferenceStep:
        (loss, metrics), pairs = result, context
        return PreferenceStep(loss.loss, 2, loss.chosen_rewards, loss.rejected_rewards, pairs.chosen,
                              pairs.rejected, {"loss/preference": loss.preference, **metrics})


def setup(job, device: str, model, tokenizer, interrupt, precomputed=None) -> ReferenceFreeTrainer:
    """The reference-free trainer for an align job (lexalign.methods: ORPO's, SimPO's and CPO's `setup`): DPO's
    machinery with one model and no reference, the method's loss and its own keys."""
    cfg = job.cfg
    train, evaluation = tokenized_datasets(job, tokenizer)
    args = {**training_arguments(job, device, evaluation is not None), "truncation_mode": TRUNCATION_MODE,
            "method": cfg.method, "loss_keys": cfg.own_keys}
    return ReferenceFreeTrainer(model=model, args=ReferenceFreeConfig(**args),
                                **trainer_inputs(job, model, tokenizer, interrupt, train, evaluation),
                                padding_free_batches=cfg.padding_free)
