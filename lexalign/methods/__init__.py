"""The method registry: one entry per alignment method, carrying what the method is and what it does.

Every question about a method is answered by its entry (`METHODS`): which data layout it reads and how many
responses per row (K, read from its own key for it, `group_key`), whether it needs a reference model, whether
`beta` means anything to it, which config keys are its own, how its trainer is set up (`setup`) and which loss
it trains with (`loss`). The schema checks, Snakemake's planning, the CLI, the reference step and the align step
ask here; nothing else compares method names.

This module is pure Python, standard library only: Snakemake reads it when it parses the workflow. A method's
behaviour is named by reference ("module:function") and imported when a trainer is built (`Method.resolve`);
lexalign.pipeline.code_inputs follows those references into the code inputs of the steps that resolve them (the
align step), so editing a loss reruns alignment but never the reference step. The losses themselves are pure
torch functions in this package's modules (`gdpo`, `reference_free`).

Adding a method: its loss in a module here, its entry below, its keys in the schema (lexalign/config/
config.schema.yaml, marked `x-method`); docs/architecture.md walks through it, and tests/test_methods.py does it.
"""

from __future__ import annotations

import enum
import importlib
from collections.abc import Callable
from dataclasses import dataclass


class Layout(str, enum.Enum):
    """How validated preference rows reach a trainer and the reference step."""

    PAIRS = "pairs"
    """prompt, chosen, rejected (DPO, ORPO, SimPO, CPO; a ranking method at K = 2)."""
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
    """The data layout it trains on (a ranking method reads ranked groups only when K > 2: `layout_for`)."""
    needs_reference: bool
    """Whether it reads the reference (SFT) model's log-probs; the reference-free ones run one model."""
    uses_beta: bool
    """Whether `alignment.beta` changes its loss (ORPO has no β: `orpo_lambda` weighs its odds-ratio term)."""
    setup: str
    """Where its trainer is built, "module:function": called with (job, device, model, tokenizer, interrupt,
    precomputed) by lexalign.train.align, it returns the trainer."""
    loss: str | None = None
    """Its loss, "module:function", for the trainers that run LexAlign's losses: pairs without a reference take
    (PairLogps, beta, **keys), ranked groups (rewards [B, K], scores [B, K], **keys); each returns (the loss, the
    metrics it logs). None: the trainer's own (TRL's DPO and KTO losses, chosen by `loss_type`)."""
    keys: tuple[str, ...] = ()
    """The alignment keys only this method reads (the schema marks them `x-method`)."""
    group_key: str | None = None
    """Its key holding K, the ranked responses per prompt (GDPO's `group_delay_size`); None: two responses per
    row (a pair; KTO's completion and its KL completion)."""
    normalise: Callable[[dict], dict] | None = None
    """Its keys (by name) in their normal form, checked for what the schema cannot say (raises ValueError with
    what is wrong, and what to do)."""

    def responses(self, alignment: dict) -> int:
        """K, the responses per prompt it reads under `alignment` (its section): the one place K is read."""
        return int(alignment[self.group_key]) if self.group_key else 2

    def layout_for(self, alignment: dict) -> Layout:
        """The layout it reads under `alignment`: a ranking method reads pairs at K = 2."""
        if self.layout is Layout.RANKED and self.responses(alignment) <= 2:
            return Layout.PAIRS
        return self.layout

    def group_size(self, alignment: dict) -> int | None:
        """K when it reads ranked groups of K (> 2) under `alignment`, else None (pairs or unpaired rows)."""
        return self.responses(alignment) if self.layout_for(alignment) is Layout.RANKED else None

    def reference_layout(self, alignment: dict) -> str:
        """The layout's name in its reference file's name: `pairs`, `unpaired`, or `k<K>` for a ranking method at
        any K (at K = 2 its pairs are scored as groups of 2, under its own name)."""
        return f"k{self.responses(alignment)}" if self.layout is Layout.RANKED else self.layout.value

    def own_keys(self, alignment: dict) -> dict:
        """Its own keys' values in `alignment`, but K (which shapes the data, not the loss)."""
        return {key: alignment[key] for key in self.keys if key != self.group_key}

    @property
    def reads_unpaired(self) -> bool:
        """Whether it trains on unpaired rows (prompt, completion, label); every other method needs pairs."""
        return self.layout is Layout.UNPAIRED

    def trainer_setup(self) -> Callable:
        """The function that builds its trainer (`setup`)."""
        return resolve(self.setup)

    def loss_function(self) -> Callable:
        """Its loss (`loss`)."""
        if self.loss is None:
            raise ValueError(f"method {self.name} trains with its trainer's own loss")
        return resolve(self.loss)


def resolve(reference: str) -> Callable:
    """The function a registry reference ("module:function") names."""
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


# Every loss_type TRL 1.x's DPOConfig accepts (trl/trainer/dpo_config.py).
DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)


def dpo_keys(keys: dict) -> dict:
    """TRL's DPO losses: `loss_type` as a list, each one TRL knows, one weight each when `loss_weights` is given."""
    types = [keys["loss_type"]] if isinstance(keys["loss_type"], str) else list(keys["loss_type"])
    unknown = [t for t in types if t not in DPO_LOSS_TYPES]
    if unknown:
        raise ValueError(f'Unknown loss_type "{unknown[0]}"', f"Supported: {', '.join(DPO_LOSS_TYPES)}")
    if keys["loss_weights"] is not None and len(keys["loss_weights"]) != len(types):
        raise ValueError(f"loss_weights has {len(keys['loss_weights'])} values for {len(types)} loss types",
                         "Give one weight per entry of loss_type")
    return {**keys, "loss_type": types}


REFERENCE_FREE_SETUP = "lexalign.train.reference_free_trainer:setup"
"""ORPO, SimPO and CPO share one trainer: the policy alone, the method's loss on its log-probs."""

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("dpo", Layout.PAIRS, needs_reference=True, uses_beta=True, setup="lexalign.train.dpo_trainer:setup",
           keys=("loss_type", "loss_weights", "label_smoothing"), normalise=dpo_keys),
    Method("gdpo", Layout.RANKED, needs_reference=True, uses_beta=True, setup="lexalign.train.ranked_trainer:setup",
           loss="lexalign.methods.gdpo:gdpo", keys=("group_delay_size", "group_delay_weight"),
           group_key="group_delay_size"),
    Method("kto", Layout.UNPAIRED, needs_reference=True, uses_beta=True, setup="lexalign.train.kto_trainer:setup",
           keys=("desirable_weight", "undesirable_weight")),
    Method("orpo", Layout.PAIRS, needs_reference=False, uses_beta=False, setup=REFERENCE_FREE_SETUP,
           loss="lexalign.methods.reference_free:orpo", keys=("orpo_lambda",)),
    Method("simpo", Layout.PAIRS, needs_reference=False, uses_beta=True, setup=REFERENCE_FREE_SETUP,
           loss="lexalign.methods.reference_free:simpo", keys=("gamma",)),
    Method("cpo", Layout.PAIRS, needs_reference=False, uses_beta=True, setup=REFERENCE_FREE_SETUP,
           loss="lexalign.methods.reference_free:cpo", keys=("cpo_alpha",)),
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


def group_size(alignment: dict) -> int | None:
    """K when the alignment's method reads ranked groups of K (> 2), else None."""
    return of(alignment).group_size(alignment)


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

METHOD_KEYS = {key: m.name for m in METHODS.values() for key in m.keys}
"""Every key that belongs to one method → that method."""


def key_owner(key: str) -> str | None:
    """The method whose own key `key` is, or None for a key every method shares."""
    return METHOD_KEYS.get(key)
