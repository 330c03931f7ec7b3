"""A training job: what finetune and align share from setup to save.

Each training step's job subclasses `TrainingJob` and supplies `setup()` (model, data,
trainer); `run()` then trains with resume and interrupt handling, and saves
the model atomically with its metrics, lineage and model card.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from lexalign.config.sections import TrainingConfig
from lexalign.core.errors import TrainingInterrupted
from lexalign.core.io import atomic_dir, hash_object, hash_path, write_json
from lexalign.core.lineage import stage_record, write_lineage, write_model_card
from lexalign.train import runtime, tracking
from lexalign.train.callbacks import ConfigHashCallback, InterruptCallback, ProgressCallback, TrackingCallback


@dataclass
class TrainingJob:
    """One training run, resolved: inputs, config, where outputs and checkpoints go."""

    model_path: Path
    """The model to start from."""
    train: pd.DataFrame
    """Training rows, in the columns the job's TRL trainer reads."""
    eval: pd.DataFrame
    """Held-out rows evaluated every eval_steps (may be empty)."""
    cfg: TrainingConfig
    """The job's hyperparameters (its config section)."""
    output_dir: Path
    """Where the final model is written (atomically)."""
    checkpoint_dir: Path
    """Resumable checkpoints; outside output_dir, which Snakemake deletes on failure."""
    device: str = "auto"
    seed: int = 42
    resume: Path | None = None
    """A checkpoint to resume from; by default the newest one made with the same config."""
    verbose: bool = False
    trust_remote_code: bool = False
    allow_pickle: bool = False
    """Load pickle-based weights of the input model (refused by default: pickles can run code)."""
    lineage_inputs: dict[str, Any] | None = None
    """Named input paths whose hashes and lineage are recorded."""
    resume_command: str = "lexalign <step> --config <config>"
    """Printed after an interrupt, with --resume appended."""
    extra_callbacks: list = field(default_factory=list)
    """More TrainerCallbacks (for the Python API: custom logging, early stopping, fault injection)."""
    tracking: dict | None = None
    """Where the run reports in the experiment trackers of `cfg.report_to`: {experiment, run} (the pipeline's,
    lexalign.train.tracking.pipeline_tracking); None: experiment `lexalign`, the output folder's name as the run."""
    session: Any = field(default=None, init=False, repr=False)
    """The tracker runs (lexalign.train.tracking.Session), once the callbacks are built."""

    stage = "train"

    def config_hash(self) -> str:
        """Identifies config + inputs; a checkpoint is only resumed under the same hash."""
        data = [int(pd.util.hash_pandas_object(f.astype(str), index=False).sum()) for f in (self.train, self.eval)]
        return hash_object({"stage": self.stage, "cfg": self.cfg.to_dict(), "model": str(self.model_path),
                            "data": data, "seed": self.seed})

    def callbacks(self, interrupt: InterruptCallback) -> list:
        self.session = self.tracking_session()
        return [
            ProgressCallback(self.checkpoint_dir / "metrics.jsonl", verbose=self.verbose),
            ConfigHashCallback(self.config_hash()),
            interrupt,
            *([TrackingCallback(self.session)] if self.session else []),
            *self.extra_callbacks,
        ]

    def tracking_session(self) -> tracking.Session | None:
        """The run's MLflow / W&B / Trackio runs to be, when `report_to` lists any."""
        names = tracking.external(self.cfg)
        if not names:
            return None
        where = self.tracking or {}
        data = (self.lineage_inputs or {}).get("data")
        data_hash = hash_path(data) if data is not None and Path(data).exists() else None
        spec = tracking.RunSpec(where.get("experiment") or tracking.DEFAULT_EXPERIMENT,
                                where.get("run") or self.output_dir.name, self.stage,
                                tracking.run_params(self.stage, self.cfg.to_dict(), data_hash, self.config_hash()))
        return tracking.Session(names, spec, self.checkpoint_dir / tracking.TRACKING_FILE)

    def setup(self):
        """Return (trainer, tokenizer, interrupt callback). Implemented by each job."""
        raise NotImplementedError

    def title(self) -> str:
        return self.stage

    def record_extra(self) -> dict:
        """More facts for lineage.json (and the model card)."""
        return {}

    def adapter(self) -> tuple[bool, bool]:
        """(trained an adapter?, merge it into the saved model?)"""
        return False, False

    def merge_base(self) -> Path:
        """The full-precision weights a trained adapter is merged into."""
        return self.model_path

    def save(self, trainer, tokenizer) -> Path:
        """Write the model; with several processes every one gathers the weights and the main one writes."""
        accelerator = trainer.accelerator
        # Weights partitioned over the processes (FSDP, DeepSpeed ZeRO-3) are gathered by all of them together.
        partitioned = accelerator.num_processes > 1 and accelerator.distributed_type in ("FSDP", "DEEPSPEED")
        state_dict = accelerator.get_state_dict(trainer.model) if partitioned else None
        if accelerator.is_main_process:
            self._write(trainer, tokenizer, state_dict)
        accelerator.wait_for_everyone()
        return self.output_dir

    def _write(self, trainer, tokenizer, state_dict) -> None:
        metrics = runtime.final_metrics(trainer)
        adapter, merge = self.adapter()
        with atomic_dir(self.output_dir) as tmp:
            runtime.save_trained_model(trainer, tokenizer, tmp, adapter=adapter, merge=merge,
                                       base_path=self.merge_base(), trust_remote_code=self.trust_remote_code,
                                       state_dict=state_dict)
            record = stage_record(self.stage, self.cfg.to_dict(), self.lineage_inputs or {"model": self.model_path},
                                  {"metrics": metrics, "config_hash": self.config_hash(), "title": self.title(),
                                   **self.record_extra()})
            write_lineage(tmp, record)
            write_model_card(tmp, record, self.title(), metrics)
            runtime.keep_metrics(self.checkpoint_dir, tmp)
            if self.session and self.session.records:  # where the evaluate step finds this run's tracker runs
                write_json(tmp / tracking.TRACKING_FILE, self.session.record())

    @contextlib.contextmanager
    def training(self, trainer, interrupt: InterruptCallback) -> Iterator[str | None]:
        """Around `trainer.train(resume_from_checkpoint=...)`: yields the checkpoint to resume from (the one asked
        for, else the newest made with the same config, else None); out-of-memory errors become messages, and an
        interrupted run (SIGTERM, SIGINT: its checkpoint is saved) ends in TrainingInterrupted."""
        resume = self.resume or runtime.find_resume_checkpoint(self.checkpoint_dir, self.config_hash())
        if resume:
            print(f"Resuming from {resume}", flush=True)
        with runtime.trainer_errors(self.cfg):
            yield str(resume) if resume else None
        if interrupt.interrupted:
            checkpoint = Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"
            raise TrainingInterrupted(checkpoint, self.resume_command)

    def run(self) -> Path:
        """Set up, train, save. The trainer's loop is called from here, so the path from a rule to the loss stays
        short (docs/architecture.md)."""
        tracking.require(tracking.selected(self.cfg))  # a missing tracker stops the run before any model loads
        trainer, tokenizer, interrupt = self.setup()
        done = False
        try:
            with self.training(trainer, interrupt) as resume:
                trainer.train(resume_from_checkpoint=resume)
            out = self.save(trainer, tokenizer)
            done = True
        finally:
            if self.session:
                self.session.close(ok=done)
        if trainer.accelerator.is_main_process:
            runtime.clear_checkpoints(self.checkpoint_dir)
            print(f"{self.title()} written to {out}", flush=True)
        return out


def job_inputs(model, data, output, checkpoint_dir, device, seed, resume, verbose, trust_remote_code,
               gated: bool = False) -> dict:
    """What every TrainingJob is built from (its shared fields): the validated (or SFT) rows of `data`, read
    (with `gated`, only past its validation report's gate), and the step's paths."""
    from lexalign.data.validated import read_validated

    train, evals = read_validated(data, gated)
    return {"model_path": Path(model), "train": train, "eval": evals, "output_dir": Path(output),
            "checkpoint_dir": Path(checkpoint_dir), "device": device, "seed": seed,
            "resume": Path(resume) if resume else None, "verbose": verbose, "trust_remote_code": trust_remote_code,
            "lineage_inputs": {"model": Path(model), "data": Path(data)}}
