"""What the training benchmarks share: the model and data they train on, step clocks, peak memory,
running configurations step by step in turns in one process, and each in its own process, by turns.

The model is the demo's Llama at benchmark size (hidden 256, 4 layers: 3.25M
parameters with the demo's 384-token vocabulary) and every sequence is exactly
`seq_len` tokens (a 64-token prompt and a completion truncated at `seq_len`), so
the matrix products, not Python, dominate a step and padding plays no part.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def write_model(out: Path, hidden: int, layers: int, seq_len: int) -> int:
    """A randomly initialised demo Llama and its tokenizer in `out` (the "SFT model"); returns its size."""
    from lexalign.demo.model import build_model, build_tokenizer

    tokenizer = build_tokenizer(0)
    model = build_model(tokenizer, 0, hidden_size=hidden, layers=layers)
    model.config.max_position_embeddings = max(seq_len, model.config.max_position_embeddings)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def text_maker(tokenizer, seed: int):
    """A function giving texts of the demo's words with at least `n_tokens` tokens (random, from `seed`)."""
    from lexalign.demo import task

    rng = random.Random(seed)
    words = " ".join(task.corpus(seed)).split()

    def text(n_tokens: int) -> str:
        out = ""
        while len(tokenizer(out, add_special_tokens=False)["input_ids"]) < n_tokens:
            out += " " + " ".join(rng.choice(words) for _ in range(16))
        return out

    return text


