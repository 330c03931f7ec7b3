"""Nothing lost, no traceback (#34): `lexalign init` and the online rounds' inputs, tried as a new user would.

Each test is a user's action and what they must see: the file, key or row named, what was found and what was
expected, the command that fixes it; no traceback; nothing of theirs replaced or half-written.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lexalign.pipeline.project import MANIFEST, NEW_SUFFIX
from workflow import copy_workflow, planned_jobs, snakemake

LEXALIGN = str(Path(sys.executable).parent / "lexalign")


def lexalign(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([LEXALIGN, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


# --- lexalign init --force keeps what the user changed -----------------------------------------------------

EDITED = ["Snakefile", "README.md", "profiles/default/config.yaml", "profiles/slurm/config.yaml",
          "config/accelerate/ddp.yaml", "config/config.yaml"]


def test_init_force_keeps_every_file_the_user_changed_and_writes_lexaligns_beside_it(tmp_path):
    target = tmp_path / "project"
    assert lexalign("init", str(target)).returncode == 0
    pristine = {relative: (target / relative).read_text() for relative in EDITED}
    for relative in EDITED:  # e.g. the user's SLURM account, their own cores setting
        (target / relative).write_text(pristine[relative] + "\n# mine: slurm_account=lab42\n")
    forced = lexalign("init", str(target), "--example", "gdpo", "--force")
    assert forced.returncode == 0 and "Traceback" not in forced.stderr, forced.stderr
    for relative in EDITED:
        assert (target / relative).read_text().endswith("# mine: slurm_account=lab42\n"), f"{relative} replaced"
        beside = "config/config.gdpo.yaml" if relative == "config/config.yaml" else relative + NEW_SUFFIX
        assert f"{target}/{relative} was kept" in forced.stderr and beside in forced.stderr, relative
        assert (target / beside).is_file(), beside
    assert (target / ("profiles/slurm/config.yaml" + NEW_SUFFIX)).read_text() == pristine["profiles/slurm/config.yaml"]
    # A file nobody edited is LexAlign's: written again in place, nothing beside it.
    assert (target / "config/accelerate/fsdp.yaml").is_file()
    assert not (target / ("config/accelerate/fsdp.yaml" + NEW_SUFFIX)).exists()
    # A second --force keeps the user's files again, and says so for each.
    again = lexalign("init", str(target), "--example", "gdpo", "--force")
    assert again.returncode == 0 and again.stderr.count("was kept") == len(EDITED)


def test_init_force_replaces_a_file_lexalign_wrote_and_nobody_edited(tmp_path):
    """The manifest tells LexAlign's own files (a newer LexAlign may write them anew) from the user's."""
    from lexalign.pipeline import project

    target = tmp_path / "project"
    project.init_project(target)
    recorded = json.loads((target / MANIFEST).read_text())
    assert set(project.project_files("demo", "project")) <= set(recorded)
    # An older LexAlign's README, unedited: the manifest holds its hash, so init replaces it with today's.
    older = "# written by an older LexAlign\n"
    (target / "README.md").write_text(older)
    (target / MANIFEST).write_text(json.dumps({**recorded, "README.md": project._digest(older)}))
    done = project.init_project(target, force=True)
    assert "README.md" in done.written and not done.kept
    assert (target / "README.md").read_text() == project.project_files("demo", "project")["README.md"]
    assert not (target / ("README.md" + NEW_SUFFIX)).exists()


@contextlib.contextmanager
def read_only_folder(path: Path):
    """`path` as a read-only file system (a tmpfs mounted ro): even root cannot write there."""
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a read-only folder here (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.parametrize("where", ["read-only parent", "a file on the way", "read-only project"])
def test_init_into_a_folder_it_cannot_write_is_a_clear_error_and_writes_nothing(tmp_path, where):
    with contextlib.ExitStack() as stack:
        if where == "read-only parent":
            parent = stack.enter_context(read_only_folder(tmp_path / "ro"))
            target = parent / "project"
        elif where == "a file on the way":
            (tmp_path / "notes").write_text("a file")
            target = tmp_path / "notes" / "project"
        else:
            target = stack.enter_context(read_only_folder(tmp_path / "project"))
        result = lexalign("init", str(target), "--force")
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        if where == "a file on the way":
            assert f'"{tmp_path / "notes"}" is a file, not a folder' in result.stderr
        else:
            assert f'Cannot write the project into "{target}"' in result.stderr
            assert "Read-only file system" in result.stderr and "Choose a folder you can write to" in result.stderr
        leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or ".lexalign-init-" in p.name]
        assert not leftovers and not (target / "Snakefile").exists()


# --- every command the README shows is run by a test, or says what it needs ----------------------------------

README_COMMANDS = [
    # (a pattern the command matches, the test that runs it, or None and what it needs that this machine lacks)
    (r"^pip install torch==2\.13\.0$", "test_installed.py::test_the_installed_package_is_the_wheel_not_the_"
                                      "checkout"),
    (r"^pip wheel --no-deps -w dist \.$", "test_installed.py::test_the_installed_package_is_the_wheel_not_the_"
                                       "checkout"),
    (r'^pip install "dist/lexalign-.*\[eval\]"$',
     "test_installed.py::test_the_demo_runs_to_its_report_in_the_users_folder"),
    (r"^pip install --force-reinstall --no-deps dist/lexalign-\*\.whl$",
     "test_installed.py::test_an_upgrade_reruns_exactly_the_steps_whose_code_changed"),
    (r"^pip install (-U lexalign|\"lexalign\[eval\]\"|'lexalign\[tracking\]')$", None,
     "LexAlign on PyPI: not published yet (the README says so and shows the wheel)"),
    (r"^pip install$", None, "a word in a sentence, not a command"),
    (r"^pip install snakemake-executor-plugin-slurm$", "test_multinode.py::test_the_job_spans_both_nodes"),
    (r"^lexalign init( |$)", "test_project.py::test_init_writes_a_project_that_plans_the_example"),
    # fetch smollm2 fetches what mtbench and punkt fetch too
    (r"^lexalign fetch( |$)", "test_smollm2.py::test_the_gguf_becomes_a_model_folder_that_answers_correctly"),
    (r"^lexalign init smol --example smollm2 && cd smol$",
     "test_smollm2.py::test_the_example_plans_one_round_without_preference_data_or_an_sft_step"),
    (r"^lexalign workflow-path", "test_project.py::test_workflow_path_prints_the_snakefile_this_lexalign_runs"),
    (r"^lexalign (finetune|align|evaluate)( |$)", "test_cli.py::test_finetune_then_align_then_evaluate_from_the_cli"),
    (r"^lexalign validate( |$)", "test_cli.py::test_validate_writes_the_four_outputs"),
    (r"^lexalign download ", "test_download_sources.py::test_example_downloads_config_is_valid"),
    (r"^lexalign push ", "test_publish.py::test_push_is_one_commit_of_weights_tokenizer_generation_config_and_a_card_"
                         "the_hub_renders"),
    (r"^(cd my-align && )?snakemake --cores [12]$",
     "test_installed.py::test_the_demo_runs_to_its_report_in_the_users_folder"),
    (r"^snakemake --cores 1 results/aligned$", "test_pipeline.py::test_second_run_does_nothing"),
    (r"^snakemake -n$", "test_pipeline.py::test_dry_run_plans_the_whole_dag"),
    (r"^snakemake -n sweep$", "test_pipeline.py::test_adding_a_sweep_run_schedules_only_that_run"),
    (r"^snakemake --report$", "test_pipeline.py::test_snakemake_report_includes_the_plots"),
    (r"^snakemake --cores 2 results/online/final --configfile config/examples/online\.yaml$",
     "test_online_rounds.py::test_the_demo_rounds_end_to_end"),
    (r"^snakemake --workflow-profile profiles/slurm", "test_multinode.py::test_the_job_spans_both_nodes"),
    (r"^snakemake (--sdm conda|--containerize > Dockerfile)$", None,
     "conda and a conda channel, which this machine cannot reach (the env files are checked instead)"),
    (r"^snakedeploy deploy-workflow /path/to/lexalign ",
     "test_project.py::test_snakedeploy_from_a_local_clone_plans_the_demo_and_lints_clean"),
    (r"^snakedeploy deploy-workflow https://github\.com/", None, "a published release (the README says so)"),
    (r"^export (MLFLOW_TRACKING_URI|WANDB_MODE)=",
     "test_tracking.py::test_mlflow_holds_both_runs_side_by_side_with_params_metrics_and_the_evaluation"),
    (r"^hf auth login$", None, "a Hugging Face account (the Hub tests use a local server and HF_TOKEN)"),
    (r"^accelerate launch$", "test_multiprocess.py::test_launch_command_uses_torchrun_or_the_named_config"),
    (r"^make (test|test TEST_WORKERS=0)$", None, "nothing: it is CI (.ci/run runs make test)"),
    (r"^make (demo|report|lint|dag)$", "test_user_inputs.py::test_the_makefile_targets_the_readme_shows_are_there"),
    (r"^(source \.venv/bin/activate|\.venv/bin/pytest -m \"not slow\")$", None,
     "nothing: developer commands of a checkout (make test runs the same suite)"),
]


def readme_commands() -> set[str]:
    """Every command the README shows: the lines of its bash blocks and its inline commands."""
    import re

    from conftest import REPO

    text = (REPO / "README.md").read_text(encoding="utf-8")
    found = set()
    for language, body in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
        if language in ("bash", "sh"):
            found |= {line.split("  #")[0].strip() for line in body.splitlines()
                      if line.strip() and not line.strip().startswith("#")}
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`]+)`", prose):
        command = " ".join(span.split())
        if re.match(r"^(lexalign|snakemake|pip|make|snakedeploy|accelerate|export|hf|source|cd|\.venv/bin/\w+) \S",
                    command):
            found.add(command)
    return found


def test_every_command_the_readme_shows_is_run_by_a_test_or_says_what_it_needs():
    import re

    from conftest import REPO

    uncovered = [c for c in sorted(readme_commands()) if not any(re.search(p, c) for p, *_ in README_COMMANDS)]
    assert not uncovered, f"README commands no test runs: {uncovered} (run each in a test, or say what it needs)"
    for pattern, test, *why in README_COMMANDS:
        if test is None:
            assert why and why[0], pattern
            continue
        file, name = test.split("::")
        assert f"def {name}(" in (REPO / "tests" / file).read_text(encoding="utf-8"), test


def test_the_makefile_targets_the_readme_shows_are_there():
    """`make demo`, `make report`, `make lint`, `make dag`: each target exists and runs what the README says
    (make -n prints the commands without running them)."""
    from conftest import REPO

    for target, expected in (("demo", "snakemake --cores 1 results/aligned"), ("report", "--report"),
                             ("lint", "snakemake --lint"), ("dag", "--dag")):
        done = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and expected in done.stdout, (target, done.stdout, done.stderr)


# --- online.prompts.path: read and checked like preference data -------------------------------------------------


@pytest.fixture(scope="module")
def online_copy(tmp_path_factory):
    """A workflow copy whose config runs the online example's rounds from a prompt file (online.prompts.path)."""
    workdir = copy_workflow(tmp_path_factory.mktemp("online-prompts"))
    config = yaml.safe_load((workdir / "config/examples/online.yaml").read_text())
    config["online"]["prompts"] = {"from": "path", "path": "prompts.jsonl", "held_out": 0}
    (workdir / "config/config.yaml").write_text(yaml.safe_dump(config))
    (workdir / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Greet person {i}."}) + "\n"
                                                   for i in range(8)))
    return workdir


