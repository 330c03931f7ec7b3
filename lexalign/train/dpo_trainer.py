"""DPO through TRL's DPOTrainer, with TRL's losses, on data LexAlign tokenized (`lexalign.core.tokens`).

Rows arrive with prompt_ids/chosen_ids/rejected_ids and, from the reference
step, ref_chosen_logps/ref_rejected_logps; with `precompute_ref_log_probs` the
trainer reads those columns, so it neither runs the reference nor, for full
fine-tuning, loads a reference model. The policy's passes run on padding-free
rows (`lexalign.train.packed`) and every log-prob comes from the lean LM head
(`lexalign.models.logprobs`), both through `lexalign.train.preference_trainer`.
"""

from __future__ import annotations

from trl import DPOConfig, DPOTrainer

from lexalign.train import trl_seam
from lexalign.train.align import dpo_arguments, tokenized_datasets, trainer_inputs
from lexalign.train.packed import padding_free_model
from lexalign.train.preference_trainer import TrainerPlumbing


class LexAlignDPOTrainer(TrainerPlumbing, DPOTrainer):
    """TRL's DPOTrainer on data LexAlign tokenized, possibly scored by the reference step."""

    trl_module = trl_seam.DPO_MODULE
    trl_internals = trl_seam.DPO
    trl_state = trl_seam.DPO_STATE
    reference_columns = ("ref_chosen_logps", "ref_rejected_logps")
    method_name = "DPO"

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(padding_free_model(self, model, inputs), inputs, return_outputs,
                                    num_items_in_batch)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "prompt_ids" not in dataset.column_names:
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        return self._drop_fully_truncated(dataset, args)


def setup(job, device: str, model, tokenizer, interrupt, precomputed=None) -> LexAlignDPOTrainer:
    """DPO's trainer for an align job (lexalign.methods: DPO's `setup`): TRL's losses on data tokenized by
    LexAlign's rule (lexalign.core.tokens), never by TRL from rendered chat text; the reference step's log-probs
    when `precomputed` (the job's reference file) holds them."""
    train, evaluation = precomputed or tokenized_datasets(job, tokenizer)
    args = {**dpo_arguments(job, device, evaluation is not None), "precompute_ref_log_probs": precomputed is not None}
    return LexAlignDPOTrainer(model=model, args=DPOConfig(**args),
                              **trainer_inputs(job, model, tokenizer, interrupt, train, evaluation),
                              padding_free_batches=job.cfg.padding_free)
