"""Padding-free batches: several sequences packed into one row, attention kept within each.

Real preference data have long-tailed lengths, so a padded batch computes mostly
padding (54 % of the tokens at batch 4 on a log-normal length mix). Packed, a
batch is one row of exactly the tokens there are: `position_ids` restart at 0
for each sequence, and transformers builds the block-diagonal attention from
them (`masking_utils.find_packed_sequence_indices`; SDPA and eager on the CPU,
FlashAttention's variable-length kernels on CUDA). Batches are formed by a
token budget rather than a fixed padded shape.

The per-token log-probabilities come from the lean LM head
(`lexalign.models.logprobs`): the LM head and the log-softmax run in tiles over the
completion positions only, so the [tokens x vocabulary] logits are never held
(the memory peak with 128k-256k vocabularies).

Two shapes. The reference step and evaluation (`lexalign.reference.scoring.group_logps`)
score sequences in one row per token budget (`pack`, `budget_batches`).
Training keeps the batch the user configured (B pairs, or B groups of K) and
repacks its padded rows (`pack_rows`): first-fit decreasing into rows as wide
as the batch's longest sequence, so no row is wider than the padded batch
was, the attention ([W x W] per row) never costs more than the padded
batch's, and the rows hold the real tokens with a little padding at their
ends. `lexalign.train.packed` runs a trainer's loss on such rows.

An architecture that cannot take packed input (`PACKED_UNSUPPORTED`, empty so
far) keeps the trainers' padded batches; the reference step refuses it by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_TOKEN_BUDGET = 1024
"""Tokens per packed batch on the CPU. Without variable-length kernels the attention of a pack is one masked
[T x T] product, so a long pack costs quadratically: 512-1024 tokens measured fastest here (bench_packing.py).
On CUDA the reference step uses 8x this."""


@dataclass
class Packed:
    """Sequences packed into one row."""

    input_ids: torch.Tensor
    """[1, T]: every sequence's tokens, one after the other."""
    position_ids: torch.Tensor
    """[1, T]: 0, 1, … within each sequence (what makes attention stay inside it)."""
    labels: torch.Tensor
    """[1, T]: the token where it is scored (a completion token), -100 elsewhere and at every sequence start."""
    sequence: torch.Tensor
    """[T]: which sequence each position belongs to."""
    count: int


def pack(sequences: list[list[int]], completion_starts: list[int]) -> Packed:
    """Pack sequences whose tokens from `completion_starts[i]` on are scored."""
    ids, positions, labels, owner = [], [], [], []
    for index, (seq, start) in enumerate(zip(sequences, completion_starts, strict=True)):
        ids += seq
        positions += range(len(seq))
        # A sequence's first token has nothing before it in its own sequence: never scored (the packed row's
        # previous token belongs to another sequence).
        labels += [-100 if i < max(start, 1) else token for i, token in enumerate(seq)]
        owner += [index] * len(seq)
    as_row = lambda values: torch.tensor(values, dtype=torch.long).unsqueeze(0)  # noqa: E731
    return Packed(as_row(ids), as_row(positions), as_row(labels), torch.tensor(owner, dtype=torch.long),
                  len(sequences))


def budget_batches(lengths: list[int], budget: int = DEFAULT_TOKEN_BUDGET) -> list[list[int]]:
    """Indices grouped into batches of at most `budget` tokens (a longer sequence alone), longest first so
    batches are full; every index exactly once."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current, used = [], [], 0
    for i in order:
        if current and used + lengths[i] > budget:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        batches.append(current)
    return batches


def packed_logps(model, packed: Packed, device: str = "cpu") -> torch.Tensor:
    """Summed log-probability of each packed sequence's scored tokens (`model` has a fused or lean LM head)."""
    outputs = model(input_ids=packed.input_ids.to(device), position_ids=packed.position_ids.to(device),
                    labels=packed.labels.to(device), use_cache=False, fused_lm_head=True)
    per_token = outputs.log_probs[0].float()  # [T - 1]: position t scores token t + 1 (0 where not scored)
    owner = packed.sequence[1:].to(per_token.device)
    sums = torch.zeros(packed.count, dtype=torch.float32, device=per_token.device)
    return sums.index_add_(0, owner, per_token)


def plan_batches(model, lengths: list[int], device: str = "cpu", token_budget: int | None = None,
                 batch_size: int = 16) -> list[list[int]]:
    """The batches `sequence_logps` scores sequences of these lengths in: by a token budget (DEFAULT_TOKEN_BUDGET,
    8x on CUDA) where the architecture takes packed input, else `batch_size` at a time in order. Every process of a
    step in several processes plans the same and scores its share (lexalign.core.shares)."""
    if supports_packing(model):
        return budget_batches(lengths, token_budget or DEFAULT_TOKEN_BUDGET * (8 if str(device).startswith("cuda")
                                                                              else 1))
    return [list(range(first, min(first + batch_size, len(lengths)))) for first in range(0, len(lengths), batch_size)]