def prompts_step(workdir: Path, name: str, text: str | bytes, field: str = "prompt") -> subprocess.CompletedProcess:
    """Write the prompt file `name` and run the rounds' prompts step on it through Snakemake."""
    path = workdir / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text)
    config = yaml.safe_load((workdir / "config/config.yaml").read_text())
    config["online"]["prompts"].update(path=name, prompt_field=field)
    (workdir / "config/config.yaml").write_text(yaml.safe_dump(config))
    (workdir / "results/online/prompts.json").unlink(missing_ok=True)
    return snakemake(workdir, "--cores", "1", "results/online/prompts.json")


def _said(done) -> str:
    out = done.stdout + done.stderr
    assert "Traceback" not in out, out[-3000:]
    return out


@pytest.mark.slow
def test_a_missing_prompt_file_a_folder_without_data_or_an_unknown_format_stop_the_plan(online_copy):
    for name, make, expected in (
            ("absent.jsonl", None, 'Dataset not found at "absent.jsonl" (online.prompts.path)'),
            ("empty-folder", "folder", "(online.prompts.path)"),
            ("prompts.txt", "Tell me a joke.\n", "prompts.txt"),
    ):
        path = online_copy / name
        if make == "folder":
            path.mkdir(exist_ok=True)
        elif make:
            path.write_text(make)
        config = yaml.safe_load((online_copy / "config/config.yaml").read_text())
        config["online"]["prompts"]["path"] = name
        (online_copy / "config/config.yaml").write_text(yaml.safe_dump(config))
        plan = snakemake(online_copy, "-n", "results/online/prompts.json")
        out = _said(plan)
        assert plan.returncode != 0 and expected in out, (name, out[-2000:])
        assert "MissingInputException" not in out


