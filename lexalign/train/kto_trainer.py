"""KTO through TRL's KTOTrainer (stable in TRL 1.x), on rows LexAlign tokenized.

KTO learns from unpaired rows, a completion with a label (desirable or not):
TRL's unpaired format. Pairs are split into one desirable row (chosen) and one
undesirable row (rejected), side by side (`lexalign.reference.unpaired_rows`).

For implicit rewards r = β·(log π(y|x) − log π_ref(y|x)) and z, a batch
estimate of KL(π ‖ π_ref) from each row's prompt with another row's
completion (clamped at 0, no gradient), the loss of a row is

    desirable:   w_d · (1 − σ(r − β·z))
    undesirable: w_u · (1 − σ(β·z − r))

averaged over the batch (TRL's `loss_type: kto`). The KL term's mismatched
completion of each row is fixed by the data (`lexalign.reference.kl_partners`),
not by the batch, so the reference step scores both the completions and the
KL completions once, like DPO's pairs; align then reads them (`ref_logps`,
`ref_KL_logps`) and runs no reference pass.

TRL's own tokenization of the data is skipped: rows arrive as prompt_ids,
completion_ids and KL_completion_ids from `lexalign.core.tokens`, so chat-rendered
text never gets a second BOS. Batches are sequential (KTOConfig's
`train_sampling_strategy`), as TRL's KL estimate requires.
"""

from __future__ import annotations

from trl import KTOConfig, KTOTrainer

from lexalign.core.errors import warn
from lexalign.data.validated import label_balance
from lexalign.train import trl_seam
from lexalign.train.align import tokenized_datasets, trainer_inputs, training_arguments
from lexalign.train.preference_trainer import TrainerPlumbing


class LexAlignKTOTrainer(TrainerPlumbing, KTOTrainer):
    """TRL's KTOTrainer on rows tokenized by LexAlign, possibly with the reference step's log-probs."""

    trl_module = trl_seam.KTO_MODULE
    trl_internals = trl_seam.KTO
    reference_columns = ("ref_logps", "ref_KL_logps")
    method_name = "KTO"

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "prompt_ids" not in dataset.column_names or "KL_completion_ids" not in dataset.column_names:
            raise ValueError(f"{dataset_name}: KTO reads rows tokenized by LexAlign (lexalign.reference."
                             "tokenized_dataset: prompt_ids, completion_ids, KL_completion_ids, label)")
        return self._drop_fully_truncated(dataset, args)


def setup(job, device: str, model, tokenizer, interrupt, precomputed=None) -> LexAlignKTOTrainer:
    """KTO's trainer for an align job (lexalign.methods: KTO's `setup`): TRL's KTOTrainer on rows LexAlign
    tokenized, the reference log-probs of every completion and KL completion read from the reference file when
    `precomputed` holds them; the rows' label balance under the job's weights said first."""
    keys = job.cfg.own_keys
    train, evaluation = precomputed or tokenized_datasets(job, tokenizer)
    labels = train["label"]
    balance = label_balance(sum(labels), len(labels) - sum(labels), keys["desirable_weight"],
                            keys["undesirable_weight"])
    print(f"KTO rows: {balance['desirable']} desirable, {balance['undesirable']} undesirable "
          f"(weighted ratio {balance['weighted_ratio']:.2f})", flush=True)
    if balance["warning"]:
        warn(balance["warning"])
    args = {**training_arguments(job, device, evaluation is not None), **keys,
            "precompute_ref_log_probs": precomputed is not None}
    return LexAlignKTOTrainer(model=model, args=KTOConfig(**args),
                              **trainer_inputs(job, model, tokenizer, interrupt, train, evaluation))
