"""What the training steps share: devices, model loading, trainer arguments,
checkpoint discovery, and running a trainer with clear errors.

Entry points (finetune, align) are split into setup, train and save; this
module holds the parts of each that do not depend on the objective.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from lexalign.config.sections import TrainingConfig
from lexalign.core.errors import LexAlignError, warn
from lexalign.core.shares import COLLECTIVE_TIMEOUT_ENV  # scale.timeout: TrainingArguments.ddp_timeout here
from lexalign.models.loading import _installed, merged_model
from lexalign.train.callbacks import CONFIG_HASH_FILE

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def gpu_defaults(device: str, bf16: bool | str | None = None) -> dict:
    """Training arguments switched on on a GPU: bf16 autocast where supported (or where the config's `bf16`
    says, `models.loading.training_bf16`), gradient checkpointing (on the CPU it would cost time). (Liger's
    kernels are applied as the model loads, see kernels.py; the Trainer's `use_liger_kernel` would patch
    transformers process-wide.)"""
    from lexalign.models.loading import training_bf16

    return {"bf16": training_bf16(device, bf16), checkpointing_argument(): device == "cuda"}


def checkpointing_argument() -> str:
    """transformers 5.x renamed `gradient_checkpointing` (a deprecated alias since) to `activation_checkpointing`."""
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


# LoRA targets per architecture when `target_modules: auto`: attention and MLP
# projections, the set QLoRA showed to match full fine-tuning. Others: all-linear.
LORA_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}


def lora_targets(target_modules, model_type: str | None):
    if target_modules == "auto":
        return LORA_TARGETS.get(model_type or "", "all-linear")
    return target_modules


def lora_config(cfg: TrainingConfig, model_type: str | None = None):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=lora_targets(cfg.target_modules, model_type),
        task_type="CAUSAL_LM",
    )


def trainer_arguments(cfg: TrainingConfig, device: str, checkpoint_dir: Path, has_eval: bool, seed: int) -> dict:
    """The TrainingArguments shared by SFTConfig and DPOConfig, from a LexAlign config."""
    args = {
        "output_dir": str(checkpoint_dir),
        "learning_rate": cfg.learning_rate,
        "per_device_train_batch_size": cfg.batch_size,
        "per_device_eval_batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "num_train_epochs": cfg.num_epochs,
        "max_steps": cfg.max_steps or -1,
        "warmup_steps": cfg.warmup_steps,
        "weight_decay": cfg.weight_decay,
        "logging_steps": cfg.logging_steps,
        "save_strategy": "steps",
        "save_steps": cfg.save_steps,
        "seed": cfg.seed if cfg.seed is not None else seed,
        "data_seed": cfg.seed if cfg.seed is not None else seed,
        "use_cpu": device == "cpu",
        "fp16": False,
        **gpu_defaults(device, cfg.bf16),
        "report_to": tensorboard_reporting(cfg, checkpoint_dir),
        "disable_tqdm": True,
        "save_only_model": False,
        "dataloader_num_workers": 0,
    }
    timeout = os.environ.get(COLLECTIVE_TIMEOUT_ENV, "")
    if timeout.isdigit():  # scale.timeout: a dead process on another node fails the job within this time
        args["ddp_timeout"] = int(timeout)
    if has_eval:
        args["eval_strategy"] = "steps" if cfg.eval_steps else "epoch"
        if cfg.eval_steps:
            args["eval_steps"] = cfg.eval_steps
    return args


def tensorboard_reporting(cfg: TrainingConfig, checkpoint_dir: Path) -> list[str]:
    """transformers' report_to: TensorBoard only (report_to: [tensorboard], or tensorboard: true). MLflow, W&B
    and Trackio are reported to by LexAlign itself (lexalign.train.tracking, TrackingCallback)."""
    from lexalign.train.tracking import selected

    if "tensorboard" not in selected(cfg):
        return []
    if not _installed("tensorboard"):
        raise LexAlignError("TensorBoard logging is on (report_to: [tensorboard] or tensorboard: true), "
                            "but TensorBoard is not installed", hint="pip install tensorboard")
    import os

    os.environ["TENSORBOARD_LOGGING_DIR"] = str(checkpoint_dir / "tensorboard")
    return ["tensorboard"]


def _checkpoints(checkpoint_dir: Path) -> list[Path]:
    found = [p for p in checkpoint_dir.glob("checkpoint-*") if p.is_dir() and CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)), reverse=True)


def is_complete_checkpoint(path: Path) -> bool:
    """A checkpoint the Trainer finished writing (its state file is written last)."""
    return (path / "trainer_state.json").is_file() and (path / CONFIG_HASH_FILE).is_file()


def find_resume_checkpoint(checkpoint_dir: Path, config_hash: str) -> Path | None:
    """The newest complete checkpoint made with this exact config, if any."""
    if not checkpoint_dir.is_dir():
        return None
    for candidate in _checkpoints(checkpoint_dir):
        if not is_complete_checkpoint(candidate):
            warn(f"Skipping incomplete checkpoint {candidate}")
            continue
        if (candidate / CONFIG_HASH_FILE).read_text().strip() != config_hash:
            warn(f"Not resuming from {candidate}: it was made with a different config. Starting fresh.")
            return None
        return candidate
    return None


def clear_checkpoints(checkpoint_dir: Path) -> None:
    """After a successful save the checkpoints have served their purpose (other files stay)."""
    for checkpoint in _checkpoints(checkpoint_dir) if checkpoint_dir.is_dir() else []:
        shutil.rmtree(checkpoint, ignore_errors=True)
    (checkpoint_dir / "metrics.jsonl").unlink(missing_ok=True)
    (checkpoint_dir / "tracking.json").unlink(missing_ok=True)  # the tracker runs a resumed job would reopen


def keep_metrics(checkpoint_dir: Path, out_dir: Path) -> None:
    """Copy the run's metrics.jsonl (for plots) beside the saved model."""
    metrics = checkpoint_dir / "metrics.jsonl"
    if metrics.is_file():
        shutil.copy2(metrics, out_dir / "metrics.jsonl")


