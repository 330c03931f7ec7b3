"""Padding-free batches: several sequences packed into one row, attention kept within each.

Real preference data have long-tailed lengths, so a padded batch computes mostly
padding (54 % of the tokens at batch 4 on a log-normal length mix). Packed, a
batch is one row of exactly the tokens there are: `position_ids` restart at 0
for each sequence, and transformers builds the block-diagonal attention from
them (`masking_utils.find_packed_sequence_indices`; SDPA and eager on the CPU,
FlashAttention's variable-length kernels on CUDA). Batches are formed by a
token budget rather than a fixed padded shape.

The per-token log-probabilities come from TRL's fused LM head
(`add_fused_lm_head`): the LM head and the log-softmax run in tiles over the
completion positions only, so the [tokens x vocabulary] logits are never held
(the memory peak with 128k-256k vocabularies).

Used by the reference step (`lexalign.reference.group_logps`). An architecture
that cannot take packed input (`PACKED_UNSUPPORTED`) falls back to length-grouped
padded batches.
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
    """Summed log-probability of each packed sequence's scored tokens (`model` has TRL's fused LM head)."""
    outputs = model(input_ids=packed.input_ids.to(device), position_ids=packed.position_ids.to(device),
                    labels=packed.labels.to(device), use_cache=False, fused_lm_head=True)
    per_token = outputs.log_probs[0].float()  # [T - 1]: position t scores token t + 1 (0 where not scored)
    owner = packed.sequence[1:].to(per_token.device)
    sums = torch.zeros(packed.count, dtype=torch.float32, device=per_token.device)
    return sums.index_add_(0, owner, per_token)


PACKED_UNSUPPORTED: frozenset[str] = frozenset()
"""Model types whose attention ignores packed position_ids (none among those tested: llama, qwen2, mistral,
gemma2, phi3, gpt2, gpt_neox)."""


def supports_packing(model) -> bool:
    return getattr(model.config, "model_type", None) not in PACKED_UNSUPPORTED
