"""Experiment tracking for real: two alignment runs of one pipeline and an evaluation, reported to MLflow (a SQLite
tracking store, read back through MLflow's client), Weights & Biases (offline: its run files, nothing sent) and
Trackio (its local store, in the TRACKIO_DIR conftest sets)."""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
from pathlib import Path

import pytest
from conftest import signal_at

from lexalign.config.loader import validate_config
from lexalign.config.sections import AlignConfig, FinetuneConfig
from lexalign.core.errors import LexAlignError
from lexalign.train import tracking

EXPERIMENT = f"exp-polite-{os.getpid()}"
RUNS = {"aligned": 0.1, "beta-0.3": 0.3}
TRACKERS = ["mlflow", "wandb", "trackio"]


class Listener:
    """A socket on 127.0.0.1 that only counts who connects: W&B's server, were it ever called."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.connections = 0
        self.stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self):
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, demo_model_dir):
    """Validate the demo's preferences, align twice (two runs of one pipeline: beta 0.1 and 0.3, two steps each,
    a metric every step) reporting to all three trackers, and evaluate the first."""
    from lexalign.demo import task
    from lexalign.steps import inputs, results, training

    root = tmp_path_factory.mktemp("tracking")
    listener = Listener()
    with pytest.MonkeyPatch.context() as env:
        env.chdir(root)  # MLflow keeps artifacts under ./mlruns of a SQLite store
        for key, value in {"MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db", "WANDB_MODE": "offline",
                           "WANDB_DIR": str(root), "WANDB_BASE_URL": listener.url, "WANDB_SILENT": "true",
                           "WANDB_DATA_DIR": str(root / "wandb-data"), "WANDB_CACHE_DIR": str(root / "wandb-cache"),
                           "WANDB_CONFIG_DIR": str(root / "wandb-config"), "WANDB_API_KEY": ""}.items():
            env.setenv(key, value)
        env.delenv("WANDB_API_KEY")
        raw = root / "prefs" / "train.jsonl"
        raw.parent.mkdir()
        raw.write_text("".join(json.dumps(row) + "\n" for row in task.preference_rows(0, 64)))
        data = root / "validated"
        inputs.validate(raw=raw, tokenizer=demo_model_dir, output=data, dataset={"path": str(raw), "max_length": 64})
        for run, beta in RUNS.items():
            training.align(model=demo_model_dir, data=data, output=root / run,
                           checkpoint_dir=root / "checkpoints" / run,
                           device="cpu", tracking={"experiment": EXPERIMENT, "run": run},
                           alignment={"beta": beta, "max_steps": 2, "logging_steps": 1, "batch_size": 8,
                                      "gradient_accumulation_steps": 1, "warmup_steps": 0, "max_length": 64,
                                      "report_to": TRACKERS})
        result = results.evaluate(aligned=root / "aligned", reference=demo_model_dir, data=data,
                                 output=root / "eval" / "aligned.json", beta=0.1,
                                 evaluate={"num_prompts": 4, "max_new_tokens": 4})
        yield {"root": root, "data": data, "result": result, "listener": listener,
               "records": {run: json.loads((root / run / "tracking.json").read_text()) for run in RUNS}}
    listener.stop = True


@pytest.mark.slow
def test_the_saved_model_says_where_its_runs_are(tracked):
    record = tracked["records"]["aligned"]
    assert (record["experiment"], record["run"], record["stage"], record["step"]) == (EXPERIMENT, "aligned", "align", 2)
    assert set(record["trackers"]) == set(TRACKERS)
    assert "tracking.json" not in {p.name for p in (tracked["root"] / "checkpoints" / "aligned").iterdir()}


@pytest.mark.slow
def test_mlflow_holds_both_runs_side_by_side_with_params_metrics_and_the_evaluation(tracked):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tracked['root']}/mlflow.db")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == set(RUNS)
    lineage = json.loads((tracked["root"] / "aligned" / "lineage.json").read_text())
    for name, beta in RUNS.items():
        run = runs[name]
        params = run.data.params
        assert (params["method"], float(params["beta"]), params["loss_type"]) == ("dpo", beta, "sigmoid")
        assert (params["use_lora"], params["lora_r"], params["lora_alpha"]) == ("True", "16", "32")
        assert params["data_sha256"] == lineage["inputs"]["data"]["sha256"]
        assert run.data.tags["lexalign.experiment"] == EXPERIMENT and run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "loss")
        assert [m.step for m in history] == [1, 2]  # every logging step
        assert [m.step for m in client.get_metric_history(run.info.run_id, "rewards/margins")] == [1, 2]
    aligned = runs["aligned"]
    assert aligned.info.run_id == tracked["records"]["aligned"]["trackers"]["mlflow"]["run_id"]
    figures = aligned.data.metrics
    assert figures["eval/preference_accuracy"] == pytest.approx(tracked["result"]["preference_accuracy"])
    assert figures["eval/pairs"] == tracked["result"]["pairs"]
    assert "eval/preference_accuracy" not in runs["beta-0.3"].data.metrics  # not evaluated
    files = {f.path for f in client.list_artifacts(aligned.info.run_id, "evaluation")}
    assert files == {"evaluation/eval.json", "evaluation/lineage.json"}
    local = Path(client.download_artifacts(aligned.info.run_id, "evaluation/eval.json", str(tracked["root"])))
    assert json.loads(local.read_text())["preference_accuracy"] == tracked["result"]["preference_accuracy"]


def wandb_records(path: Path) -> list:
    """The records of a W&B run file (run-<id>.wandb: LevelDB-style log blocks of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buffer, out = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        buffer += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(buffer)
            out.append(record)
            buffer = b""
    return out


@pytest.mark.slow
def test_wandb_writes_both_runs_offline_grouped_by_the_experiment_and_sends_nothing(tracked):
    root = tracked["root"]
    for name, beta in RUNS.items():
        wandb_id = tracked["records"][name]["trackers"]["wandb"]["id"]
        files = sorted(root.glob(f"wandb/offline-run-*-{wandb_id}/run-{wandb_id}.wandb"))
        assert len(files) == (2 if name == "aligned" else 1)  # the training run; the evaluation resumed it
        training = wandb_records(files[0])
        run = next(r.run for r in training if r.WhichOneof("record_type") == "run")
        assert (run.run_group, run.display_name, run.project) == (EXPERIMENT, name, "lexalign")
        config = {item.key: json.loads(item.value_json) for item in run.config.update}
        assert config["method"] == "dpo" and config["beta"] == beta and config["lora_r"] == 16
        steps = [{i.nested_key[0]: json.loads(i.value_json) for i in r.history.item}
                 for r in training if r.WhichOneof("record_type") == "history"]
        assert [s["_step"] for s in steps if "loss" in s] == [1, 2]
    aligned_id = tracked["records"]["aligned"]["trackers"]["wandb"]["id"]
    resumed = wandb_records(sorted(root.glob(f"wandb/offline-run-*-{aligned_id}/run-{aligned_id}.wandb"))[1])
    summary = {tuple(i.nested_key) or (i.key,): json.loads(i.value_json)
               for r in resumed if r.WhichOneof("record_type") == "summary" for i in r.summary.update}
    assert summary[("eval/preference_accuracy",)] == pytest.approx(tracked["result"]["preference_accuracy"])
    artifact = next(r.artifact for r in resumed if r.WhichOneof("record_type") == "artifact")
    assert artifact.type == "evaluation"
    assert {c.path for c in artifact.manifest.contents} == {"eval.json", "lineage.json"}
    assert tracked["listener"].connections == 0, "W&B offline must send nothing"


@pytest.mark.slow
def test_trackio_holds_both_runs_in_the_experiment_with_the_evaluation(tracked):
    from trackio.sqlite_storage import SQLiteStorage

    # Where TRACKIO_DIR says (conftest sets it before TRL imports Trackio, which reads it once).
    assert Path(SQLiteStorage.get_project_db_path(EXPERIMENT)).is_relative_to(os.environ["TRACKIO_DIR"])
    assert set(SQLiteStorage.get_runs(EXPERIMENT)) >= set(RUNS)
    logs = SQLiteStorage.get_logs(EXPERIMENT, "aligned")
    assert [row["step"] for row in logs if "loss" in row] == [1, 2]
    evaluated = [row for row in logs if "eval/preference_accuracy" in row]
    assert evaluated and evaluated[0]["eval/preference_accuracy"] == pytest.approx(
        tracked["result"]["preference_accuracy"])
    logged = SQLiteStorage.get_run_artifacts(EXPERIMENT, "aligned", None)["output"]
    assert {"evaluation-aligned-eval", "evaluation-aligned-lineage"} <= {a.get("name") for a in logged}, logged




@pytest.mark.slow
def test_an_interrupted_sft_run_resumes_into_the_same_tracker_run(tracked, tmp_path, monkeypatch, demo_model_dir):
    """finetune.report_to: the SFT run, stopped by SIGTERM (as SLURM does) and resumed from its checkpoint, is one
    MLflow run with every step."""
    import pandas as pd
    from mlflow import MlflowClient

    from lexalign.core.errors import TrainingInterrupted
    from lexalign.demo import task
    from lexalign.train.finetune import FinetuneJob

    uri = f"sqlite:///{tracked['root']}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    job = FinetuneJob(model_path=demo_model_dir, train=pd.DataFrame(task.sft_rows(0, 32)),
                      eval=pd.DataFrame(columns=["prompt", "completion"]), output_dir=tmp_path / "sft",
                      checkpoint_dir=tmp_path / "checkpoints", device="cpu",
                      tracking={"experiment": EXPERIMENT, "run": "sft"},
                      cfg=FinetuneConfig.from_dict({"max_steps": 4, "logging_steps": 1, "batch_size": 8,
                                                    "max_length": 64, "report_to": ["mlflow"]}))
    job.extra_callbacks = [signal_at(3)]
    with pytest.raises(TrainingInterrupted):
        job.run()
    started = json.loads((job.checkpoint_dir / tracking.TRACKING_FILE).read_text())
    run_id = started["trackers"]["mlflow"]["run_id"]
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(run_id).info.status == "FAILED"
    job.extra_callbacks = []
    job.run()  # resumes from checkpoint-3
    assert json.loads((job.output_dir / tracking.TRACKING_FILE).read_text())["trackers"]["mlflow"]["run_id"] == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "sft" and run.data.params["stage"] == "finetune"
    assert sorted({m.step for m in client.get_metric_history(run_id, "loss")}) == [1, 2, 3, 4]
    assert [r.info.run_name for r in client.search_runs([run.info.experiment_id])].count("sft") == 1
    assert not (job.checkpoint_dir / tracking.TRACKING_FILE).exists()


