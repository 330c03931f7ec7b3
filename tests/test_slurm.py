"""The demo pipeline on a real (single-node) SLURM cluster, through profiles/slurm.

The test installs Debian's slurmctld, slurmd, slurm-client and munge (and
snakemake-executor-plugin-slurm) when they are missing, starts them by hand (no
systemd) with their state under a temporary folder, and runs the demo to
results/aligned with `snakemake --workflow-profile` (a copy of profiles/slurm
fitted to this machine: no GPUs, its memory and CPUs; finetune in two CPU
processes). Halfway through training it requeues the finetune job, as SLURM
does when it preempts one. It checks that every job but the downloads ran as a
SLURM job, that the requeued job resumed from its checkpoint and that
results/aligned loads, then stops the daemons by their pid files. It needs root
and apt-get; elsewhere it is skipped.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, write_jsonl
from workflow import SNAKEMAKE, copy_workflow

from lexalign.demo import task

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
DAEMONS = ["slurmctld", "slurmd", "munged"]
PLUGIN = "snakemake-executor-plugin-slurm"
SNAKEMAKE_TIMEOUT = 420


def _skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "SLURM test: Linux only"
    if os.geteuid() != 0:
        return "SLURM test: needs root (it installs and starts slurmctld, slurmd and munged)"
    if not shutil.which("apt-get"):
        return "SLURM test: needs apt-get (Debian/Ubuntu) to install slurmctld, slurmd, slurm-client and munge"
    return None


pytestmark = [pytest.mark.slurm, pytest.mark.slow,
              pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")]


def _run(cmd: list[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


def _install_slurm() -> None:
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "munged", "mungekey", "sbatch", "squeue")):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    update = _run(["apt-get", "update", "-qq"], timeout=180, env=env)
    assert update.returncode == 0, f"apt-get update failed:\n{update.stderr[-2000:]}"
    install = _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES], timeout=240, env=env)
    assert install.returncode == 0, f"apt-get install {' '.join(PACKAGES)} failed:\n{install.stderr[-2000:]}"


def _install_plugin() -> None:
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        pip = _run([sys.executable, "-m", "pip", "install", "--quiet", PLUGIN], timeout=240)
        assert pip.returncode == 0, f"pip install {PLUGIN} failed:\n{pip.stderr[-2000:]}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


class Cluster:
    """One node named after this host, its CPUs and ~80% of its memory; daemons stopped by pid file."""

    def __init__(self, root: Path, partitions: list[str]):
        self.root = root
        self.node = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self.memory_mb = int(_memory_mb() * 0.8)
        self.partitions = partitions
        self.conf = root / "slurm.conf"
        self.bin = root / "bin"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf), "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}"}
        self.pid_files = {"munged": root / "munge/munged.pid", "slurmctld": root / "slurmctld.pid",
                          "slurmd": root / "slurmd.pid"}

    def write_config(self) -> None:
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        root = self.root
        lines = [
            "ClusterName=lexalign",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={root}/munge/munge.socket",
            f"StateSaveLocation={root}/state",
            f"SlurmdSpoolDir={root}/spool",
            f"SlurmctldPidFile={self.pid_files['slurmctld']}",
            f"SlurmdPidFile={self.pid_files['slurmd']}",
            f"SlurmctldLogFile={root}/log/slurmctld.log",
            f"SlurmdLogFile={root}/log/slurmd.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "SchedulerType=sched/builtin",
            "ReturnToService=2",
            # Finished jobs stay visible to squeue this long: the executor's status
            # queries go through squeue here (no accounting database for sacct).
            "MinJobAge=600",
            "KillWait=30",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN",
        ]
        for i, name in enumerate(dict.fromkeys(["debug", *self.partitions])):
            default = "YES" if i == 0 else "NO"
            lines.append(f"PartitionName={name} Nodes=ALL Default={default} MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        # Inside a job the executor's job step calls srun with every SLURM_* variable removed,
        # SLURM_CONF included: this srun puts this cluster's config back (a real node has /etc/slurm).
        self.bin.mkdir(exist_ok=True)
        srun = self.bin / "srun"
        srun.write_text(f'#!/bin/sh\nSLURM_CONF="{self.conf}" exec {shutil.which("srun")} "$@"\n')
        srun.chmod(0o755)

    def start(self) -> None:
        self.write_config()
        key = self.root / "munge/munge.key"
        for cmd in (
            ["mungekey", "--create", "--keyfile", str(key)],
            ["munged", "--force", f"--key-file={key}", f"--socket={self.root}/munge/munge.socket",
             f"--pid-file={self.pid_files['munged']}", f"--log-file={self.root}/log/munged.log",
             f"--seed-file={self.root}/munge/munged.seed"],
            ["slurmctld", "-c"],  # fresh state
            ["slurmd", "-N", self.node],
        ):
            result = _run(cmd, env=self.env, timeout=30)
            assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stderr}\n{self.logs()}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = _run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, timeout=10).stdout.split()
            if state and all(s.rstrip("*") == "idle" for s in state):
                return
            time.sleep(0.5)
        raise AssertionError(f"the SLURM node did not become idle\n{self.logs()}")

    def logs(self) -> str:
        out = []
        for name in ("slurmctld", "slurmd", "munged"):
            path = self.root / "log" / f"{name}.log"
            if path.is_file():
                out.append(f"--- {path}\n" + "\n".join(path.read_text().splitlines()[-30:]))
        return "\n".join(out)

    def squeue(self, field: str = "%j") -> dict[str, tuple[str, str]]:
        """jobid → (name, state) of every job slurmctld still knows, finished ones included."""
        out = _run(["squeue", "--states=all", "-h", "-o", f"%i|{field}|%T"], env=self.env, timeout=20).stdout
        return {i: (n, s) for i, n, s in (line.split("|") for line in out.splitlines() if line.count("|") == 2)}

    def squeue_comments(self) -> dict[str, tuple[str, str]]:
        """jobid → (comment, state); the SLURM executor comments each job with rule_<rule>."""
        return self.squeue("%k")

    def stop(self) -> None:
        """Cancel the jobs, stop the daemons by their pid files, then any process of this cluster's jobs left."""
        if self.conf.is_file() and self.pid_files["slurmctld"].is_file():
            try:
                _run(["scancel", "--full", "--user", "root"], env=self.env, timeout=20)
                deadline = time.monotonic() + 45  # training saves a checkpoint on SIGTERM, then exits
                while time.monotonic() < deadline and any(
                        state in ("RUNNING", "COMPLETING", "PENDING") for _, state in self.squeue().values()):
                    time.sleep(0.5)
            except (subprocess.TimeoutExpired, OSError):
                pass
        for name in DAEMONS:  # slurmctld and slurmd first, munged (which they use) last
            path = self.pid_files[name]
            try:
                pid = int(path.read_text().strip())
            except (OSError, ValueError):
                continue
            _terminate(pid)
        # slurmstepd and job processes that outlived slurmd: they carry this cluster's SLURM_CONF.
        marker = f"SLURM_CONF={self.conf}".encode()
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and int(proc.name) != os.getpid():
                try:
                    if marker in (proc / "environ").read_bytes().split(b"\0"):
                        os.kill(int(proc.name), signal.SIGKILL)
                except (OSError, ProcessLookupError):
                    pass


