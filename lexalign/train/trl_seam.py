"""Every TRL internal LexAlign replaces, overrides or reads, in one list, checked when a trainer is built.

LexAlign's trainers extend TRL 1.x's DPOTrainer and KTOTrainer. Where TRL has a
public extension point it is used (`compute_loss`, the Trainer's own); the rest
goes through TRL internals, and every one of them is named here:

- private methods our subclasses override (`_prepare_dataset`, ...): if TRL
  renames one, our override is silently never called;
- module globals swapped while a trainer is built (`add_fused_lm_head`, for the
  lean LM head of `lexalign.models.logprobs`; `hash_module`, skipped when the reference
  log-probs are precomputed): if TRL stops calling them through its module, the
  swap silently does nothing;
- helpers and private state the trainers read (`_metrics`, `_tp_size`, ...).

`check_internals` runs before `super().__init__` (a few `inspect.signature` calls)
and `check_state` after it; `building` swaps the globals and `BuildRecord.require`
fails when the lean head was not installed through them. Each failure is a
LexAlignError naming the installed TRL version and the attribute.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from dataclasses import dataclass, field

from lexalign.core.errors import LexAlignError


@dataclass(frozen=True)
class Internal:
    """A TRL attribute LexAlign depends on: `module`.`name` (dotted within the module, e.g. a method)."""

    module: str
    name: str
    parameters: tuple[str, ...] | None
    """The parameter names `inspect.signature` must give (None: only its existence is checked)."""
    use: str
    """What LexAlign does with it."""

    def resolve(self):
        obj = importlib.import_module(self.module)
        for part in self.name.split("."):
            obj = getattr(obj, part)
        return obj


def _module(name: str) -> tuple[Internal, ...]:
    """The globals the lean head and the skipped hash swap in a trainer module (dpo_trainer, kto_trainer)."""
    return (
        Internal(name, "add_fused_lm_head", ("model", "temperature", "cast_lm_head_to_fp32", "outputs"),
                 "swapped for the lean LM head while the trainer is built (lexalign.models.logprobs.lean_heads)"),
        Internal(name, "hash_module", ("module",),
                 "swapped for a constant while a trainer is built on precomputed reference log-probs"),
    )


DPO_MODULE, KTO_MODULE = "trl.trainer.dpo_trainer", "trl.trainer.kto_trainer"
_DATASET = ("self", "dataset", "processing_class", "args", "dataset_name")
_PRECOMPUTE = ("self", "dataset", "name", "batch_size")

SHARED = (
    Internal("trl.trainer.utils", "FusedCausalLMOutput", None, "what the lean head returns"),
    Internal("trl.kernels", "ChunkedLogProbFunction.forward",
             ("ctx", "hidden", "weight", "bias", "targets", "temperature", "chunk_size", "final_logit_softcapping",
              "logit_scale", "outputs"), "the lean head's kernel on accelerators (lexalign.models.logprobs)"),
)
DPO = (*SHARED, *_module(DPO_MODULE),
       Internal(DPO_MODULE, "DPOTrainer._prepare_dataset", _DATASET, "overridden: data arrive tokenized by LexAlign"),
       Internal(DPO_MODULE, "DPOTrainer._precompute_ref_logps", _PRECOMPUTE,
                "overridden: the reference step's log-probs are read, not recomputed"),
       Internal(DPO_MODULE, "DPOTrainer._set_signature_columns_if_needed", ("self",),
                "overridden: the columns the GDPO and reference-free collators read"),
       Internal(DPO_MODULE, "DPOTrainer.compute_loss", ("self", "model", "inputs", "return_outputs",
                                                         "num_items_in_batch"),
                "overridden (public): padding-free batches, and the GDPO and reference-free losses"),
       Internal("trl.trainer.utils", "pad", ("tensors", "padding_value", "padding_side", "pad_to_multiple_of"),
                "GDPO's collator pads as TRL's"),
       Internal("trl.trainer.utils", "use_adapter", ("model", "adapter_name"),
                "GDPO's online reference: the PEFT model with its adapter disabled"),
       Internal("trl.models.utils", "disable_gradient_checkpointing", ("model", "gradient_checkpointing_kwargs"),
                "GDPO's online reference pass"))
KTO = (*SHARED, *_module(KTO_MODULE),
       Internal(KTO_MODULE, "KTOTrainer._prepare_dataset", _DATASET, "overridden: rows arrive tokenized by LexAlign"),
       Internal(KTO_MODULE, "KTOTrainer._precompute_ref_logps", _PRECOMPUTE,
                "overridden: the reference step's log-probs are read, not recomputed"))

DPO_STATE = ("_metrics", "_total_train_tokens", "_tp_size", "aux_loss_enabled", "router_aux_loss_coef", "beta",
             "ref_model", "_signature_columns")
"""DPOTrainer's state our loss and metrics read (set in its __init__)."""


