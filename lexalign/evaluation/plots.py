"""The report's pictures, as matplotlib PNGs: each run's training curves (one panel per loss), the eval figures across
runs (preference accuracy, the judge's win rate with its interval, the answer length ratio), the answer lengths,
and the online rounds' figures against the model (0: SFT, r: after round r)."""

from __future__ import annotations

import json
from pathlib import Path

from lexalign.core.io import read_json
from lexalign.methods import DEFAULT, METHODS

LENGTH_GROWTH_FLAG = 1.2
"""Aligned answers longer than this times the SFT answers are flagged (as lexalign.evaluation.figures flags them)."""


CURVES = [("loss", "Training loss"), ("rewards/margins", "Reward margin (chosen − rejected)"),
          ("rewards/accuracies", "Reward accuracy")]


FEW_POINTS = 3
"""A run with at most this many logged points gets each point's value written beside it."""


def _metrics(model_dir: Path) -> list[dict]:
    file = model_dir / "metrics.jsonl"
    if not file.is_file():
        return []
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


def loss_kind(model_dir: Path) -> str:
    """The loss a run trained with (its lineage.json): runs with the same one share a loss panel."""
    lineage = model_dir / "lineage.json"
    config = read_json(lineage).get("config", {}) if lineage.is_file() else {}
    method = METHODS.get(config.get("method") or DEFAULT)
    if method is not None and "loss_type" not in method.keys:  # a loss of its own: one panel per method
        return method.name.upper()
    losses = config.get("loss_type") or ["sigmoid"]
    return "DPO: " + " + ".join([losses] if isinstance(losses, str) else losses)


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_series(ax, points: list[tuple], label: str) -> None:
    from matplotlib.ticker import MaxNLocator

    xs, ys = zip(*points, strict=True)
    line = ax.plot(xs, ys, marker="o", markersize=4, label=label)[0]
    if len(points) <= FEW_POINTS:
        for x, y in points:
            ax.annotate(f"{y:.3g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8,
                        color=line.get_color())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_curves(runs: dict[str, Path], out_dir: Path) -> list[Path]:
    plt = _figure()
    written = []
    metrics = {name: _metrics(model_dir) for name, model_dir in runs.items()}
    for key, title in CURVES:
        series = {name: [(m["step"], m[key]) for m in rows if key in m] for name, rows in metrics.items()}
        series = {name: points for name, points in series.items() if points}
        if key == "loss":  # one panel per loss: different losses live on different scales
            panels: dict[str, list[str]] = {}
            for name in series or runs:
                panels.setdefault(loss_kind(runs[name]), []).append(name)
        else:
            panels = {"": list(series)}
        columns = min(len(panels), 3) or 1
        rows = -(-len(panels) // columns) or 1
        fig, axes = plt.subplots(rows, columns, figsize=(6 if columns == 1 else 4.2 * columns, 3.5 * rows), dpi=100,
                                 squeeze=False)
        flat = [ax for row in axes for ax in row]
        for ax, (kind, names) in zip(flat, panels.items(), strict=False):
            for name in names:
                if name in series:
                    _plot_series(ax, series[name], name)
            steps = {x for name in names for x, _ in series.get(name, [])}
            if len(steps) == 1:  # one logged step: centre it rather than let matplotlib pick a zero-width range
                ax.set_xlim(min(steps) - 1, min(steps) + 1)
            ax.set(title=f"{title} ({kind})" if kind and len(panels) > 1 else f"{title} — {kind}" if kind else title,
                   xlabel="optimizer step")
            ax.grid(alpha=0.3)
            if ax.has_data():
                ax.legend(fontsize=8)
            else:
                ax.text(0.5, 0.5, "no logged steps", ha="center", va="center", transform=ax.transAxes)
        for ax in flat[len(panels):]:
            ax.set_axis_off()
        path = out_dir / f"curve_{key.replace('/', '_')}.png"
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def judged_runs(evals: dict[str, dict]) -> dict[str, dict]:
    """The runs a judge compared with the SFT model (their judge figures), by name."""
    return {n: e["judge"] for n, e in evals.items() if (e.get("judge") or {}).get("win_rate") is not None}


def _lengths(evals: dict[str, dict]) -> dict[str, dict]:
    return {n: e["length"] for n, e in evals.items() if (e.get("length") or {}).get("ratio") is not None}


def plot_eval(evals: dict[str, dict], out_dir: Path) -> Path:
    """Preference accuracy per run, and where there is one, the judge's win rate (with its interval) and the
    answer-length ratio: a panel only for what there is."""
    plt = _figure()
    names = list(evals)
    judged, lengths = judged_runs(evals), _lengths(evals)
    panels = ["accuracy"] + (["judge"] if judged else []) + (["length"] if lengths else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) if len(panels) > 1 else 6, 3.6), dpi=100,
                             squeeze=False)
    axes = dict(zip(panels, axes[0], strict=True))
    ax = axes["accuracy"]
    ax.bar_label(ax.bar(names, [evals[n]["preference_accuracy"] for n in names], color="tab:blue"), fmt="%.2f")
    ax.set(title="Held-out preference accuracy", ylim=(0, 1.1))
    if judged:
        ax = axes["judge"]
        rates = [judged[n]["win_rate"] for n in judged]
        low = [r - (judged[n]["ci_low"] if judged[n]["ci_low"] is not None else r) for n, r in zip(judged, rates,
                                                                                                    strict=True)]
        high = [(judged[n]["ci_high"] if judged[n]["ci_high"] is not None else r) - r for n, r in zip(judged, rates,
                                                                                                       strict=True)]
        bars = ax.bar(list(judged), rates, yerr=[low, high], capsize=4, color="tab:green")
        ax.bar_label(bars, fmt="%.2f", padding=2)
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
        judge_names = sorted({j["name"] for j in judged.values()})
        ax.set(title="Win rate against SFT (95% CI)", ylim=(0, 1.15),
               xlabel=", ".join(judge_names) if len(", ".join(judge_names)) < 50 else "judge: see table")
    if lengths:
        ax = axes["length"]
        ratios = [lengths[n]["ratio"] for n in lengths]
        colors = ["tab:red" if r > LENGTH_GROWTH_FLAG else "tab:gray" for r in ratios]
        ax.bar_label(ax.bar(list(lengths), ratios, color=colors), fmt="×%.2f")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(LENGTH_GROWTH_FLAG, color="tab:red", linestyle="--", linewidth=1, label="+20%")
        ax.set(title="Answer length, aligned ÷ SFT", ylim=(0, max(max(ratios), LENGTH_GROWTH_FLAG) * 1.25))
        ax.legend(fontsize=8, loc="lower right")
    for ax in axes.values():
        ax.tick_params(axis="x", labelrotation=20)
    path = out_dir / "eval_comparison.png"
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_lengths(validated: Path, tokenizer_dir: Path, out_dir: Path, limit: int = 20000) -> Path:
    import pandas as pd

    from lexalign.models.loading import load_tokenizer

    plt = _figure()
    frame = pd.read_parquet(validated / "train.parquet").head(limit)
    tokenizer = load_tokenizer(tokenizer_dir)
    answers = ["completion"] if "completion" in frame.columns else ["chosen", "rejected"]  # unpaired rows: one
    texts = [p + a for column in answers for p, a in zip(frame["prompt"], frame[column], strict=False)]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.hist(lengths, bins=30, color="tab:purple")
    limit_line = read_json(validated / "report.json").get("lengths", {}).get("max_length")
    if limit_line:
        ax.axvline(limit_line, color="red", linestyle="--", label="max_length")
        ax.legend()
    ax.set(title="Prompt + response length (tokens), validated train data", xlabel="tokens", ylabel="rows")
    path = out_dir / "length_histogram.png"
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def online_points(rounds: list[dict]) -> dict[str, list[tuple]]:
    """The per-round series, each point (model, value[, low, high]) where model 0 is SFT and r the model after
    round r: a round's samples come from the model it started from (r - 1), its evaluation is of its own model
    (r), against the SFT model's greedy answers (the SFT's own value at 0). A value a round lacks is left out."""
    points: dict[str, list[tuple]] = {key: [] for key in ("sampled_score", "greedy_score", "win_rate",
                                                           "sampled_tokens", "greedy_tokens", "kl")}
    for number, figures in enumerate(rounds, start=1):
        sampled, evaluation = figures["samples"], figures["evaluation"]
        if number == 1:
            for key, name in (("greedy_score", "mean_score_sft"), ("greedy_tokens", "sft_mean_tokens")):
                if evaluation.get(name) is not None:
                    points[key].append((0, evaluation[name]))
        for key, value, model in (("sampled_score", sampled["mean_score"], number - 1),
                                  ("sampled_tokens", sampled["mean_tokens"], number - 1),
                                  ("greedy_score", evaluation.get("mean_score"), number),
                                  ("greedy_tokens", evaluation.get("mean_tokens"), number),
                                  ("kl", evaluation.get("kl_to_reference"), number)):
            if value is not None:
                points[key].append((model, value))
        if evaluation.get("win_rate") is not None:
            points["win_rate"].append((number, evaluation["win_rate"], evaluation.get("ci_low"),
                                       evaluation.get("ci_high")))
    return points


