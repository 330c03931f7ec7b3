"""The shape of the code: one hop from a rule to its step, derived code inputs, one source of truth for
configuration, no import cycles, tests that share builders instead of importing each other."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import re
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from lexalign import steps
from lexalign.config import sections
from lexalign.config.loader import SCHEMA_PATH, _resolve
from lexalign.core.errors import LexAlignError
from lexalign.methods import METHOD_KEYS
from lexalign.pipeline import code_inputs
from lexalign.pipeline.rules import STEP_OF_RULE
from workflow import snakemake

PACKAGE = REPO / "lexalign"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The lexalign modules a file imports, anywhere in it (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        found |= set(code_inputs._imported(node, PACKAGE).values())
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles = []

    def visit(node, stack):
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in done:
            return
        for other in sorted(graph.get(node, ())):
            visit(other, stack + [node])
        done.add(node)

    done: set[str] = set()
    for node in sorted(graph):
        visit(node, [])
    return cycles


def test_no_import_cycles():
    graph = {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}
    cycles = _cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" → ".join(c) for c in cycles)


def test_no_folder_imports_a_folder_that_imports_it_back():
    """Folder by folder (lexalign/data, lexalign/train, ...; a top-level module is its own): no cycle either."""
    def folder(module: str) -> str:
        return ".".join(module.split(".")[:2])

    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        module = _module_name(path)
        graph.setdefault(folder(module), set()).update(
            folder(other) for other in _imports(path) if folder(other) not in (folder(module), "lexalign"))
    cycles = _cycles(graph)
    assert not cycles, "folder cycles: " + "; ".join(" → ".join(c) for c in cycles)


def test_no_two_modules_share_a_name():
    """A module's name says where it is: no `stages.py` in two folders (package folders count as modules)."""
    names: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = path.parent.name if path.name == "__init__.py" else path.stem
        if path.parent != PACKAGE or path.name != "__init__.py":
            names.setdefault(name, []).append(str(path.relative_to(REPO)))
    shared = {name: paths for name, paths in names.items() if len(paths) > 1}
    assert not shared, shared


def test_the_package_top_level_is_short():
    """A newcomer reads the architecture from `ls lexalign` (docs/architecture.md): about 16 entries at most."""
    entries = [p.name for p in PACKAGE.iterdir() if p.name not in ("__pycache__", "_workflow")]
    assert len(entries) <= 16, sorted(entries)


def test_no_test_module_imports_another():
    offenders = []
    for path in (REPO / "tests").glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name} imports {n}" for n in names if n.split(".")[0].startswith("test_")]
    assert not offenders, offenders


# --- one hop from a rule to its step --------------------------------------------------------------


def _rule_fields() -> dict[str, set[str]]:
    """Each rule's named input, output and params keys, read from rules/*.smk (with `use rule … with:`)."""
    fields: dict[str, dict[str, set[str]]] = {}
    for path in (REPO / "rules").glob("*.smk"):
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"^(?:rule (\w+)|use rule (\w+) as (\w+) with):\n((?:    .*\n|\n)+)", text, re.M):
            name = match.group(1) or match.group(3)
            body = match.group(4)
            sections = dict(fields.get(match.group(2), {})) if match.group(2) else {}
            for section in ("input", "output", "params"):
                block = re.search(rf"^    {section}:\n((?:        .*\n|\n)+)", body, re.M)
                if block:
                    sections[section] = set(re.findall(r"^        (\w+)=", block.group(1), re.M))
            fields[name] = sections
    return {rule: s.get("input", set()) | s.get("output", set()) | s.get("params", set()) for rule, s in fields.items()
            if rule in STEP_OF_RULE}


def test_every_rule_passes_its_step_exactly_its_arguments():
    rules = _rule_fields()
    assert set(rules) == set(STEP_OF_RULE), "a rule without a step, or a step without a rule"
    for rule, names in rules.items():
        step = steps.step_function(STEP_OF_RULE[rule])
        parameters = inspect.signature(step).parameters
        assert all(p.kind is p.KEYWORD_ONLY for p in parameters.values()), f"{step.__name__}: keyword-only"
        given = names - {"code"}
        required = {n for n, p in parameters.items() if p.default is p.empty}
        assert given <= set(parameters), f"{rule} passes {given - set(parameters)} that {step.__name__} lacks"
        assert required <= given, f"{rule} misses {required - given} that {step.__name__} needs"


def test_a_step_called_with_a_wrong_name_is_refused():
    with pytest.raises(LexAlignError, match="wrong arguments") as err:
        steps.run("evaluate", aligned="a", reference="r", data="d", output="o", evaluate={}, beta=0.1, bta=1)
    assert "Unknown: bta" in err.value.render()


# --- code inputs derived from the import closure --------------------------------------------------


