"""The finetune step: supervised fine-tuning through TRL's SFTTrainer.

Data may be plain text, prompt/completion (loss on the completion) or chat
messages; methods are LoRA, QLoRA (4-bit NF4 base) and full fine-tuning. The
saved model has the adapter merged in unless `merge: false`.
"""

from __future__ import annotations

from dataclasses import dataclass

from lexalign.core.errors import LexAlignError
from lexalign.core.paths import require_model
from lexalign.models import loading as models
from lexalign.train import runtime
from lexalign.train.callbacks import InterruptCallback
from lexalign.train.job import TrainingJob


@dataclass
class FinetuneJob(TrainingJob):
    """SFT: `cfg` is a FinetuneConfig."""

    resume_command: str = "lexalign finetune --config <config>"
    stage = "finetune"

    def title(self) -> str:
        return f"SFT model ({self.cfg.method})"

    def adapter(self) -> tuple[bool, bool]:
        return self.cfg.uses_adapter, self.cfg.merge

    def setup(self):
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        if self.cfg.method == "none":
            raise LexAlignError("finetune.method is none: there is nothing to fine-tune",
                                hint="Align the model as it is: lexalign align with model.path set to it "
                                     "(the pipeline plans no finetune job for method none)")
        require_model(self.model_path, "lexalign download --config config/downloads.yaml")
        device = models.resolve_device(self.device)
        tokenizer = models.load_tokenizer(self.model_path, self.trust_remote_code)
        model = models.load_causal_lm(self.model_path, device, quantize_4bit=self.cfg.method == "qlora",
                                       trust_remote_code=self.trust_remote_code, allow_pickle=self.allow_pickle,
                                       train_all_weights=self.cfg.method == "full", bf16=self.cfg.bf16)
        model = models.lean_for_training(model, device, self.cfg.method == "qlora")
        has_eval = len(self.eval) > 0
        args = SFTConfig(
            **runtime.trainer_arguments(self.cfg, device, self.checkpoint_dir, has_eval, self.seed),
            max_length=self.cfg.max_length,
            packing=False,
        )
        interrupt = InterruptCallback()
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_pandas(self.train, preserve_index=False),
            eval_dataset=Dataset.from_pandas(self.eval, preserve_index=False) if has_eval else None,
            processing_class=tokenizer,
            peft_config=runtime.lora_config(self.cfg, model.config.model_type) if self.cfg.uses_adapter else None,
            callbacks=self.callbacks(interrupt),
        )
        return trainer, tokenizer, interrupt
