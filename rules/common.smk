# Config validation and named helpers shared by every rule.
import gc
import sys
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")

# Snakemake's imports leave about a million objects that live until it exits; each full garbage collection
# scans them all again, and reading this workflow's rules triggers one more (~0.08 s of a 2 s no-op plan,
# benchmarks/bench_startup.py). Frozen, later collections skip them (the gc module's advice for such programs).
gc.freeze()

# A checkout (or a copy of one) runs its own lexalign, beside this folder; an installed workflow (the wheel's
# lexalign/_workflow, used by a project's `module`) runs the installed package it sits in.
_checkout = Path(workflow.current_basedir).parent
if (_checkout / "lexalign" / "__init__.py").is_file():
    sys.path.insert(0, str(_checkout))
from lexalign.core.errors import LexAlignError  # noqa: E402
from lexalign.pipeline.plan import checked_config  # noqa: E402
from lexalign.pipeline.workflow_files import code_path  # noqa: E402
from lexalign.reference.layout import SETTING_PATTERN, parse_setting  # noqa: E402

try:
    # The config checked against its schema, each section, sweep run and online round in full
    # (lexalign/pipeline/plan.py): kept between plans, so a plan with nothing new imports no schema validator.
    # snakemake.utils.validate would read the same schema again.
    _checked = checked_config(config)
    config.update(_checked["config"])
    RUNS = _checked["runs"]
    ONLINE = _checked["online"]
    # The offline pipeline's alignment, evaluation and report of its runs: false only for rounds alone.
    OFFLINE = not ONLINE or ONLINE["offline"]
    # Every local path, before any job is planned (a dry run included): never kept, the files may have moved.
    from lexalign.pipeline.plan import check_judges, check_machine, check_pipeline_paths

    check_pipeline_paths(config)
    check_judges(config)
    check_machine(config)
except LexAlignError as err:
    raise WorkflowError(err.render()) from None


def _check_machine(executor):
    """online.sampling.engine vllm: vLLM and a CUDA GPU where the jobs run, once the executor is known."""
    from lexalign.pipeline.plan import check_machine

    try:
        check_machine(config, executor)
    except LexAlignError as err:
        raise WorkflowError(err.render()) from None

# Say it on every run, the dry run included: these settings let a model run code here.
for _key in ("trust_remote_code", "allow_pickle"):
    if config["model"][_key]:
        print(f"Warning: model.{_key} is on: the model can run code on this machine.", file=sys.stderr)

RESULTS = "results"
LOGS = "logs"


def step_code(rule):
    """The source files the rule's step can run (lexalign/pipeline/code_inputs.py: the import closure of its function in
    lexalign/steps/training.py, and the rule's script), in the lexalign this workflow imports: a checkout's, or the
    installed package's. Snakemake compares their checksums, so editing one, or upgrading LexAlign to a version
    that changed one, reruns the step, and only the steps that can run it."""
    from lexalign.pipeline.rules import rule_sources

    return [code_path(path) for path in rule_sources(rule)]


def conda_env():
    """The rules' software environment under `--sdm conda`: torch's CPU build where the config says device: cpu,
    else its CUDA build (envs/)."""
    return "../envs/lexalign-cpu.yaml" if config["device"] == "cpu" else "../envs/lexalign-cuda.yaml"


def local_input(section):
    """A local source's path, so editing the user's file reruns its download."""
    source = config[section]
    return [source["path"]] if source.get("source") == "local" and source.get("path") else []


def source_params(section):
    """Where a download comes from (lexalign.config.loader.download_source): only what changes what is fetched
    (model, sft_data, preference_data, reward_model)."""
    return _checked["sources"][section]


def sft_model():
    """The model alignment starts from and is measured against: the SFT output, or with finetune.method
    none the downloaded model itself, read in place (no SFT job, no SFT data, no copy of its weights)."""
    return f"{RESULTS}/models/base" if config["finetune"]["method"] == "none" else f"{RESULTS}/models/sft"


def start_name():
    """What the model alignment starts from is called in reports: SFT, or the start (finetune.method none)."""
    return "start" if config["finetune"]["method"] == "none" else "SFT"


def training_seed():
    return config["seed"]


def tracking_params(run):
    """Where a training run reports in its experiment trackers (lexalign.train.tracking.pipeline_tracking): the
    experiment every run of this pipeline shares and the run's name (sft, aligned, a sweep run, online-round-<r>);
    None without a tracker but TensorBoard."""
    return _checked["tracking"][run]


def run_alignment(run):
    """The alignment config of a sweep run (the primary run is `aligned`)."""
    return config["alignment"] if run == "aligned" else RUNS[run]


def preference_data(alignment):
    """Validated data for an alignment: pairs (or KTO's rows), or ranked groups of K (lexalign.methods)."""
    from lexalign import methods

    return validated_data(methods.group_size(alignment))


