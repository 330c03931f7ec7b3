"""Experiment trackers: MLflow, Weights & Biases and Trackio (TensorBoard goes through transformers).

(About 400 lines on purpose: the three trackers side by side behind one interface, so each does the same
things - start, log, reopen, add the evaluation - the same way.)

A training run reports to the trackers its section's `report_to` lists (`tensorboard: true` is a synonym of
listing tensorboard): its resolved config as parameters (method, beta, loss, LoRA settings, the data's
hash), and every metric the trainer logs, at its step. Runs are grouped by the pipeline they belong to: one
experiment (`tracking.experiment`, by default one name per pipeline: its model, data and SFT config), in
which the SFT run, the primary alignment run and every sweep run sit side by side under their own names.

Where each run lives is written to `tracking.json` beside the saved model (never uploaded by `lexalign
push`); the evaluate step reopens the run from there and adds the eval figures, eval.json and lineage.json.

Each tracker reads its own settings from the environment, as it always does: MLFLOW_TRACKING_URI (a server,
or a SQLite file), WANDB_MODE (offline writes files and sends nothing), WANDB_PROJECT, WANDB_DIR, TRACKIO_DIR.
Nothing here imports a tracker before a run asks for one: the pipeline reads `pipeline_tracking` while it
plans, and that must stay cheap.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from lexalign.core.errors import LexAlignError, warn
from lexalign.core.io import hash_object, read_json, write_json

TRACKERS = ("tensorboard", "mlflow", "wandb", "trackio")
"""Every value `report_to` accepts (the schema's `trackers`)."""
EXTERNAL = ("mlflow", "wandb", "trackio")
"""The trackers LexAlign reports to itself; TensorBoard is transformers' own callback."""
EXTRA = "pip install lexalign[tracking]"
TRACKING_FILE = "tracking.json"
"""Beside a saved model (and in the checkpoint folder while training): where its tracker runs are."""
DEFAULT_EXPERIMENT = "lexalign"
"""The experiment of runs started outside the pipeline (the `lexalign` CLI, the Python API)."""
WANDB_PROJECT = "lexalign"
"""The W&B project when WANDB_PROJECT is unset; the pipeline's experiment is the run's W&B group."""
HINTS = {
    "mlflow": "Check MLFLOW_TRACKING_URI (a server such as http://127.0.0.1:5000, or sqlite:///mlflow.db)",
    "wandb": "Log in with `wandb login`, or set WANDB_MODE=offline to write the run to files and sync it later",
    "trackio": "Check TRACKIO_DIR (where Trackio keeps its runs)",
}
LABELS = {"mlflow": "MLflow", "wandb": "Weights & Biases", "trackio": "Trackio", "tensorboard": "TensorBoard"}
_PARAM_SKIP = ("output_dir", "checkpoint_dir", "report_to", "tensorboard")


def _get(cfg, key: str, default=None):
    return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)


def selected(cfg) -> list[str]:
    """The trackers a finetune or alignment section (a dict or its config class) reports to, in order."""
    names = list(_get(cfg, "report_to") or [])
    if _get(cfg, "tensorboard") and "tensorboard" not in names:
        names.append("tensorboard")
    return names


def external(cfg) -> list[str]:
    """The trackers of `cfg` LexAlign reports to itself (all but TensorBoard)."""
    return [name for name in selected(cfg) if name in EXTERNAL]


def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def require(names) -> None:
    """Every tracker named is installed, or a clear error naming the extra that brings it."""
    missing = [name for name in names if name in EXTERNAL and not installed(name)]
    if missing:
        listed = ", ".join(LABELS[name] for name in missing)
        raise LexAlignError(
            f"report_to lists {', '.join(missing)} ({listed}), which needs the tracking extra: {EXTRA}",
            "The extra installs MLflow, Weights & Biases and Trackio.",
            hint=f"Run: {EXTRA}  (or remove {', '.join(missing)} from report_to)",
        )


