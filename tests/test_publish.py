"""Publishing to the Hub: `lexalign push` and the publish rule, with the real huggingface_hub client against the
loopback Hub (tests/hub_server.py, its upload endpoints), and the model card the Hub renders.

Uploads go through the client's LFS path (HF_HUB_DISABLE_XET=1): the loopback Hub does not serve Xet storage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hub_server import assert_clean_error, files_under

from workflow import PLANTED_TOKEN, edit_config, planned_jobs, snakemake

REPO = Path(__file__).resolve().parent.parent
REPO_ID = "acme/polite-llama"
UPLOADED = {".gitattributes", "README.md", "config.json", "generation_config.json", "model.safetensors",
            "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "lineage.json"}


def hub_env(hub, tmp_path: Path) -> dict:
    """The environment of a publish: the loopback Hub, a token (planted: it must never be printed)."""
    return {"HF_ENDPOINT": hub.url, "HF_TOKEN": PLANTED_TOKEN, "HF_HUB_DISABLE_XET": "1",
            "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": None}


@pytest.fixture
def push(tmp_path, hub):
    """Run `lexalign push` against the loopback Hub; returns (rc, stdout, stderr)."""
    hub.tokens.add(PLANTED_TOKEN)

    def run(*args: str, env: dict | None = None):
        full = {**os.environ, **hub_env(hub, tmp_path), "PYTHONPATH": str(REPO), **(env or {})}
        full = {k: v for k, v in full.items() if v is not None}
        done = subprocess.run([sys.executable, "-m", "lexalign.cli", "push", *args], cwd=tmp_path, env=full,
                              capture_output=True, text=True, timeout=180)
        run.logs.append(done.stdout + done.stderr)
        return done.returncode, done.stdout, done.stderr

    run.logs = []
    return run


def card_of(files: dict[str, bytes]):
    from huggingface_hub import ModelCard

    return ModelCard(files["README.md"].decode())


@pytest.mark.slow
def test_push_is_one_commit_of_weights_tokenizer_generation_config_and_a_card_the_hub_renders(demo_run, hub, push,
                                                                                             cli, tmp_path):
    aligned = demo_run / "results/aligned"
    rc, out, err = push("--model", str(aligned), "--repo-id", REPO_ID, "--private", env={"HF_DEBUG": "1"})
    assert rc == 0, err
    repo = hub.repos[("model", REPO_ID)]
    assert repo.private and len(repo.commits) == 2 and len(repo.messages) == 1  # created, then ONE commit
    files = repo.commits[repo.refs["main"]]
    assert set(files) == UPLOADED  # no metrics.jsonl, no tracking.json, no pickles
    assert files["model.safetensors"] == (aligned / "model.safetensors").read_bytes()
    assert list(repo.messages.values()) == ["Upload Aligned model (dpo, beta=0.1) with LexAlign"]
    assert f"{hub.url}/{REPO_ID}/commit/{repo.refs['main']}" in out

    card = card_of(files)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert {"lexalign", "dpo", "trl"} <= set(card.data.tags)
    assert card.data.base_model is None  # the demo model comes from no Hub repo
    evaluation = json.loads((demo_run / "results/eval/aligned.json").read_text())
    text = card.text
    assert f"| preference accuracy (implicit reward ranks chosen above rejected) | — | " \
           f"{evaluation['preference_accuracy']:.3f} |" in text
    judged = next(line for line in text.splitlines() if line.startswith("| judged wanted behaviour"))
    assert "40 prompts; 95% interval" in judged and judged.count("[") == 2
    assert "## Training configuration" in text and "| beta | 0.1 |" in text
    assert "| demo | model | (built-in demo) |" in text and "- **finetune**:" in text

    # The token went to the Hub, never to the storage the weights were PUT to, and was never printed.
    assert f"Bearer {PLANTED_TOKEN}" in hub.authorizations
    puts = hub.seen("PUT", server="cdn")
    assert puts and not [r for r in puts if r.authorization]
    assert "curl" in err and PLANTED_TOKEN not in out + err

    # What was published downloads and loads.
    rc, _, err = cli({"models": [{"name": "back", "source": "hub", "repo_id": REPO_ID, "output": "back"}]},
                     env={"HF_TOKEN": PLANTED_TOKEN})
    assert rc == 0, err
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    AutoTokenizer.from_pretrained(tmp_path / "back")

    # Nothing changed: pushing again makes no new commit.
    assert push("--model", str(aligned), "--repo-id", REPO_ID)[0] == 0
    assert len(repo.commits) == 2


@pytest.mark.slow
def test_a_failed_upload_leaves_no_commit_and_says_so(demo_run, hub, push):
    aligned = demo_run / "results/aligned"
    weights = hashlib.sha256((aligned / "model.safetensors").read_bytes()).hexdigest()
    hub.fail_upload[weights] = 403  # the storage refuses the weights, mid-upload (other files went up)
    rc, _, err = push("--model", str(aligned), "--repo-id", REPO_ID, "--revision", "dpo-beta-0.1")
    assert_clean_error(rc, err)
    assert "the upload of model.safetensors to acme/polite-llama failed" in err
    assert "Nothing was committed: acme/polite-llama is as it was." in err and "X-Amz-Signature=signed" not in err
    repo = hub.repos[("model", REPO_ID)]
    assert len(repo.commits) == 1 and set(repo.refs) == {"main", "dpo-beta-0.1"}
    assert repo.refs["main"] == repo.refs["dpo-beta-0.1"]  # the new branch points where main did: nothing landed

    del hub.fail_upload[weights]
    hub.fail_commit[REPO_ID] = 500  # the commit itself is refused
    rc, _, err = push("--model", str(aligned), "--repo-id", REPO_ID, "--revision", "dpo-beta-0.1")
    assert_clean_error(rc, err)
    assert "the Hub answered 500" in err and "Nothing was committed" in err
    assert len(repo.commits) == 1

    del hub.fail_commit[REPO_ID]
    rc, _, err = push("--model", str(aligned), "--repo-id", REPO_ID, "--revision", "dpo-beta-0.1")
    assert rc == 0, err
    assert len(repo.commits) == 2 and repo.refs["main"] != repo.refs["dpo-beta-0.1"]
    assert set(repo.commits[repo.refs["dpo-beta-0.1"]]) == UPLOADED
    for log in push.logs:
        assert PLANTED_TOKEN not in log and "Traceback" not in log


def test_refusals_before_anything_is_uploaded(tmp_path, hub, push, demo_model_dir):
    model = tmp_path / "model"
    shutil.copytree(demo_model_dir, model)
    hub.add_repo("acme/public", {"config.json": "{}"})
    rc, _, err = push("--model", str(model), "--repo-id", "acme/public", "--private")
    assert_clean_error(rc, err)
    assert "acme/public exists and is public, but the publish asks for a private repo" in err
    rc, _, err = push("--model", str(model), "--repo-id", REPO_ID, env={"HF_TOKEN": None})
    assert_clean_error(rc, err)
    assert "needs a Hub login" in err
    hub.read_only.add(PLANTED_TOKEN)
    rc, _, err = push("--model", str(model), "--repo-id", REPO_ID)
    assert_clean_error(rc, err)
    assert "403" in err and "write access" in err
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    rc, _, err = push("--model", str(model), "--repo-id", REPO_ID)
    assert_clean_error(rc, err)
    assert "No safetensors weights" in err and "pytorch_model.bin" in err
    assert not hub.seen("PUT") and not hub.seen("POST", "/commit/")


@pytest.mark.slow
def test_an_adapter_only_output_is_pushed_as_a_peft_adapter(tmp_path, hub, push, demo_model_dir):
    """finetune with merge: false saves the LoRA adapter alone: it goes up as a PEFT adapter of its base model's
    Hub repo, with the base model's license."""
    import pandas as pd

    from lexalign.config.sections import FinetuneConfig
    from lexalign.demo import task
    from lexalign.train.finetune import FinetuneJob

    base = tmp_path / "base"
    shutil.copytree(demo_model_dir, base)
    (base / "lineage.json").write_text(json.dumps({
        "stage": "download", "config": {"kind": "model", "source": "hub", "repo_id": "acme/tiny-base",
                                        "revision": "main"},
        "resolved_revision": "0123456789abcdef0123456789abcdef01234567", "license": "apache-2.0",
        "inputs": {}, "parents": {}, "versions": {}}))
    job = FinetuneJob(model_path=base, train=pd.DataFrame(task.sft_rows(0, 16)),
                      eval=pd.DataFrame(columns=["prompt", "completion"]), output_dir=tmp_path / "adapter",
                      checkpoint_dir=tmp_path / "checkpoints", device="cpu",
                      cfg=FinetuneConfig.from_dict({"merge": False, "max_steps": 1, "batch_size": 8,
                                                    "max_length": 64, "lora_dropout": 0.0}))
    adapter = job.run()
    rc, _, err = push("--model", str(adapter), "--repo-id", "acme/tiny-sft-adapter")
    assert rc == 0, err
    repo = hub.repos[("model", "acme/tiny-sft-adapter")]
    files = repo.commits[repo.refs["main"]]
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"} <= set(files)
    assert "config.json" not in files and "model.safetensors" not in files
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == "acme/tiny-base"
    card = card_of(files)
    assert (card.data.library_name, card.data.base_model, card.data.license) == ("peft", "acme/tiny-base",
                                                                                 "apache-2.0")
    assert card.data.base_model_relation == "adapter" and {"peft", "lora", "sft"} <= set(card.data.tags)
    assert "| hub | model | acme/tiny-base | main | 0123456789abcdef0123456789abcdef01234567 |" in card.text


