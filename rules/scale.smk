# How many nodes and processes each training and scoring step runs on: the config's `scale` section → the
# rule's resources (lexalign.pipeline.scale.scale_resources). Several nodes need SLURM: on a machine without it
# (no srun) that is an error as the Snakefile is read (a dry run included), and with any executor but SLURM's
# an error before the first job starts.
import shutil

from lexalign.pipeline.scale import check_nodes
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
    SLURM executor's mpi hook with one task per node."""
    return _scale_resources(config["scale"], section, config["device"])
