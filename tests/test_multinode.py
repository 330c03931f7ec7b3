"""Alignment on two SLURM nodes through profiles/slurm: the same model as one node, a job that spans both,
resumes across nodes, and a dead process on one node that fails the whole job in bounded time.

The session's cluster (testkit/slurm_cluster.py): two slurmd, each in its own network namespace, joined to the
controller's namespace by veth pairs on a private subnet. The demo (finetune.method none: the demo model is
aligned as it is) runs with `scale.align: {nodes: 2, processes_per_node: 1}` on the CPU (gloo), twice:

1. once a checkpoint is complete and training is past it, the job is cancelled and requeued (`scontrol
   requeue`, SLURM's preemption: SIGTERM, a checkpoint, the job queued again);
2. the requeued job resumes from that checkpoint; once a newer checkpoint is complete the training process
   of rank 1, on lxnode2, is killed (SIGKILL): the whole job fails within the collective timeout
   (scale.timeout) and Snakemake reports the rule's error;
3. a rerun of the same snakemake command resumes from the last complete checkpoint and finishes.

The aligned model then equals that of one node running two processes (the same global batch) within 1e-4.
The reference step runs in two processes inside its one-node job (`scale.reference.processes_per_node: 2`): a
job's processes under SLURM, its batches shared out and gathered into one file (tests/test_shares.py shows that
file equals one process's). This is the session's one pipeline through profiles/slurm: every step but the
downloads ran as a SLURM job.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, write_jsonl

from lexalign.demo import task
from testkit.slurm_cluster import fit_profile, jobs_of, skip_reason
from testkit.slurm_cluster import wait_for as _wait
from workflow import SNAKEMAKE, copy_workflow

pytestmark = [pytest.mark.slurm, pytest.mark.slow,
              pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")]

STEPS = 24
SAVE_STEPS = 4
BATCH = 2  # per process: 2 nodes × 1 process, or 1 node × 2 processes, both a global batch of 4
TIMEOUT = 60  # scale.timeout: how long a collective waits for a dead peer
RUN_TIMEOUT = 600  # per snakemake run; a loaded 2-core machine needs it (about 2 minutes unloaded)
HASH_FILE = "lexalign_config_hash.txt"


def _config(workdir: Path) -> dict:
    write_jsonl(workdir / "data/preferences/train.jsonl", task.preference_rows(0, 64))
    path = workdir / "config/config.yaml"
    config = yaml.safe_load(path.read_text())
    # device is left at its default, auto, as a user's is: the cluster's nodes have no GPUs, so the jobs must ask
    # SLURM for none (sinfo says so; a --gres=gpu request would be refused at submission).
    assert config["device"] == "auto"
    config["finetune"]["method"] = "none"  # align the demo model itself: no SFT job
    config["preference_data"].update(source="local", path="data/preferences", eval_fraction=0.1)
    config["alignment"].update(max_steps=STEPS, batch_size=BATCH, logging_steps=1, save_steps=SAVE_STEPS,
                               gradient_accumulation_steps=1, warmup_steps=0)
    config["runs"] = {}
    config["scale"] = {"timeout": TIMEOUT, "align": {"nodes": 2, "processes_per_node": 1, "backend": "ddp"},
                       "reference": {"nodes": 1, "processes_per_node": 2}}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return config


def _complete(checkpoints: Path) -> list[int]:
    """The steps of the checkpoints every rank finished writing (tagged), oldest first."""
    found = [int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*") if (p / HASH_FILE).is_file()]
    return sorted(found)


def _step(checkpoints: Path) -> int:
    try:
        lines = (checkpoints / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    steps = [json.loads(line).get("step", 0) for line in lines if '"loss"' in line]
    return max(steps, default=0)




def _worker(rank: int, node: str) -> int | None:
    """The pid of the training process of `rank` (launched by accelerate on `node`), if it runs."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = set((proc / "environ").read_bytes().split(b"\0"))
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (f"RANK={rank}".encode() in env and f"SLURMD_NODENAME={node}".encode() in env
                and b"LOCAL_RANK=0" in env and b"lexalign.pipeline.launch" in cmdline and b"--node" not in cmdline):
            return int(proc.name)
    return None


class Run:
    """One `snakemake --workflow-profile profiles/slurm-test results/aligned` in the controller's namespace."""

    def __init__(self, cluster, workdir: Path, name: str):
        self.cluster, self.workdir, self.name = cluster, workdir, name
        self.out = workdir / f"snakemake-{name}.out"
        self.started = time.monotonic()
        with self.out.open("w") as handle:
            self.process = subprocess.Popen(
                cluster.in_ctl([SNAKEMAKE, "--workflow-profile", "profiles/slurm-test", "results/aligned"]),
                cwd=workdir, env=cluster.env, stdout=handle, stderr=subprocess.STDOUT, text=True)

    def output(self) -> str:
        return self.out.read_text()

    def wait(self) -> int:
        try:
            return self.process.wait(timeout=max(RUN_TIMEOUT - (time.monotonic() - self.started), 1))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"snakemake ({self.name}) ran past {RUN_TIMEOUT} s\n{self.output()[-4000:]}\n"
                        f"{self.cluster.squeue()}\n{self.cluster.logs()}")

    def fail(self, message: str):
        self.process.kill()
        self.process.wait()
        log = self.workdir / "logs/align.log"
        pytest.fail(f"{self.name}: {message}\n{self.output()[-4000:]}\n--- align.log\n"
                    f"{log.read_text()[-4000:] if log.is_file() else ''}\n{self.cluster.squeue()}\n"
                    f"{self.cluster.logs()}")

    def align_job(self) -> str:
        jobs = self.cluster.squeue_comments()
        return next((i for i, (comment, state) in sorted(jobs.items(), key=lambda j: int(j[0]))
                     if comment == "rule_align" and state == "RUNNING"), None)


