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
from lexalign.train import runtime
from lexalign.train.callbacks import InterruptCallback
from lexalign.train.job import TrainingJob


@dataclass
class AlignJob(TrainingJob):
    """Preference alignment: `cfg` is an AlignConfig."""

    tokenizer_path: Path | None = None
    """Where the tokenizer is, when not beside the model (model.base_model)."""
    resume_command: str = "lexalign align --config <config>"
    stage = "align"

    def title(self) -> str:
        return f"Aligned model ({self.cfg.method}, beta={self.cfg.beta})"

    def adapter(self) -> tuple[bool, bool]:
        return self.cfg.use_lora, True

    def setup(self):
        return setup(self)


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


def load_policy(job: AlignJob, device: str):
    """The SFT model as a plain causal LM (adapters merged), and its tokenizer."""
    path = runtime.require_model(job.model_path, "lexalign finetune --config config/finetune.yaml")
    tokenizer = runtime.load_tokenizer(job.tokenizer_path or path, job.trust_remote_code)
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        import json

        base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        model = runtime.merged_model(path, Path(base), job.trust_remote_code)
    else:
        model = runtime.load_causal_lm(path, device, trust_remote_code=job.trust_remote_code)
    return model, tokenizer


def setup(job: AlignJob):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    if job.cfg.method != "dpo":
        raise LexAlignError(f'alignment.method "{job.cfg.method}" is not available in this version',
                            hint="Use method: dpo")
    device = runtime.resolve_device(job.device)
    model, tokenizer = load_policy(job, device)
    has_eval = len(job.eval) > 0
    columns = ["prompt", "chosen", "rejected"]
    interrupt = InterruptCallback()
    trainer = DPOTrainer(
        model=model,
        args=DPOConfig(**dpo_arguments(job, device, has_eval)),
        train_dataset=Dataset.from_pandas(job.train[columns], preserve_index=False),
        eval_dataset=Dataset.from_pandas(job.eval[columns], preserve_index=False) if has_eval else None,
        processing_class=tokenizer,
        peft_config=runtime.lora_config(job.cfg) if job.cfg.use_lora else None,
        callbacks=job.callbacks(interrupt),
    )
    return trainer, tokenizer, interrupt
