"""Padding-free batches: several sequences packed into one row, attention kept within each.

(Over 400 lines on purpose: the row layouts and the attention that reads them change together; split, every
change to a layout would touch two files.)

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

Prompts shared (`shared_units`): sequences with the same prompt (DPO's chosen
and rejected, GDPO's K responses, several pairs of one prompt) are packed as one
unit, the prompt once and each response after it: [prompt[:-1] | prompt[-1],
response 1 | prompt[-1], response 2 | ...]. Each response's segment starts with
the prompt's last token again (the position that scores the response's first
token, one per response) and its positions go on from the prompt's, and it
attends to the prompt and to itself only. So the prompt's tokens run through
the model once per group instead of once per response, and every response's
log-probs are those of prompt + response alone (to float rounding:
tests/test_prefix_sharing.py). Attention then runs unit by unit
(`unit_attention_forward`, SDPA on each prompt causally and on each segment
against prompt + segment: no [W x W] product over a whole row, so rows can be
wide and hold no padding, `WIDE_ROW_TOKENS`), with an explicit [R, 1, W, W]
mask (`allowed`) beside it for any attention that does not take the units.
Only where the attention takes such a mask (`sharing_mask_kind`: SDPA, eager;
FlashAttention's variable-length kernels take none) and no sliding window binds.

An architecture that cannot take packed input (`PACKED_UNSUPPORTED`, empty so
far) keeps the trainers' padded batches; the reference step refuses it by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    """[T]: which sequence each position belongs to (a shared prompt: its unit's first sequence)."""
    count: int
    allowed: torch.Tensor | None = None
    """[1, T, T]: which positions each position attends to, where prompts are shared (None: position_ids alone
    keep attention within each sequence)."""
    spans: UnitSpans | None = None
    """Where each unit is, for attention unit by unit (with `allowed`)."""


@dataclass
class UnitSpans:
    """The units of packed rows for `unit_attention_forward`: for each row, its units in order as (first position,
    shared prefix length, the (start, end) of each member's segment), covering the row (its end's padding a unit of
    its own)."""

    rows: list[list[tuple[int, int, list[tuple[int, int]]]]]
    masks: dict = field(default_factory=dict, repr=False)
    calls: int = 0
    """Attention calls that took the units (a forward of an L-layer model makes L)."""

    def mask(self, cut: int, length: int, device) -> torch.Tensor:
        """[length, cut + length]: a segment's queries see the prefix and their own segment causally."""
        key = (cut, length, str(device))
        if key not in self.masks:
            self.masks[key] = torch.ones(length, cut + length, dtype=torch.bool, device=device).tril(cut)
        return self.masks[key]

    def unit_mask(self, start: int, cut: int, segments: list[tuple[int, int]], device) -> torch.Tensor:
        """[L, L] for a whole unit of L tokens: the prefix causally, each segment the prefix and itself causally."""
        key = ("unit", start, cut, tuple(segments), str(device))
        if key not in self.masks:
            length = segments[-1][1] - start
            segment = torch.zeros(length, dtype=torch.long, device=device)
            for k, (a, b) in enumerate(segments):
                segment[a - start:b - start] = k + 1
            visible = (segment[None, :] == 0) | (segment[:, None] == segment[None, :])
            self.masks[key] = visible & torch.ones(length, length, dtype=torch.bool, device=device).tril()
        return self.masks[key]


def prefix_cut(start: int) -> int:
    """The tokens of a sequence whose scored tokens start at `start` that can be shared with the sequences of the
    same prompt: all but the prompt's last token (which scores the response's first token, once per response)."""
    return max(start - 1, 0)


def shared_units(sequences, starts: list[int]) -> list[list[int]]:
    """Indices grouped by the tokens they can share (`prefix_cut`: the same prompt), in order of first appearance;
    a sequence with nothing to share is a unit of its own. `sequences`: lists of ids (or 1-D tensors)."""
    units: dict = {}
    out: list[list[int]] = []
    for i, (seq, start) in enumerate(zip(sequences, starts, strict=True)):
        cut = prefix_cut(start)
        key = (cut, tuple(seq[:cut].tolist() if isinstance(seq, torch.Tensor) else seq[:cut])) if cut else None
        if key is None or key not in units:
            out.append([i])
            if key is not None:
                units[key] = out[-1]
        else:
            units[key].append(i)
    return out


def unit_length(lengths: list[int], cut: int) -> int:
    """Tokens a unit of sequences of these lengths packs into, sharing `cut` tokens (0: a single sequence)."""
    return cut + sum(n - cut for n in lengths)


def unit_layout(members: list[int], lengths: list[int], cut: int) -> list[tuple[int, int, int, int]]:
    """A unit's packed tokens in order, each as (sequence, token index in it, position id, segment): the shared
    prefix (segment 0, from the unit's first sequence), then each member's tokens from `cut` on (segment k + 1)."""
    out = [(members[0], j, j, 0) for j in range(cut)]
    for k, i in enumerate(members):
        out += [(i, j, j, k + 1) for j in range(cut, lengths[i])]
    return out


def allowed_attention(unit: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    """[R, W] unit and segment ids of packed rows → [R, W, W]: position q attends to position k (k <= q) of its
    own unit where k is in the shared prefix (segment 0) or in q's own segment."""
    width = unit.shape[-1]
    causal = torch.ones(width, width, dtype=torch.bool, device=unit.device).tril()
    same_unit = unit[:, :, None] == unit[:, None, :]
    visible = (segment[:, None, :] == 0) | (segment[:, :, None] == segment[:, None, :])
    return same_unit & visible & causal


def pack(sequences: list[list[int]], completion_starts: list[int], share_prefixes: bool = False,
         units: bool = False) -> Packed:
    """Pack sequences whose tokens from `completion_starts[i]` on are scored; with `share_prefixes`, the sequences
    of one prompt as one unit (`shared_units`), its tokens once. `units` (or shared prompts): the explicit mask and
    the units for attention unit by unit (`unit_attention_forward`), rather than position_ids alone."""
    groups = shared_units(sequences, completion_starts) if share_prefixes else [[i] for i in range(len(sequences))]
    lengths = [len(seq) for seq in sequences]
    ids, positions, labels, owner, unit_ids, segments = [], [], [], [], [], []
    spans = []
    for u, members in enumerate(groups):
        cut = prefix_cut(completion_starts[members[0]]) if len(members) > 1 else 0
        spans.append(_unit_spans(len(ids), cut, [lengths[i] for i in members]))
        for i, j, position, segment in unit_layout(members, lengths, cut):
            token = sequences[i][j]
            ids.append(token)
            positions.append(position)
            # A sequence's first token has nothing before it in its own sequence: never scored (the packed row's
            # previous token belongs to another sequence); nor a segment's first token (the prompt's last).
            labels.append(-100 if j < max(completion_starts[i], 1) else token)
            owner.append(i)
            unit_ids.append(u)
            segments.append(segment)
    as_row = lambda values: torch.tensor(values, dtype=torch.long).unsqueeze(0)  # noqa: E731
    explicit = units or any(len(members) > 1 for members in groups)
    allowed = allowed_attention(as_row(unit_ids), as_row(segments)) if explicit else None
    return Packed(as_row(ids), as_row(positions), as_row(labels), torch.tensor(owner, dtype=torch.long),
                  len(sequences), allowed, UnitSpans([spans]) if explicit else None)


def _unit_spans(start: int, cut: int, lengths: list[int]) -> tuple[int, int, list[tuple[int, int]]]:
    """A unit at `start` sharing `cut` tokens among members of these lengths, as `UnitSpans` holds it."""
    segments, at = [], start + cut
    for n in lengths:
        segments.append((at, at + n - cut))
        at += n - cut
    return start, cut, segments


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
    extra = packed_forward_kwargs(model, None if packed.allowed is None else packed.allowed.to(device), packed.spans)
    outputs = model(input_ids=packed.input_ids.to(device), position_ids=packed.position_ids.to(device),
                    labels=packed.labels.to(device), use_cache=False, fused_lm_head=True, **extra)
    per_token = outputs.log_probs[0].float()  # [T - 1]: position t scores token t + 1 (0 where not scored)
    owner = packed.sequence[1:].to(per_token.device)
    sums = torch.zeros(packed.count, dtype=torch.float32, device=per_token.device)
    return sums.index_add_(0, owner, per_token)


def plan_batches(model, lengths: list[int], device: str = "cpu", token_budget: int | None = None,
                 batch_size: int = 16, sequences: list[list[int]] | None = None,
                 starts: list[int] | None = None) -> list[list[int]]:
    """The batches `sequence_logps` scores sequences of these lengths in: by a token budget (DEFAULT_TOKEN_BUDGET,
    8x on CUDA) where the architecture takes packed input, else `batch_size` at a time in order. Every process of a
    step in several processes plans the same and scores its share (lexalign.core.shares).

    Given the `sequences` and where their scored tokens `starts`, the sequences of one prompt go into one batch
    and count its tokens once (`shared_units`), where the model can share them (`sharing_mask_kind`)."""
    if supports_packing(model):
        budget = token_budget or DEFAULT_TOKEN_BUDGET * (8 if str(device).startswith("cuda") else 1)
        if sequences is None or starts is None or sharing_mask_kind(model) is None:
            return budget_batches(lengths, budget)
        units = []
        for members in shared_units(sequences, starts):
            shared = len(members) > 1 and unit_shareable(model, [lengths[i] for i in members])
            units += [members] if shared else [[i] for i in members]
        sizes = [unit_length([lengths[i] for i in u], prefix_cut(starts[u[0]]) if len(u) > 1 else 0) for u in units]
        return [[i for u in batch for i in units[u]] for batch in budget_batches(sizes, budget)]
    return [list(range(first, min(first + batch_size, len(lengths)))) for first in range(0, len(lengths), batch_size)]


def sequence_logps(model, sequences: list[list[int]], completion_starts: list[int], device: str = "cpu",
                   token_budget: int | None = None, batch_size: int = 16, pad_token_id: int = 0,
                   batches: list[list[int]] | None = None, share_prefixes: bool = True) -> list[float]:
    """Summed log-prob of each sequence's tokens from `completion_starts[i]` on, scored without gradients.

    In the batches of `plan_batches` (packed, else right-padded), log-probs from the lean head
    (`lexalign.models.logprobs`). `batches`: only these of them (a process's share, lexalign.core.shares); the
    other sequences' values are NaN. `share_prefixes`: the sequences of one prompt in a batch share its tokens
    (`shared_units`), where the model can (`sharing_mask_kind`)."""
    import numpy as np

    from lexalign.models.logprobs import ensure_lean_head

    ensure_lean_head(model)
    if batches is None:
        batches = plan_batches(model, [len(s) for s in sequences], device, token_budget, batch_size,
                               sequences if share_prefixes else None, completion_starts)
    share = share_prefixes and sharing_mask_kind(model) is not None
    out = np.full(len(sequences), np.nan, dtype=np.float64)
    with torch.inference_mode():
        for batch in batches:
            seqs, starts = [sequences[i] for i in batch], [completion_starts[i] for i in batch]
            if supports_packing(model):
                out[batch] = _packed_batch(model, seqs, starts, device,
                                           share and unit_shareable(model, [len(s) for s in seqs]))
            else:
                out[batch] = _padded_batch(model, seqs, starts, device, pad_token_id)
    return out.tolist()


def _packed_batch(model, sequences, starts, device, share_prefixes=False):
    # Attention unit by unit wherever the model's SDPA takes it: a pack's cost is its sequences', not [T x T].
    packed = pack(sequences, starts, share_prefixes, units=unit_attention_available(model))
    return packed_logps(model, packed, device).cpu().numpy()


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
    allowed: torch.Tensor | None = None
    """[R, W, W]: which positions each position attends to, where prompts are shared (`shared_units`); None:
    position_ids alone keep attention within each sequence."""
    spans: UnitSpans | None = None
    """Where each unit is, for attention unit by unit (with `allowed`)."""

    def to(self, device) -> PackedRows:
        return PackedRows(*(getattr(self, name).to(device) for name in
                            ("input_ids", "position_ids", "labels", "index", "valid")),
                          None if self.allowed is None else self.allowed.to(device), self.spans)

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


def completion_starts(attention_mask: torch.Tensor, completion_mask: torch.Tensor) -> list[int]:
    """Where each right-padded row's scored tokens start: its first completion token (its length when none)."""
    scored = completion_mask.bool() & attention_mask.bool()
    lengths = attention_mask.sum(dim=1)
    return torch.where(scored.any(dim=1), scored.int().argmax(dim=1), lengths).tolist()


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
              pad_token_id: int = 0, share_prefixes: bool = False, row_tokens: int | None = None) -> PackedRows:
    """Repack a right-padded batch ([N, L] ids, attention and completion masks, as TRL's collators build them).

    `share_prefixes`: the sequences of one prompt (`shared_units`) packed as one unit, the prompt's tokens once;
    the rows are then as wide as the longest unit, or, with `row_tokens` (attention unit by unit: the row's width
    costs nothing there), as wide as all the units up to `row_tokens`, so they hold little or no padding."""
    ids, attention, completion = input_ids.cpu(), attention_mask.cpu(), completion_mask.cpu()
    lengths = attention.sum(dim=1).tolist()
    n_seq, seq_len = ids.shape
    if share_prefixes:
        starts = completion_starts(attention, completion)
        units = shared_units([ids[i, :lengths[i]] for i in range(n_seq)], starts)
    else:
        starts, units = None, [[i] for i in range(n_seq)]
    cuts = [prefix_cut(starts[members[0]]) if len(members) > 1 else 0 for members in units]
    sizes = [unit_length([lengths[i] for i in members], cut) for members, cut in zip(units, cuts, strict=True)]
    width = max(max(sizes), 1)
    if share_prefixes and row_tokens:
        width = max(width, min(sum(sizes), row_tokens))
    rows = first_fit_rows(sizes, width)
    n_rows = len(rows)
    packed_ids = torch.full((n_rows, width), pad_token_id, dtype=ids.dtype)
    positions = torch.zeros((n_rows, width), dtype=torch.long)
    labels = torch.full((n_rows, width), -100, dtype=torch.long)
    unit_ids = torch.zeros((n_rows, width), dtype=torch.long)
    segments = torch.zeros((n_rows, width), dtype=torch.long)
    index = torch.zeros((n_seq, max(seq_len - 1, 0)), dtype=torch.long)
    valid = torch.zeros_like(index, dtype=torch.bool)
    scored = completion.bool()
    scored[:, 0] = False  # nothing before a sequence's first token in its own sequence
    next_unit = 0
    spans: list[list] = []
    for r, row in enumerate(rows):
        offset = 0
        spans.append([])
        for u in row:
            members, cut = units[u], cuts[u]
            base = r * (width - 1)
            prefix = offset
            spans[-1].append(_unit_spans(offset, cut, [lengths[i] for i in members]))
            if cut:  # the shared prompt, once (segment 0): from the unit's first sequence
                first = members[0]
                packed_ids[r, offset:offset + cut] = ids[first, :cut]
                positions[r, offset:offset + cut] = torch.arange(cut)
                offset += cut
            unit_ids[r, prefix:prefix + sizes[u]] = next_unit
            next_unit += 1
            for k, i in enumerate(members):
                n = lengths[i]
                if n == 0:
                    continue
                span = n - cut  # this sequence's own tokens (segment k + 1): from `cut` on
                packed_ids[r, offset:offset + span] = ids[i, cut:n]
                positions[r, offset:offset + span] = torch.arange(cut, n)
                labels[r, offset:offset + span] = ids[i, cut:n].masked_fill(~scored[i, cut:n], -100)
                segments[r, offset:offset + span] = k + 1
                index[i, :cut] = base + prefix + torch.arange(cut)
                index[i, cut:n - 1] = base + offset + torch.arange(span - 1)
                valid[i, :n - 1] = True
                offset += span
        positions[r, offset:] = torch.arange(width - offset)
        unit_ids[r, offset:] = next_unit
        next_unit += 1
        if offset < width:  # the row's padding: a unit of its own
            spans[-1].append((offset, 0, [(offset, width)]))
    if not share_prefixes:
        return PackedRows(packed_ids, positions, labels, index, valid).to(input_ids.device)
    return PackedRows(packed_ids, positions, labels, index, valid, allowed_attention(unit_ids, segments),
                      UnitSpans(spans)).to(input_ids.device)


def sharing_mask_kind(model) -> str | None:
    """The attention implementation that takes the explicit mask of shared prompts ("sdpa", "eager"), or None
    where prompts are not shared (FlashAttention's variable-length kernels take no mask; flex attention would
    need a block mask)."""
    if not supports_packing(model):
        return None
    kind = getattr(model.config, "_attn_implementation", None)
    return "sdpa" if kind in ("sdpa", UNIT_ATTENTION) else "eager" if kind == "eager" else None


def sliding_window(model) -> int | None:
    """The attention window of an architecture whose layers (some of them) attend to the last W tokens only."""
    text = model.config.get_text_config()
    window = getattr(text, "sliding_window", None)
    if not window or getattr(text, "use_sliding_window", True) is False:
        return None
    return int(window)


def unit_shareable(model, lengths: list[int]) -> bool:
    """Whether sequences of these lengths can share their prompt in `model`: an explicit mask replaces the
    model's own, so a sliding window must not bind (every sequence within it)."""
    window = sliding_window(model)
    return sharing_mask_kind(model) is not None and (window is None or max(lengths, default=0) <= window)


def attention_mask(model, allowed: torch.Tensor) -> torch.Tensor:
    """[R, W, W] allowed positions → the [R, 1, W, W] mask `model`'s attention takes as it is (transformers passes a
    4D mask through): additive for eager attention (0 where allowed, the dtype's minimum elsewhere), boolean for
    SDPA."""
    mask = allowed[:, None]
    if sharing_mask_kind(model) == "eager":
        dtype = model.get_input_embeddings().weight.dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    return mask


def packed_forward_kwargs(model, allowed: torch.Tensor | None, spans: UnitSpans | None) -> dict:
    """What a forward over packed rows passes besides ids, positions and labels: nothing where position_ids keep
    each sequence apart, else the explicit mask and, where the attention runs unit by unit, the units."""
    if allowed is None:
        return {}
    kwargs = {"attention_mask": attention_mask(model, allowed)}
    if spans is not None and enable_unit_attention(model):
        kwargs["packed_units"] = spans
    return kwargs


UNIT_ATTENTION = "lexalign_sdpa"
"""The attention implementation a model's SDPA is switched to for packed rows with shared prompts: transformers'
SDPA for every call but those given `packed_units`, which attend unit by unit (`unit_attention_forward`)."""

WIDE_ROW_TOKENS = 4096
"""How wide training rows are where attention runs unit by unit (`pack_rows(row_tokens=...)`): a batch of up to this
many tokens is one row with no padding. Its [R, 1, W, W] boolean mask (for attention that does not take the units)
is 16 MB at this width."""


def unit_attention_available(model) -> bool:
    return getattr(model.config, "_attn_implementation", None) in ("sdpa", UNIT_ATTENTION)


def enable_unit_attention(model) -> bool:
    """Switch `model`'s SDPA to `UNIT_ATTENTION` (registered with transformers once): the same SDPA for every other
    call (its masks too), attention unit by unit where a forward passes `packed_units`. False where the model's
    attention is not SDPA."""
    if not unit_attention_available(model):
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if UNIT_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(UNIT_ATTENTION, unit_attention_forward)
        AttentionMaskInterface.register(UNIT_ATTENTION, sdpa_mask)
    if model.config._attn_implementation != UNIT_ATTENTION:
        model.config._attn_implementation = UNIT_ATTENTION
    return True


SEGMENT_BY_SEGMENT = True
"""Attention unit by unit: each shared prefix and each segment in calls of their own (the least compute), else each
unit in one masked call (fewer, larger calls: prefix rows and other segments' columns computed, then masked)."""


def unit_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                           dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                           packed_units: UnitSpans | None = None, **kwargs):
    """transformers' attention-function signature ([B, H, T, D] query, [B, H_kv, T, D] key and value → [B, T, H, D]).

    Without `packed_units`, transformers' SDPA as it is. With them, each unit of each row by itself: its shared
    prefix causally, each member's segment against prefix + segment (`UnitSpans.mask`), so the cost is each
    unit's, not the row's [W x W] (and grouped-query heads are not copied where SDPA takes them masked: the CPU)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if packed_units is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    packed_units.calls += 1
    rows = []
    for r, units in enumerate(packed_units.rows):
        q, k, v = query[r:r + 1], key[r:r + 1], value[r:r + 1]
        pieces = []
        for start, cut, segments in units:
            prefix = slice(start, start + cut)
            if cut and not SEGMENT_BY_SEGMENT:  # the unit in one call, its own mask
                whole = slice(start, segments[-1][1])
                mask = packed_units.unit_mask(start, cut, segments, query.device)
                pieces.append(_attend(q[:, :, whole], k[:, :, whole], v[:, :, whole], mask, dropout, scaling))
                continue
            if cut:
                pieces.append(_attend(q[:, :, prefix], k[:, :, prefix], v[:, :, prefix], None, dropout, scaling))
            for a, b in segments:
                if cut:
                    mask = packed_units.mask(cut, b - a, query.device)
                    pieces.append(_attend(q[:, :, a:b], torch.cat([k[:, :, prefix], k[:, :, a:b]], dim=2),
                                          torch.cat([v[:, :, prefix], v[:, :, a:b]], dim=2), mask, dropout, scaling))
                else:
                    pieces.append(_attend(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None, dropout, scaling))
        rows.append(torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0])
    out = torch.cat(rows) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


def _attend(q, k, v, mask, dropout, scale):
    """SDPA of one span: causal without a mask; grouped-query heads as SDPA takes them (copied only where a masked
    call would leave the fused kernels: on accelerators)."""
    groups = q.shape[1] // k.shape[1]
    gqa = groups > 1 and (mask is None or q.device.type == "cpu") and k.shape[-1] <= 256
    if groups > 1 and not gqa:
        k, v = (x.repeat_interleave(groups, dim=1) for x in (k, v))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                            is_causal=mask is None, scale=scale, enable_gqa=gqa)


PACKED_UNSUPPORTED: frozenset[str] = frozenset()
"""Model types whose attention ignores packed position_ids (none among those tested: llama, qwen2, mistral,
gemma2, phi3, gpt2, gpt_neox)."""


def supports_packing(model) -> bool:
    return getattr(model.config, "model_type", None) not in PACKED_UNSUPPORTED
