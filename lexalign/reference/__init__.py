"""The reference step: the reference model's log-probabilities of every response, computed once.

DPO, GDPO and KTO compare the policy with a frozen reference (the SFT model) on
every response of every step. Those reference log-probabilities never change,
so this step computes them once for the validated train and eval data and writes
them to one parquet file; align then reads them instead of running (or holding)
the reference model, in every epoch and every sweep run that shares the SFT
model, the data, `max_length` and the truncation. ORPO, SimPO and CPO read no
reference file.

The file (`results/reference/<data>/<layout>-<length>.parquet`) has one row per
group the trainer sees:

- `split` (train | eval) and `row`, the row's position in the validated split;
- `prompt_ids`, `completion_ids` (K lists, best first) and `scores` (K): the
  tokens exactly as the trainers read them (LexAlign's one tokenization rule,
  `lexalign.core.tokens`);
- `ref_logps` (K): the reference's summed log-probability of each response,
  truncated as the trainers' collator truncates (keep_start to `max_length`),
  computed on padding-free packed batches with LexAlign's lean log-prob head
  (`lexalign.models.packing`, `lexalign.models.logprobs`).

A layout is `pairs` (chosen, rejected: K = 2), `k<K>` (GDPO's ranked groups) or
`unpaired` (KTO: one completion per row with its label, and the KL term's
mismatched completion, so K = 2; `scores` holds the label, 1.0 desirable and 0.0
undesirable); `lexalign.methods` says which method reads which. The file's
metadata holds its key (`keys`): align refuses a file whose key differs from its
own.

One module per concern: `layout` (the groups of a split, pure), `keys` (what the
log-probs depend on, and the file's name), `cache` (tokenization, cached by
content), `scoring` (the forward pass and the file).

Every one of them imports pandas, pyarrow and torch inside its functions only,
so reading the file names (`layout`, for Snakemake's planning) loads nothing
heavy. The trainers' datasets are built from the file by `lexalign.train.trainer_data`.
"""