def plot_online(rounds: list[dict], out_dir: Path) -> Path:
    """Four panels over the models (0: SFT, r: after round r), each saying what its points are."""
    plt = _figure()
    points = online_points(rounds)
    temperature = rounds[0]["samples"]["temperature"] if rounds else None
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8), dpi=100)
    panels = [
        (axes[0], "Judge's mean score", [("sampled_score", f"samples it drew (T={temperature})"),
                                          ("greedy_score", "greedy, held-out prompts")]),
        (axes[2], "Answer length (tokens)", [("sampled_tokens", "samples it drew"),
                                             ("greedy_tokens", "greedy, held-out prompts")]),
        (axes[3], "KL to the round's reference", [("kl", "KL(model ‖ its round's reference), sampled")]),
    ]
    for ax, title, series in panels:
        for key, label in series:
            if points[key]:
                _plot_series(ax, [p[:2] for p in points[key]], label)
        ax.set(title=title, xlabel="model (0: SFT, r: after round r)")
        if ax.has_data():
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not computed", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
    ax = axes[1]
    if points["win_rate"]:
        xs = [p[0] for p in points["win_rate"]]
        rates = [p[1] for p in points["win_rate"]]
        low = [r - (p[2] if p[2] is not None else r) for p, r in zip(points["win_rate"], rates, strict=True)]
        high = [(p[3] if p[3] is not None else r) - r for p, r in zip(points["win_rate"], rates, strict=True)]
        ax.errorbar(xs, rates, yerr=[low, high], marker="o", capsize=4, color="tab:green",
                    label="greedy, held-out prompts (95% CI)")
        for x, y in zip(xs, rates, strict=True):
            ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.legend(fontsize=7)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set(title="Win rate against SFT", ylim=(0, 1.05), xlabel="model after round r")
    ax.grid(alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    path = out_dir / "online_rounds.png"
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
