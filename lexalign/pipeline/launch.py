"""Several processes for one pipeline step, through `accelerate launch`.

A training rule (finetune, align) and a scoring rule (reference, evaluate, and an
online round's online_generate and online_score: each process takes its share of
the batches or shards and the main process writes the output, `lexalign.core.shares`)
run in as many processes as their resources ask for, the first of these that is set:

    processes: N            explicit (also on the CPU, where each process uses gloo)
    gpu / gpus: N           the SLURM plugin's GPU count (`--gpus=N`)
    gres: "gpu[:type]:N"    a GRES request

With one process the step trains in the rule's own process, as always. With
more, `lexalign.pipeline.rules.run_rule` hands the step and its arguments (the rule's
inputs, outputs and params, by name) to `run_in_processes`, which writes them
to a JSON spec beside the log and runs

    python -m accelerate.commands.launch --num_processes N
        [--config_file <resources.accelerate_config> | --multi_gpu] ... -m lexalign.pipeline.launch SPEC

so every process runs the same step from the spec: data parallel by default
(DDP: NCCL on GPUs, gloo on the CPU), FSDP or DeepSpeed ZeRO-3 when the rule's
`accelerate_config` resource names one of config/accelerate/*.yaml.

Several nodes (`scale.<step>.nodes` > 1, SLURM only): the rule's resources ask
for the nodes, one task per node and the executor's `mpi` hook, so the SLURM
executor runs the rule itself on the first node of the allocation, undivided.
`run_on_nodes` then starts one launcher per node,

    srun --nodes N --ntasks N --ntasks-per-node 1 --kill-on-bad-exit=1 ... \
        python -m lexalign.pipeline.launch --node NODE.json

and each (`run_node`) runs `accelerate launch --num_machines N --machine_rank
$SLURM_NODEID --main_process_ip <the first node> --main_process_port <free>`.
A process that dies takes the whole job down: srun kills the other nodes'
launchers, and a collective waits at most `scale.timeout` seconds (ddp_timeout).

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
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from lexalign.core.errors import LexAlignError
from lexalign.pipeline.scale import (
    SCALED_STEPS,
    activity,
    num_nodes,
    num_processes,
    resource,
)


def in_worker() -> bool:
    """True inside a process started by a distributed launcher."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def launch_command(spec: Path | list[Path], processes: int, config_file: str | None = None,
                   threads: int | None = None, port: int | None = None, machines: int = 1,
                   machine_rank: int = 0, main_address: str | None = None) -> list[str]:
    """The `accelerate launch` command line that runs the spec(s) in `processes` processes on this machine,
    and with `machines` > 1 this machine's part (`machine_rank`) of `processes` × `machines` processes."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes * machines),
           "--num_machines", str(machines), "--main_process_port", str(port or _free_port()),
           "--dynamo_backend", "no"]
    if machines > 1:
        cmd += ["--machine_rank", str(machine_rank), "--main_process_ip", str(main_address)]
    if config_file:
        cmd += ["--config_file", str(config_file)]
    else:
        # The torchrun launcher; on a machine without GPUs the processes use gloo on the CPU.
        cmd += ["--multi_gpu", "--mixed_precision", "no"]
    if threads:
        cmd += ["--num_cpu_threads_per_process", str(max(threads // processes, 1))]
        # (per machine: `threads` are this node's CPUs, `processes` its processes)
    specs = spec if isinstance(spec, (list, tuple)) else [spec]
    return [*cmd, "-m", "lexalign.pipeline.launch", *map(str, specs)]




def nodes_for(step: str, resources) -> int:
    """How many nodes a step runs on (1 outside SCALED_STEPS, and inside an already launched process)."""
    if step not in SCALED_STEPS or in_worker():
        return 1
    return num_nodes(resources)


def processes_for(step: str, resources) -> int:
    """How many processes a step runs in: the one place that decides (1 outside SCALED_STEPS, and inside
    an already launched process)."""
    if step not in SCALED_STEPS or in_worker():
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


def _config_file(resources) -> str | None:
    config_file = resource(resources, "accelerate_config") or None
    if config_file and not Path(config_file).is_file():
        raise LexAlignError(f'Accelerate config not found: "{config_file}"',
                            hint="Set the rule's accelerate_config resource to one of config/accelerate/*.yaml")
    return config_file


def _timeout_env(resources) -> None:
    """scale.timeout → the launched processes' collective timeout (they inherit the environment; read by
    lexalign.train.runtime.trainer_arguments as TrainingArguments.ddp_timeout, by lexalign.core.shares for the
    scoring steps' barriers)."""
    from lexalign.core.shares import COLLECTIVE_TIMEOUT_ENV

    timeout = resource(resources, "collective_timeout")
    if timeout not in (None, ""):
        os.environ[COLLECTIVE_TIMEOUT_ENV] = str(int(timeout))


def _spec_file(step: str, arguments: dict, log_dir: Path | None, kind: str = "launch") -> Path:
    log_dir = Path(log_dir) if log_dir else Path(tempfile.gettempdir())
    log_dir.mkdir(parents=True, exist_ok=True)
    return write_spec(step, arguments, Path(tempfile.mkstemp(prefix=f".{step}-{kind}-", suffix=".json",
                                                             dir=log_dir)[1]))


def run_in_processes(step: str, arguments: dict, processes: int, resources=None, threads: int | None = None,
                     log_dir: Path | None = None) -> None:
    """Run a step in `processes` processes (accelerate launch) and wait for them.

    Raises LexAlignError if they failed (each process has printed its own error).
    """
    config_file = _config_file(resources)
    _timeout_env(resources)
    spec = _spec_file(step, arguments, log_dir)
    cmd = launch_command(spec, processes, config_file, threads)
    print(f"{activity(step)} in {processes} processes: {' '.join(cmd)}", flush=True)
    try:
        status = run_launcher(cmd, stdout=_fileno(sys.stdout), stderr=_fileno(sys.stderr))
    finally:
        spec.unlink(missing_ok=True)
    if status != 0:
        raise LexAlignError(f"{step} failed in one of its {processes} processes (exit status {status})",
                            hint="The processes' own messages are above")