@pytest.mark.slow
def test_prompt_files_in_every_format_and_their_bad_rows(online_copy):
    import gzip

    import pandas as pd

    good = [{"prompt": f"Greet person {i}.", "instruction_id_list": ["punctuation:no_comma"]} for i in range(5)]
    jsonl = "".join(json.dumps(row) + "\n" for row in good)
    # JSON Lines, compressed JSON Lines, JSON, CSV and Parquet, and a folder holding a train split: all read.
    (online_copy / "folder").mkdir(exist_ok=True)
    (online_copy / "folder" / "train.jsonl").write_text(jsonl)
    pd.DataFrame({"prompt": [row["prompt"] for row in good]}).to_parquet(online_copy / "prompts.parquet")
    for name, text in (("prompts.jsonl", jsonl), ("prompts.jsonl.gz", gzip.compress(jsonl.encode())),
                       ("prompts.json", json.dumps(good)), ("prompts.csv", "prompt,n\n" + "".join(
                           f'"{row["prompt"]}",{i}\n' for i, row in enumerate(good))),
                       ("prompts.parquet", None), ("folder", None)):
        done = prompts_step(online_copy, name, text)
        assert done.returncode == 0, _said(done)[-3000:]
        written = json.loads((online_copy / "results/online/prompts.json").read_text())
        assert sorted(written["prompts"]) == sorted(row["prompt"] for row in good), name
    # The other fields of a row travel with its prompt, for the judges that read them (IFEval's instructions).
    # Keyed by the prompt as a judge reads it (sampling.question).
    done = prompts_step(online_copy, "prompts.jsonl", jsonl)
    fields = json.loads((online_copy / "results/online/prompts.json").read_text())["fields"]
    assert fields["Greet person 0."] == {"instruction_id_list": ["punctuation:no_comma"]}

    # Bad rows: rejected with a reason and counted, never sampled; the rest are the prompts.
    rows = [{"prompt": "Say hi."}, {"prompt": None}, {"prompt": ""}, {"prompt": "   "}, {"prompt": 42},
            {"question": "no prompt field"}, {"prompt": [{"role": "user", "content": "Hello"}]}]
    text = "".join(json.dumps(row) + "\n" for row in rows) + "{not json\n"
    done = prompts_step(online_copy, "prompts.jsonl", text)
    out = _said(done)
    assert done.returncode == 0, out[-3000:]
    written = json.loads((online_copy / "results/online/prompts.json").read_text())
    key = lambda prompt: json.dumps(prompt, sort_keys=True)  # noqa: E731 - the prompts' own order is seeded
    assert sorted(map(key, written["prompts"])) == sorted(map(key, ["Say hi.", [{"role": "user", "content": "Hello"}]]))
    assert written["rejected"] == {"null_prompt": 1, "empty_prompt": 2, "not_a_prompt": 1, "no_field": 1,
                                   "unparseable_json": 1}
    log = (online_copy / "logs/online/prompts.log").read_text()
    assert len(written["rejects"]) == 6 and "Warning: 6 rows of prompts.jsonl rejected" in log, log

    # A file with no usable prompt stops the step, and says what it holds.
    for name, text, field, expected in (
            ("prompts.jsonl", "", "prompt", 'The prompt file "prompts.jsonl" (online.prompts.path) has no rows'),
            ("prompts.jsonl", "{not json\n[1, 2\n", "prompt", "No usable prompt in"),
            ("prompts.csv", "question\nWhy?\n", "prompt", 'has no field "prompt" in any of its 1 rows'),
            ("prompts.jsonl", jsonl, "text", "Its fields: instruction_id_list, prompt"),
            ("prompts.jsonl", "".join(json.dumps({"prompt": v}) + "\n" for v in (None, "", 7)), "prompt",
             "all 3 rows rejected"),
    ):
        done = prompts_step(online_copy, name, text, field)
        out = _said(done)
        assert done.returncode != 0 and expected in out, (name, field, out[-2000:])