@contextlib.contextmanager
def trainer_errors(cfg: TrainingConfig) -> Iterator[None]:
    """Running out of memory while training, as the error users should see instead of a traceback."""
    import torch

    try:
        yield
    except (torch.OutOfMemoryError, MemoryError) as err:
        kind = "CUDA out of memory" if isinstance(err, torch.OutOfMemoryError) else "CPU out of memory"
        raise LexAlignError(
            kind,
            hint=f"Try: reducing batch_size (now {cfg.batch_size}), enabling use_lora, "
            f"or raising gradient_accumulation_steps (now {cfg.gradient_accumulation_steps})",
        ) from None


def save_trained_model(trainer, tokenizer, out_dir: Path, adapter: bool, merge: bool, base_path: Path,
                       trust_remote_code: bool = False, state_dict: dict | None = None) -> None:
    """Write the trained model into `out_dir` (a folder being built atomically).

    Adapters are merged into full-precision base weights unless `merge` is
    false, in which case the PEFT adapter is saved alone (loadable with PEFT).
    `state_dict`: the weights gathered from every process (FSDP, DeepSpeed ZeRO-3).
    """
    import tempfile

    from lexalign.models.merge import merge_into_files

    model = trainer.accelerator.unwrap_model(trainer.model)
    weights = {"state_dict": state_dict} if state_dict is not None else {}
    if adapter and merge and state_dict is None and merges_in_place(model):
        # The trained model's own float32 CPU weights are the base's: merging them in place writes the same
        # weights as reloading the base would, without a second copy of the model in memory (the job's peak).
        model.merge_and_unload().save_pretrained(out_dir, safe_serialization=True)
    elif adapter and merge:
        with tempfile.TemporaryDirectory(dir=out_dir.parent) as adapter_dir:
            model.save_pretrained(adapter_dir, safe_serialization=True, **weights)
            if state_dict is None:  # gathered weights (FSDP, ZeRO-3) stay as the launcher's processes left them
                release_weights(model)
            # A plain LoRA goes into the base's files tensor by tensor (no float32 copy of the model in memory);
            # anything else through PEFT into the base loaded again.
            if not merge_into_files(Path(adapter_dir), Path(base_path), out_dir):
                merged_model(Path(adapter_dir), base_path, trust_remote_code).save_pretrained(
                    out_dir, safe_serialization=True)
    else:
        model.save_pretrained(out_dir, safe_serialization=True, **weights)
    tokenizer.save_pretrained(out_dir)


def release_weights(model) -> None:
    """Free the trained model's weights (its adapter is saved by now, and nothing reads it after the save) before
    the base is loaded again in float32 to merge into: both at once were a bf16 job's peak on the CPU. A 4-bit
    model keeps them (bitsandbytes' parameters do not move to the meta device)."""
    from peft import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if getattr(base, "hf_quantizer", None) is None:
        model.to_empty(device="meta")


def merges_in_place(model) -> bool:
    """Whether `model` (a trained PEFT model, used no more after this) can take its adapter into its own weights and
    give exactly what `merged_model` gives from the files: a base all float32 on the CPU, as `load_causal_lm` loads
    it there. A 4-bit (QLoRA) or bf16 base, or one on a GPU, is merged into the base reloaded in float32 instead."""
    import torch
    from peft import PeftModel

    params = list(model.parameters())
    return isinstance(model, PeftModel) and all(p.dtype == torch.float32 and p.device.type == "cpu" for p in params)


def final_metrics(trainer) -> dict:
    """The last value of each logged metric, for the model card."""
    out: dict = {}
    for entry in trainer.state.log_history:
        out.update({k: v for k, v in entry.items() if isinstance(v, (int, float)) and k not in ("step",)})
    out["global_step"] = trainer.state.global_step
    return out