def _planned(output: str) -> dict[str, str]:
    """rule → its reason, from a dry run's job blocks."""
    jobs = {}
    for block in re.split(r"\n(?=rule \w+:)", output):
        match = re.match(r"rule (\w+):", block)
        reason = re.search(r"reason: (.*)", block)
        if match and reason:
            jobs[match.group(1)] = jobs.get(match.group(1), "") + reason.group(1)
    return jobs


def _rule_graph(workdir) -> dict[str, set[str]]:
    """rule → the rules that read its outputs, from `snakemake --rulegraph`."""
    dot = snakemake(workdir, "--rulegraph").stdout
    names = dict(re.findall(r'^\s*(\d+)\[label = "(\w+)"', dot, re.M))
    graph: dict[str, set[str]] = {name: set() for name in names.values()}
    for source, target in re.findall(r"^\s*(\d+) -> (\d+)", dot, re.M):
        graph[names[source]].add(names[target])
    return graph


def _downstream(rules: set[str], graph: dict[str, set[str]]) -> set[str]:
    out, todo = set(rules), list(rules)
    while todo:
        for after in graph.get(todo.pop(), ()):
            if after not in out:
                out.add(after)
                todo.append(after)
    return out


@pytest.mark.slow
def test_editing_a_module_reruns_exactly_the_steps_that_can_run_it(demo_run):
    """Edit each module (one per distinct set of steps that can run it), dry-run, and compare: the rules that
    rerun are those whose step's closure holds the module, and the rules that read their outputs; no other.
    (A rule downstream of a rerun reports only that reason, so the rule graph accounts for those.)"""
    closures = {rule: {str(p.relative_to(REPO)) for p in code_inputs.step_sources(step, PACKAGE)}
                for rule, step in STEP_OF_RULE.items()}
    graph = _rule_graph(demo_run)
    modules = sorted(str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py"))
    groups: dict[frozenset, str] = {}
    for module in modules:
        groups.setdefault(frozenset(r for r, files in closures.items() if module in files), module)
    assert frozenset() in groups, "some module should be in no step (the CLI)"
    assert len(groups) >= 6
    for rules, module in groups.items():
        path = demo_run / module
        original, stat = path.read_bytes(), path.stat()
        path.write_bytes(original + b"\n# edited\n")  # Snakemake compares checksums: a new mtime alone is not enough
        try:
            result = snakemake(demo_run, "-n")
        finally:
            path.write_bytes(original)
            os.utime(path, (stat.st_atime, stat.st_mtime))
        assert result.returncode == 0, result.stderr[-2000:]
        planned = set(_planned(result.stdout)) - {"all"}
        expected = _downstream(rules & set(graph), graph) - {"all"}
        assert planned == expected, f"{module}: planned {sorted(planned)}, its steps and readers {sorted(expected)}"
        for rule, reason in _planned(result.stdout).items():
            if rule in rules and not graph_upstream_planned(rule, planned, graph):
                assert module in reason, (module, rule, reason)
    assert "Nothing to be done" in snakemake(demo_run, "-n").stdout


def graph_upstream_planned(rule: str, planned: set[str], graph: dict[str, set[str]]) -> bool:
    return any(rule in after and before in planned for before, after in graph.items())


def test_the_closure_follows_imports_inside_functions():
    align = {str(p.relative_to(PACKAGE)) for p in code_inputs.step_sources("align", PACKAGE)}
    evaluate = {str(p.relative_to(PACKAGE)) for p in code_inputs.step_sources("evaluate", PACKAGE)}
    # Imported inside functions only: the trainer (the align step), the model loader (evaluate → models).
    assert {"train/align.py", "train/ranked_trainer.py", "methods/gdpo.py", "models/loading.py", "core/tokens.py",
            "pipeline/rules.py", "steps/training.py"} <= align
    assert {"evaluation/figures.py", "models/loading.py", "core/tokens.py", "demo/task.py",
            "steps/results.py"} <= evaluate
    assert "train/align.py" not in evaluate and "evaluation/report.py" not in align and "cli.py" not in align
    # A step's code is its own phase's module, not the others'.
    assert "steps/results.py" not in align and "steps/training.py" not in evaluate


# --- one source of truth for configuration --------------------------------------------------------


SCHEMA = yaml.safe_load(SCHEMA_PATH.read_text(encoding="utf-8"))
# Every config class built from a schema section (its SECTION), found rather than listed.
CLASSES = [cls for cls in vars(sections).values()
           if isinstance(cls, type) and dataclasses.is_dataclass(cls) and getattr(cls, "SECTION", None)]


def test_every_schema_key_has_a_description():
    undescribed = [f"{name}.{key}" for name, section in SCHEMA["$defs"].items()
                   for key, value in (section.get("properties") or {}).items()
                   if "description" not in value and "$ref" not in value]
    assert not undescribed, undescribed


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_dataclass_defaults_are_the_schemas(cls):
    properties = SCHEMA["$defs"][cls.SECTION]["properties"]
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "method_keys"}
    # AlignConfig holds the methods' own keys in `method_keys` (lexalign.methods): their defaults are the schema's.
    own = set(METHOD_KEYS) if cls is sections.AlignConfig else set()
    assert set(fields) | own == set(properties), f"{cls.__name__} vs schema {cls.SECTION}"
    if own:
        assert sections.AlignConfig.from_dict({}).method_keys == {
            key: _resolve(properties[key], SCHEMA).get("default") for key in own} | {"loss_type": ["sigmoid"]}
    for name, field in fields.items():
        schema_default = _resolve(properties[name], SCHEMA).get("default")
        if field.default is not dataclasses.MISSING:
            assert field.default == schema_default, f"{cls.SECTION}.{name}"
        elif field.default_factory is not dataclasses.MISSING:  # pragma: no cover - none today
            assert field.default_factory() == schema_default, f"{cls.SECTION}.{name}"


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_from_dict_refuses_unknown_keys(cls):
    with pytest.raises(LexAlignError, match="Unknown key"):
        cls.from_dict({"path": "x", "no_such_key": 1})