# --- online settings the plan must catch ------------------------------------------------------------------------


@pytest.mark.slow
def test_vllm_sampling_without_vllm_or_a_gpu_stops_the_dry_run(online_copy):
    """Not after download and SFT have run: the plan itself (this machine has neither vLLM nor a CUDA GPU)."""
    config = yaml.safe_load((online_copy / "config/config.yaml").read_text())
    config["online"]["sampling"]["engine"] = "vllm"
    (online_copy / "config/config.yaml").write_text(yaml.safe_dump(config))
    try:
        plan = snakemake(online_copy, "-n", "results/online/final")
    finally:
        config["online"]["sampling"]["engine"] = "hf"
        (online_copy / "config/config.yaml").write_text(yaml.safe_dump(config))
    out = _said(plan)
    assert plan.returncode != 0 and "online.sampling.engine is vllm, but vLLM is not installed here" in out, out
    assert "online.sampling.engine: hf" in out


def test_vllm_needs_a_cuda_gpu_where_the_jobs_run(monkeypatch):
    """With vLLM there (stood in by a spec), the machine's GPU decides, unless the jobs go to a cluster."""
    import importlib.util

    from lexalign.core.errors import LexAlignError
    from lexalign.pipeline.plan import check_machine

    config = {"device": "auto", "online": {"sampling": {"engine": "vllm"}}}
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a))
    with pytest.raises(LexAlignError, match="needs a CUDA GPU, and this machine has none"):
        check_machine(config, executor="local")
    check_machine(config, executor="slurm")  # the GPU nodes sample; the step checks again there
    with pytest.raises(LexAlignError, match='device is "cpu"'):
        check_machine({**config, "device": "cpu"}, executor="slurm")
    check_machine({"online": {"sampling": {"engine": "hf"}}}, executor="local")
    check_machine({"online": None}, executor="local")