def test_the_card_carries_base_model_datasets_license_the_eval_table_and_the_lineage():
    """A card from a lineage of Hub sources: the metadata the Hub renders, the eval table with the judge's 95%
    interval, the training configuration, the sources with the commits they resolved to."""
    from huggingface_hub import ModelCard

    from lexalign.core.lineage import model_card, wilson_interval

    def download(kind, repo_id, commit, **extra):
        return {"stage": "download", "config": {"kind": kind, "source": "hub", "repo_id": repo_id,
                                                 "revision": "main"}, "resolved_revision": commit, **extra}

    sft = {"stage": "finetune", "config": {"method": "lora", "lora_r": 16},
           "parents": {"model": download("model", "meta-llama/Llama-3.2-1B", "a1" * 20, license="llama3.2"),
                       "data": {"stage": "prepare_sft_data", "config": {},
                                "parents": {"data": download("sft_data", "HuggingFaceH4/ultrafeedback_binarized",
                                                             "b2" * 20)}}}}
    record = {"stage": "align", "title": "Aligned model (dpo, beta=0.1)", "versions": {"trl": "1.16.0"},
              "config": {"method": "dpo", "beta": 0.1, "loss_type": ["sigmoid"], "use_lora": True, "lora_r": 16,
                         "output_dir": "results/aligned", "report_to": []},
              "reference_model": {"path": "results/models/sft", "sft": True, "note": "the SFT model"},
              "parents": {"model": sft, "data": {"stage": "validate", "config": {}, "parents": {
                  "data": download("preference_data", "Anthropic/hh-rlhf", "c3" * 20)}}}}
    evaluation = {"pairs": 72, "beta": 0.1, "preference_accuracy": 1.0, "mean_margin": 1.5,
                  "logp_accuracy_policy": 0.9, "logp_accuracy_reference": 0.4, "kl_estimate": 0.25,
                  "generation": {"judge": "demo-polite-greeting", "decoding": "greedy", "prompts": 40,
                                 "sft_rate": 0.0, "aligned_rate": 1.0}}
    text = model_card(record, evaluation=evaluation)
    card = ModelCard(text)
    assert text.startswith("---\nlibrary_name: transformers\n")
    assert card.data.base_model == "meta-llama/Llama-3.2-1B" and card.data.license == "llama3.2"
    assert card.data.datasets == ["HuggingFaceH4/ultrafeedback_binarized", "Anthropic/hh-rlhf"]
    assert {"lexalign", "dpo", "trl", "lora"} <= set(card.data.tags) and card.data.pipeline_tag == "text-generation"
    assert yaml.safe_load(text.split("---")[1])["base_model_relation"] == "finetune"
    low, high = wilson_interval(1.0, 40)
    assert round(100 * low, 1) == 91.2 and high == 1.0
    assert "| judged wanted behaviour (demo-polite-greeting, greedy decoding, 40 prompts; 95% interval) | " \
           "0.0% [0.0, 8.8] | 100.0% [91.2, 100.0] |" in text
    assert "| preference accuracy (implicit reward ranks chosen above rejected) | — | 1.000 |" in text
    assert "| KL(aligned ‖ SFT model) per prompt, nats | 0 | 0.250 |" in text
    assert "| beta | 0.1 |" in text and "| loss_type | sigmoid |" in text and "output_dir" not in text
    for kind, repo, commit in (("model", "meta-llama/Llama-3.2-1B", "a1"), ("sft_data", "HuggingFaceH4/"
                               "ultrafeedback_binarized", "b2"), ("preference_data", "Anthropic/hh-rlhf", "c3")):
        assert f"| hub | {kind} | {repo} | main | {commit * 20} |" in text
    assert "# Aligned model (dpo, beta=0.1)" in text