def validated_data(k):
    """The validated data's folder: ranked groups of K, or (K None) pairs or unpaired rows."""
    return f"{RESULTS}/data/preferences-k{k}" if k else f"{RESULTS}/data/preferences"


def readers(data):
    """The alignments (run name → its section; the primary run is `aligned`) that read the validated `data`."""
    runs = {"aligned": config["alignment"], **RUNS}
    return {run: alignment for run, alignment in runs.items() if preference_data(alignment) == data}


def pairs_only(data):
    """Whether a method that needs pairs (lexalign.methods: all but those reading unpaired rows) reads the
    validated `data`: then unpaired rows stop the validate step, before any reference step."""
    from lexalign import methods

    return any(not methods.of(alignment).reads_unpaired for alignment in readers(data).values())


def ranking_data():
    """Ranked groups for GDPO's metrics in every run's evaluation: the largest K any run reading ranked groups
    uses (lexalign.methods)."""
    from lexalign import methods

    sizes = [k for a in [config["alignment"], *RUNS.values()] if (k := methods.group_size(a))]
    return [validated_data(max(sizes))] if sizes else []


def run_evaluations():
    """Every evaluation: the primary run and each sweep run."""
    return [f"{RESULTS}/eval/aligned.json"] + [f"{RESULTS}/runs/{run}/eval.json" for run in RUNS]


def reference_file(alignment):
    """The reference log-probs an alignment reads (named by lexalign.reference.layout.setting_name); none for a
    reference-free method (lexalign.methods: ORPO, SimPO, CPO), so no reference job is planned."""
    from lexalign import methods
    from lexalign.reference.layout import setting_name

    if not methods.of(alignment).needs_reference:
        return []
    return [f"{RESULTS}/reference/{Path(preference_data(alignment)).name}/{setting_name(alignment)}.parquet"]


def published(kind):
    """The model folder (kind model) or eval file (kind eval) of the run publish.run names."""
    run = config["publish"]["run"] if config["publish"]["repo_id"] else "aligned"
    if run != "aligned" and run not in RUNS:
        raise WorkflowError(f'Error: publish.run is "{run}", which is no run of this pipeline\n'
                            f"Runs: {', '.join(['aligned', *RUNS])}")
    if kind == "model":
        return f"{RESULTS}/aligned" if run == "aligned" else f"{RESULTS}/runs/{run}/model"
    return f"{RESULTS}/eval/aligned.json" if run == "aligned" else f"{RESULTS}/runs/{run}/eval.json"


def publish_targets():
    """The default target's publish output: the commit record, when there is a repo to publish to."""
    return [f"{RESULTS}/published.json"] if config["publish"]["repo_id"] else []


def evaluate_params():
    """The evaluate section as the evaluate rules read it: all but lm_eval, which its own rules read."""
    return {key: value for key, value in config["evaluate"].items() if key != "lm_eval"}


def reward_model_input():
    """The judge's reward model (evaluate.judge: reward_model), fetched by download_reward_model; else nothing."""
    return [f"{RESULTS}/models/reward"] if config["evaluate"]["judge"] == "reward_model" else []


def reward_model_source():
    """Where the reward model comes from (its source keys only, as for the model)."""
    return source_params("reward_model")


def reward_model_local_input():
    """A local reward model's folder, so replacing it refetches it."""
    source = config["evaluate"]["reward_model"]
    return [source["path"]] if source.get("path") and not source.get("repo_id") else []


def run_benchmarks():
    """The lm-eval results of every run (evaluate.lm_eval.tasks set), in the order of run_evaluations; else none."""
    if not config["evaluate"]["lm_eval"]["tasks"]:
        return []
    return [f"{RESULTS}/eval/aligned.lm_eval.json"] + [f"{RESULTS}/runs/{run}/lm_eval.json" for run in RUNS]


def lm_eval_task_files():
    """LexAlign's local lm-eval tasks (YAML and data): editing one reruns the benchmarks."""
    from lexalign.demo.benchmark import TASKS_DIR

    return sorted(code_path(path) for path in TASKS_DIR.rglob("*") if path.is_file()
                  and "__pycache__" not in path.parts)


def judge_files(judge):
    """The files a judge reads (a reward function of the user's, {python: file.py:function}; IFEval's prompts
    for the evaluate step): inputs of the steps that judge, so editing one rescores and re-evaluates, and
    samples nothing again."""
    files = [judge["python"].rpartition(":")[0]] if isinstance(judge, dict) else []
    if judge == "ifeval" and config["evaluate"]["ifeval"]["prompts"]:
        files.append(config["evaluate"]["ifeval"]["prompts"])
    return files


def judge_name(judge):
    """A judge's name (python for a reward function of the user's): the scores file and the score cache of the
    rounds are named by it."""
    return "python" if isinstance(judge, dict) else judge