@pytest.fixture(scope="module")
def two_nodes(slurm_cluster, tmp_path_factory):
    """The demo aligned on two nodes: requeued, killed on one node, rerun to the end."""
    cluster = slurm_cluster
    workdir = copy_workflow(tmp_path_factory.mktemp("multinode"))
    config = _config(workdir)
    profile = yaml.safe_load((workdir / "profiles/slurm/config.yaml").read_text())
    (workdir / "profiles/slurm-test").mkdir()
    fitted = fit_profile(profile, cluster.cpus, cluster.memory_mb)
    (workdir / "profiles/slurm-test/config.yaml").write_text(yaml.safe_dump(fitted, sort_keys=False))
    checkpoints = workdir / "results/checkpoints/aligned"
    log = workdir / "logs/align.log"
    started = time.monotonic()
    result = {"workdir": workdir, "config": config}

    run = Run(cluster, workdir, "first")
    try:
        # 1. Cancelled mid-run (requeued, as SLURM preempts a job) once a checkpoint is complete and training
        # is past it; the requeued job starts at once (SLURM would wait ~2 minutes).
        _wait(lambda: (_complete(checkpoints) and _step(checkpoints) > _complete(checkpoints)[0])
              or run.process.poll() is not None, RUN_TIMEOUT, "a complete checkpoint and a step past it", poll=0.05)
        job = run.align_job()
        if run.process.poll() is not None or job is None:
            run.fail("snakemake ended, or the align job was not running, before the job could be cancelled")
        requeue = cluster.slurm("scontrol", "requeue", job)
        assert requeue.returncode == 0, requeue.stderr
        _wait(lambda: cluster.squeue().get(job, ("", ""))[1] == "PENDING", 90, "the requeued job to be pending")
        result["after_cancel"] = _complete(checkpoints)
        cluster.slurm("scontrol", "update", f"jobid={job}", "StartTime=now")
        result["job"] = cluster.slurm("scontrol", "show", "job", job).stdout

        # 2. The requeued job resumes; once a newer checkpoint is complete, rank 1's process on lxnode2 dies.
        first = max(result["after_cancel"], default=0)
        _wait(lambda: (max(_complete(checkpoints), default=0) > first
                       and _step(checkpoints) > max(_complete(checkpoints))) or run.process.poll() is not None,
              RUN_TIMEOUT, "a newer complete checkpoint after the resume", poll=0.05)
        pid = _worker(1, "lxnode2")
        if run.process.poll() is not None or pid is None:
            run.fail("snakemake ended, or rank 1 was not running on lxnode2, before it could be killed")
        result["complete_at_kill"] = _complete(checkpoints)
        result["resumed_log"] = log.read_text()
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        _wait(lambda: cluster.squeue().get(job, ("", ""))[1] not in ("RUNNING", "COMPLETING"), TIMEOUT + 60,
              "the align job to end after one node's process was killed", poll=0.5)
        result["job_failed_after"] = time.monotonic() - killed
        result["job_state"] = cluster.squeue()[job][1]
    except AssertionError as err:
        run.fail(str(err))
    result["first_code"] = run.wait()
    result["first_output"], result["killed_log"] = run.output(), log.read_text()

    # 3. Rerun to the end.
    run = Run(cluster, workdir, "rerun")
    result["rerun_code"] = run.wait()
    result["rerun_output"], result["rerun_log"] = run.output(), log.read_text()
    print(f"\ntwo nodes, two snakemake runs: {time.monotonic() - started:.0f} s")
    assert result["rerun_code"] == 0, result["rerun_output"][-5000:] + result["rerun_log"][-3000:]
    return result


@pytest.fixture(scope="module")
def one_node(two_nodes, tmp_path_factory):
    """The same alignment, inputs and global batch on one node in two processes (accelerate launch, gloo), as
    the align rule runs it with `scale.align: {nodes: 1, processes_per_node: 2}`."""
    from lexalign.config.loader import validate_config
    from lexalign.pipeline.launch import launch_command, run_launcher, write_spec

    workdir, root = two_nodes["workdir"], tmp_path_factory.mktemp("one-node")
    config = validate_config(yaml.safe_load((workdir / "config/config.yaml").read_text()), "pipeline")
    reference = sorted((workdir / "results/reference").rglob("*.parquet"))
    arguments = {"model": str(workdir / "results/models/base"), "data": str(workdir / "results/data/preferences"),
                 "reference": [str(path) for path in reference], "output": str(root / "model"),
                 "alignment": config["alignment"], "device": "cpu", "seed": config["seed"],
                 "trust_remote_code": False, "checkpoint_dir": str(root / "checkpoints"), "tracking": None}
    spec = write_spec("align", arguments, root / "spec.json")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = root / "launch.log"
    started = time.monotonic()
    with log.open("w") as handle:
        cmd = launch_command(spec, 2, str(REPO / "config/accelerate/ddp.yaml"), threads=2)
        status = run_launcher(cmd, env=env, stdout=handle, stderr=handle, timeout=300)
    assert status == 0, log.read_text()[-5000:]
    print(f"one node, two processes: {time.monotonic() - started:.0f} s")
    return root / "model"