@pytest.mark.slow
@pytest.mark.parametrize("online, expected", [
    ({}, None),
    (True, "Expected: the online section, a mapping (rounds, prompts, judge, ...), or nothing (the offline pipeline)"),
    ("yes", "Found: 'yes' (a string)"),
])
def test_the_online_sections_shapes_do_what_the_docs_say(tmp_path, online, expected):
    """Absent, null or {}: the offline pipeline; anything but a mapping: an error that says a mapping is wanted."""
    workdir = copy_workflow(tmp_path)
    config = yaml.safe_load((workdir / "config/config.yaml").read_text())
    (workdir / "config/config.yaml").write_text(yaml.safe_dump({**config, "online": online}))
    plan = snakemake(workdir, "-n")
    out = _said(plan)
    if expected is None:
        assert plan.returncode == 0, out[-2000:]
        assert not [rule for rule in planned_jobs(plan.stdout) if rule.startswith("online")], out[-2000:]
    else:
        assert plan.returncode != 0 and 'Invalid value for "online"' in out and expected in out, out[-2000:]
        assert "Expected: null" not in out


@pytest.mark.slow
def test_online_alignment_items_beyond_the_rounds_are_named_in_a_warning(online_copy):
    config = yaml.safe_load((online_copy / "config/config.yaml").read_text())
    original = config["online"]
    config["online"] = {**original, "rounds": 2, "alignment": [{"beta": 0.1}, {"beta": 0.2}, {"beta": 0.3}]}
    (online_copy / "config/config.yaml").write_text(yaml.safe_dump(config))
    (online_copy / "prompts.jsonl").write_text(json.dumps({"prompt": "Hi."}) + "\n")
    try:
        plan = snakemake(online_copy, "-n", "results/online/final")
    finally:
        config["online"] = original
        (online_copy / "config/config.yaml").write_text(yaml.safe_dump(config))
    out = _said(plan)
    assert plan.returncode == 0, out[-2000:]
    assert "online.alignment has 3 items and online.rounds is 2: online.alignment[2] will never be used" in out