# --- configuration: report_to, the tensorboard synonym, the extra, the experiment -------------------


def test_report_to_lists_trackers_and_tensorboard_true_is_a_synonym():
    cfg = AlignConfig.from_dict({"report_to": ["mlflow"], "tensorboard": True})
    assert tracking.selected(cfg) == ["mlflow", "tensorboard"] and tracking.external(cfg) == ["mlflow"]
    assert tracking.selected(FinetuneConfig.from_dict({"report_to": ["tensorboard"]})) == ["tensorboard"]
    with pytest.raises(LexAlignError) as err:
        AlignConfig.from_dict({"report_to": ["mlfow"]})
    assert 'alignment.report_to.0' in err.value.render() and "mlflow, wandb, trackio" in err.value.render()


def test_asking_for_a_tracker_without_the_extra_names_the_extra(monkeypatch, tmp_path):
    import pandas as pd

    from lexalign.train.align import AlignJob

    monkeypatch.setattr(tracking, "installed", lambda name: name != "wandb")
    job = AlignJob(model_path=tmp_path / "no-model-needed", train=pd.DataFrame(), eval=pd.DataFrame(),
                   cfg=AlignConfig.from_dict({"report_to": ["mlflow", "wandb"]}), output_dir=tmp_path / "out",
                   checkpoint_dir=tmp_path / "ck")
    with pytest.raises(LexAlignError) as err:
        job.run()  # refused before anything loads
    text = err.value.render()
    assert "report_to lists wandb" in text and "needs the tracking extra: pip install lexalign[tracking]" in text
    assert "mlflow" not in text.split("\n")[0]