def test_the_job_spans_both_nodes(two_nodes):
    log = two_nodes["rerun_log"]
    assert "Training on 2 nodes × 1 processes" in log, log[-3000:]
    assert "Node 0 of 2 (lxnode1)" in log and "Node 1 of 2 (lxnode2)" in log, log[-3000:]
    assert "[rank 0/2] on node lxnode1" in log and "[rank 1/2] on node lxnode2" in log, log[-3000:]


def test_device_auto_asks_a_cpu_cluster_for_no_gpus(two_nodes):
    job = two_nodes["job"]  # scontrol show job, of the align job
    assert "NumNodes=2" in job and "gres/gpu" not in job and "TresPerNode" not in job, job


def test_a_cancelled_job_resumes_from_the_checkpoint_it_wrote(two_nodes):
    assert "Restarts=1" in two_nodes["job"], two_nodes["job"]
    assert two_nodes["after_cancel"], "the cancelled job left no complete checkpoint"
    resumed = re.search(r"Resuming from \S*checkpoint-(\d+)", two_nodes["resumed_log"])
    assert resumed and int(resumed.group(1)) == max(two_nodes["after_cancel"]), two_nodes["resumed_log"][-3000:]


def test_a_dead_process_on_one_node_fails_the_whole_job_in_bounded_time(two_nodes):
    assert two_nodes["first_code"] != 0
    assert two_nodes["job_failed_after"] < TIMEOUT + 60, two_nodes["job_failed_after"]
    assert two_nodes["job_state"] in ("FAILED", "CANCELLED", "NODE_FAIL"), two_nodes["job_state"]
    assert "Error in rule align" in two_nodes["first_output"], two_nodes["first_output"][-4000:]
    log = two_nodes["killed_log"]
    assert "Error: align failed on one of its 2 nodes" in log, log[-3000:]
    assert "[rank 0] Lost another process of the job" in log, log[-3000:]
    assert "[rank0]: Traceback" not in log, log[-3000:]


def test_the_rerun_resumes_from_the_last_complete_checkpoint(two_nodes):
    resumed = re.search(r"Resuming from \S*checkpoint-(\d+)", two_nodes["rerun_log"])
    assert resumed, two_nodes["rerun_log"][-3000:]
    assert int(resumed.group(1)) >= max(two_nodes["complete_at_kill"]), (resumed.group(0),
                                                                         two_nodes["complete_at_kill"])
    lineage = json.loads((two_nodes["workdir"] / "results/aligned/lineage.json").read_text())
    assert lineage["metrics"]["global_step"] == STEPS


def test_every_step_but_the_download_ran_as_a_slurm_job(two_nodes):
    output = two_nodes["first_output"]
    submitted = set(re.findall(r"has been submitted with SLURM jobid \d+ \(log: \S*/slurm_logs/rule_(\w+)/", output))
    assert submitted == {"validate_preferences", "reference", "align"}, output[-4000:]
    # Only the downloads ran where snakemake runs (the failed job's own log, shown in the output, says
    # "localrule align": inside the job, as the executor runs it).
    ran_here = {j["rule"] for j in jobs_of(output.split("Error in rule")[0]).values() if j["local"]}
    assert ran_here == {"download_model", "download_data"}, output[-4000:]


def test_the_reference_step_ran_in_two_processes_inside_its_job(two_nodes):
    (log,) = (two_nodes["workdir"] / "logs/reference").rglob("*.log")
    text = log.read_text()
    assert "Running the reference step in 2 processes" in text, text[-3000:]
    assert "Gathered the values of 2 processes" in text, text[-3000:]


def test_the_aligned_model_matches_one_node(two_nodes, one_node):
    from transformers import AutoModelForCausalLM

    two = AutoModelForCausalLM.from_pretrained(two_nodes["workdir"] / "results/aligned").state_dict()
    one = AutoModelForCausalLM.from_pretrained(one_node).state_dict()
    assert set(one) == set(two)
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    start = AutoModelForCausalLM.from_pretrained(two_nodes["workdir"] / "results/models/base").state_dict()
    moved = max((one[k] - start[k]).abs().max().item() for k in one)
    print(f"two nodes vs one node: weights differ by up to {worst:.2e} (training moved them by up to {moved:.2e})")
    assert moved > 1e-3, "training did not change the model: the comparison would prove nothing"
    assert worst < 1e-4, f"two nodes and one node differ by up to {worst}"
