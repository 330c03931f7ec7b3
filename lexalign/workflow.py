"""The bridge from a Snakemake rule to a stage function.

Each script in `scripts/` calls `run_rule(<step>, snakemake)` under Snakemake
and the CLI otherwise. Under Snakemake, output goes to the rule's `log:` file,
every step after download runs with HF_HUB_OFFLINE=1, and a LexAlignError
becomes a message (in the log and on the terminal) and exit status 1.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from lexalign.errors import LexAlignError


def _call(step: str, smk) -> None:
    from lexalign import stages

    p, i, o = smk.params, smk.input, smk.output
    if step == "download":
        stages.download(p.source, o[0], p.kind, p.seed)
    elif step == "prepare_sft_data":
        stages.prepare_sft(p.data, i.raw, o[0], p.seed)
    elif step == "validate":
        stages.validate(p.dataset, i.raw, i.tokenizer, o[0], p.seed, p.trust_remote_code)
    elif step == "finetune":
        stages.finetune(i.model, i.data, p.finetune, o[0], p.checkpoint_dir, p.device, p.seed,
                        trust_remote_code=p.trust_remote_code, allow_pickle=p.allow_pickle)
    elif step == "reference":
        stages.reference(i.model, i.data, o[0], **p.reference, device=p.device,
                         trust_remote_code=p.trust_remote_code, cache_dir=p.cache_dir)
    elif step == "align":
        stages.align(i.model, i.data, p.alignment, o[0], p.checkpoint_dir, p.device, p.seed,
                     trust_remote_code=p.trust_remote_code, reference=getattr(i, "reference", None))
    elif step == "evaluate":
        stages.evaluate(i.aligned, i.reference, i.data, p.evaluate, p.beta, o[0], p.seed,
                        ranked=i.ranked[0] if i.get("ranked") else None)
    elif step == "report":
        stages.report(p.runs, i.evals, i.models, i.validated, i.tokenizer, o.page, o.plots)
    else:
        raise ValueError(f"unknown step {step!r}")


def run_rule(step: str, smk) -> None:
    if step != "download":
        os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    log = Path(smk.log[0]) if smk.log else None
    terminal = sys.__stderr__
    handle = log.open("w", encoding="utf-8") if log else None
    redirect = (contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle)) if handle else ()
    try:
        with contextlib.ExitStack() as stack:
            for r in redirect:
                stack.enter_context(r)
            try:
                from lexalign.launch import launched

                if not launched(step, smk):  # several processes (resources): `accelerate launch` ran the step
                    _call(step, smk)
            except LexAlignError as err:
                print(err.render(), file=sys.stderr, flush=True)
                if handle:
                    print(err.render(), file=terminal, flush=True)
                sys.exit(1)
    finally:
        if handle:
            handle.close()


def main_script(step: str, smk=None) -> None:
    """Entry of `scripts/<step>.py`: a Snakemake rule, or `python scripts/<step>.py --config …`."""
    if smk is not None:
        run_rule(step, smk)
        return
    from lexalign.cli import run

    sys.argv = ["lexalign", step, *sys.argv[1:]]
    run()