# --- which experiment and run: decided when the pipeline plans ---------------------------------------


def default_experiment(config: dict) -> str:
    """One name per pipeline: what its runs share (the model, the data, the SFT config and the seed), so a
    sweep's runs land together, and changing only an alignment setting keeps them together."""
    finetune = {k: v for k, v in (config.get("finetune") or {}).items() if k not in _PARAM_SKIP}
    shared = {"seed": config.get("seed"), "finetune": finetune,
              **{key: config.get(key) for key in ("model", "sft_data", "preference_data")}}
    model = config.get("model") or {}
    name = (model.get("repo_id") or model.get("path") or model.get("source") or "demo").rstrip("/")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name.rsplit("/", 1)[-1]).strip("-") or "model"
    return f"lexalign-{name}-{hash_object(shared)[:8]}"


def pipeline_tracking(config: dict, section: dict, run: str) -> dict | None:
    """What a training rule passes its step: the experiment every run of this pipeline shares, and this run's
    name; None when the section reports to no tracker but TensorBoard (so nothing reruns for it)."""
    if not external(section):
        return None
    experiment = (config.get("tracking") or {}).get("experiment") or default_experiment(config)
    return {"experiment": experiment, "run": run}


# --- the trackers ----------------------------------------------------------------------------------


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:300]}" if text else type(err).__name__


def _without_userinfo(uri: str) -> str:
    """A tracking URI without any user:password part (never written to a file)."""
    parts = urlsplit(uri)
    if not parts.netloc or "@" not in parts.netloc:
        return uri
    return urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[1], parts.path, parts.query, parts.fragment))


def _metric_name(key: str) -> str:
    return re.sub(r"[^0-9A-Za-z_\-. :/]", "_", key)


@dataclass
class RunSpec:
    """One run: which experiment it belongs to, its name, its stage and the parameters it is logged with."""

    experiment: str
    run: str
    stage: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def tags(self) -> dict[str, str]:
        return {"lexalign.experiment": self.experiment, "lexalign.run": self.run, "lexalign.stage": self.stage,
                **({"lexalign.method": str(self.params["method"])} if "method" in self.params else {})}


class MlflowTracker:
    """MLflow through its client (no global active run): wherever MLFLOW_TRACKING_URI points, a server or a
    SQLite store; else MLflow's default store in the working directory."""

    name = "mlflow"

    def __init__(self, record: dict | None = None):
        from mlflow import MlflowClient

        # The environment wins; else the store the run was started in (a URI without credentials).
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (record or {}).get("tracking_uri")
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = (record or {}).get("run_id")

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # a sweep run in another process created it first
            return self.client.get_experiment_by_name(name).experiment_id

    def start(self, spec: RunSpec) -> dict:
        from mlflow.entities import Param

        experiment_id = self._experiment_id(spec.experiment)
        run = self.client.create_run(experiment_id, run_name=spec.run, tags=spec.tags)
        self.run_id = run.info.run_id
        params = [Param(key, str(value)[:500]) for key, value in spec.params.items()]
        for start in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        return {"run_id": self.run_id, "experiment_id": experiment_id,
                "tracking_uri": _without_userinfo(self.client.tracking_uri)}

    def reopen(self) -> None:
        self.client.update_run(self.run_id, status="RUNNING")

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(_metric_name(k), v, now, step) for k, v in metrics.items()])

    def log_evaluation(self, figures: dict[str, float], folder: Path, step: int) -> None:
        self.log(figures, step)
        self.client.log_artifacts(self.run_id, str(folder), "evaluation")

    def finish(self, ok: bool = True) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


