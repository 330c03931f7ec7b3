"""The align step: DPO through TRL's DPOTrainer (GDPO through ours), KTO through TRL's KTOTrainer, and the
reference-free ORPO, SimPO and CPO through `lexalign.train.reference_free_trainer`, starting from the SFT model.

The reference model is always the SFT model: with `use_lora` a fresh adapter is
trained on top of the (merged) SFT weights and TRL computes the reference with
the adapter disabled, which is exactly the SFT policy; with full fine-tuning
TRL loads a frozen copy of the same SFT weights. An SFT output that is an
adapter alone is merged into its base first, so the reference never falls back
to the original base model.

With a reference file (`reference_path`, from `lexalign.reference`: the
pipeline's reference step) the data arrive tokenized and with the reference
log-probabilities of every response, computed once: no reference pass runs in
any epoch, and with full fine-tuning no second model is loaded at all (TRL's
`precompute_ref_log_probs`, reading the precomputed columns). Without one, the
reference is computed online, as above. KTO reads the same kind of file
(layout `unpaired`: each row's completion and its KL completion); ORPO, SimPO
and CPO have no reference at all: one model, one forward pass per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lexalign import methods
from lexalign.core.errors import LexAlignError
from lexalign.core.io import atomic_dir
from lexalign.core.paths import require_model
from lexalign.models import loading as models
from lexalign.reference.layout import TRUNCATION_MODE
from lexalign.train import runtime
from lexalign.train.callbacks import InterruptCallback
from lexalign.train.job import TrainingJob


@dataclass
class AlignJob(TrainingJob):
    """Preference alignment: `cfg` is an AlignConfig."""

    tokenizer_path: Path | None = None
    """Where the tokenizer is, when not beside the model (model.base_model)."""
    reference_path: Path | None = None
    """Precomputed reference log-probs (`lexalign.reference`); None computes them online."""
    reference_model_path: Path | None = None
    """The model the reference file's log-probs are of, when not the model training starts from (an online round
    with `reference: sft` starts from the previous round's model and is held to the SFT model): the file's key is
    checked against it. None: `model_path`."""
    sampled: list[dict] | None = None
    """An online round's selection records (`lexalign.train.trainer_data.read_selection`): without a reference file (the
    reference-free methods) the trainer reads their sampled ids, never the text tokenized again."""
    sft_path: Path | None = None
    """The SFT model's full weights (set by setup; differs from model_path when that is an adapter alone)."""
    resume_command: str = "lexalign align --config <config>"
    stage = "align"

    def title(self) -> str:
        method = methods.method(self.cfg.method)
        if not method.uses_beta:  # ORPO has no beta: its own key (λ) weighs its loss
            keys = ", ".join(f"{key}={value}" for key, value in self.cfg.own_keys.items())
            return f"Aligned model ({method.name}, {keys})"
        return f"Aligned model ({method.name}, beta={self.cfg.beta})"

    def adapter(self) -> tuple[bool, bool]:
        return self.cfg.use_lora, True

    def record_extra(self) -> dict:
        if self.cfg.reference_free:
            return {"reference_model": {"path": None, "note": f"{self.cfg.method} is reference-free: no reference "
                                                              "model"}}
        return {"reference_model": reference_model(self.reference_model_path or self.model_path)}

    def setup(self):
        return setup(self)

    def merge_base(self) -> Path:
        return self.sft_path or self.model_path


def dpo_arguments(job: AlignJob, device: str, has_eval: bool) -> dict:
    """LexAlign's align config in TRL's DPOConfig terms."""
    keys = job.cfg.method_keys
    return {**training_arguments(job, device, has_eval), "loss_type": list(keys["loss_type"]),
            "loss_weights": keys["loss_weights"], "label_smoothing": keys["label_smoothing"],
            "truncation_mode": TRUNCATION_MODE}


def reference_model(model_path: Path) -> dict:
    """What the reference (the model alignment starts from and is held close to) is, for lineage and the card."""
    from lexalign.core.lineage import read_lineage

    stage = (read_lineage(model_path) or {}).get("stage")
    sft = stage == "finetune"
    return {"path": str(model_path), "stage": stage, "sft": sft,
            "note": "the SFT model" if sft else "the starting model as it is, with no SFT step "
                    "(finetune.method: none, or a model given to lexalign align directly)"}