def _scontrol(*args: str) -> str:
    try:
        done = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise LexAlignError(f"scontrol {' '.join(args)} failed: {err}") from None
    if done.returncode != 0:
        raise LexAlignError(f"scontrol {' '.join(args)} failed", done.stderr.strip() or done.stdout.strip())
    return done.stdout


def main_address() -> str:
    """The address the other nodes reach this node (the first of the allocation: the rule runs there) at:
    its NodeAddr in slurm.conf (often the host name), else the host name."""
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    try:
        found = re.search(r"\bNodeAddr=(\S+)", _scontrol("show", "node", node))
    except LexAlignError:
        found = None
    return found.group(1) if found else node


def run_on_nodes(step: str, arguments: dict, nodes: int, processes: int, resources=None,
                 threads: int | None = None, log_dir: Path | None = None) -> None:
    """Run a step on `nodes` nodes × `processes` processes of this SLURM allocation and wait for them:
    one `lexalign.pipeline.launch --node` per node through srun (the rule's `mpi` resource), rendezvous on this node."""
    if not os.environ.get("SLURM_JOB_ID"):
        raise LexAlignError(f"{step} asks for {nodes} nodes, but this process is not inside a SLURM job",
                            hint="Several nodes need the SLURM profile (snakemake --workflow-profile profiles/slurm)")
    config_file = _config_file(resources)
    _timeout_env(resources)
    mpi = str(resource(resources, "mpi") or "srun")
    cpus = resource(resources, "cpus_per_task") or threads
    spec = _spec_file(step, arguments, log_dir)
    node = {"spec": str(spec), "nodes": nodes, "processes": processes, "config_file": config_file,
            "threads": int(cpus) if cpus else None, "main_address": main_address(), "port": _free_port("")}
    node_spec = Path(str(spec).replace("-launch-", "-node-"))
    node_spec.write_text(json.dumps(node), encoding="utf-8")
    cmd = [*shlex.split(mpi), f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1",
           "--kill-on-bad-exit=1", *([f"--cpus-per-task={int(cpus)}"] if cpus else []),
           sys.executable, "-m", "lexalign.pipeline.launch", "--node", str(node_spec)]
    print(f"{activity(step)} on {nodes} nodes × {processes} processes "
          f"(rendezvous {node['main_address']}:{node['port']}): {' '.join(cmd)}", flush=True)
    try:
        status = run_launcher(cmd, stdout=_fileno(sys.stdout), stderr=_fileno(sys.stderr))
    finally:
        spec.unlink(missing_ok=True)
        node_spec.unlink(missing_ok=True)
    if status != 0:
        raise LexAlignError(f"{step} failed on one of its {nodes} nodes (exit status {status}): the whole job stops",
                            hint="The processes' own messages are above; a rerun resumes from the last checkpoint "
                                 "every process finished writing")


def run_node(path: str | Path) -> int:
    """This node's launcher (`python -m lexalign.pipeline.launch --node NODE.json`, one srun task per node)."""
    node = json.loads(Path(path).read_text(encoding="utf-8"))
    rank = int(os.environ.get("SLURM_NODEID", "0"))
    name = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    processes = node["processes"]
    cmd = launch_command(Path(node["spec"]), processes, node["config_file"], node["threads"], node["port"],
                         machines=node["nodes"], machine_rank=rank, main_address=node["main_address"])
    print(f"Node {rank} of {node['nodes']} ({name}): ranks {rank * processes}..{(rank + 1) * processes - 1}",
          flush=True)
    return run_launcher(cmd)


def main(argv: list[str] | None = None) -> None:
    """One launched process: `python -m lexalign.pipeline.launch SPEC [SPEC ...]` runs each spec in turn
    (`--node NODE.json`: one node's launcher, see run_on_nodes)."""
    from lexalign import steps

    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m lexalign.pipeline.launch SPEC.json [SPEC.json ...]", file=sys.stderr)
        sys.exit(2)
    if argv[0] == "--node" and len(argv) == 2:
        sys.exit(run_node(argv[1]))
    # The launcher started us with SIGTERM/SIGINT ignored: restore them (training installs its own handler).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rank = int(os.environ.get("RANK", "0"))
    if "SLURMD_NODENAME" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print(f"[rank {rank}/{os.environ['WORLD_SIZE']}] on node {os.environ['SLURMD_NODENAME']}", flush=True)
    for path in argv:
        step, arguments = load_spec(path)
        try:
            steps.run(step, **arguments)
        except LexAlignError as err:
            message = err.render()
            print(message if rank == 0 else f"[rank {rank}] {message}", file=sys.stderr, flush=True)
            sys.exit(1)
        except Exception as err:  # noqa: BLE001 - only a collective's failure is turned into a message
            if not lost_peer(err):
                raise
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            print(f"[rank {rank}] Lost another process of the job (a collective failed: {first})\n"
                  f"  That process's node has its own message; scale.timeout bounds how long a collective waits.",
                  file=sys.stderr, flush=True)
            sys.exit(1)


def lost_peer(err: BaseException) -> bool:
    """Whether `err` is a collective (all-reduce, barrier) that failed because another process died or hung."""
    import torch.distributed as dist

    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        mark in text for mark in ("gloo", "NCCL", "Connection reset by peer", "Connection closed by peer",
                                  "timed out", "Timed out"))


if __name__ == "__main__":
    main()
