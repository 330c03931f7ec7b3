"""Validate a preference dataset: every row is kept or rejected with a reason.

Rows stream through in batches: read (`load`, `jsonl`) → normalise the shape
(`shapes`) → column-wise checks (`checks`) → exact duplicates → token lengths
(`lengths`) → [pairs grouped into rankings (`ranking`)] → split by prompt →
out (`outputs`). Kept plus rejected always equals the rows read.

Reason codes in `report["reject_reasons"]` and `rejects.jsonl`:

- reading: `unparseable_json` (with its line number), `undecodable_bytes`,
  `not_an_object`, `malformed_row` (CSV/TSV field count);
- fields: `missing_field`, `null_field`, `non_string_field`, `empty_field`
  (empty or whitespace only), `bad_message`, `bad_score`;
- content: `chosen_equals_rejected`, `duplicate_row`, `roles_not_alternating`,
  `not_ending_with_assistant`, `prompt_mismatch` / `no_shared_prompt` (chosen
  and rejected do not share the prompt), `chat_template_error`,
  `chat_template_mismatch` (the template does not round-trip);
- groups: `too_few_responses` (fewer than group_size), `all_tied`;
- unpaired rows (KTO): `bad_label` (not true/false);
- length: `too_long`, `prompt_too_long`, `identical_after_truncation`;
- split: `prompt_in_train_and_eval` (an eval row whose prompt is in train).

Outputs (`validate_to_dir`, or `validate_preferences` + `write_split_outputs`):
`train.parquet`, `eval.parquet`, `rejects.jsonl`, `report.json`.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from lexalign.config.sections import DatasetConfig
from lexalign.core.io import atomic_dir, write_json
from lexalign.core.tokens import CHAT_ATTR
from lexalign.data.checks import Deduper, check_pairs, normalise
from lexalign.data.common import eval_threshold, hash_strings, reject
from lexalign.data.lengths import LengthCheck
from lexalign.data.load import data_files, detect_format, iter_pieces, sample
from lexalign.data.outputs import MemorySink, ParquetSink
from lexalign.data.ranking import group_pairs
from lexalign.data.shapes import ChatRenderer, detect_plan
from lexalign.data.splits import file_labels, resolve_data_dir
from lexalign.data.validated import kto_balance, needs_pairs_error, summary, unpaired_readers
from lexalign.methods import Layout

COLUMNS = ["prompt", "chosen", "rejected"]
REASONS = (
    "unparseable_json", "undecodable_bytes", "not_an_object", "malformed_row",
    "missing_field", "null_field", "non_string_field", "empty_field", "bad_message", "bad_score",
    "chosen_equals_rejected", "duplicate_row", "roles_not_alternating", "not_ending_with_assistant",
    "prompt_mismatch", "no_shared_prompt", "chat_template_error", "chat_template_mismatch",
    "too_few_responses", "all_tied", "bad_label", "too_long", "prompt_too_long", "identical_after_truncation",
    "prompt_in_train_and_eval",
)


class LengthBias:
    """Is the longer answer the preferred one? Over every kept pair (chosen vs rejected; ranked groups: best vs
    worst), with d = len(chosen) − len(rejected) in characters:

    - `chosen_longer_share`: the share of pairs with d > 0 (`equal_length_share`: d = 0);
    - `correlation`: the correlation between the length difference and the preference. Each pair read in both
      orders, (d, preferred) and (−d, not preferred), the point-biserial correlation of the two is
      mean(d) / sqrt(mean(d²)): 0 when length says nothing, 1 when the longer answer always wins by the same
      margin. DPO learns whatever separates chosen from rejected: a high value warns that it can learn
      "longer" (the evaluation's length ratio then shows whether it did).
    """

    def __init__(self):
        self.pairs = self.longer = self.equal = 0
        self.sum_d = self.sum_d2 = 0.0

    def add(self, table) -> None:
        import pyarrow.compute as pc

        if table.num_rows == 0 or "chosen" not in table.column_names:  # unpaired (KTO) rows have no pairs
            return
        d = np.asarray(pc.subtract(pc.utf8_length(table.column("chosen")), pc.utf8_length(table.column("rejected")))
                       .to_numpy(zero_copy_only=False), dtype=np.float64)
        self.pairs += len(d)
        self.longer += int((d > 0).sum())
        self.equal += int((d == 0).sum())
        self.sum_d += float(d.sum())
        self.sum_d2 += float((d * d).sum())

    def report(self) -> dict:
        n = self.pairs
        return {
            "pairs": n,
            "unit": "characters",
            "chosen_longer_share": self.longer / n if n else None,
            "equal_length_share": self.equal / n if n else None,
            "mean_length_difference": self.sum_d / n if n else None,
            "correlation": float((self.sum_d / n) / np.sqrt(self.sum_d2 / n)) if n and self.sum_d2 else None,
        }


class _Validation:
    def __init__(self, cfg: DatasetConfig, tokenizer, seed: int):
        self.cfg, self.seed = cfg, seed
        self.root = resolve_data_dir(cfg.path, cfg.data_dir)
        self.files = {"train": data_files(self.root, cfg.train_split)}
        self.files["eval"] = data_files(self.root, cfg.eval_split, exact=True) if cfg.eval_split else []
        self.kinds = {f: detect_format(f, cfg.format) for split in self.files.values() for f in split}
        self.labels = file_labels([f for split in self.files.values() for f in split], self.root)
        records, names, text_cells = [], [], False
        for file in self.files["train"]:
            records, names = sample(file, self.kinds[file], cfg.train_split)
            text_cells = self.kinds[file] in ("csv", "tsv")
            if names:
                break
        # nothing readable at all: read as pairs, so every line is rejected with its reason
        self.plan = detect_plan(records, names or list(self.plan_fields), cfg, text_cells)
        k = self.plan.group_size
        self.grouped = bool(k and k > 2 and self.plan.layout is not Layout.RANKED)
        self.unpaired = self.plan.layout is Layout.UNPAIRED
        self.renderer = ChatRenderer(tokenizer)
        self.lengths = (LengthCheck(tokenizer, cfg.max_length, cfg.length_policy, self.plan.chat)
                        if tokenizer is not None else None)
        self.dedupe = Deduper()
        self.threshold = eval_threshold(0.0 if cfg.eval_split else cfg.eval_fraction)
        self.train_prompts: set[int] = set()
        self.pending: list[tuple] = []
        self.origins: dict[str, list] = {}
        self.reasons: Counter = Counter()
        self.input_sizes: dict[int, int] = {}
        self.output_sizes: Counter = Counter()
        self.counts = Counter()
        self.rankings: Counter = Counter()
        self.length_bias = LengthBias()
        self.sink = None

    @property
    def plan_fields(self) -> tuple[str, str, str]:
        return self.cfg.prompt_field, self.cfg.chosen_field, self.cfg.rejected_field

    def _reject(self, records: list[dict]) -> None:
        if records:
            self.reasons.update(r["reason"] for r in records)
            self.counts["rejected"] += len(records)
            self.sink.reject(records)

    def run(self, sink) -> dict:
        self.sink = sink
        for split, split_name in (("train", self.cfg.train_split), ("eval", self.cfg.eval_split)):
            for file in self.files[split]:
                for piece in iter_pieces(file, self.kinds[file], self.plan.fast_fields, self.plan.columns,
                                         split_name, self.labels[file]):
                    self._piece(piece, split)
            self._finish(split)
        if self.lengths is not None:
            self.lengths.raise_if_failed()
        return self._report()

    def _piece(self, piece, split: str) -> None:
        self.counts["input"] += len(piece) + len(piece.rejects)
        self._reject(piece.rejects)
        table, bad = normalise(piece, self.plan, self.renderer, self.input_sizes)
        self._reject(bad)
        table, bad = check_pairs(table, piece.file, self.plan)
        self._reject(bad)
        if "responses" not in table.column_names and not self.unpaired:
            self.input_sizes[2] = self.input_sizes.get(2, 0) + table.num_rows
        prompt_hash = hash_strings(table.column("prompt"), self.seed)
        keep, bad = self.dedupe(table, piece.file, prompt_hash, self.plan)
        self._reject(bad)
        if bad:
            table, prompt_hash = table.filter(keep), prompt_hash[keep]
        if self.lengths is not None:
            rows = table.num_rows
            table, bad = self.lengths(table, piece.file, self.plan_fields)
            self._reject(bad)
            if table.num_rows != rows:
                prompt_hash = hash_strings(table.column("prompt"), self.seed)
        if self.grouped:
            self.pending.append((table, piece.file))
        else:
            self._route(table, prompt_hash, split, piece.file)

    def _finish(self, split: str) -> None:
        if not self.grouped or not self.pending:
            return
        import pyarrow as pa

        rows = []
        for table, file in self.pending:
            columns = [table.column(c).to_pylist() for c in COLUMNS + ["_row"]]
            rows += [(*values, file) for values in zip(*columns, strict=True)]
        self.pending = []
        ranked, bad, stats = group_pairs(rows, self.plan.group_size, self.plan_fields)
        self.rankings.update(stats)
        self._reject(bad)
        columns = {name: [r[name] for r in ranked] for name in ("prompt", "chosen", "rejected", "responses", "scores",
                                                                "source_row", "source_rows")}
        table = pa.table({
            **{name: pa.array(columns[name], type=pa.string()) for name in COLUMNS},
            "responses": pa.array(columns["responses"], type=pa.list_(pa.string())),
            "scores": pa.array(columns["scores"], type=pa.list_(pa.float64())),
            "_row": pa.array(columns["source_row"], type=pa.int64()),
            "source_rows": pa.array(columns["source_rows"], type=pa.list_(pa.int64())),
        })
        self.origins = {r["prompt"]: list(zip(r["source_rows"], r["_files"], strict=False)) for r in ranked}
        self._route(table, hash_strings(table.column("prompt"), self.seed), split, "(grouped)")

    def _route(self, table, prompt_hash: np.ndarray, split: str, file: str) -> None:
        import pyarrow as pa

        if table.num_rows == 0:
            return
        if self.cfg.eval_split:
            if split == "train":
                self.train_prompts.update(prompt_hash.tolist())
                parts = {"train": table}
            else:
                leak = np.fromiter(map(self.train_prompts.__contains__, prompt_hash.tolist()), dtype=bool,
                                   count=len(prompt_hash))
                if leak.any():
                    self._leaked(table.filter(pa.array(leak)), file)
                parts = {"eval": table.filter(pa.array(~leak))}
        else:
            to_eval = prompt_hash < self.threshold
            parts = {"train": table.filter(pa.array(~to_eval)), "eval": table.filter(pa.array(to_eval))}
        for name, part in parts.items():
            self.sink.write(name, part)
            self.length_bias.add(part)
            self.counts[f"{name}_rows"] += part.num_rows
            if "source_rows" in part.column_names:
                self.counts["kept"] += sum(map(len, part.column("source_rows").to_pylist()))
                self.output_sizes.update(len(r) for r in part.column("responses").to_pylist())
            elif "label" in part.column_names:
                self.counts["kept"] += part.num_rows
                self.output_sizes[1] += part.num_rows
                self.counts[f"{name}_desirable"] += sum(part.column("label").to_pylist())
            else:
                self.counts["kept"] += part.num_rows
                sizes = part.column("responses").to_pylist() if "responses" in part.column_names else None
                if sizes is None:
                    self.output_sizes[2] += part.num_rows
                else:
                    self.output_sizes.update(map(len, sizes))

    def _leaked(self, table, file: str) -> None:
        records = []
        for row in table.to_pylist():
            origins = self.origins.get(row["prompt"], []) if "source_rows" in row else [(row["_row"], file)]
            if "label" in row:
                data = {self.plan.prompt: row["prompt"], self.plan.completion: row["completion"],
                        self.plan.label: row["label"]}
            else:
                data = {self.plan.prompt: row["prompt"], self.plan.chosen: row["chosen"],
                        self.plan.rejected: row["rejected"]}
            records += [reject(n, f, "prompt_in_train_and_eval", "the prompt is also in the train split", data)
                        for n, f in origins]
        self._reject(records)

    def _report(self) -> dict:
        cfg, counts = self.cfg, self.counts
        total = counts["input"]
        report = {
            "source": str(self.root),
            "shape": self.plan.shape,
            # Texts rendered by the chat template: every later step encodes them with no special tokens added.
            CHAT_ATTR: self.plan.chat,
            "files": [{"file": str(f), "format": self.kinds[f], "split": s}
                      for s, fs in self.files.items() for f in fs],
            "input_rows": total,
            "kept_rows": counts["kept"],
            "train_rows": counts["train_rows"],
            "eval_rows": counts["eval_rows"],
            "rejected_rows": counts["rejected"],
            "reject_reasons": dict(sorted(self.reasons.items())),
            "reject_fraction": counts["rejected"] / total if total else 0.0,
            "max_reject_fraction": cfg.max_reject_fraction,
            "group_size": self.plan.group_size,
            "responses_per_prompt": {str(k): v for k, v in sorted(self.output_sizes.items())},
            "input_responses_per_prompt": {str(k): v for k, v in sorted(self.input_sizes.items())},
            "split": {"eval_split": cfg.eval_split, "eval_fraction": None if cfg.eval_split else cfg.eval_fraction,
                      "by": "prompt", "seed": self.seed},
            "lengths": self.lengths.report(total) if self.lengths is not None else {"checked": False},
            "length_bias": self.length_bias.report(),
        }
        if self.unpaired:
            # KTO's balance: desirable / undesirable rows (validation and align warn when far from its weights).
            report["labels"] = {split: {"desirable": counts[f"{split}_desirable"],
                                        "undesirable": counts[f"{split}_rows"] - counts[f"{split}_desirable"]}
                                for split in ("train", "eval")}
        if self.plan.counts:
            report["notes"] = dict(self.plan.counts)
        if self.grouped:
            report["rankings"] = dict(self.rankings)
        if report["kept_rows"] + report["rejected_rows"] != total:  # pragma: no cover - a bug, never data
            raise AssertionError(f"rows lost in validation: {report['kept_rows']} kept + "
                                 f"{report['rejected_rows']} rejected != {total} read")
        return report


def validate_preferences(cfg: DatasetConfig, tokenizer, seed: int = 42) -> dict[str, Any]:
    """Read, check and split the data in memory. Returns train/eval frames, rejects and the report.

    `tokenizer` measures lengths (None skips the length check) and renders conversations.
    """
    validation = _Validation(cfg, tokenizer, seed)
    sink = MemorySink(validation.grouped, validation.unpaired)
    report = validation.run(sink)
    frames = sink.frames()
    for name in ("train", "eval"):
        frames[name].attrs[CHAT_ATTR] = report[CHAT_ATTR]
    return {"train": frames["train"], "eval": frames["eval"], "rejects": sink.rejects, "report": report}


def validate_to_dir(cfg: DatasetConfig, tokenizer, out_dir: str | Path, seed: int = 42,
                    lineage: dict | None = None, kto_weights: dict | None = None, pairs_only: bool = False) -> dict:
    """Validate straight into `out_dir` (train/eval parquet, rejects.jsonl, report.json), batch by batch.

    Memory stays bounded by the batch size, whatever the file size (except
    when pairs are grouped into rankings, which needs every pair of a prompt).
    Returns the report.

    `kto_weights` (run → its desirable_weight and undesirable_weight): the KTO runs that read these data; the
    report's `balance` holds the balance of their training rows under each run's weights (`kto_balance`).
    `pairs_only`: a method that needs pairs reads these data, so unpaired rows are an error (nothing written).
    """
    validation = _Validation(cfg, tokenizer, seed)
    with atomic_dir(out_dir) as tmp:
        sink = ParquetSink(tmp, validation.grouped, validation.unpaired)
        try:
            report = validation.run(sink)
        finally:
            sink.close()
        if pairs_only and validation.unpaired:
            raise needs_pairs_error(f"A method other than {unpaired_readers()} (alignment.method, or a sweep run's "
                                    "method)",
                                    report["source"], summary(report))
        if kto_weights:
            report["balance"] = kto_balance(report, kto_weights)
        write_json(tmp / "report.json", report)
        if lineage:
            write_json(tmp / "lineage.json", lineage)
    return report


class _Discard:
    def write(self, split: str, table) -> None:
        pass

    def reject(self, records: list[dict]) -> None:
        pass


def check_only(cfg: DatasetConfig, tokenizer=None, seed: int = 42) -> dict:
    """Every check, nothing kept or written: the report alone (a dry run; what the benchmark times)."""
    return _Validation(cfg, tokenizer, seed).run(_Discard())