@pytest.mark.slow
def test_the_publish_rule_runs_only_when_a_repo_is_set(demo_run, hub, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(demo_run, workdir, symlinks=True)
    hub.tokens.add(PLANTED_TOKEN)
    # Without a repo there is no publish job (test_architecture: the demo run is "Nothing to be done").
    edit_config(workdir, "publish", "repo_id", REPO_ID)
    result = snakemake(workdir, "--cores", "1", env=hub_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert planned_jobs(result.stdout + result.stderr) == {"publish": 1, "all": 1}
    published = json.loads((workdir / "results/published.json").read_text())
    repo = hub.repos[("model", REPO_ID)]
    assert published["commit"] == repo.refs["main"] and published["repo_id"] == REPO_ID
    assert set(repo.commits[repo.refs["main"]]) == UPLOADED and not published["private"]
    assert "| judged wanted behaviour" in card_of(repo.commits[repo.refs["main"]]).text
    leaked = [p for p in files_under(workdir) if (workdir / p).is_file()
              and PLANTED_TOKEN.encode() in (workdir / p).read_bytes()]
    assert not leaked and PLANTED_TOKEN not in result.stdout + result.stderr


def test_the_base_models_license_is_recorded_at_download(tmp_path, hub, cli):
    """Where the card's `license` comes from: the base model's own card, read when it is downloaded."""
    hub.add_repo("acme/licensed", {"config.json": "{}", "model.safetensors": b"\0" * 64,
                                   "README.md": "---\nlicense: apache-2.0\ntags: [base]\n---\n# A base model\n"})
    rc, _, err = cli({"models": [{"name": "base", "source": "hub", "repo_id": "acme/licensed", "output": "base"}]})
    assert rc == 0, err
    lineage = json.loads((tmp_path / "base/lineage.json").read_text())
    assert lineage["license"] == "apache-2.0"
    from lexalign.core.lineage import card_metadata

    child = {"stage": "align", "config": {"method": "gdpo"}, "parents": {"model": lineage}}
    assert card_metadata(child) | {"tags": None} == {
        "library_name": "transformers", "pipeline_tag": "text-generation", "base_model": "acme/licensed",
        "base_model_relation": "finetune", "license": "apache-2.0", "tags": None}
    assert "gdpo" in card_metadata(child)["tags"]
