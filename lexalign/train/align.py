"""The align step: DPO through TRL's DPOTrainer, starting from the SFT model.

The reference model is always the SFT model: with `use_lora` a fresh adapter is
trained on top of the (merged) SFT weights and TRL computes the reference with
the adapter disabled, which is exactly the SFT policy; with full fine-tuning
TRL loads a frozen copy of the same SFT weights. An SFT output that is an
adapter alone is merged into its base first, so the reference never falls back
to the original base model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lexalign.config.stages import AlignConfig
from lexalign.errors import LexAlignError
from lexalign.io import atomic_dir
from lexalign.train import runtime
from lexalign.train.callbacks import InterruptCallback
from lexalign.train.job import TrainingJob


@dataclass
class AlignJob(TrainingJob):
    """Preference alignment: `cfg` is an AlignConfig."""

    tokenizer_path: Path | None = None
    """Where the tokenizer is, when not beside the model (model.base_model)."""
    sft_path: Path | None = None
    """The SFT model's full weights (set by setup; differs from model_path when that is an adapter alone)."""
    resume_command: str = "lexalign align --config <config>"
    stage = "align"

    def title(self) -> str:
        return f"Aligned model ({self.cfg.method}, beta={self.cfg.beta})"

    def adapter(self) -> tuple[bool, bool]:
        return self.cfg.use_lora, True

    def setup(self):
        return setup(self)

    def merge_base(self) -> Path:
        return self.sft_path or self.model_path


def dpo_arguments(job: AlignJob, device: str, has_eval: bool) -> dict:
    """LexAlign's align config in TRL's DPOConfig terms."""
    cfg = job.cfg
    return {
        **runtime.trainer_arguments(cfg, device, job.checkpoint_dir, has_eval, job.seed),
        "beta": cfg.beta,
        "loss_type": list(cfg.loss_type),
        "loss_weights": cfg.loss_weights,
        "label_smoothing": cfg.label_smoothing,
        "max_length": cfg.max_length,
        "trust_remote_code": job.trust_remote_code,
    }


def sft_weights(job: AlignJob) -> Path:
    """A folder with the SFT model's full weights.

    An SFT output that is an adapter alone is merged into its base once, into
    the checkpoint folder, so the policy, the reference and the final merge all
    start from the SFT policy and never from the original base model.
    """
    import json

    path = runtime.require_model(job.model_path, "lexalign finetune --config config/finetune.yaml")
    if not (path / "adapter_config.json").is_file() or (path / "config.json").is_file():
        return path
    merged = job.checkpoint_dir / "sft-merged"
    if not (merged / "config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        model = runtime.merged_model(path, Path(base), job.trust_remote_code)
        with atomic_dir(merged) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
    return merged


def load_policy(job: AlignJob, device: str):
    """The SFT model (4-bit for QLoRA), and its tokenizer."""
    job.sft_path = sft_weights(job)
    tokenizer = runtime.load_tokenizer(job.tokenizer_path or job.model_path, job.trust_remote_code)
    model = runtime.load_causal_lm(job.sft_path, device, quantize_4bit=job.cfg.load_in_4bit,
                                   trust_remote_code=job.trust_remote_code)
    return model, tokenizer


def setup(job: AlignJob):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    if job.cfg.method not in ("dpo", "gdpo"):
        raise LexAlignError(f'alignment.method "{job.cfg.method}" is not available in this version',
                            hint="Use method: dpo or gdpo")
    device = runtime.resolve_device(job.device)
    model, tokenizer = load_policy(job, device)
    has_eval = len(job.eval) > 0
    columns = ["prompt", "chosen", "rejected"]
    interrupt = InterruptCallback()
    if job.cfg.method == "gdpo":
        return setup_gdpo(job, device, model, tokenizer, interrupt), tokenizer, interrupt
    trainer = DPOTrainer(
        model=model,
        args=DPOConfig(**dpo_arguments(job, device, has_eval)),
        train_dataset=Dataset.from_pandas(job.train[columns], preserve_index=False),
        eval_dataset=Dataset.from_pandas(job.eval[columns], preserve_index=False) if has_eval else None,
        processing_class=tokenizer,
        peft_config=runtime.lora_config(job.cfg, model.config.model_type) if job.cfg.use_lora else None,
        callbacks=job.callbacks(interrupt),
    )
    return trainer, tokenizer, interrupt


def setup_gdpo(job: AlignJob, device: str, model, tokenizer, interrupt):
    """GDPO's trainer: DPO's arguments and machinery, K ranked responses per prompt."""
    from lexalign.train.gdpo import GDPOConfig, GDPOTrainer, ranked_dataset

    cfg = job.cfg
    if list(cfg.loss_type) != ["sigmoid"] or cfg.label_smoothing:
        raise LexAlignError("method: gdpo has its own loss; loss_type and label_smoothing are DPO options",
                            hint="Remove loss_type/label_smoothing, or use method: dpo")
    k = cfg.group_delay_size
    train = ranked_dataset(job.train, k, "train")
    evaluation = ranked_dataset(job.eval, k, "eval") if len(job.eval) else None
    args = {**dpo_arguments(job, device, evaluation is not None), "group_delay_size": k,
            "group_delay_weight": cfg.group_delay_weight}
    return GDPOTrainer(
        model=model,
        args=GDPOConfig(**args),
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=runtime.lora_config(cfg, model.config.model_type) if cfg.use_lora else None,
        callbacks=job.callbacks(interrupt),
    )
