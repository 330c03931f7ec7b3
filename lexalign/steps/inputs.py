"""The steps that put models and data in place, checked: download, prepare_sft, validate."""

from __future__ import annotations

from pathlib import Path

from lexalign.config.sections import DatasetConfig, SftDatasetConfig, SourceConfig


def download(*, output: str | Path, source: dict, kind: str, seed: int = 42) -> Path:
    """Fetch a model or dataset (`kind`) from the demo, a local path or the Hub into `output`.

    `source`: the source keys of the model or dataset section, and a dataset's `data_dir` (its sub-folder)."""
    from lexalign.hub.sources import fetch

    source = dict(source)
    data_dir = source.pop("data_dir", None)
    cfg = SourceConfig.from_dict(source)
    out = fetch(cfg, output, kind, seed, data_dir=data_dir)
    print(f"Fetched {kind} from {cfg.source} into {out}", flush=True)
    return out


def prepare_sft(*, raw: str | Path, output: str | Path, data: dict, seed: int = 42) -> dict:
    """SFT data (`data`: the sft_data section) from the download in `raw` into train/eval files in `output`."""
    from lexalign.core.lineage import stage_record
    from lexalign.data.common import write_split_outputs
    from lexalign.data.sft import prepare_sft as _prepare

    cfg = SftDatasetConfig.from_dict({**data, "path": str(raw)})
    result = _prepare(cfg, seed)
    lineage = stage_record("prepare_sft_data", cfg.to_dict(), {"data": raw})
    write_split_outputs(output, result, lineage)
    report = result["report"]
    print(f"SFT data ({report['shape']}): {report['train_rows']} train + {report['eval_rows']} eval, "
          f"{report['rejected_rows']} rejected → {output}", flush=True)
    return report


def validate(*, raw: str | Path, tokenizer: str | Path, output: str | Path, dataset: dict, seed: int = 42,
             trust_remote_code: bool = False, kto_weights: dict | None = None, pairs_only: bool = False) -> dict:
    """Validate preference data into train/eval parquet, rejects and report (streamed, memory bounded by
    batches); then gate: too many rejects, or nothing left, stops here with the summary.

    `kto_weights` (run → its desirable_weight and undesirable_weight): the KTO runs that read these data; the
    balance of their training rows under each run's weights goes into the report and the summary, with a
    warning where it is outside KTO's recommended range. `pairs_only`: a method that needs pairs reads these
    data, so unpaired rows stop here (before any reference step)."""
    from lexalign.core.errors import warn
    from lexalign.core.lineage import stage_record
    from lexalign.data.validated import gate, summary
    from lexalign.data.validation import validate_to_dir
    from lexalign.models.loading import load_tokenizer

    cfg = DatasetConfig.from_dict({**dataset, "path": str(raw)})
    lineage = stage_record("validate", cfg.to_dict(), {"data": raw, "tokenizer": tokenizer})
    report = validate_to_dir(cfg, load_tokenizer(tokenizer, trust_remote_code), output, seed, lineage,
                             kto_weights=kto_weights, pairs_only=pairs_only)
    print(summary(report), flush=True)
    for run, balance in (report.get("balance") or {}).items():
        if balance["warning"]:
            warn(balance["warning"], f"KTO run: {run}")
    gate(report, str(output))
    return report

