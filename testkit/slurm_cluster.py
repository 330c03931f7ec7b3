"""A real SLURM cluster on this machine for the tests: one controller and two nodes, each in its own network namespace.

A helper module (not a test module), used by tests/test_multinode.py through the
session fixture `slurm_cluster` (tests/conftest.py): the bring-up happens once per test session.

Layout (everything created by `start` and removed by `stop`, even after a failure):

    netns lx<tag>c   the controller: slurmctld, and where the tests run sbatch/squeue/snakemake;
                     a bridge `lxbr` at 10.<a>.<b>.1/24
    netns lx<tag>1   node lxnode1: slurmd at 10.<a>.<b>.2 on veth `lxn0` (its peer on the bridge)
    netns lx<tag>2   node lxnode2: slurmd at 10.<a>.<b>.3 on veth `lxn0`

The subnet is private (10.0.0.0/8) and exists only inside these namespaces: no address outside them is
contacted. munged runs in the host namespace: its socket is a file, reachable from every namespace.
Each node's training processes use the veth (GLOO_SOCKET_IFNAME=lxn0), so rank 0 on lxnode1 and rank 1 on
lxnode2 really talk over the bridge.

The test installs Debian's slurmctld, slurmd, slurm-client and munge when they are missing (root and apt-get).
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
PLUGIN = "snakemake-executor-plugin-slurm"
NODES = ("lxnode1", "lxnode2")
IFACE = "lxn0"
"""The name of each node's network interface (the same in every node namespace)."""
CTLD_PORT, SLURMD_PORT = 6817, 6818  # inside the namespaces: no clash with anything on the host


def skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "SLURM test: Linux only"
    if os.geteuid() != 0:
        return "SLURM test: needs root (it installs and starts slurmctld, slurmd and munged in network namespaces)"
    if not shutil.which("apt-get"):
        return "SLURM test: needs apt-get (Debian/Ubuntu) to install slurmctld, slurmd, slurm-client and munge"
    if not shutil.which("ip"):
        return "SLURM test: needs iproute2 (ip netns) for the nodes' network namespaces"
    return None


def run(cmd: list[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


def install_slurm() -> None:
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "munged", "mungekey", "sbatch", "squeue")):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    update = run(["apt-get", "update", "-qq"], timeout=180, env=env)
    assert update.returncode == 0, f"apt-get update failed:\n{update.stderr[-2000:]}"
    install = run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES], timeout=240, env=env)
    assert install.returncode == 0, f"apt-get install {' '.join(PACKAGES)} failed:\n{install.stderr[-2000:]}"


def install_plugin() -> None:
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        pip = run([sys.executable, "-m", "pip", "install", "--quiet", PLUGIN], timeout=240)
        assert pip.returncode == 0, f"pip install {PLUGIN} failed:\n{pip.stderr[-2000:]}"


def memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


