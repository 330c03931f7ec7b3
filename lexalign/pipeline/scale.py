"""The config's `scale` section as the rules' resources (rules/scale.smk): nodes, processes per node, the
accelerate config and the collective timeout of each training and scoring step, checked as the workflow is planned."""

from __future__ import annotations

import re
import shutil
import subprocess

from lexalign.core.errors import LexAlignError

TRAINING_STEPS = ("finetune", "align")
SCORING_STEPS = ("reference", "evaluate", "online_generate", "online_score", "online_reference")
"""Steps whose processes each take a share of the work (lexalign.core.shares: batches to score; an online round's
generation shards): one whole model per process, no backend."""
SCALED_STEPS = TRAINING_STEPS + SCORING_STEPS
"""The steps the config's `scale` section sizes (rules/scale.smk), the only ones run in several processes."""
SCALE_SECTIONS = {"finetune": "finetune", "align": "align", "reference": "reference", "evaluate": "evaluate",
                  "generate": "online_generate", "score": "online_score"}
"""scale.<section> → the step (lexalign.steps) its rules run (scale.reference also sizes each online round's
reference step, online_reference: the same pass over the sampled ids)."""
ACTIVITIES = {"online_generate": "Sampling the round's completions", "online_score": "Scoring the round's completions",
              "online_reference": "Scoring the round's reference log-probs"}
GPU_KEYS = ("gpu", "gpus", "nvidia_gpu")
BACKEND_CONFIGS = {"ddp": "config/accelerate/ddp.yaml", "fsdp": "config/accelerate/fsdp.yaml",
                   "deepspeed": "config/accelerate/deepspeed_zero3.yaml"}
"""scale.<step>.backend → the shipped accelerate config."""
SLURM_EXECUTORS = ("slurm", "slurm-jobstep")

def activity(step: str) -> str:
    """What the processes of a step do, as its log says it."""
    return "Training" if step in TRAINING_STEPS else ACTIVITIES.get(step, f"Running the {step} step")



def resource(resources, key):
    if resources is None:
        return None
    if isinstance(resources, dict):
        return resources.get(key)
    return getattr(resources, key, None)


def num_processes(resources) -> int:
    """How many training processes a rule's resources ask for (1 when none)."""
    explicit = resource(resources, "processes")
    if explicit not in (None, ""):
        return max(int(explicit), 1)
    for key in GPU_KEYS:
        value = resource(resources, key)
        if value not in (None, ""):
            match = re.search(r"(\d+)$", str(value))  # `gpu: 4` or `gpus: a100:4`
            return max(int(match.group(1)), 1) if match else 1
    for entry in str(resource(resources, "gres") or "").split(","):
        parts = entry.strip().split(":")  # gpu, gpu:N or gpu:type:N
        if parts[0] == "gpu":
            return max(int(parts[-1]), 1) if len(parts) > 1 and parts[-1].isdigit() else 1
    return 1


def num_nodes(resources) -> int:
    """How many nodes a rule's resources ask for (1 when none)."""
    value = resource(resources, "nodes")
    return max(int(value), 1) if value not in (None, "") else 1


def cluster_has_gpus(sinfo: str | None = None, timeout: float = 10) -> bool | None:
    """Whether any node of this machine's SLURM cluster has GPUs, by the GRES column of `sinfo` ("gpu:a100:4(S:0-1)",
    "(null)"); None when there is no sinfo or it cannot answer in `timeout` seconds (no controller, say)."""
    sinfo = sinfo or shutil.which("sinfo")
    if not sinfo:
        return None
    try:
        done = subprocess.run([sinfo, "--noheader", "--format=%G"], capture_output=True, text=True,
                              timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    entries = [entry.strip() for line in done.stdout.splitlines() for entry in line.split(",")]
    return any(re.match(r"gpu(:|\(|$)", entry) for entry in entries)


def gpu_request(device: str, per_node: int | None, cluster_gpus: bool | None) -> str:
    """The `gres` a step asks for: `gpu:<processes per node>` with device cuda, and with device auto unless the
    cluster is known to have no GPUs (`cluster_gpus` False: sinfo lists none, so asking would be refused); none
    with device cpu ("": no GRES)."""
    if device == "cpu" or (device == "auto" and cluster_gpus is False):
        return ""
    return f"gpu:{per_node or 1}"


def scale_resources(scale: dict, section: str, device: str, cluster_gpus: bool | None = None) -> dict:
    """The resources of a rule from the config's `scale` section (`section`: one of SCALE_SECTIONS; a scoring step
    has no backend: its processes launch as DDP's do, each holding the whole model).

    nodes, processes (per node) and accelerate_config always follow the config; on GPUs `gres` (gpu_request:
    device cuda, or auto on a cluster not known to lack GPUs); with several nodes the SLURM executor's `mpi` hook
    and one task per node (`tasks` = nodes; `tasks_per_node` must be > 1 in the plugin, and `tasks_per_gpu: 0` keeps the
    plugin from turning `tasks` into `--ntasks-per-gpu` on GPU jobs).
    """
    own = scale[section]
    nodes, per_node = int(own["nodes"]), own["processes_per_node"]
    resources = {"nodes": nodes, "accelerate_config": BACKEND_CONFIGS[own.get("backend", "ddp")],
                 "collective_timeout": int(scale["timeout"])}
    if per_node:
        resources["processes"] = int(per_node)
    gres = gpu_request(device, per_node, cluster_gpus)
    if gres:
        resources["gres"] = gres
    if nodes > 1:
        resources.update(mpi="srun", tasks=nodes, tasks_per_gpu=0)
    return resources


def check_nodes(scale: dict, executor: str | None, srun: str | None) -> None:
    """Raise LexAlignError at DAG time when a step asks for several nodes where it cannot have them."""
    for section, step in SCALE_SECTIONS.items():
        nodes = int(scale.get(section, {}).get("nodes", 1))
        if nodes <= 1:
            continue
        if not srun:
            reason = "this machine has no SLURM (no srun on PATH)"
        elif executor not in (*SLURM_EXECUTORS, "dryrun"):
            reason = f'this run uses the "{executor}" executor, which runs every job on this machine'
        else:
            continue
        raise LexAlignError(f"scale.{section}.nodes is {nodes}: {activity(step).lower()} on several nodes needs "
                            f"SLURM, and {reason}",
                            hint="Run with the SLURM profile (snakemake --workflow-profile profiles/slurm), "
                                 f"or set scale.{section}.nodes: 1 (and processes_per_node for several GPUs)")
