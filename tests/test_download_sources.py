"""Local and demo sources (the same config shape as the Hub), manifests, and offline steps."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from lexalign.config.loader import load_config
from lexalign.config.sections import SourceConfig
from lexalign.core.errors import LexAlignError
from lexalign.hub import manifest

REPO = Path(__file__).resolve().parent.parent


def run_cli(tmp_path: Path, config: dict, *args: str):
    cfg = tmp_path / "downloads.yaml"
    cfg.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}  # local and demo need no network
    done = subprocess.run([sys.executable, "-m", "lexalign.cli", "download", "--config", str(cfg), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout, done.stderr


def test_local_and_demo_sources_land_with_lineage_and_manifest(tmp_path):
    folder = tmp_path / "my-model"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "sub" / "weights.safetensors").write_bytes(b"w" * 100)
    (tmp_path / "prefs.jsonl").write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n')
    config = {"models": [{"name": "mine", "source": "local", "path": "my-model"}],
              "datasets": [{"name": "prefs", "source": "local", "path": "prefs.jsonl", "output": "data/prefs"},
                           {"name": "demo-prefs", "source": "demo"}]}

    rc, out, err = run_cli(tmp_path, config, "--dry-run")
    assert rc == 0, err
    assert "config.json" in out and "sub/weights.safetensors" in out and "Total: 3 files, 150 B" in out
    assert not (tmp_path / "results").exists()

    rc, out, err = run_cli(tmp_path, config)
    assert rc == 0, err
    model = tmp_path / "results/downloads/models/mine"
    assert (model / "sub/weights.safetensors").read_bytes() == b"w" * 100
    lineage = json.loads((model / "lineage.json").read_text())
    assert lineage["config"]["source"] == "local" and lineage["config"]["path"] == "my-model"
    data = manifest.read(model)
    assert data["request"]["source"] == "local" and set(data["files"]) == {"config.json", "sub/weights.safetensors"}
    assert not manifest.problems(model, data)
    assert (tmp_path / "data/prefs/prefs.jsonl").is_file()
    demo = tmp_path / "results/downloads/datasets/demo-prefs"
    assert json.loads((demo / "lineage.json").read_text())["rows"] > 0
    assert manifest.read(demo)["files"]


def test_unknown_only_name_and_missing_local_path(tmp_path):
    config = {"models": [{"name": "a", "source": "local", "path": "missing-folder"}]}
    rc, _, err = run_cli(tmp_path, config, "--only", "b")
    assert rc == 1 and 'No model or dataset named "b"' in err and "Names: a" in err
    rc, _, err = run_cli(tmp_path, config)
    assert rc == 1 and "Local path not found" in err and "Traceback" not in err


def test_one_config_shape_for_hub_local_and_demo(tmp_path):
    (tmp_path / "d.yaml").write_text(yaml.safe_dump({"models": [
        {"source": "hub", "repo_id": "acme/m", "revision": "v1", "allow_patterns": "*.json"},
        {"source": "local", "path": "x"},
        {"source": "demo"},
    ], "datasets": [{"source": "hub", "repo_id": "acme/d"}]}))
    cfg = load_config(tmp_path / "d.yaml", "download")
    entries = cfg["models"] + cfg["datasets"]
    assert len({tuple(sorted(e)) for e in entries}) == 1  # the schema fills every key, whatever the source
    assert set(entries[0]) | {"name"} == {f.name for f in dataclasses.fields(SourceConfig)}  # name has no default
    sources = [SourceConfig.from_dict(e) for e in entries]
    assert sources[0].hub_repo_type("model") == "model" and sources[3].hub_repo_type("preference_data") == "dataset"
    with pytest.raises(LexAlignError, match='needs a "repo_id"'):
        SourceConfig.from_dict({"source": "hub"})


def test_manifest_detects_missing_resized_and_changed_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.bin").write_bytes(b"12345")
    request = {"source": "local", "path": "x"}
    manifest.write(tmp_path, request, None, manifest.describe(tmp_path))
    assert manifest.complete(tmp_path, request)
    assert manifest.complete(tmp_path, {**request, "path": "y"}) is None
    (tmp_path / "b.bin").write_bytes(b"54321")
    assert manifest.problems(tmp_path, manifest.read(tmp_path)) == ["b.bin: sha256 differs from the manifest"]
    assert manifest.problems(tmp_path, manifest.read(tmp_path), hashes=False) == []
    (tmp_path / "b.bin").write_bytes(b"1")
    (tmp_path / "a.txt").unlink()
    assert manifest.problems(tmp_path, manifest.read(tmp_path)) == ["a.txt: missing", "b.bin: 1 bytes, expected 5"]


def test_redact_removes_the_token_and_token_shaped_strings(monkeypatch):
    from lexalign.hub.failures import redact

    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnopqrstuvwxyz012345")
    text = "failed with hf_abcdefghijklmnopqrstuvwxyz012345 and api_org_ZZZZZZZZZZZZZZZZ"
    assert redact(text) == "failed with <token> and <token>"


def test_every_step_after_download_runs_offline(monkeypatch):
    """Rules run with HF_HUB_OFFLINE=1 for every step but download (lexalign/pipeline/rules.py)."""
    from lexalign import steps
    from lexalign.pipeline.rules import ONLINE_STEPS, STEP_OF_RULE, run_rule

    seen = {}

    def checked(step, arguments):
        return lambda **_: seen.__setitem__(step, os.environ.get("HF_HUB_OFFLINE"))

    monkeypatch.setattr(steps, "checked", checked)
    nothing = SimpleNamespace(items=lambda: {}.items())
    for rule, step in STEP_OF_RULE.items():
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        seen.pop(step, None)
        run_rule(SimpleNamespace(rule=rule, input=nothing, output=nothing, params=nothing, log=[], resources=None,
                                 threads=1))
        assert seen[step] == (None if step in ONLINE_STEPS else "1"), rule
    assert set(ONLINE_STEPS) == {"download", "publish", "lm_eval"}  # downloads, the Hub upload, lm-eval's datasets


def test_example_downloads_config_is_valid():
    cfg = load_config(REPO / "config/downloads.yaml.example", "download")
    sources = [SourceConfig.from_dict(e) for e in cfg["models"] + cfg["datasets"]]
    assert {s.source for s in sources} == {"hub", "local", "demo"}
    hub_model = next(s for s in cfg["models"] if s["source"] == "hub")
    hub_data = next(SourceConfig.from_dict(s) for s in cfg["datasets"] if s["source"] == "hub")
    assert hub_model["repo_id"] and hub_data.hub_repo_type("preference_data") == "dataset"