def _pipeline(**changes) -> dict:
    config = {"model": {"source": "demo"}, "sft_data": {"source": "demo"}, "preference_data": {"source": "demo"},
              "finetune": {"method": "lora"}, "alignment": {"method": "dpo", "report_to": ["wandb"]},
              "runs": {"gdpo-k4": {"method": "gdpo"}}}
    for section, values in changes.items():
        config[section] = {**config.get(section, {}), **values}
    return validate_config(config, "pipeline")


def test_a_pipelines_runs_share_one_experiment():
    config = _pipeline()
    sft = tracking.pipeline_tracking(config, {**config["finetune"], "report_to": ["mlflow"]}, "sft")
    aligned = tracking.pipeline_tracking(config, config["alignment"], "aligned")
    sweep = tracking.pipeline_tracking(config, {**config["alignment"], "method": "gdpo"}, "gdpo-k4")
    assert sft["experiment"] == aligned["experiment"] == sweep["experiment"]
    assert aligned["experiment"].startswith("lexalign-demo-") and sweep["run"] == "gdpo-k4"
    # An alignment setting or a tracker keeps the experiment; another model or SFT config makes another one.
    assert tracking.pipeline_tracking(_pipeline(alignment={"beta": 0.3}), config["alignment"], "x")["experiment"] \
        == aligned["experiment"]
    assert tracking.default_experiment(_pipeline(finetune={"report_to": ["mlflow"]})) == aligned["experiment"]
    assert tracking.default_experiment(_pipeline(finetune={"lora_r": 8})) != aligned["experiment"]
    named = _pipeline(tracking={"experiment": "greetings"})
    assert tracking.pipeline_tracking(named, named["alignment"], "aligned")["experiment"] == "greetings"
    # Without a tracker beyond TensorBoard, the rule's params say nothing (no rerun for it).
    assert tracking.pipeline_tracking(config, {"report_to": ["tensorboard"]}, "sft") is None
    assert tracking.pipeline_tracking(config, config["finetune"], "sft") is None