class Cluster:
    """slurmctld and two slurmd, each in a network namespace of its own; stopped by pid file, namespaces deleted."""

    def __init__(self, root: Path, partitions: list[str]):
        self.root = root
        self.host = os.uname().nodename.split(".")[0]  # slurmctld checks it runs on SlurmctldHost
        self.nodes = NODES
        self.cpus = os.cpu_count() or 1
        self.memory_mb = int(memory_mb() * 0.8)
        self.partitions = partitions
        self.conf = root / "slurm.conf"
        self.bin = root / "bin"
        tag = f"{os.getpid() % 100000}"
        self.ctl_ns = f"lx{tag}c"
        self.node_ns = {node: f"lx{tag}{i}" for i, node in enumerate(NODES, 1)}
        # A private /24 that only these namespaces hold.
        self.subnet = f"10.{random.randint(100, 250)}.{random.randint(0, 255)}"
        self.ctl_addr = f"{self.subnet}.1"
        self.node_addr = {node: f"{self.subnet}.{i}" for i, node in enumerate(NODES, 2)}
        self.env = {**os.environ, "SLURM_CONF": str(self.conf),
                    "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}", "GLOO_SOCKET_IFNAME": IFACE}
        self.pid_files = {"munged": root / "munge/munged.pid", "slurmctld": root / "slurmctld.pid",
                          **{node: root / f"slurmd-{node}.pid" for node in NODES}}
        self.started = False

    # --- commands inside the namespaces ---------------------------------------------------------------

    def in_ctl(self, cmd: list[str]) -> list[str]:
        """`cmd` run in the controller's namespace (where snakemake, sbatch and squeue reach slurmctld)."""
        return in_netns(self.ctl_ns, cmd)

    def slurm(self, *cmd: str, timeout: float = 20) -> subprocess.CompletedProcess:
        return run(self.in_ctl(list(cmd)), env=self.env, timeout=timeout)

    # --- bring-up -------------------------------------------------------------------------------------

    def _network(self) -> None:
        steps = [["ip", "netns", "add", self.ctl_ns]]
        steps += [["ip", "netns", "add", ns] for ns in self.node_ns.values()]
        ctl = ["ip", "-n", self.ctl_ns]
        steps += [[*ctl, "link", "set", "lo", "up"],
                  [*ctl, "link", "add", "lxbr", "type", "bridge"],
                  [*ctl, "addr", "add", f"{self.ctl_addr}/24", "dev", "lxbr"],
                  [*ctl, "link", "set", "lxbr", "up"]]
        for i, (node, ns) in enumerate(self.node_ns.items(), 1):
            peer = ["ip", "-n", ns]
            steps += [[*ctl, "link", "add", f"lxb{i}", "type", "veth", "peer", "name", IFACE, "netns", ns],
                      [*ctl, "link", "set", f"lxb{i}", "master", "lxbr"],
                      [*ctl, "link", "set", f"lxb{i}", "up"],
                      [*peer, "link", "set", "lo", "up"],
                      [*peer, "addr", "add", f"{self.node_addr[node]}/24", "dev", IFACE],
                      [*peer, "link", "set", IFACE, "up"]]
        for cmd in steps:
            result = run(cmd, timeout=20)
            assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stderr}"

    def write_config(self) -> None:
        for sub in ("munge", "state", "log", *(f"spool/{node}" for node in NODES)):
            (self.root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        root = self.root
        lines = [
            "ClusterName=lexalign",
            f"SlurmctldHost={self.host}({self.ctl_addr})",
            f"SlurmctldPort={CTLD_PORT}",
            f"SlurmdPort={SLURMD_PORT}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={root}/munge/munge.socket",
            f"StateSaveLocation={root}/state",
            f"SlurmdSpoolDir={root}/spool/%n",
            f"SlurmctldPidFile={self.pid_files['slurmctld']}",
            f"SlurmdPidFile={root}/slurmd-%n.pid",
            f"SlurmctldLogFile={root}/log/slurmctld.log",
            f"SlurmdLogFile={root}/log/slurmd-%n.log",
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
            # A node whose slurmd stops answering is down within this long (the other node's job fails).
            "SlurmdTimeout=60",
        ]
        lines += [f"NodeName={node} NodeAddr={self.node_addr[node]} CPUs={self.cpus} "
                  f"RealMemory={self.memory_mb} State=UNKNOWN" for node in NODES]
        for i, name in enumerate(dict.fromkeys(["debug", *self.partitions])):
            default = "YES" if i == 0 else "NO"
            lines.append(f"PartitionName={name} Nodes=ALL Default={default} MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        # Inside a job the executor's job step runs the rule with every SLURM_* variable removed,
        # SLURM_CONF included: srun and scontrol put this cluster's config back (a real node has /etc/slurm).
        self.bin.mkdir(exist_ok=True)
        for tool in ("srun", "scontrol", "sinfo"):
            wrapper = self.bin / tool
            wrapper.write_text(f'#!/bin/sh\nSLURM_CONF="{self.conf}" exec {shutil.which(tool)} "$@"\n')
            wrapper.chmod(0o755)

    def start(self) -> None:
        self.started = True
        self._network()
        self.write_config()
        key = self.root / "munge/munge.key"
        commands = [
            ["mungekey", "--create", "--keyfile", str(key)],
            ["munged", "--force", f"--key-file={key}", f"--socket={self.root}/munge/munge.socket",
             f"--pid-file={self.pid_files['munged']}", f"--log-file={self.root}/log/munged.log",
             f"--seed-file={self.root}/munge/munged.seed"],
            self.in_ctl(["slurmctld", "-c"]),  # fresh state
        ]
        commands += [in_netns(self.node_ns[node], ["slurmd", "-N", node]) for node in NODES]
        for cmd in commands:
            result = run(cmd, env=self.env, timeout=30)
            assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stderr}\n{self.logs()}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = self.slurm("sinfo", "-h", "-N", "-o", "%N %T", timeout=10).stdout.split("\n")
            idle = {line.split()[0] for line in state if line.strip() and line.split()[1].rstrip("*") == "idle"}
            if idle >= set(NODES):
                return
            time.sleep(0.5)
        raise AssertionError(f"the SLURM nodes did not become idle\n{self.logs()}")

    def logs(self) -> str:
        out = []
        for path in sorted((self.root / "log").glob("*.log")):
            out.append(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(out)

    def squeue(self, field: str = "%j") -> dict[str, tuple[str, str]]:
        """jobid → (name, state) of every job slurmctld still knows, finished ones included."""
        out = self.slurm("squeue", "--states=all", "-h", "-o", f"%i|{field}|%T").stdout
        return {i: (n, s) for i, n, s in (line.split("|") for line in out.splitlines() if line.count("|") == 2)}

    def squeue_comments(self) -> dict[str, tuple[str, str]]:
        """jobid → (comment, state); the SLURM executor comments each job with rule_<rule>."""
        return self.squeue("%k")

    def stop(self) -> None:
        """Cancel the jobs, stop the daemons by their pid files, kill what is left of the jobs, delete the
        namespaces (their veths and bridge go with them)."""
        if self.started and self.pid_files["slurmctld"].is_file():
            try:
                self.slurm("scancel", "--full", "--user", "root")
                deadline = time.monotonic() + 45  # training saves a checkpoint on SIGTERM, then exits
                while time.monotonic() < deadline and any(
                        state in ("RUNNING", "COMPLETING", "PENDING") for _, state in self.squeue().values()):
                    time.sleep(0.5)
            except (subprocess.TimeoutExpired, OSError):
                pass
        # slurmctld and the slurmd first, munged (which they use) last.
        for name in ("slurmctld", *NODES, "munged"):
            try:
                pid = int(self.pid_files[name].read_text().strip())
            except (OSError, ValueError):
                continue
            terminate(pid)
        # slurmstepd and job processes that outlived slurmd: they carry this cluster's SLURM_CONF.
        marker = f"SLURM_CONF={self.conf}".encode()
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and int(proc.name) != os.getpid():
                try:
                    if marker in (proc / "environ").read_bytes().split(b"\0"):
                        os.kill(int(proc.name), signal.SIGKILL)
                except (OSError, ProcessLookupError):
                    pass
        for ns in [self.ctl_ns, *self.node_ns.values()]:
            run(["ip", "netns", "delete", ns], timeout=20)


def in_netns(ns: str, cmd: list[str]) -> list[str]:
    """`cmd` in network namespace `ns` and nothing else of ours changed: nsenter, not `ip netns exec`, which
    remounts /sys (slurmd then finds no cgroup filesystem)."""
    return ["nsenter", f"--net=/run/netns/{ns}", *cmd]


def terminate(pid: int, grace: float = 15) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and alive(pid):
        time.sleep(0.2)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().split(") ", 1)[-1].startswith("Z"))


def partitions(profile: dict) -> list[str]:
    """The partitions a SLURM profile names (the cluster gets each, on every node)."""
    names = [profile.get("default-resources", {}).get("slurm_partition")]
    names += [r.get("slurm_partition") for r in profile.get("set-resources", {}).values()]
    return [n for n in dict.fromkeys(names) if n]


def fit_profile(profile: dict, cpus: int, memory_mb: int) -> dict:
    """profiles/slurm fitted to these nodes: no GPUs, their memory and CPUs, squeue for job states.

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


def jobs_of(output: str) -> dict[str, dict]:
    """Snakemake's job blocks: jobid → {rule, local}."""
    jobs = {}
    for match in re.finditer(r"^(local)?rule (\w+):\n((?:    .*\n)+)", output, re.M):
        jobid = re.search(r"^    jobid: (\d+)$", match.group(3), re.M)
        if jobid:
            jobs[jobid.group(1)] = {"rule": match.group(2), "local": bool(match.group(1))}
    return jobs


def wait_for(condition, timeout: float, what: str, poll: float = 0.2):
    """`condition()`'s first truthy value, polled every `poll` s for at most `timeout` s (a bounded wait)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