def make_pairs(model_dir: Path, rows: int, prompt_tokens: int, seq_len: int, seed: int = 0):
    """Prompt/chosen/rejected rows whose prompt + completion reach `seq_len` tokens (then truncated)."""
    import pandas as pd

    from lexalign.models.loading import load_tokenizer

    text = text_maker(load_tokenizer(model_dir), seed)
    return pd.DataFrame([{"prompt": text(prompt_tokens), "chosen": text(seq_len), "rejected": text(seq_len)}
                         for _ in range(rows)])


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, batch and clock options of the training benchmarks."""
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", default="cpu", choices=["cpu", "wall"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: LexAlign's GPU settings, the wall clock, peak GPU memory")


def parse_training_arguments(parser: argparse.ArgumentParser) -> argparse.Namespace:
    args = parser.parse_args()
    if args.device == "cuda":
        args.clock = "wall"  # a CPU clock misses the GPU's work
    return args


def sync() -> None:
    """Wait for the GPU's queued work, so a clock read after it includes it (nothing to do on the CPU)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def peak_gpu_mb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def plain_trl_settings(device: str, lora: bool) -> tuple[dict, dict]:
    """(from_pretrained kwargs, DPOConfig kwargs) a plain TRL script would use for the settings LexAlign
    picks on `device` (models.load_causal_lm, runtime.gpu_defaults), so both sides compute the same."""
    import torch

    from lexalign.models import loading as models
    from lexalign.train import runtime

    bf16_weights = device == "cuda" and torch.cuda.is_bf16_supported() and lora
    load = {"dtype": torch.bfloat16 if bf16_weights else torch.float32,
            "attn_implementation": models.attention_implementation(device)}
    from lexalign.models.kernels import liger_installed

    # Liger the way a TRL user switches it on (LexAlign applies the same layer kernels as the model loads).
    return load, {"use_cpu": device == "cpu", **runtime.gpu_defaults(device),
                  "use_liger_kernel": device == "cuda" and liger_installed()}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def step_clock():
    """A TrainerCallback recording each optimizer step's CPU and wall time, each epoch's, and peak RSS."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.steps_cpu, self.steps_wall, self.epochs_cpu, self.epochs_wall = [], [], [], []
            self.peak_train_mb = self.peak_gpu_mb = None

        def on_epoch_begin(self, args, state, control, **kwargs):
            self._epoch = (time.process_time(), time.perf_counter())

        def on_epoch_end(self, args, state, control, **kwargs):
            self.epochs_cpu.append(time.process_time() - self._epoch[0])
            self.epochs_wall.append(time.perf_counter() - self._epoch[1])

        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            self._step = (time.process_time(), time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.steps_cpu.append(time.process_time() - self._step[0])
            self.steps_wall.append(time.perf_counter() - self._step[1])

        def on_train_end(self, args, state, control, **kwargs):
            self.peak_train_mb = peak_rss_mb()
            self.peak_gpu_mb = peak_gpu_mb()

        def result(self) -> dict:
            return {"steps_cpu": self.steps_cpu, "steps_wall": self.steps_wall, "epochs_cpu": self.epochs_cpu,
                    "epochs_wall": self.epochs_wall, "peak_train_mb": self.peak_train_mb,
                    "peak_gpu_mb": self.peak_gpu_mb}

    return StepClock()


def run_worker(script: Path, name: str, spec: dict, threads: int) -> dict:
    """Run `script --worker NAME SPEC` in a fresh process (so its peak RSS is its own); return its JSON."""
    spec_file = Path(spec["tmp"]) / f"spec-{name}.json"
    out_file = Path(spec["tmp"]) / f"result-{name}.json"
    spec_file.write_text(json.dumps(spec))
    out_file.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    result = subprocess.run([sys.executable, str(script), "--worker", name, str(spec_file), str(out_file)],
                            capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"worker {name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return json.loads(out_file.read_text())


def by_turns(script: Path, names: list[str], spec: dict, rounds: int, threads: int) -> dict[str, list[dict]]:
    """Each configuration once per round, the order rotating, so a busy machine slows them alike."""
    results: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            print(f"  round {r + 1}/{rounds}: {name}", flush=True)
            results[name].append(run_worker(script, name, spec, threads))
    return results


def steady_rate(result: dict, warmup: int, clock: str) -> float:
    """Steps per second of one run: 1 / the median time of its steps after `warmup`."""
    times = result["steps_cpu" if clock == "cpu" else "steps_wall"][warmup:]
    return 1.0 / statistics.median(times)


def machine() -> str:
    import platform

    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {cores} cores, {gpu}, torch {torch.__version__}"


class Turns:
    """Training runs in threads of one process taking turns, one optimizer step each.

    A run holds the turn from the start of a step (`on_step_begin`) to the start
    of its next one, so its data loading, logging and callbacks count with its
    step and never overlap another run's. Each step is timed with the thread's
    own CPU clock (`time.thread_time`; the waiting threads use none) and with
    wall time. Steps of different runs that follow each other ran under the same
    machine load, so their ratios, paired step by step, cancel most of it. The
    order reverses every round (A B C D, D C B A, ...): a run's place in a round
    changed its step time by about 1% here, and this way every run has the same
    average place.
    """

    def __init__(self, names: list[str]):
        self.order = list(names)
        self.rounds = 0
        self.queue: list[str] = []  # the runs still to step in this round
        self.done: set[str] = set()
        self.arrived: set[str] = set()
        self.lock = threading.Condition()
        self.steps: dict[str, list[dict]] = {name: [] for name in names}

    def _current(self) -> str | None:
        live = [n for n in self.order if n not in self.done]
        self.queue = [n for n in self.queue if n in live]
        if not self.queue and live:
            self.queue = live if self.rounds % 2 == 0 else live[::-1]
            self.rounds += 1
        return self.queue[0] if self.queue else None

    def acquire(self, name: str) -> None:
        """Wait for `name`'s turn; the first steps wait until every run is set up and ready."""
        with self.lock:
            self.arrived.add(name)
            self.lock.notify_all()
            self.lock.wait_for(lambda: len(self.arrived | self.done) == len(self.order) and self._current() == name)

    def release(self, name: str, finished: bool = False) -> None:
        with self.lock:
            if name in self.queue:
                self.queue.remove(name)
            if finished:
                self.done.add(name)
            self.lock.notify_all()

    def callback(self, name: str):
        """The TrainerCallback that makes run `name` take its turns and records its step times."""
        from transformers import TrainerCallback

        turns = self

        class TakeTurns(TrainerCallback):
            started = None

            def _close(self, state):
                if self.started is not None:
                    sync()  # the step's GPU work counts with it
                    cpu, wall, step = self.started
                    turns.steps[name].append({"cpu": time.thread_time() - cpu, "wall": time.perf_counter() - wall,
                                              "step": step})

            def on_step_begin(self, args, state, control, **kwargs):
                if self.started is not None:
                    self._close(state)
                    turns.release(name)
                turns.acquire(name)
                sync()
                self.started = (time.thread_time(), time.perf_counter(), state.global_step)

            def on_train_end(self, args, state, control, **kwargs):
                self._close(state)
                self.started = None
                turns.release(name, finished=True)

        return TakeTurns()

    def run(self, targets: dict) -> None:
        """Run each `targets[name]()` (a training run with `callback(name)` installed) in its own thread."""
        errors = {}

        def body(name, target):
            try:
                target()
            except BaseException as err:  # noqa: BLE001 - reported below
                errors[name] = err
                if name not in self.done:
                    self.release(name, finished=True)

        threads = [threading.Thread(target=body, args=(name, targets[name]), name=name) for name in self.order]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            name, err = next(iter(errors.items()))
            raise RuntimeError(f"run {name} failed: {err!r}") from err


def paired_ratio(ours: list[dict], theirs: list[dict], warmup: int, clock: str) -> tuple[float, float, float]:
    """Step rate of `ours` over `theirs`: the median of step-by-step time ratios after `warmup`, with its
    interquartile range."""
    # The last step is left out too: a run that finished first may be saving its model meanwhile.
    ratios = sorted(t[clock] / o[clock] for o, t in zip(ours[warmup:-1], theirs[warmup:-1], strict=False))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return statistics.median(ratios), q[0], q[2]


def train_only(job, trainer, interrupt) -> None:
    """What a training job's run() does between setup and save (lexalign.train.job.TrainingJob.run)."""
    with job.training(trainer, interrupt) as resume:
        trainer.train(resume_from_checkpoint=resume)
