"""Trainer callbacks: the progress line, the metrics file, checkpoint tags, interrupts."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

CONFIG_HASH_FILE = "lexalign_config_hash.txt"
BAR_WIDTH = 17


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes}m" if hours else f"{minutes}m {secs:02d}s"


class ProgressCallback(TrainerCallback):
    """`Epoch 1/3: [████░░░] 60% | Loss: 0.823 | Policy Loss: 0.651 | Reward: 0.172 | ETA: 8m 15s`.

    Updated in place on a terminal; plain lines (one per logging step) when the
    output is a file, as under Snakemake. Every log also goes to `metrics.jsonl`.
    """

    def __init__(self, metrics_file: str | Path, verbose: bool = False, stream=None):
        self.metrics_file = Path(metrics_file)
        self.verbose = verbose
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.time()
        self.last: dict = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.metrics_file.parent.mkdir(parents=True, exist_ok=True)
        self.start = time.time()
        self.start_step = state.global_step

    def _line(self, state) -> str:
        total = max(state.max_steps, 1)
        done = state.global_step / total
        filled = int(round(done * BAR_WIDTH))
        epochs = max(int(round(state.num_train_epochs or 1)), 1)
        epoch = min(int(state.epoch or 0) + 1, epochs)
        steps_run = max(state.global_step - self.start_step, 1)
        eta = (time.time() - self.start) / steps_run * (total - state.global_step)
        parts = [f"Epoch {epoch}/{epochs}: [{'█' * filled}{'░' * (BAR_WIDTH - filled)}] {100 * done:3.0f}% "
                 f"({state.global_step}/{total})"]
        for key, label in (("loss", "Loss"), ("loss/pairwise", "Policy Loss"), ("rewards/margins", "Reward"),
                           ("eval_loss", "Eval Loss")):
            if key in self.last:
                parts.append(f"{label}: {self.last[key]:.3f}")
        parts.append(f"ETA: {_fmt_eta(eta)}")
        return " | ".join(parts)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        if not logs or not state.is_world_process_zero:  # with several processes, the main one reports
            return
        self.last.update(logs)
        record = {"step": state.global_step, "epoch": state.epoch, "time": round(time.time() - self.start, 3), **logs}
        with self.metrics_file.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tty:
            self.stream.write("\r\033[K" + self._line(state))
        else:
            self.stream.write(self._line(state) + "\n")
        if self.verbose:
            self.stream.write(("\n" if self.tty else "") + "  " + json.dumps(logs) + "\n")
        self.stream.flush()

    def on_train_end(self, args, state, control, **kwargs):
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


class ConfigHashCallback(TrainerCallback):
    """Tag each checkpoint with the hash of the config that produced it.

    Automatic resume only picks checkpoints whose tag matches the current config. The tag is the checkpoint's
    last file: with several processes (on several nodes) the main process writes it only once every process
    has written its part (its RNG state, its shard), so a checkpoint with a tag is complete.
    """

    def __init__(self, config_hash: str):
        self.config_hash = config_hash

    def on_save(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()  # every rank's part is on disk
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            (folder / CONFIG_HASH_FILE).write_text(self.config_hash + "\n")


def any_process(flag: bool, device) -> bool:
    """True if `flag` is true in any training process (the flag itself with a single process)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    tensor = torch.tensor([int(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


class InterruptCallback(TrainerCallback):
    """Ctrl+C or SIGTERM (sent by SLURM before a kill): save a checkpoint, then stop."""

    def __init__(self):
        self.interrupted = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.interrupted:  # a second signal: stop at once
            raise KeyboardInterrupt
        self.interrupted = True

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def on_step_end(self, args, state, control, **kwargs):
        # Every process stops after the same step, even if the signal reached them on either side of it.
        self.interrupted = any_process(self.interrupted, args.device)
        if self.interrupted:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class TrackingCallback(TrainerCallback):
    """Reports the run to MLflow, W&B and Trackio (a `lexalign.train.tracking.Session`): the runs start as training
    begins (or reopen when it resumes from a checkpoint), every logged metric goes to them at its step; the
    training job closes them once the model is saved. With several processes, the main one reports."""

    def __init__(self, session):
        self.session = session

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.session.begin(resumed=state.global_step > 0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero:
            self.session.log(logs, state.global_step)