class WandbTracker:
    """Weights & Biases: project WANDB_PROJECT (else lexalign), the pipeline's experiment as the run's group.
    WANDB_MODE=offline writes the run under WANDB_DIR and sends nothing (`wandb sync` sends it later)."""

    name = "wandb"

    def __init__(self, record: dict | None = None):
        self.record = record or {}
        self.run = None

    def start(self, spec: RunSpec) -> dict:
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or WANDB_PROJECT, group=spec.experiment,
                              name=spec.run, job_type=spec.stage, config=spec.params,
                              tags=[spec.stage, *([str(spec.params["method"])] if "method" in spec.params else [])],
                              reinit="create_new")
        return {"id": self.run.id, "project": self.run.project, "group": spec.experiment, "name": spec.run}

    def reopen(self) -> None:
        import wandb

        record = self.record
        self.run = wandb.init(project=record["project"], id=record["id"], group=record.get("group"),
                              name=record.get("name"), resume="allow", reinit="create_new")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_evaluation(self, figures: dict[str, float], folder: Path, step: int) -> None:
        import wandb

        self.run.summary.update(figures)
        artifact = wandb.Artifact(f"evaluation-{self.run.id}", type="evaluation")
        artifact.add_dir(str(folder))
        self.run.log_artifact(artifact)

    def finish(self, ok: bool = True) -> None:
        self.run.finish(exit_code=0 if ok else 1)


class TrackioTracker:
    """Trackio: the pipeline's experiment as the project, kept where TRACKIO_DIR says (local by default)."""

    name = "trackio"

    def __init__(self, record: dict | None = None):
        self.record = record or {}
        self.run = None

    def _init(self, project: str, name: str, group: str | None, config: dict | None, resume: str):
        import trackio

        return trackio.init(project=project, name=name, group=group, config=config, resume=resume,
                            auto_log_cpu=False, auto_log_gpu=False)

    def start(self, spec: RunSpec) -> dict:
        self.run = self._init(spec.experiment, spec.run, spec.stage, spec.params, "never")
        return {"project": spec.experiment, "name": spec.run, "group": spec.stage}

    def reopen(self) -> None:
        record = self.record
        self.run = self._init(record["project"], record["name"], record.get("group"), None, "must")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_evaluation(self, figures: dict[str, float], folder: Path, step: int) -> None:
        import trackio

        self.run.log(figures, step=step)
        for path in sorted(folder.iterdir()):
            trackio.log_artifact(path, name=f"evaluation-{self.record.get('name', 'run')}-{path.stem}",
                                 type="evaluation")

    def finish(self, ok: bool = True) -> None:
        self.run.finish()


ADAPTERS = {"mlflow": MlflowTracker, "wandb": WandbTracker, "trackio": TrackioTracker}


def _failure(name: str, action: str, spec_or_record, err: BaseException) -> LexAlignError:
    where = (f"{spec_or_record.experiment} / {spec_or_record.run}" if isinstance(spec_or_record, RunSpec)
             else f"{spec_or_record.get('experiment')} / {spec_or_record.get('run')}")
    return LexAlignError(f"{LABELS[name]} could not {action} the run {where}", _first_line(err), hint=HINTS[name])


# --- a training run's session: started by the trainer callback, closed by the job -------------------


def run_params(stage: str, config: dict, data_hash: str | None = None, config_hash: str | None = None) -> dict:
    """The parameters a run is logged with: its resolved config, flat (lists joined with commas), without
    where files go; the data's hash and the config hash (the checkpoint tag)."""
    params: dict[str, Any] = {"stage": stage}
    for key, value in sorted(config.items()):
        if key in _PARAM_SKIP or value is None or isinstance(value, dict):
            continue
        params[key] = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
    if data_hash:
        params["data_sha256"] = data_hash
    if config_hash:
        params["config_hash"] = config_hash
    return params


