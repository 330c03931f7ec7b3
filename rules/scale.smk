# How many nodes and processes each training and scoring step runs on: the config's `scale` section → the
# rule's resources (lexalign.pipeline.scale.scale_resources). Several nodes need SLURM: on a machine without it
# (no srun) that is an error as the Snakefile is read (a dry run included), and with any executor but SLURM's
# an error before the first job starts.
import functools
import shutil

from lexalign.pipeline.scale import SLURM_EXECUTORS, check_nodes, cluster_has_gpus, gpu_request
from lexalign.pipeline.scale import scale_resources as _scale_resources


def _check_nodes(executor):
    try:
        check_nodes(config["scale"], executor, shutil.which("srun"))
    except LexAlignError as err:
        raise WorkflowError(err.render()) from None


_check_nodes("dryrun")  # the executor is not known yet: here, only whether this machine has SLURM


def scale_resources(section):
    """The resources of a training or scoring step's rule (finetune, align, reference, evaluate, and an online
    round's generate and score), from scale.<section> - nodes, processes per node, accelerate_config (the
    backend; DDP's launch for a scoring step), GPUs per node, the collective timeout and, on several nodes, the
    SLURM executor's mpi hook with one task per node.

    With device auto the GPU request waits for the job: on SLURM it asks sinfo whether the cluster has GPUs (a
    CPU cluster refuses `--gres=gpu`); elsewhere, and in a dry run, it asks for them as device cuda would."""
    resources = _scale_resources(config["scale"], section, config["device"])
    if config["device"] == "auto" and "gres" in resources:
        per_node = config["scale"][section]["processes_per_node"]
        resources["gres"] = lambda wildcards: gpu_request("auto", per_node, _slurm_cluster_gpus())
    return resources


@functools.cache
def _slurm_cluster_gpus():
    """Whether the SLURM cluster this run submits to has GPUs (None: not a SLURM run, or sinfo cannot say)."""
    if getattr(workflow.executor_plugin, "name", None) not in SLURM_EXECUTORS:
        return None
    return cluster_has_gpus()
