"""The demo pipeline on a real SLURM cluster, through profiles/slurm.

The session's cluster (lexalign/demo/slurm_cluster.py, the `slurm_cluster` fixture:
two nodes, each a slurmd in its own network namespace) installs Debian's
slurmctld, slurmd, slurm-client and munge (and snakemake-executor-plugin-slurm)
when they are missing and starts them by hand (no systemd) with their state
under a temporary folder. This test runs the demo to
results/aligned with `snakemake --workflow-profile` (a copy of profiles/slurm
fitted to this machine: no GPUs, its memory and CPUs; finetune in two CPU
processes). Halfway through training it requeues the finetune job, as SLURM
does when it preempts one. It checks that every job but the downloads ran as a
SLURM job, that the requeued job resumed from its checkpoint and that
results/aligned loads, then stops the daemons by their pid files. It needs root
and apt-get; elsewhere it is skipped.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import write_jsonl

from lexalign.demo import task
from lexalign.demo.slurm_cluster import Cluster, fit_profile, jobs_of, skip_reason
from lexalign.demo.slurm_cluster import wait_for as _wait
from workflow import SNAKEMAKE, copy_workflow

SNAKEMAKE_TIMEOUT = 420

pytestmark = [pytest.mark.slurm, pytest.mark.slow,
              pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")]


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


@pytest.fixture(scope="module")
def cluster(slurm_cluster):
    """The session's SLURM cluster (tests/conftest.py: two nodes, each in a network namespace)."""
    return slurm_cluster




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
    requeue = cluster.slurm("scontrol", "requeue", slurm_id)
    assert requeue.returncode == 0, requeue.stderr
    _wait(lambda: cluster.squeue().get(slurm_id, ("", ""))[1] == "PENDING", 60, "the requeued job to be pending")
    cluster.slurm("scontrol", "update", f"jobid={slurm_id}", "StartTime=now")
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
    # Two training processes on the CPU, as `processes_per_node: 2` would start on a GPU node.
    fitted["set-resources"].setdefault("finetune", {}).update(
        processes=2, accelerate_config="config/accelerate/cpu_2proc.yaml")
    (workdir / "profiles/slurm-test/config.yaml").write_text(yaml.safe_dump(fitted, sort_keys=False))

    started = time.monotonic()
    out_file = workdir / "snakemake.out"
    # --workflow-profile: as `--profile`, profiles/default (the local settings) would override its resources.
    with out_file.open("w") as out:
        snakemake = subprocess.Popen(cluster.in_ctl([SNAKEMAKE, "--workflow-profile", "profiles/slurm-test",
                                                     "results/aligned"]),
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
    job = cluster.slurm("scontrol", "show", "job", slurm_id).stdout
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
