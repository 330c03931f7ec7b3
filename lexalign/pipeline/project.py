"""`lexalign init`: a project folder of the user's own.

A project holds the user's config, profiles and a Snakefile that uses the
installed workflow (lexalign.pipeline.workflow_files) through Snakemake's `module`
directive; results, logs and checkpoints land in the project, and no line of
LexAlign's code is copied there.
"""

from __future__ import annotations

from pathlib import Path

from lexalign.core.errors import LexAlignError
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
snakemake -n                          # what would run, and why
snakemake --cores 1 results/aligned   # download → finetune → validate → align
snakemake --cores 1                   # … evaluate and report (results/report.html)
```

Rerun it and only the stale steps run: a changed config value, a changed input file, or a LexAlign
upgrade that changed the code of a step. Results are in `results/`, logs in `logs/`, resumable
checkpoints in `results/checkpoints/`.
'''


def init_project(directory: str | Path, example: str = DEFAULT_EXAMPLE, force: bool = False) -> list[str]:
    """Write a ready project into `directory`; return what was written (relative paths), for the message.

    Refuses a non-empty folder unless `force`; even then an existing config/config.yaml is kept and the
    example's config is written beside it (config/config.<example>.yaml), never over it."""
    from lexalign.config.annotated import render_config
    from lexalign.config.loader import load_yaml

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
                                 "(your config/config.yaml is kept)")
    values = load_yaml(available[example])
    written = []

    def write(relative: str, text: str) -> None:
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(path)
        written.append(relative)

    config = render_config(values, title=f"LexAlign pipeline configuration: the `{example}` example.")
    existing = target / "config" / "config.yaml"
    if existing.is_file() and existing.read_text(encoding="utf-8") != config:
        write(f"config/config.{example}.yaml", config)
    else:
        write("config/config.yaml", config)
    write("Snakefile", PROJECT_SNAKEFILE)
    write("README.md", PROJECT_README.format(name=target.resolve().name, example=example))
    root = workflow_root()
    for folder in ("profiles", "config/accelerate"):
        for source in sorted((root / folder).rglob("*")):
            if source.is_file() and "__pycache__" not in source.parts:
                write(str(source.relative_to(root)), source.read_text(encoding="utf-8"))
    return written