def sft_weights(job: AlignJob) -> Path:
    """A folder with the SFT model's full weights.

    An SFT output that is an adapter alone is merged into its base once, into
    the checkpoint folder, so the policy, the reference and the final merge all
    start from the SFT policy and never from the original base model.
    """
    import json

    path = require_model(job.model_path, "lexalign finetune --config config/finetune.yaml")
    if not (path / "adapter_config.json").is_file() or (path / "config.json").is_file():
        return path
    merged = job.checkpoint_dir / "sft-merged"
    if not (merged / "config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        model = models.merged_model(path, Path(base), job.trust_remote_code)
        with atomic_dir(merged) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
    return merged


def load_policy(job: AlignJob, device: str):
    """The SFT model (4-bit for QLoRA), and its tokenizer."""
    job.sft_path = sft_weights(job)
    tokenizer = models.load_tokenizer(job.tokenizer_path or job.model_path, job.trust_remote_code)
    model = models.load_causal_lm(job.sft_path, device, quantize_4bit=job.cfg.load_in_4bit,
                                   trust_remote_code=job.trust_remote_code, train_all_weights=not job.cfg.use_lora,
                                   bf16=job.cfg.bf16)
    return models.lean_for_training(model, device, job.cfg.load_in_4bit), tokenizer


def reference_datasets(job: AlignJob, device: str):
    """Train and eval datasets from the job's reference file, checked against the job's inputs."""
    from lexalign.reference.keys import check_key, compute_dtype, read_key, reference_key
    from lexalign.reference.layout import layout_for, split_groups
    from lexalign.reference.scoring import load_reference
    from lexalign.train.trainer_data import trainer_dataset

    cfg = job.cfg
    layout = layout_for(cfg.to_dict())
    splits = {"train": split_groups(job.train, layout), "eval": split_groups(job.eval, layout)}
    if cfg.group_size is not None:  # ranked groups of K
        from lexalign.data.ranking import check_groups

        for name, frame in (("train", job.train), ("eval", job.eval)):
            check_groups(len(splits[name]), splits[name].dropped, len(frame), cfg.group_size, name)
    path = _reference_file(job.reference_path)
    expected = reference_key(job.reference_model_path or job.model_path,
                                       job.tokenizer_path or job.model_path, splits, layout, cfg.max_length,
                                       TRUNCATION_MODE, cfg.load_in_4bit,
                                       compute_dtype(device, cfg.load_in_4bit, cfg.bf16))
    check_key(path, read_key(path), expected)
    tables = load_reference(path)
    print(f"Reference log-probs: {path} ({tables['train'].num_rows} train, {tables['eval'].num_rows} eval groups)",
          flush=True)
    return trainer_dataset(tables["train"], layout), trainer_dataset(tables["eval"], layout)


def tokenized_datasets(job: AlignJob, tokenizer):
    """Train and eval datasets tokenized for the trainer, the reference computed online."""
    from lexalign.reference.layout import layout_for
    from lexalign.train.trainer_data import tokenized_dataset

    layout = layout_for(job.cfg.to_dict())
    if job.sampled is not None:
        print(f"Tokens: the ids sampled in the online round ({len(job.sampled)} selected), not the text encoded "
              "again", flush=True)
    train = tokenized_dataset(tokenizer, job.train, layout, "train", sampled=job.sampled)
    evaluation = tokenized_dataset(tokenizer, job.eval, layout, "eval", sampled=job.sampled) \
        if len(job.eval) else None
    return train, evaluation


def _reference_file(path: Path) -> Path:
    if not Path(path).is_file():
        raise LexAlignError(f'Reference log-probs not found at "{path}"',
                            hint="Compute them with the pipeline's reference step, or align without them")
    return Path(path)


def check_data(job: AlignJob) -> None:
    """Unpaired rows (prompt, completion, label) carry no preference between two answers: only KTO reads them."""
    from lexalign.data.validated import is_unpaired, needs_pairs_error

    if is_unpaired(job.train) and methods.method(job.cfg.method).layout is not methods.Layout.UNPAIRED:
        raise needs_pairs_error(f'alignment.method "{job.cfg.method}"', "the training split")


def setup(job: AlignJob):
    """The trainer of the job's method, as its registry entry builds it (lexalign.methods: Method.setup), with the
    tokenizer and the interrupt callback; every check of the inputs comes first, the reference file before any
    model loads."""
    method = methods.method(job.cfg.method)
    check_data(job)
    if not method.needs_reference and job.reference_path:
        raise LexAlignError(f"method {method.name} is reference-free: it reads no reference log-probs",
                            f"Given: {job.reference_path}", hint="Align without a reference file")
    if job.reference_model_path and not job.reference_path and method.needs_reference:
        # Without the file TRL's reference is the model training starts from: not the one asked for.
        raise LexAlignError(f"The reference model {job.reference_model_path} differs from the model training starts "
                            f"from ({job.model_path}): its log-probs must come from a reference file",
                            hint="Compute them with the reference step (an online round's reference job)")
    device = models.resolve_device(job.device)
    precomputed = reference_datasets(job, device) if job.reference_path else None
    model, tokenizer = load_policy(job, device)
    interrupt = InterruptCallback()
    return method.trainer_setup()(job, device, model, tokenizer, interrupt, precomputed), tokenizer, interrupt


def trainer_inputs(job: AlignJob, model, tokenizer, interrupt, train, evaluation) -> dict:
    """What every preference trainer is built with besides its config: data, tokenizer, LoRA, callbacks."""
    return {"train_dataset": train, "eval_dataset": evaluation, "processing_class": tokenizer,
            "peft_config": runtime.lora_config(job.cfg, model.config.model_type) if job.cfg.use_lora else None,
            "callbacks": job.callbacks(interrupt)}


def training_arguments(job: AlignJob, device: str, has_eval: bool) -> dict:
    """What every preference trainer's config shares: TrainingArguments, beta, max_length."""
    return {**runtime.trainer_arguments(job.cfg, device, job.checkpoint_dir, has_eval, job.seed),
            "beta": job.cfg.beta, "max_length": job.cfg.max_length, "trust_remote_code": job.trust_remote_code}


