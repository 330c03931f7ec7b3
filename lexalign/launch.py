"""Several training processes for one pipeline step, through `accelerate launch`.

A training rule (finetune, align) runs in as many processes as its resources ask
for, the first of these that is set:

    processes: N            explicit (also on the CPU, where each process uses gloo)
    gpu / gpus: N           the SLURM plugin's GPU count (`--gpus=N`)
    gres: "gpu[:type]:N"    a GRES request

With one process the step trains in the rule's own process, as always. With
more, `lexalign.workflow.run_rule` hands the step and its arguments (the rule's
inputs, outputs and params, by name) to `run_in_processes`, which writes them
to a JSON spec beside the log and runs

    python -m accelerate.commands.launch --num_processes N
        [--config_file <resources.accelerate_config> | --multi_gpu] ... -m lexalign.launch SPEC

so every process runs the same step from the spec: data parallel by default
(DDP: NCCL on GPUs, gloo on the CPU), FSDP or DeepSpeed ZeRO-3 when the rule's
`accelerate_config` resource names one of config/accelerate/*.yaml.

Signals (preemption): SLURM and Ctrl+C signal every process of the job, so each
training process gets SIGTERM/SIGINT itself, saves a checkpoint and stops.
The launcher and this rule's process ignore those signals and wait for the
training processes, instead of killing them halfway through the save
(torchrun would otherwise signal them a second time and kill them after 30 s).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from lexalign.errors import LexAlignError

TRAINING_STEPS = ("finetune", "align")
GPU_KEYS = ("gpu", "gpus", "nvidia_gpu")


def _resource(resources, key):
    if resources is None:
        return None
    if isinstance(resources, dict):
        return resources.get(key)
    return getattr(resources, key, None)


def num_processes(resources) -> int:
    """How many training processes a rule's resources ask for (1 when none)."""
    explicit = _resource(resources, "processes")
    if explicit not in (None, ""):
        return max(int(explicit), 1)
    for key in GPU_KEYS:
        value = _resource(resources, key)
        if value not in (None, ""):
            match = re.search(r"(\d+)$", str(value))  # `gpu: 4` or `gpus: a100:4`
            return max(int(match.group(1)), 1) if match else 1
    for entry in str(_resource(resources, "gres") or "").split(","):
        parts = entry.strip().split(":")  # gpu, gpu:N or gpu:type:N
        if parts[0] == "gpu":
            return max(int(parts[-1]), 1) if len(parts) > 1 and parts[-1].isdigit() else 1
    return 1


def in_worker() -> bool:
    """True inside a process started by a distributed launcher."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(spec: Path | list[Path], processes: int, config_file: str | None = None,
                   threads: int | None = None, port: int | None = None) -> list[str]:
    """The `accelerate launch` command line that runs the spec(s) in `processes` processes."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
           "--num_machines", "1", "--main_process_port", str(port or _free_port()), "--dynamo_backend", "no"]
    if config_file:
        cmd += ["--config_file", str(config_file)]
    else:
        # The torchrun launcher; on a machine without GPUs the processes use gloo on the CPU.
        cmd += ["--multi_gpu", "--mixed_precision", "no"]
    if threads:
        cmd += ["--num_cpu_threads_per_process", str(max(threads // processes, 1))]
    specs = spec if isinstance(spec, (list, tuple)) else [spec]
    return [*cmd, "-m", "lexalign.launch", *map(str, specs)]


def processes_for(step: str, resources) -> int:
    """How many processes a step runs in: the one place that decides (1 outside training steps, and inside
    an already launched process)."""
    if step not in TRAINING_STEPS or in_worker():
        return 1
    return num_processes(resources)


def write_spec(step: str, arguments: dict, path: Path) -> Path:
    """What a process needs to run the step: its name and its arguments by name, as JSON."""
    path.write_text(json.dumps({"step": step, "arguments": arguments}, indent=1, default=str), encoding="utf-8")
    return path


def load_spec(path: str | Path) -> tuple[str, dict]:
    """A spec file back into (step, arguments)."""
    spec = json.loads(Path(path).read_text(encoding="utf-8"))
    return spec["step"], spec["arguments"]


def _fileno(stream) -> int | None:
    try:
        stream.flush()
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def run_launcher(cmd: list[str], env: dict | None = None, stdout=None, stderr=None,
                 timeout: float | None = None) -> int:
    """Run the launcher and wait for it, with SIGTERM/SIGINT ignored here and there (see the module doc).

    After `timeout` seconds the launcher and its processes are killed and TimeoutError raised.
    """
    # torchrun would turn SIGTERM/SIGINT into "signal the workers again, SIGKILL them 30 s later":
    # leave those two to the workers (PET_* sets torchrun's --signals-to-handle; torch versions without it ignore it).
    quiet = "SIGHUP,SIGQUIT"
    env = {**(env or os.environ), "PET_SIGNALS_TO_HANDLE": quiet, "TORCHELASTIC_SIGNALS_TO_HANDLE": quiet}
    env.setdefault("PYTHONUNBUFFERED", "1")
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        # The child inherits the ignored signals; torchrun leaves them so (the env above).
        process = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=stderr)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(process.pid)
            process.wait()
            raise TimeoutError(f"{cmd[0]} ... ran past {timeout} s and was killed") from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _kill_tree(pid: int) -> None:
    import psutil  # accelerate's dependency

    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    for process in [*parent.children(recursive=True), parent]:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def run_in_processes(step: str, arguments: dict, processes: int, resources=None, threads: int | None = None,
                     log_dir: Path | None = None) -> None:
    """Run a training step in `processes` processes (accelerate launch) and wait for them.

    Raises LexAlignError if they failed (each process has printed its own error).
    """
    config_file = _resource(resources, "accelerate_config") or None
    if config_file and not Path(config_file).is_file():
        raise LexAlignError(f'Accelerate config not found: "{config_file}"',
                            hint="Set the rule's accelerate_config resource to one of config/accelerate/*.yaml")
    log_dir = Path(log_dir) if log_dir else Path(tempfile.gettempdir())
    log_dir.mkdir(parents=True, exist_ok=True)
    spec = write_spec(step, arguments, Path(tempfile.mkstemp(prefix=f".{step}-launch-", suffix=".json",
                                                             dir=log_dir)[1]))
    cmd = launch_command(spec, processes, config_file, threads)
    print(f"Training in {processes} processes: {' '.join(cmd)}", flush=True)
    try:
        status = run_launcher(cmd, stdout=_fileno(sys.stdout), stderr=_fileno(sys.stderr))
    finally:
        spec.unlink(missing_ok=True)
    if status != 0:
        raise LexAlignError(f"{step} failed in one of its {processes} processes (exit status {status})",
                            hint="The processes' own messages are above")


def main(argv: list[str] | None = None) -> None:
    """One launched process: `python -m lexalign.launch SPEC [SPEC ...]` runs each spec in turn."""
    from lexalign import stages

    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m lexalign.launch SPEC.json [SPEC.json ...]", file=sys.stderr)
        sys.exit(2)
    # The launcher started us with SIGTERM/SIGINT ignored: restore them (training installs its own handler).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rank = int(os.environ.get("RANK", "0"))
    for path in argv:
        step, arguments = load_spec(path)
        try:
            stages.run(step, **arguments)
        except LexAlignError as err:
            message = err.render()
            print(message if rank == 0 else f"[rank {rank}] {message}", file=sys.stderr, flush=True)
            sys.exit(1)


if __name__ == "__main__":
    main()
