"""The report step: one HTML page comparing every run, with matplotlib PNGs.

- training curves (loss, reward margin, reward accuracy per step) from each
  run's `metrics.jsonl`;
- an eval table across runs with the SFT model as baseline;
- the validation report's token-length histogram.

The PNGs are also outputs of their own, marked `report()` in the workflow, so
`snakemake --report` includes them with captions.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from lexalign.io import atomic_write_text, read_json

CURVES = [("loss", "Training loss"), ("rewards/margins", "Reward margin (chosen − rejected)"),
          ("rewards/accuracies", "Reward accuracy")]


def _metrics(model_dir: Path) -> list[dict]:
    file = model_dir / "metrics.jsonl"
    if not file.is_file():
        return []
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(runs: dict[str, Path], out_dir: Path) -> list[Path]:
    plt = _figure()
    written = []
    for key, title in CURVES:
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        for name, model_dir in runs.items():
            points = [(m["step"], m[key]) for m in _metrics(model_dir) if key in m]
            if points:
                ax.plot(*zip(*points, strict=False), marker=".", label=name)
        ax.set(title=title, xlabel="optimizer step")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
        path = out_dir / f"curve_{key.replace('/', '_')}.png"
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def plot_eval(evals: dict[str, dict], out_dir: Path) -> Path:
    plt = _figure()
    names = list(evals)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5), dpi=100)
    axes[0].bar_label(axes[0].bar(names, [evals[n]["preference_accuracy"] for n in names], color="tab:blue"),
                      fmt="%.2f")
    axes[0].set(title="Held-out preference accuracy", ylim=(0, 1.05))
    judged = {n: e["generation"] for n, e in evals.items() if e.get("generation")}
    if judged:
        first = next(iter(judged.values()))
        labels = ["SFT"] + list(judged)
        rates = [first["sft_rate"]] + [g["aligned_rate"] for g in judged.values()]
        axes[1].bar_label(axes[1].bar(labels, rates, color="tab:green"), fmt="%.2f")
        axes[1].set(title="Judged wanted behaviour", ylim=(0, 1.05))
    else:
        axes[1].text(0.5, 0.5, "no judge configured", ha="center", va="center")
        axes[1].set_axis_off()
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=20)
    path = out_dir / "eval_comparison.png"
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_lengths(validated: Path, tokenizer_dir: Path, out_dir: Path, limit: int = 20000) -> Path:
    import pandas as pd

    from lexalign.models import load_tokenizer

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


def _fmt(value) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" if isinstance(value, float) else html.escape(str(value))


def eval_table(evals: dict[str, dict], methods: dict[str, str] | None = None) -> str:
    methods = methods or {}
    columns = [("preference_accuracy", "pref. accuracy"), ("mean_margin", "mean margin"),
               ("kl_estimate", "KL(aligned ‖ SFT)"), ("kendall_tau", "Kendall τ"),
               ("top1_accuracy", "top-1 accuracy")]
    head = "<th>method</th>" + "".join(f"<th>{label}</th>" for _, label in columns) + "<th>judged rate</th>"
    rows = []
    first_gen = next((e["generation"] for e in evals.values() if e.get("generation")), None)
    if first_gen:
        rows.append("<tr><td>SFT (baseline)</td>" + "<td>—</td>" * (len(columns) + 1)
                    + f"<td>{_fmt(first_gen['sft_rate'])}</td></tr>")
    for name, result in evals.items():
        cells = "".join(f"<td>{_fmt(result.get(key))}</td>" for key, _ in columns)
        rate = result.get("generation", {}).get("aligned_rate")
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{_fmt(methods.get(name))}</td>{cells}"
                    f"<td>{_fmt(rate)}</td></tr>")
    return f"<table><tr><th>run</th>{head}</tr>{''.join(rows)}</table>"


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>LexAlign report</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}img{{max-width:100%;margin:0.5em 0}}</style></head>
<body data-images-loaded="pending">
<h1>LexAlign report</h1>
<p>{summary}</p>
<h2>Evaluation on held-out data</h2>
{table}
{eval_images}
<h2>Training curves</h2>
{curve_images}
<h2>Validated data</h2>
<p>{validation}</p>
{length_images}
<script>
window.addEventListener("load", function () {{
  var imgs = Array.from(document.images);
  var ok = imgs.filter(function (i) {{ return i.complete && i.naturalWidth > 0; }}).length;
  document.body.setAttribute("data-images-loaded", ok + "/" + imgs.length);
}});
</script>
</body></html>
"""


def _images(paths: list[Path], page: Path) -> str:
    return "\n".join(f'<img src="{p.relative_to(page.parent).as_posix()}" alt="{p.stem}">' for p in paths)


def build_report(evals: dict[str, Path], models: dict[str, Path], validated: Path, tokenizer_dir: Path,
                 page: Path, plots: Path) -> Path:
    """Write the plots into `plots` and the page to `page` (images linked relatively)."""
    plots.mkdir(parents=True, exist_ok=True)
    from lexalign.lineage import read_lineage

    results = {name: read_json(path) for name, path in evals.items()}
    methods = {name: ((read_lineage(path) or {}).get("config") or {}).get("method") for name, path in models.items()}
    curves = plot_curves(models, plots)
    comparison = plot_eval(results, plots)
    lengths = plot_lengths(validated, tokenizer_dir, plots)
    report = read_json(validated / "report.json")
    validation = (f"{report['input_rows']} rows read: {report['train_rows']} train, {report['eval_rows']} eval, "
                  f"{report['rejected_rows']} rejected.")
    atomic_write_text(page, PAGE.format(
        summary=f"{len(results)} run(s) aligned from one SFT model and compared on the same held-out data.",
        table=eval_table(results, methods), eval_images=_images([comparison], page), curve_images=_images(curves, page),
        validation=html.escape(validation), length_images=_images([lengths], page),
    ))
    return page
