"""The source files a pipeline step can run: each rule's `code` input, derived rather than listed.

A step is a function of a module of `lexalign/steps/` (its phase: `PHASES` in
`lexalign/steps/__init__.py`). Its files are that module itself, the package
`__init__`s on the way, and the import closure of what the function uses: the
modules it imports (inside the function too), the modules behind the module's
module-level imports, and the helpers of its module it calls; then, for each of
those modules, every lexalign module it imports anywhere
(inside functions included), transitively. Editing any of these files reruns
the step, and only the steps whose closure holds the file.

Read with `ast`, never imported: Snakemake computes this for every rule when it
plans the DAG, and importing torch there would cost seconds.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

PACKAGE = "lexalign"
ROOT = Path(__file__).resolve().parents[1]


@cache
def _module_file(module: str, root: Path) -> Path | None:
    parts = module.split(".")[1:]
    path = root.joinpath(*parts)
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def _imported(node: ast.AST, root: Path) -> dict[str, str]:
    """{bound name: module} for one import statement, lexalign modules only."""
    out = {}
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name.split(".")[0] == PACKAGE:
                out[alias.asname or alias.name.split(".")[0]] = alias.name
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE and not node.level:
        for alias in node.names:
            sub = f"{node.module}.{alias.name}"
            out[alias.asname or alias.name] = sub if _module_file(sub, root) else node.module
    return out


@cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


# An import statement of a lexalign module, found in the text: `import lexalign…`, `from lexalign… import a, b`
# or the parenthesised form over several lines. Only these statements are parsed, never whole files: reading the
# ~60 modules' imports costs milliseconds, parsing every file ~0.5 s on each plan (tests/test_architecture.py
# checks that this finds exactly what a walk of each whole file's tree finds).
IMPORT_STATEMENT = re.compile(
    r"^[ \t]*(?:from[ \t]+lexalign(?:\.\w+)*[ \t]+import[ \t]+(?:\([^)]*\)|[^\n]*)|import[ \t]+lexalign[^\n]*)",
    re.MULTILINE)


TRIPLE_QUOTE = re.compile(r"\"\"\"|\'\'\'")


def _string_spans(text: str) -> list[tuple[int, int]]:
    """Where the triple-quoted strings are (docstrings, templates): an import written inside one is text. A
    statement inside a one-line string cannot start a line, so these are the only strings that matter."""
    spans, opened, kind = [], None, None
    for match in TRIPLE_QUOTE.finditer(text):
        if opened is None:
            opened, kind = match.start(), match.group()
        elif match.group() == kind:
            spans.append((opened, match.end()))
            opened = None
    return spans


# A call that resolves the method registry's references (lexalign.methods: "module:function", imported when a
# trainer is built) runs whatever they name: the module that makes one can run every module the registry names.
RESOLVES = re.compile(r"\.(?:trainer_setup|loss_function)\(")
REFERENCE = re.compile(r"[\"'](lexalign(?:\.\w+)+):\w+[\"']")


@cache
def _registry_references(root: Path) -> frozenset[str]:
    """The modules the method registry names by reference (its `setup` and `loss` of every method)."""
    text = _module_file(f"{PACKAGE}.methods", root).read_text(encoding="utf-8")
    return frozenset(match.group(1) for match in REFERENCE.finditer(text))


@cache
def _imports_of(path: Path, root: Path) -> frozenset[str]:
    """The lexalign modules one file imports, anywhere in it (inside functions too), and the ones it resolves from
    the method registry."""
    text = path.read_text(encoding="utf-8")
    spans = _string_spans(text)
    found: set[str] = set()
    for match in IMPORT_STATEMENT.finditer(text):
        if any(start < match.start() < end for start, end in spans):
            continue
        for node in ast.parse(match.group().strip()).body:
            found.update(_imported(node, root).values())
    if any(not any(start < match.start() < end for start, end in spans) for match in RESOLVES.finditer(text)):
        found |= _registry_references(root)
    return frozenset(found)


def module_closure(modules: set[str], root: Path = ROOT) -> set[str]:
    """Every lexalign module reachable from `modules` by imports anywhere in their source, with the packages
    that contain them."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b.c runs a and a.b
        path = _module_file(module, root)
        if path is not None:
            todo += _imports_of(path, root)
    return seen


def _called(node: ast.AST) -> set[str]:
    """Names called in a function (`helper(...)`), not merely read: a local `report` is not the report step."""
    return {n.func.id for n in ast.walk(node) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}


@cache
def step_module(step: str, root: Path = ROOT) -> str:
    """The module of lexalign.steps that defines `step` (its PHASES, read with `ast`)."""
    tree = _tree(root / "steps" / "__init__.py")
    phases = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                  and any(getattr(target, "id", None) == "PHASES" for target in node.targets))
    for phase, steps in phases.items():
        if step in steps:
            return f"{PACKAGE}.steps.{phase}"
    raise KeyError(f"lexalign.steps has no step {step!r}")


def step_modules(step: str, root: Path = ROOT) -> set[str]:
    """The lexalign modules the step function `step` can run."""
    module = step_module(step, root)
    tree = _tree(_module_file(module, root))
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    top_level = {}
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            top_level.update(_imported(node, root))
    # Importing the module runs its module-level imports; its functions' imports run only in the step that calls
    # them.
    modules = set(top_level.values())
    todo, done = [step], set()
    while todo:  # the step and the helpers of its module it calls
        name = todo.pop()
        if name in done:
            continue
        done.add(name)
        function = functions[name]
        used = _called(function)
        for node in ast.walk(function):
            modules |= set(_imported(node, root).values())
        todo += [other for other in functions if other in used and other not in done]
    return module_closure(modules, root) | {module}


BRIDGE = (f"{PACKAGE}.pipeline.rules", f"{PACKAGE}.pipeline.launch")
"""What every rule runs before its step (scripts/step.py → run_rule → the step, or accelerate launch)."""


def step_sources(step: str, root: Path = ROOT) -> list[Path]:
    """The source files of `step_modules` and of the bridge every rule runs, sorted."""
    files = {_module_file(module, root) for module in (*step_modules(step, root), *BRIDGE)}
    return sorted(f for f in files if f is not None)