def trl_version() -> str:
    import trl

    return getattr(trl, "__version__", "unknown")


def _fail(what: str, *details: str) -> LexAlignError:
    return LexAlignError(
        f"TRL {trl_version()}: {what}", *details,
        hint="Install a TRL version LexAlign supports (pyproject.toml), or update lexalign/train/trl_seam.py and "
             "the trainer that uses it")


def check_internals(internals: tuple[Internal, ...]) -> None:
    """Fail, naming TRL's version and the attribute, when one is missing or takes other parameters."""
    for internal in internals:
        where = f"{internal.module}.{internal.name}"
        try:
            obj = internal.resolve()
        except (ImportError, AttributeError):
            raise _fail(f"{where} is missing", f"LexAlign uses it: {internal.use}") from None
        if internal.parameters is None:
            continue
        try:
            found = tuple(inspect.signature(obj).parameters)
        except (TypeError, ValueError):
            found = None
        if found != internal.parameters:
            raise _fail(f"{where} has changed", f"expected parameters ({', '.join(internal.parameters)}), found "
                        f"({', '.join(found) if found is not None else 'no signature'})",
                        f"LexAlign uses it: {internal.use}")


def check_state(trainer, names: tuple[str, ...], base: str) -> None:
    """Fail when the built trainer lacks state that LexAlign's loss or metrics read."""
    missing = [name for name in names if not hasattr(trainer, name)]
    if missing:
        raise _fail(f"{base} no longer sets {', '.join(missing)}", "LexAlign's loss and metrics read it")


@dataclass
class BuildRecord:
    """What happened to the swapped globals while a trainer was built."""

    module: str
    installs: list = field(default_factory=list)
    """The models TRL installed its fused head on (through our swap: each got the lean head, or TRL's where the
    lean head does not apply, `lexalign.models.logprobs.lean_heads`)."""

    def require(self) -> None:
        """Fail when TRL built the trainer without calling `add_fused_lm_head` through its module: the lean
        head would silently not be there (TRL's own head gives the same numbers, slower)."""
        if not self.installs:
            raise _fail(f"{self.module}.add_fused_lm_head was not called while the trainer was built",
                        "LexAlign installs its lean LM head (lexalign/models/logprobs.py) through that global; "
                        "without it TRL's own head would run")


@contextlib.contextmanager
def building(module_name: str, precomputed: bool):
    """While a TRL trainer is built: the lean head for TRL's fused head, and, on precomputed reference
    log-probs, no hash of every weight (TRL keys a cache with it that is never read when the datasets carry
    the log-probs; hashing a large model takes seconds to minutes)."""
    from lexalign.models.logprobs import lean_heads

    module = importlib.import_module(module_name)
    record = BuildRecord(module_name)
    with contextlib.ExitStack() as stack:
        if precomputed:
            stack.enter_context(_swapped(module, "hash_module", lambda mod: "precomputed"))
        stack.enter_context(lean_heads(module))
        install = module.add_fused_lm_head

        def counted(model, *args, **kwargs):
            record.installs.append(model)
            return install(model, *args, **kwargs)

        stack.enter_context(_swapped(module, "add_fused_lm_head", counted))
        yield record


@contextlib.contextmanager
def _swapped(module, name: str, value):
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)