@dataclass
class Session:
    """The tracker runs of one training run. `begin` starts them (or, resuming from a checkpoint, reopens the
    ones this run started before); `log` reports the trainer's metrics; `close` ends them."""

    names: list[str]
    spec: RunSpec
    state_file: Path
    """In the checkpoint folder: which runs this training run started, so a resumed job logs to the same ones."""
    trackers: dict[str, Any] = field(default_factory=dict)
    records: dict[str, dict] = field(default_factory=dict)
    step: int = 0
    _warned: set = field(default_factory=set)

    def _previous(self) -> dict:
        if not self.state_file.is_file():
            return {}
        state = read_json(self.state_file)
        same = state.get("experiment") == self.spec.experiment and state.get("run") == self.spec.run
        return state.get("trackers", {}) if same else {}

    def begin(self, resumed: bool) -> None:
        require(self.names)
        previous = self._previous() if resumed else {}
        for name in self.names:
            record = previous.get(name)
            try:
                tracker = ADAPTERS[name](record)
                if record:
                    tracker.reopen()
                else:
                    record = tracker.start(self.spec)
            except LexAlignError:
                raise
            except Exception as err:  # each tracker's own errors: a message, not a traceback
                raise _failure(name, "start", self.spec, err) from None
            self.trackers[name], self.records[name] = tracker, record
        labels = ", ".join(LABELS[name] for name in self.names)
        print(f"Tracking: {labels}, experiment {self.spec.experiment}, run {self.spec.run}", flush=True)
        write_json(self.state_file, self.record())

    def log(self, logs: dict, step: int) -> None:
        metrics = {k: float(v) for k, v in (logs or {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if not metrics:
            return
        self.step = max(self.step, step)
        for name, tracker in self.trackers.items():
            try:
                tracker.log(metrics, step)
            except Exception as err:  # a lost point must not stop a long training run: say it once
                if name not in self._warned:
                    self._warned.add(name)
                    warn(f"{LABELS[name]} did not take the metrics of step {step}; training goes on",
                         _first_line(err))

    def record(self) -> dict:
        """What tracking.json holds: the experiment, the run, each tracker's ids (never a credential)."""
        return {"experiment": self.spec.experiment, "run": self.spec.run, "stage": self.spec.stage,
                "step": self.step, "trackers": dict(self.records)}

    def close(self, ok: bool) -> None:
        for name, tracker in self.trackers.items():
            try:
                tracker.finish(ok)
            except Exception as err:
                warn(f"{LABELS[name]} did not close the run {self.spec.run}", _first_line(err))
        self.trackers.clear()


# --- after evaluation ------------------------------------------------------------------------------


def eval_figures(result: dict, prefix: str = "eval") -> dict[str, float]:
    """The numbers of an evaluation result, flat (`eval/preference_accuracy`, `eval/generation/aligned_rate`)."""
    out: dict[str, float] = {}
    for key, value in result.items():
        name = f"{prefix}/{key}"
        if isinstance(value, dict):
            out.update(eval_figures(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def log_evaluation(model_dir: str | Path, result: dict, eval_file: str | Path) -> list[str]:
    """Add an evaluation to the tracker runs of the model it evaluated (its tracking.json): the eval figures as
    metrics, eval.json and the model's lineage.json as artifacts. Returns the trackers logged to."""
    model_dir = Path(model_dir)
    file = model_dir / TRACKING_FILE
    if not file.is_file():
        return []
    record = read_json(file)
    names = list(record.get("trackers", {}))
    require(names)
    figures = eval_figures(result)
    with tempfile.TemporaryDirectory(prefix="lexalign-eval-") as folder:
        folder = Path(folder)
        shutil.copyfile(eval_file, folder / "eval.json")
        if (model_dir / "lineage.json").is_file():
            shutil.copyfile(model_dir / "lineage.json", folder / "lineage.json")
        for name in names:
            try:
                tracker = ADAPTERS[name](record["trackers"][name])
                tracker.reopen()
                tracker.log_evaluation(figures, folder, int(record.get("step") or 0))
                tracker.finish(True)
            except LexAlignError:
                raise
            except Exception as err:
                raise _failure(name, "add the evaluation to", record, err) from None
    print(f"Evaluation logged to {', '.join(LABELS[n] for n in names)} "
          f"(experiment {record.get('experiment')}, run {record.get('run')})", flush=True)
    return names
