"""A validated data folder read back: its train and eval rows, its report's summary and gate, whether its texts were
rendered with the chat template, and what its rows hold (pairs, KTO's unpaired rows and their label balance).

The folder is what `lexalign.data.validation` writes: `train.parquet`, `eval.parquet`, `rejects.jsonl` and
`report.json`. Every step that reads validated data reads it through here.
"""

from __future__ import annotations

from pathlib import Path

from lexalign.core.errors import LexAlignError
from lexalign.methods import METHODS


def summary(report: dict) -> str:
    """A few lines for the terminal: what was kept, what was dropped and why."""
    lines = [
        f"Validated {report['input_rows']} rows ({report.get('shape', 'pairs')}) from {report['source']}: "
        f"kept {report['train_rows']} train + {report['eval_rows']} eval, rejected {report['rejected_rows']} "
        f"({100 * report['reject_fraction']:.1f}%)"
    ]
    for reason, count in report["reject_reasons"].items():
        lines.append(f"  {reason}: {count}")
    sizes = report.get("responses_per_prompt")
    if sizes:
        lines.append("  responses per prompt: " + ", ".join(f"{k} × {v}" for k, v in sizes.items()))
    labels = report.get("labels")
    if labels:
        train = labels["train"]
        lines.append(f"  labels (train): {train['desirable']} desirable, {train['undesirable']} undesirable")
    for run, balance in (report.get("balance") or {}).items():
        ratio = balance["weighted_ratio"]
        lines.append(f"  KTO balance ({run}): weighted ratio "
                     f"{'undefined' if ratio is None else f'{ratio:.2f}'} under desirable_weight "
                     f"{balance['desirable_weight']:g} and undesirable_weight {balance['undesirable_weight']:g} "
                     f"({'outside' if balance['warning'] else 'inside'} the recommended [1, 1.33])")
    rankings = report.get("rankings")
    if rankings:
        lines.append(f"  rankings: {rankings.get('prompts', 0)} prompts from {rankings.get('pairs', 0)} pairs; "
                     f"{rankings.get('total_order', 0)} total order, {rankings.get('with_ties', 0)} with ties, "
                     f"{rankings.get('with_cycles', 0)} with cycles (tied)")
    bias = report.get("length_bias") or {}
    if bias.get("chosen_longer_share") is not None:
        correlation = bias.get("correlation")
        lines.append(f"  chosen is the longer answer in {100 * bias['chosen_longer_share']:.1f}% of pairs "
                     f"(length–preference correlation {correlation if correlation is not None else 0:+.2f})")
    lengths = report.get("lengths", {})
    tokens = lengths.get("tokens")
    if tokens:
        lines.append(
            f"  length in tokens: p50 {tokens['p50']:.0f}, p90 {tokens['p90']:.0f}, max {tokens['max']}; "
            f"{lengths.get('over_max_length', 0)} rows ({100 * lengths.get('over_max_length_share', 0):.1f}%) over "
            f"max_length {lengths.get('max_length')} ({lengths.get('length_policy')})"
        )
    return "\n".join(lines)


KTO_RATIO = (1.0, 4 / 3)
"""KTO's recommended (desirable_weight × desirable rows) / (undesirable_weight × undesirable rows) (the KTO
paper's Eq. 8, TRL's KTO docs)."""


def label_balance(desirable: int, undesirable: int, desirable_weight: float = 1.0,
                  undesirable_weight: float = 1.0) -> dict:
    """KTO's desirable / undesirable balance under its weights, and a warning when the weighted ratio is
    outside [1, 4/3] (with the weights that would bring it inside)."""
    desirable, undesirable = int(desirable), int(undesirable)
    out = {"desirable": desirable, "undesirable": undesirable, "desirable_weight": desirable_weight,
           "undesirable_weight": undesirable_weight, "weighted_ratio": float("nan"), "warning": None}
    if not desirable or not undesirable:
        missing = "undesirable (label false)" if desirable else "desirable (label true)"
        out["warning"] = (f"KTO: the training rows have no {missing} completions ({desirable} desirable, "
                          f"{undesirable} undesirable): it needs both")
        return out
    ratio = desirable_weight * desirable / (undesirable_weight * undesirable)
    out["weighted_ratio"] = ratio
    low, high = KTO_RATIO
    if not low - 1e-9 <= ratio <= high + 1e-9:
        d_low, d_high = (undesirable_weight * undesirable / desirable * x for x in KTO_RATIO)
        u_low, u_high = (desirable_weight * desirable / undesirable / x for x in (high, low))
        out["warning"] = (
            f"KTO: {desirable} desirable and {undesirable} undesirable rows under desirable_weight "
            f"{desirable_weight:g} and undesirable_weight {undesirable_weight:g} give a weighted ratio of "
            f"{ratio:.2f}, outside the recommended [1, 1.33]; set desirable_weight in [{d_low:.2f}, {d_high:.2f}] "
            f"or undesirable_weight in [{u_low:.2f}, {u_high:.2f}]")
    return out