def sequence_logps(model, sequences: list[list[int]], completion_starts: list[int], device: str = "cpu",
                   token_budget: int | None = None, batch_size: int = 16, pad_token_id: int = 0,
                   batches: list[list[int]] | None = None) -> list[float]:
    """Summed log-prob of each sequence's tokens from `completion_starts[i]` on, scored without gradients.

    In the batches of `plan_batches` (packed, else right-padded), log-probs from the lean head
    (`lexalign.models.logprobs`). `batches`: only these of them (a process's share, lexalign.core.shares); the
    other sequences' values are NaN."""
    import numpy as np

    from lexalign.models.logprobs import ensure_lean_head

    ensure_lean_head(model)
    if batches is None:
        batches = plan_batches(model, [len(s) for s in sequences], device, token_budget, batch_size)
    out = np.full(len(sequences), np.nan, dtype=np.float64)
    with torch.inference_mode():
        for batch in batches:
            score = _packed_batch if supports_packing(model) else _padded_batch
            out[batch] = score(model, [sequences[i] for i in batch], [completion_starts[i] for i in batch], device,
                               pad_token_id)
    return out.tolist()


def _packed_batch(model, sequences, starts, device, pad_token_id):
    return packed_logps(model, pack(sequences, starts), device).cpu().numpy()


def _padded_batch(model, sequences, starts, device, pad_token_id):
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, (seq, start) in enumerate(zip(sequences, starts, strict=True)):
        start = max(start, 1)
        ids[row, :len(seq)] = torch.tensor(seq)
        attention[row, :len(seq)] = 1
        labels[row, start:len(seq)] = torch.tensor(seq[start:], dtype=torch.long)
    outputs = model(input_ids=ids.to(device), attention_mask=attention.to(device), labels=labels.to(device),
                    use_cache=False, fused_lm_head=True)
    return outputs.log_probs.float().sum(-1).cpu().numpy()


@dataclass
class PackedRows:
    """A padded batch's sequences repacked into fewer rows, and the way back to the padded batch's shape."""

    input_ids: torch.Tensor
    """[R, W]: the sequences one after the other, then the row's padding."""
    position_ids: torch.Tensor
    """[R, W]: 0, 1, … within each sequence; the padding at a row's end counts from 0 again (a block of its own)."""
    labels: torch.Tensor
    """[R, W]: the padded batch's completion tokens where they are scored, -100 elsewhere."""
    index: torch.Tensor
    """[N, L - 1]: for padded row i and shifted position j (scoring token j + 1), the position in the flattened
    [R, W - 1] per-token outputs that holds it."""
    valid: torch.Tensor
    """[N, L - 1]: where `index` points at a real position of sequence i (j < its length - 1)."""

    def to(self, device) -> PackedRows:
        return PackedRows(*(getattr(self, name).to(device) for name in
                            ("input_ids", "position_ids", "labels", "index", "valid")))

    def unpack(self, per_token: torch.Tensor) -> torch.Tensor:
        """[R, W - 1] per-token values → [N, L - 1], as the padded batch would have them (0 / False elsewhere)."""
        values = per_token.reshape(-1)[self.index]
        return values & self.valid if values.dtype == torch.bool else values * self.valid


def first_fit_rows(lengths: list[int], width: int) -> list[list[int]]:
    """Indices into rows of at most `width` tokens, first fit, longest first; every index exactly once."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, space in enumerate(free) if space >= lengths[i]), None)
        if row is None:
            rows.append([])
            free.append(width)
            row = len(rows) - 1
        rows[row].append(i)
        free[row] -= lengths[i]
    return rows


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
              pad_token_id: int = 0) -> PackedRows:
    """Repack a right-padded batch ([N, L] ids, attention and completion masks, as TRL's collators build them)."""
    ids, attention, completion = input_ids.cpu(), attention_mask.cpu(), completion_mask.cpu()
    lengths = attention.sum(dim=1).tolist()
    width = max(max(lengths), 1)
    rows = first_fit_rows(lengths, width)
    n_rows, seq_len = len(rows), ids.shape[1]
    packed_ids = torch.full((n_rows, width), pad_token_id, dtype=ids.dtype)
    positions = torch.zeros((n_rows, width), dtype=torch.long)
    labels = torch.full((n_rows, width), -100, dtype=torch.long)
    index = torch.zeros((ids.shape[0], max(seq_len - 1, 0)), dtype=torch.long)
    valid = torch.zeros_like(index, dtype=torch.bool)
    for r, members in enumerate(rows):
        offset = 0
        for i in members:
            n = lengths[i]
            if n == 0:
                continue
            packed_ids[r, offset:offset + n] = ids[i, :n]
            positions[r, offset:offset + n] = torch.arange(n)
            scored = completion[i, :n].bool()
            scored[0] = False  # nothing before a sequence's first token in its own sequence
            labels[r, offset:offset + n] = ids[i, :n].masked_fill(~scored, -100)
            index[i, :n - 1] = r * (width - 1) + offset + torch.arange(n - 1)
            valid[i, :n - 1] = True
            offset += n
        positions[r, offset:] = torch.arange(width - offset)
    return PackedRows(packed_ids, positions, labels, index, valid).to(input_ids.device)


PACKED_UNSUPPORTED: frozenset[str] = frozenset()
"""Model types whose attention ignores packed position_ids (none among those tested: llama, qwen2, mistral,
gemma2, phi3, gpt2, gpt_neox)."""


def supports_packing(model) -> bool:
    return getattr(model.config, "model_type", None) not in PACKED_UNSUPPORTED
