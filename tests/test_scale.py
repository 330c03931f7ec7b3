"""The config's `scale` section: what each training rule asks SLURM for, and where several nodes are an error.

Fast: no cluster. tests/test_multinode.py trains on a real two-node SLURM cluster.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from lexalign.config.loader import validate_config
from lexalign.core.errors import LexAlignError
from lexalign.pipeline.launch import launch_command
from lexalign.pipeline.scale import (
    check_nodes,
    cluster_has_gpus,
    gpu_request,
    num_nodes,
    num_processes,
    scale_resources,
)
from workflow import SNAKEMAKE, copy_workflow

REPO = Path(__file__).resolve().parent.parent


def _scale(**align) -> dict:
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config["scale"] = {"align": align, "timeout": 90}
    return validate_config(config, "pipeline")["scale"]


def test_scale_defaults_to_one_node_and_the_gpu_resources():
    scale = validate_config(yaml.safe_load((REPO / "config/config.yaml").read_text()), "pipeline")["scale"]
    assert scale["align"] == scale["finetune"] == {"nodes": 1, "processes_per_node": None, "backend": "ddp"}
    assert scale["timeout"] == 1800
    resources = scale_resources(scale, "align", "auto")
    assert resources == {"nodes": 1, "accelerate_config": "config/accelerate/ddp.yaml", "collective_timeout": 1800,
                         "gres": "gpu:1"}
    assert num_processes(resources) == 1 and num_nodes(resources) == 1
    # device auto on a SLURM cluster whose sinfo lists no GPUs asks for none: sbatch would refuse --gres=gpu.
    on_cpus = scale_resources(scale, "align", "auto", cluster_gpus=False)
    assert "gres" not in on_cpus and num_processes(on_cpus) == 1


@pytest.mark.parametrize("device, per_node, cluster_gpus, expected", [
    ("cuda", None, None, "gpu:1"), ("cuda", 4, False, "gpu:4"),  # cuda is what the config says, whatever sinfo says
    ("auto", 2, True, "gpu:2"), ("auto", None, None, "gpu:1"),   # no sinfo, or a dry run: as cuda
    ("auto", 2, False, ""), ("cpu", 2, True, ""),
])
def test_the_gpu_request_follows_the_device_and_the_cluster(device, per_node, cluster_gpus, expected):
    assert gpu_request(device, per_node, cluster_gpus) == expected


@pytest.mark.parametrize("printed, code, expected", [
    ("(null)\n(null)\n", 0, False),                       # a CPU cluster (the test cluster's own answer)
    ("(null)\ngpu:a100:4(S:0-1)\n", 0, True),              # one GPU partition among CPU ones
    ("tmpdisk:100,gpu:2\n", 0, True),                      # GPUs beside another GRES
    ("gpudirect:1\n", 0, False),                           # a GRES whose name only starts with gpu
    ("", 1, None),                                         # sinfo fails (no controller)
])
def test_sinfo_says_whether_the_cluster_has_gpus(tmp_path, printed, code, expected):
    sinfo = tmp_path / "sinfo"
    (tmp_path / "out").write_text(printed)
    sinfo.write_text(f'#!/bin/sh\n[ "$1 $2" = "--noheader --format=%G" ] || exit 9\n'
                     f'cat {tmp_path / "out"}\nexit {code}\n')
    sinfo.chmod(0o755)
    assert cluster_has_gpus(str(sinfo)) is expected


def test_a_sinfo_that_hangs_or_is_missing_says_nothing(tmp_path):
    sinfo = tmp_path / "sinfo"
    sinfo.write_text("#!/bin/sh\nexec sleep 30\n")
    sinfo.chmod(0o755)
    started = __import__("time").monotonic()
    assert cluster_has_gpus(str(sinfo), timeout=0.5) is None
    assert __import__("time").monotonic() - started < 10
    assert cluster_has_gpus(str(tmp_path / "missing")) is None


def test_two_gpu_nodes_ask_for_one_task_per_node_and_the_gpus_of_each():
    resources = scale_resources(_scale(nodes=2, processes_per_node=4, backend="fsdp"), "align", "cuda")
    assert resources == {"nodes": 2, "processes": 4, "gres": "gpu:4",
                         "accelerate_config": "config/accelerate/fsdp.yaml", "collective_timeout": 90,
                         "mpi": "srun", "tasks": 2, "tasks_per_gpu": 0}
    assert num_processes(resources) == 4 and num_nodes(resources) == 2


def test_cpu_nodes_ask_for_no_gpus():
    resources = scale_resources(_scale(nodes=2, processes_per_node=1), "align", "cpu")
    assert "gres" not in resources and resources["processes"] == 1 and resources["tasks"] == 2


@pytest.mark.parametrize("backend, config", [("ddp", "ddp.yaml"), ("fsdp", "fsdp.yaml"),
                                             ("deepspeed", "deepspeed_zero3.yaml")])
def test_each_backend_is_a_shipped_accelerate_config(backend, config):
    resources = scale_resources(_scale(backend=backend), "align", "cpu")
    assert resources["accelerate_config"] == f"config/accelerate/{config}"
    assert (REPO / resources["accelerate_config"]).is_file()


def test_a_wrong_scale_key_is_named():
    with pytest.raises(LexAlignError) as err:
        _scale(nodes=0)
    assert '"scale.align.nodes"' in err.value.render()
    with pytest.raises(LexAlignError) as err:
        _scale(backend="horovod")
    assert '"scale.align.backend"' in err.value.render()


def test_several_nodes_need_slurm():
    scale = _scale(nodes=2)
    with pytest.raises(LexAlignError, match="scale.align.nodes is 2.*no SLURM"):
        check_nodes(scale, "slurm", None)
    with pytest.raises(LexAlignError, match='"local" executor'):
        check_nodes(scale, "local", "/usr/bin/srun")
    check_nodes(scale, "slurm", "/usr/bin/srun")
    check_nodes(scale, "slurm-jobstep", "/usr/bin/srun")
    check_nodes(_scale(nodes=1), "local", None)


def test_each_node_launches_its_share_of_the_processes(tmp_path):
    cmd = launch_command(tmp_path / "spec.json", 4, "config/accelerate/ddp.yaml", threads=8, port=29500,
                         machines=2, machine_rank=1, main_address="node1")
    value = {flag: cmd[cmd.index(flag) + 1] for flag in ("--num_processes", "--num_machines", "--machine_rank",
                                                         "--main_process_ip", "--main_process_port",
                                                         "--num_cpu_threads_per_process")}
    assert value == {"--num_processes": "8", "--num_machines": "2", "--machine_rank": "1",
                     "--main_process_ip": "node1", "--main_process_port": "29500",
                     "--num_cpu_threads_per_process": "2"}


def sbatch_line(resources: dict, threads: int = 8) -> str:
    """What the SLURM executor submits for a job with these resources (its own get_submit_command)."""
    submit = pytest.importorskip("snakemake_executor_plugin_slurm.submit_string")

    class Resources(dict):
        __getattr__ = dict.get

    job = SimpleNamespace(resources=Resources(resources), threads=threads)
    params = {"run_uuid": "UUID", "slurm_logfile": "LOG", "comment_str": "rule_align", "account": "",
              "partition": "-p gpu", "workdir": ""}
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    return " ".join((submit.get_submit_command(job, params) + set_gres_string(job)).split())


def test_the_sbatch_line_of_two_gpu_nodes():
    resources = {"mem_mb": 64000, "runtime": 720, "cpus_per_task": 8,
                 **scale_resources(_scale(nodes=2, processes_per_node=4), "align", "cuda")}
    line = sbatch_line(resources)
    assert "--nodes=2" in line and "--ntasks=2" in line and "--cpus-per-task=8" in line and "--mem 64000" in line
    assert "--gres=gpu:4" in line and "--gpus" not in line
    assert "--ntasks-per-gpu" not in line and "--ntasks-per-node" not in line, line
    print(line)


def test_a_dry_run_without_slurm_says_so_before_any_job(tmp_path):
    import subprocess

    workdir = copy_workflow(tmp_path / "wf")
    no_srun = tmp_path / "bin"
    no_srun.mkdir()
    for tool in ("sh", "git", "which", "uname", "cat", "env"):
        found = __import__("shutil").which(tool)
        if found:
            (no_srun / tool).symlink_to(found)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{no_srun}"}
    done = subprocess.run([SNAKEMAKE, "-n", "results/aligned", "--config", 'scale={"align": {"nodes": 2}}'],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert "scale.align.nodes is 2: training on several nodes needs SLURM" in output, output[-3000:]
    assert "Traceback (most recent call last)" not in output, output[-3000:]
