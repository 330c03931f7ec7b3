"""One home for what LexAlign knows about each alignment method.

Every question about a method (does it need a reference model, which data
layout does it read, which config keys are its own, does `beta` mean anything
for it) is answered here; the schema checks, Snakemake's planning, the CLI, the
trainers and the reference step ask this module instead of comparing method or
layout names as strings. Pure Python, no imports beyond the standard library:
Snakemake reads it when it parses the workflow.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Layout(str, enum.Enum):
    """How validated preference rows reach a trainer and the reference step."""

    PAIRS = "pairs"
    """prompt, chosen, rejected (DPO, ORPO, SimPO, CPO; GDPO at K = 2)."""
    UNPAIRED = "unpaired"
    """prompt, completion, label (KTO's thumbs-up / thumbs-down rows)."""
    RANKED = "ranked"
    """prompt with K responses best first (GDPO with K > 2); a reference file names it `k<K>`."""


@dataclass(frozen=True)
class Method:
    """One alignment method."""

    name: str
    """Its value of `alignment.method`."""
    layout: Layout
    """The data layout it trains on (GDPO reads ranked groups only when K > 2: `Method.layout_for`)."""
    needs_reference: bool
    """Whether it reads the reference (SFT) model's log-probs; the reference-free ones run one model."""
    uses_beta: bool
    """Whether `alignment.beta` changes its loss (ORPO has no β: `orpo_lambda` weighs its odds-ratio term)."""
    keys: tuple[str, ...] = ()
    """The alignment keys only this method reads."""
    trainer: str = ""
    """What trains it, for messages and model cards."""

    def layout_for(self, group_size: int) -> Layout:
        """The layout this method reads at K responses per prompt."""
        if self.layout is Layout.RANKED and group_size <= 2:
            return Layout.PAIRS
        return self.layout

    def group_size(self, group_size: int) -> int | None:
        """K when it reads ranked groups of K (> 2), else None (pairs or unpaired rows)."""
        return group_size if self.layout_for(group_size) is Layout.RANKED else None

    def reference_layout(self, group_size: int) -> str:
        """The layout's name in its reference file's name: `pairs`, `unpaired`, or `k<K>` for GDPO at any K (at
        K = 2 its pairs are scored as groups of 2, under GDPO's own key)."""
        return f"k{group_size}" if self.layout is Layout.RANKED else self.layout.value

    @property
    def reads_unpaired(self) -> bool:
        """Whether it trains on unpaired rows (prompt, completion, label); every other method needs pairs."""
        return self.layout is Layout.UNPAIRED


# `loss_type`, `loss_weights` and `label_smoothing` configure TRL's DPO losses; GDPO's pairwise term is DPO's.
DPO_KEYS = ("loss_type", "loss_weights", "label_smoothing")

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("dpo", Layout.PAIRS, needs_reference=True, uses_beta=True, keys=DPO_KEYS, trainer="TRL's DPOTrainer"),
    Method("gdpo", Layout.RANKED, needs_reference=True, uses_beta=True,
           keys=("group_delay_size", "group_delay_weight"), trainer="LexAlign's GDPOTrainer"),
    Method("kto", Layout.UNPAIRED, needs_reference=True, uses_beta=True,
           keys=("desirable_weight", "undesirable_weight"), trainer="TRL's KTOTrainer"),
    Method("orpo", Layout.PAIRS, needs_reference=False, uses_beta=False, keys=("orpo_lambda",),
           trainer="LexAlign's reference-free trainer"),
    Method("simpo", Layout.PAIRS, needs_reference=False, uses_beta=True, keys=("gamma",),
           trainer="LexAlign's reference-free trainer"),
    Method("cpo", Layout.PAIRS, needs_reference=False, uses_beta=True, keys=("cpo_alpha",),
           trainer="LexAlign's reference-free trainer"),
)}
"""Every method, by its config name."""

NAMES = tuple(METHODS)
DEFAULT = "dpo"


def method(name: str | None) -> Method:
    """The method called `name` (None: the default, DPO). An unknown name raises KeyError; configs are checked
    against the schema's enum before any code asks here."""
    return METHODS[name or DEFAULT]


def of(alignment: dict) -> Method:
    """The method of an alignment section."""
    return method(alignment.get("method"))


def parse_layout(name: str) -> tuple[Layout, int]:
    """A reference layout's name (`Method.reference_layout`) as (layout, K): pairs and unpaired rows score
    K = 2 responses per row (KTO's: the completion and its KL completion)."""
    if name in (Layout.PAIRS.value, Layout.UNPAIRED.value):
        return Layout(name), 2
    if name.startswith("k") and name[1:].isdigit() and int(name[1:]) >= 2:
        return Layout.RANKED, int(name[1:])
    raise ValueError(f"unknown reference layout {name!r} (pairs, unpaired or k<K>)")


LAYOUT_PATTERN = rf"(?:{Layout.PAIRS.value}|{Layout.UNPAIRED.value}|k\d+)"
"""A regular expression matching every name `parse_layout` reads."""


def key_owner(key: str) -> str | None:
    """The method whose own key `key` is, or None for a key every method shares."""
    for m in METHODS.values():
        if key in m.keys:
            return m.name
    return None