def kto_balance(report: dict, weights: dict[str, dict]) -> dict[str, dict]:
    """KTO's balance of a validation's training rows under each KTO run's weights (`weights`: run → its
    desirable_weight and undesirable_weight), by `label_balance`: unpaired rows by their labels, pairs split in
    two (one desirable and one undesirable row each). An undefined ratio (no rows of one label) is None."""
    labels = (report.get("labels") or {}).get("train") or {"desirable": report["train_rows"],
                                                            "undesirable": report["train_rows"]}
    out = {}
    for run, w in weights.items():
        balance = label_balance(labels["desirable"], labels["undesirable"], w["desirable_weight"],
                                w["undesirable_weight"])
        if balance["weighted_ratio"] != balance["weighted_ratio"]:  # NaN: no JSON for it
            balance["weighted_ratio"] = None
        out[run] = balance
    return out


def is_unpaired(frame) -> bool:
    """Whether validated rows are unpaired (prompt, completion, label): KTO's rows, no preference between two
    answers."""
    return "label" in frame.columns and "chosen" not in frame.columns


def unpaired_readers() -> str:
    """The methods that read unpaired rows (lexalign.methods: KTO)."""
    return " or ".join(m.name for m in METHODS.values() if m.reads_unpaired)


def needs_pairs_error(reader: str, where: str, *details: str) -> LexAlignError:
    """Unpaired rows hold no preference between two answers, so only KTO reads them: the error when `reader`,
    which needs pairs, is given the unpaired rows of `where`."""
    return LexAlignError(f"{reader} needs pairs (or ranked responses), and the data in {where} are unpaired rows "
                         "(prompt, completion, label)", *details,
                         hint=f"Use method: {unpaired_readers()}, which learns from unpaired rows, or give pairs")


def gate(report: dict, where: str) -> None:
    """Stop before training when the data is not fit to train on."""
    if report["train_rows"] == 0:
        raise LexAlignError(f"No usable training rows in {report['source']}", summary(report),
                            hint=f"See the rejects in {where}/rejects.jsonl")
    if report["reject_fraction"] > report["max_reject_fraction"]:
        raise LexAlignError(
            f"{100 * report['reject_fraction']:.1f}% of rows were rejected, above max_reject_fraction "
            f"{100 * report['max_reject_fraction']:.0f}%",
            summary(report),
            hint=f"Fix the data (see {where}/rejects.jsonl) or raise dataset.max_reject_fraction",
        )


def is_validated_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "report.json").is_file() and (path / "train.parquet").is_file()


def read_validated(data: str | Path, gated: bool = False):
    """The train and eval rows of a validated data folder, each frame marked with whether its texts were rendered
    with the chat template (`lexalign.core.tokens.CHAT_ATTR`); with `gated`, only if its validation report passed
    the gate."""
    import pandas as pd

    from lexalign.core.tokens import CHAT_ATTR

    data = Path(data)
    if gated:
        from lexalign.core.io import read_json
        gate(read_json(data / "report.json"), str(data))
    frames = pd.read_parquet(data / "train.parquet"), pd.read_parquet(data / "eval.parquet")
    chat = is_chat(data)
    for frame in frames:
        frame.attrs[CHAT_ATTR] = chat
    return frames


def is_chat(data: str | Path) -> bool:
    """Whether validation rendered a data folder's texts with the chat template (its report.json says)."""
    from lexalign.core.io import read_json
    from lexalign.core.tokens import CHAT_ATTR

    report = Path(data) / "report.json"
    return bool(read_json(report).get(CHAT_ATTR, False)) if report.is_file() else False
