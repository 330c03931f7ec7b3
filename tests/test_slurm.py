"""The demo pipeline on a real (single-node) SLURM cluster, through profiles/slurm.

The test installs Debian's slurmctld, slurmd, slurm-client and munge when they
are missing, starts them by hand (no systemd) with their state under a
temporary folder, runs the demo's jobs with `snakemake --profile` (a copy of
profiles/slurm fitted to this machine: no GPUs, its memory and CPUs), checks
that they ran as SLURM jobs and that results/aligned loads, and stops the
daemons by their pid files. It needs root and apt-get; elsewhere it is skipped.
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
from conftest import REPO
from test_pipeline import SNAKEMAKE, copy_workflow

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
DAEMONS = ["slurmctld", "slurmd", "munged"]
PLUGIN = "snakemake-executor-plugin-slurm"
SNAKEMAKE_TIMEOUT = 200


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

    def squeue(self) -> dict[str, tuple[str, str]]:
        """jobid → (name, state) of every job slurmctld still knows, finished ones included."""
        out = _run(["squeue", "--states=all", "-h", "-o", "%i|%j|%T"], env=self.env, timeout=20).stdout
        return {i: (n, s) for i, n, s in (line.split("|") for line in out.splitlines() if line.count("|") == 2)}

    def stop(self) -> None:
        if self.conf.is_file() and self.pid_files["slurmctld"].is_file():
            try:
                _run(["scancel", "--full", "--user", "root"], env=self.env, timeout=20)
            except (subprocess.TimeoutExpired, OSError):
                pass
        for name in DAEMONS:  # slurmctld and slurmd first, munged (which they use) last
            path = self.pid_files[name]
            try:
                pid = int(path.read_text().strip())
            except (OSError, ValueError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 15
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
    """profiles/slurm fitted to this node: no GPUs (2 CPU processes for finetune instead), its memory and CPUs."""
    profile = dict(profile)

    def fit(resources: dict) -> dict:
        resources = {k: v for k, v in resources.items() if k not in ("gpu", "gpus", "gres")}
        if "mem_mb" in resources:
            resources["mem_mb"] = min(int(resources["mem_mb"]), memory_mb // 2)
        if "cpus_per_task" in resources:
            resources["cpus_per_task"] = min(int(resources["cpus_per_task"]), cpus)
        return resources

    profile["default-resources"] = fit(profile.get("default-resources") or {})
    profile["set-resources"] = {rule: fit(r) for rule, r in (profile.get("set-resources") or {}).items()}
    profile["set-threads"] = {rule: min(int(t), cpus) for rule, t in (profile.get("set-threads") or {}).items()}
    # Two training processes on the CPU, as `gpu: 2` would start on a GPU node.
    profile["set-resources"].setdefault("finetune", {}).update(
        processes=2, cpus_per_task=min(2, cpus), accelerate_config="config/accelerate/cpu_2proc.yaml")
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


def shrink_demo(workdir: Path) -> None:
    """Fewer training steps: this test is about SLURM, test_pipeline about what training achieves."""
    path = workdir / "config/config.yaml"
    config = yaml.safe_load(path.read_text())
    config["finetune"].update(max_steps=6, logging_steps=2, save_steps=1000)
    config["alignment"].update(max_steps=4, logging_steps=2, save_steps=1000)
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


def test_demo_pipeline_runs_as_slurm_jobs(cluster, tmp_path):
    (tmp_path / "workflow").mkdir()
    workdir = copy_workflow(tmp_path / "workflow")
    shrink_demo(workdir)
    profile = yaml.safe_load((workdir / "profiles/slurm/config.yaml").read_text())
    assert profile["executor"] == "slurm"
    (workdir / "profiles/slurm-test").mkdir()
    fitted = fit_profile(profile, cluster.cpus, cluster.memory_mb)
    (workdir / "profiles/slurm-test/config.yaml").write_text(yaml.safe_dump(fitted, sort_keys=False))

    started = time.monotonic()
    try:
        # --workflow-profile: as `--profile`, profiles/default (the local settings) would override its resources.
        result = subprocess.run([SNAKEMAKE, "--workflow-profile", "profiles/slurm-test", "results/aligned"],
                                cwd=workdir, env=cluster.env, capture_output=True, text=True,
                                timeout=SNAKEMAKE_TIMEOUT)
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        pytest.fail(f"snakemake ran past {SNAKEMAKE_TIMEOUT} s\n{out[-4000:]}\n{cluster.squeue()}\n{cluster.logs()}")
    output = result.stdout + result.stderr
    print(f"snakemake through SLURM: {time.monotonic() - started:.0f} s")
    assert result.returncode == 0, output[-6000:] + "\n" + cluster.logs()

    # Every job but the downloads (localrules) was an sbatch job, and SLURM ran it to completion.
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
    finetune_id = next(s for j, s in submitted.items() if jobs[j]["rule"] == "finetune")
    slurm_log = workdir / ".snakemake/slurm_logs/rule_finetune" / f"{finetune_id}.log"
    assert slurm_log.is_file(), sorted(p.name for p in (workdir / ".snakemake/slurm_logs").rglob("*"))

    # finetune asked for 2 processes: accelerate launch started them inside the SLURM job.
    finetune_log = (workdir / "logs/finetune.log").read_text()
    assert "Training in 2 processes" in finetune_log, finetune_log[-3000:]

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(workdir / "results/aligned")
    assert model.num_parameters() > 0
