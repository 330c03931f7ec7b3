"""Layered imports: a module imports only from its own layer or below, function-level imports included.

Read with `ast` (never imported), as `lexalign.pipeline.code_inputs` reads them: an upward import makes a cheap edit
rerun an expensive step (the reference step's code inputs once held the GDPO trainer and every loss)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lexalign"

LAYERS = [
    # 0. Words, plain helpers and pure functions: errors, atomic files, lineage, the tokenization rule (lexalign.core);
    #    the method registry and its losses (lexalign.methods); the demo's task and model. No dataset is read here.
    ["lexalign", "lexalign.core", "lexalign.methods", "lexalign.demo"],
    # 1. Configs, checked against the schema.
    ["lexalign.config"],
    # 2. Data and where it comes from: reading and validating datasets, the Hub, local and demo sources.
    ["lexalign.data", "lexalign.hub"],
    # 3. Models and the numerics on them: loading, kernels, the lean head, packing.
    ["lexalign.models"],
    # 4. Passes over a model: the reference log-probs; sampling, judging and selecting completions.
    ["lexalign.reference", "lexalign.generation"],
    # 5. Training and evaluating a model.
    ["lexalign.train", "lexalign.evaluation"],
    # 6. One function per pipeline step.
    ["lexalign.steps"],
    # 7. Entry points: the command line, and the Snakemake-facing layer (a rule's step, planning, init, launch).
    ["lexalign.cli", "lexalign.pipeline"],
]


def layer_of(module: str) -> int:
    """The layer of the longest prefix that names `module` (a package's layer covers its modules)."""
    best = None
    for level, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best[1])):
                best = (level, name)
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_layers.py: add it to one")
    return best[0]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every lexalign import in the file, anywhere in it."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "lexalign"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lexalign":
            for alias in node.names:  # `from lexalign import reference` imports the module lexalign.reference
                sub = f"{node.module}.{alias.name}"
                is_module = (ROOT.parent / Path(*sub.split("."))).with_suffix(".py").is_file() or \
                    (ROOT.parent / Path(*sub.split(".")) / "__init__.py").is_file()
                found.append((node.lineno, sub if is_module else node.module))
    return found


SOURCES = sorted(ROOT.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_no_module_imports_from_a_layer_above_its_own(path):
    module = module_name(path)
    level = layer_of(module)
    upward = [f"line {line}: {target} (layer {layer_of(target)})" for line, target in imports(path)
              if target != "lexalign" and layer_of(target) > level]
    assert not upward, f"{module} (layer {level}) imports from above: " + "; ".join(upward)


def test_the_layer_check_sees_function_level_imports(tmp_path):
    """The check can fail: an import inside a function is found, and placed by its layer."""
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from lexalign.train.ranked_trainer import ranked_dataset\n"
                      "    from lexalign import reference\n")
    assert imports(source) == [(2, "lexalign.train.ranked_trainer"), (3, "lexalign.reference")]
    assert layer_of("lexalign.train.ranked_trainer") > layer_of("lexalign.models.loading") > layer_of("lexalign.config")


def test_the_reference_step_runs_no_trainer_or_loss():
    """Editing a loss or a trainer reruns align jobs only: none is among the reference step's code inputs."""
    from lexalign.pipeline.code_inputs import step_sources

    files = [str(p.relative_to(ROOT)) for p in step_sources("reference", ROOT)]
    assert files and not [f for f in files if f.startswith(("train/", "losses/"))], files
    assert "reference/scoring.py" in files and "methods/__init__.py" in files


def test_benchmarks_import_nothing_from_the_tests():
    """What a benchmark shares with the tests lives in lexalign (or benchmarks/common.py), never in tests/."""
    repo = ROOT.parent
    test_modules = {p.stem for p in (repo / "tests").glob("*.py")}
    offenders = []
    for path in sorted((repo / "benchmarks").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(text)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            offenders += [f"{path.name} imports {n}" for n in names if n.split(".")[0] in test_modules | {"tests"}]
        if '"tests"' in text or "'tests'" in text:
            offenders.append(f"{path.name} names the tests folder")
    assert not offenders, offenders


def test_planning_reads_the_methods_and_reference_names_without_heavy_imports():
    """Snakemake imports these when it parses the workflow: no pandas, numpy, pyarrow or torch behind them."""
    import subprocess
    import sys

    probe = ("import sys, lexalign.methods, lexalign.reference.layout, lexalign.config.loader; "
             "print(sorted(m for m in ('pandas', 'numpy', 'pyarrow', 'torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