def _terminate(pid: int, grace: float = 15) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.2)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().split(") ", 1)[-1].startswith("Z"))


def _partitions(profile: dict) -> list[str]:
    names = [profile.get("default-resources", {}).get("slurm_partition")]
    names += [r.get("slurm_partition") for r in profile.get("set-resources", {}).values()]
    return [n for n in dict.fromkeys(names) if n]


def fit_profile(profile: dict, cpus: int, memory_mb: int) -> dict:
    """profiles/slurm fitted to this node: no GPUs (2 CPU processes for finetune instead), its memory and CPUs.

    Every job asks for one CPU and a quarter of the memory, so jobs that may run side by side do.
    """
    profile = dict(profile)

    def fit(resources: dict) -> dict:
        resources = {k: v for k, v in resources.items() if k not in ("gpu", "gpus", "gres")}
        if "mem_mb" in resources:
            resources["mem_mb"] = min(int(resources["mem_mb"]), memory_mb // 4)
        if "cpus_per_task" in resources:
            resources["cpus_per_task"] = 1
        return resources

    profile["default-resources"] = fit(profile.get("default-resources") or {})
    profile["set-resources"] = {rule: fit(r) for rule, r in (profile.get("set-resources") or {}).items()}
    profile["set-threads"] = {rule: min(int(t), cpus) for rule, t in (profile.get("set-threads") or {}).items()}
    # Two training processes on the CPU, as `gpu: 2` would start on a GPU node.
    profile["set-resources"].setdefault("finetune", {}).update(
        processes=2, accelerate_config="config/accelerate/cpu_2proc.yaml")
    profile.update({
        # Without an accounting database `sacct` cannot answer: query squeue (MinJobAge keeps finished jobs).
        "slurm-status-command": "squeue",
        "slurm-init-seconds-before-status-checks": 1,
        "slurm-no-account": True,
        "slurm-keep-successful-logs": True,
        "latency-wait": 5,
        "retries": 0,
    })
    return profile


FINETUNE_STEPS = 20


def shrink_demo(workdir: Path) -> None:
    """Less data and fewer steps: this test is about SLURM, test_pipeline about what training achieves.

    The demo's rows, fewer of them, as local files; finetune logs every step and
    runs long enough to be requeued halfway through.
    """
    write_jsonl(workdir / "data/sft/train.jsonl", task.sft_rows(0, 96))
    write_jsonl(workdir / "data/preferences/train.jsonl", task.preference_rows(0, 64))
    path = workdir / "config/config.yaml"
    config = yaml.safe_load(path.read_text())
    config["device"] = "cpu"  # this cluster has no GPUs: the training rules ask for none (rules/scale.smk)
    config["sft_data"].update(source="local", path="data/sft")
    config["preference_data"].update(source="local", path="data/preferences", eval_fraction=0.1)
    config["finetune"].update(max_steps=FINETUNE_STEPS, batch_size=4, logging_steps=1, save_steps=1000)
    config["alignment"].update(max_steps=2, batch_size=4, logging_steps=1, save_steps=1000)
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def jobs_of(output: str) -> dict[str, dict]:
    """Snakemake's job blocks: jobid → {rule, local}."""
    jobs = {}
    for match in re.finditer(r"^(local)?rule (\w+):\n((?:    .*\n)+)", output, re.M):
        jobid = re.search(r"^    jobid: (\d+)$", match.group(3), re.M)
        if jobid:
            jobs[jobid.group(1)] = {"rule": match.group(2), "local": bool(match.group(1))}
    return jobs


@pytest.fixture(scope="module")
def cluster():
    started = time.monotonic()
    _install_slurm()
    _install_plugin()
    installed = time.monotonic()
    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    root = Path(tempfile.mkdtemp(prefix="lexalign-slurm-"))  # short: the munge socket path has a length limit
    root.chmod(0o700)
    slurm = Cluster(root, _partitions(profile))
    try:
        slurm.start()
        print(f"\nSLURM: installed in {installed - started:.0f} s, started in {time.monotonic() - installed:.1f} s")
        yield slurm
    finally:
        slurm.stop()
        shutil.rmtree(root, ignore_errors=True)


def _wait(condition, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _logged_steps(metrics: Path) -> int:
    try:
        return sum('"loss"' in line for line in metrics.read_text().splitlines())
    except OSError:
        return 0


def _preempt(cluster: Cluster, workdir: Path, snakemake: subprocess.Popen) -> str:
    """Requeue the finetune job once it is training, as SLURM does when it preempts a job.

    SLURM sends SIGTERM to every process of the job (SIGKILL KillWait later) and queues
    it again; training saves a checkpoint first. A requeued job waits ~2 minutes
    before it may start again: the test lets it start at once.
    """
    metrics = workdir / "results/checkpoints/sft/metrics.jsonl"
    _wait(lambda: _logged_steps(metrics) >= 1 or snakemake.poll() is not None, SNAKEMAKE_TIMEOUT,
          "finetune to start training", poll=0.05)
    assert snakemake.poll() is None, "snakemake ended before finetune trained"
    jobs = cluster.squeue_comments()
    slurm_id = next(i for i, (comment, state) in jobs.items() if comment == "rule_finetune" and state == "RUNNING")
    requeue = _run(["scontrol", "requeue", slurm_id], env=cluster.env, timeout=20)
    assert requeue.returncode == 0, requeue.stderr
    _wait(lambda: cluster.squeue().get(slurm_id, ("", ""))[1] == "PENDING", 60, "the requeued job to be pending")
    _run(["scontrol", "update", f"jobid={slurm_id}", "StartTime=now"], env=cluster.env, timeout=20)
    return slurm_id


@pytest.fixture(scope="module")
def pipeline(cluster, tmp_path_factory):
    """The demo, to results/aligned, through the SLURM profile; finetune preempted halfway."""
    workdir = copy_workflow(tmp_path_factory.mktemp("workflow"))
    shrink_demo(workdir)
    profile = yaml.safe_load((workdir / "profiles/slurm/config.yaml").read_text())
    assert profile["executor"] == "slurm"
    (workdir / "profiles/slurm-test").mkdir()
    fitted = fit_profile(profile, cluster.cpus, cluster.memory_mb)
    (workdir / "profiles/slurm-test/config.yaml").write_text(yaml.safe_dump(fitted, sort_keys=False))

    started = time.monotonic()
    out_file = workdir / "snakemake.out"
    # --workflow-profile: as `--profile`, profiles/default (the local settings) would override its resources.
    with out_file.open("w") as out:
        snakemake = subprocess.Popen([SNAKEMAKE, "--workflow-profile", "profiles/slurm-test", "results/aligned"],
                                     cwd=workdir, env=cluster.env, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            preempted = _preempt(cluster, workdir, snakemake)
            snakemake.wait(timeout=SNAKEMAKE_TIMEOUT - (time.monotonic() - started))
        except (subprocess.TimeoutExpired, AssertionError, StopIteration) as err:
            snakemake.kill()
            snakemake.wait()
            pytest.fail(f"{type(err).__name__}: {err}\n{out_file.read_text()[-5000:]}\n{cluster.squeue()}\n"
                        f"{cluster.logs()}")
    output = out_file.read_text()
    print(f"snakemake through SLURM: {time.monotonic() - started:.0f} s")
    assert snakemake.returncode == 0, output[-6000:] + "\n" + cluster.logs()
    return {"workdir": workdir, "output": output, "preempted": preempted}


def test_jobs_ran_as_slurm_jobs_but_the_downloads(cluster, pipeline):
    output, workdir = pipeline["output"], pipeline["workdir"]
    jobs = jobs_of(output)
    submitted = dict(re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", output))
    local = {j["rule"] for j in jobs.values() if j["local"]}
    remote = {jobs[j]["rule"] for j in submitted}
    assert local == {"download_model", "download_data"}, output[-4000:]
    assert remote >= {"prepare_sft_data", "validate_preferences", "finetune", "align"}, output[-4000:]
    assert set(submitted) == {j for j, info in jobs.items() if not info["local"]}
    known = cluster.squeue()
    for slurm_id in submitted.values():
        assert slurm_id in known, f"SLURM job {slurm_id} unknown to slurmctld: {known}"
        assert known[slurm_id][1] == "COMPLETED", known
    for rule in remote:
        assert list((workdir / ".snakemake/slurm_logs" / f"rule_{rule}").rglob("*.log")), f"no SLURM log for {rule}"


def test_training_ran_in_two_processes_inside_the_job(pipeline):
    log = (pipeline["workdir"] / "logs/finetune.log").read_text()
    assert "Training in 2 processes" in log and "accelerate.commands.launch --num_processes 2" in log, log[-3000:]


def test_a_preempted_job_is_requeued_and_resumes_from_its_checkpoint(cluster, pipeline):
    workdir, slurm_id = pipeline["workdir"], pipeline["preempted"]
    job = _run(["scontrol", "show", "job", slurm_id], env=cluster.env).stdout
    assert "Restarts=1" in job and "JobState=COMPLETED" in job, job
    log = (workdir / "logs/finetune.log").read_text()  # the second run's: the job ran the rule again
    assert re.search(r"Resuming from results/checkpoints/sft/checkpoint-\d+", log), log[-3000:]
    lineage = (workdir / "results/models/sft/lineage.json").read_text()
    assert f'"global_step": {FINETUNE_STEPS}' in lineage
    metrics = workdir / "results/models/sft/metrics.jsonl"
    steps = [int(s) for s in re.findall(r'"step": (\d+)[^\n]*"loss"', metrics.read_text())]
    assert sorted(set(steps)) == list(range(1, FINETUNE_STEPS + 1)), steps


def test_the_aligned_model_loads(pipeline):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(pipeline["workdir"] / "results/aligned")
    assert model.num_parameters() > 0