def test_from_dict_fills_defaults_and_holds_bounds_from_the_schema():
    cfg = sections.AlignConfig.from_dict({"beta": "0.2"})
    schema = SCHEMA["$defs"]["alignment"]["properties"]
    assert cfg.beta == 0.2 and cfg.learning_rate == schema["learning_rate"]["default"]
    with pytest.raises(LexAlignError, match=r"group_delay_size must be >= 2 \(got: 1\)"):
        sections.AlignConfig.from_dict({"group_delay_size": 1})


def test_the_cli_evaluate_defaults_are_the_schemas():
    from lexalign.cli import evaluate

    defaults = {p.name: p.default for p in evaluate.params}
    schema = SCHEMA["$defs"]["evaluate"]["properties"]
    assert defaults["num_prompts"] == schema["num_prompts"]["default"]
    assert defaults["judge"] == schema["judge"]["default"]


# --- from a rule to the loss -------------------------------------------------------------------------------


def _calls_to(function: str, smk) -> list[str]:
    """The frames on the stack when `function` (a loss of lexalign.methods) is first called while `run_rule(smk)`
    runs, from run_rule down: `file:function` each."""
    import sys

    from lexalign.pipeline.rules import run_rule

    seen: list[str] = []

    def profile(frame, event, arg):
        if event == "call" and not seen and frame.f_code.co_name == function \
                and "lexalign/methods/" in frame.f_code.co_filename:
            current = frame
            while current is not None:
                seen.append(f"{Path(current.f_code.co_filename).name}:{current.f_code.co_name}")
                if current.f_code.co_name == "run_rule":
                    break
                current = current.f_back
            seen.reverse()
            sys.setprofile(None)

    sys.setprofile(profile)
    try:
        run_rule(smk)
    finally:
        sys.setprofile(None)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("method, loss", [("gdpo", "gdpo"), ("simpo", "simpo")])
def test_from_a_rule_to_the_loss_is_at_most_ten_calls(method, loss, sft_model_dir, tmp_path):
    """The align rule's script calls run_rule; from there to the method's loss (the pure function the registry
    names) is at most 9 more calls, transformers' and TRL's training loop included (docs/architecture.md)."""
    from types import SimpleNamespace

    import pandas as pd

    from lexalign.demo import task
    from lexalign.steps import inputs

    raw = tmp_path / "raw" / "train.jsonl"
    raw.parent.mkdir()
    pd.DataFrame(task.ranked_rows(0, 16)).to_json(raw, orient="records", lines=True)
    data = tmp_path / "data"
    inputs.validate(raw=raw, tokenizer=sft_model_dir, output=data,
                    dataset={"path": str(raw), "max_length": 64, **({"group_size": 4} if method == "gdpo" else {})})
    alignment = {"method": method, "max_steps": 1, "batch_size": 4, "max_length": 64, "logging_steps": 1,
                 "save_steps": 100, "warmup_steps": 0, "gradient_accumulation_steps": 1}
    items = lambda mapping: SimpleNamespace(items=mapping.items)  # noqa: E731 - Snakemake's named lists
    smk = SimpleNamespace(rule="align", input=items({"model": str(sft_model_dir), "data": str(data)}),
                          output=items({"output": str(tmp_path / "aligned")}), log=[], resources=None, threads=1,
                          params=items({"alignment": alignment, "checkpoint_dir": str(tmp_path / "checkpoints"),
                                        "device": "cpu"}))
    stack = _calls_to(loss, smk)
    assert stack and stack[-1].endswith(f":{loss}"), stack
    # scripts/step.py → run_rule is the first call; each frame after run_rule is one more.
    assert stack[0] == "rules.py:run_rule" and len(stack) <= 10, " → ".join(stack)
    assert (tmp_path / "aligned" / "model.safetensors").is_file()
