"""The report step: one HTML page comparing every run, with matplotlib PNGs.

- at a glance: one line per run a user can act on (accuracy, win rate, length);
- the eval table across runs with the SFT model as baseline, and its picture
  (preference accuracy; the judge's win rate with its 95% interval; the answer
  length ratio), panels only for what there is;
- the judge's table, the answer lengths (a run whose answers grew by more than
  20% is flagged), lm-eval's benchmarks (SFT and each run), and the SFT and
  aligned answers side by side per run;
- training curves from each run's `metrics.jsonl`: the loss in one panel per
  loss (an IPO loss of 25 and a sigmoid loss of 0.7 never share an axis);
  points marked and labelled when a run logged only a few;
- the validation report: counts, whether the longer answer is the preferred
  one, the token-length histogram;
- with online rounds, their own section: per round, the judge's mean score,
  the win rate against SFT with its interval, the answer length and the KL to
  the round's reference, from each round's files (`round_figures`), plotted
  against the model (0: SFT, r: after round r).

The PNGs are also outputs of their own, marked `report()` in the workflow, so
`snakemake --report` includes them with captions.
"""

from __future__ import annotations

import html
from pathlib import Path

from lexalign.core.io import atomic_write_text, read_json
from lexalign.evaluation.plots import LENGTH_GROWTH_FLAG, judged_runs, plot_curves, plot_eval, plot_lengths, plot_online

SAMPLE_CHARS = 1200


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.{digits}f}" if isinstance(value, float) else html.escape(str(value))


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _table(head: list[str], rows: list[list[str]], css: str = "") -> str:
    header = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table class="{css}"><tr>{header}</tr>{body}</table>' if css else f"<table><tr>{header}</tr>{body}</table>"


def eval_table(evals: dict[str, dict], methods: dict[str, str] | None = None) -> str:
    methods = methods or {}
    columns = [("preference_accuracy", "pref. accuracy"), ("mean_margin", "mean margin"),
               ("kl_estimate", "KL(aligned ‖ SFT)"), ("kendall_tau", "Kendall τ"),
               ("top1_accuracy", "top-1 accuracy")]
    judged = judged_runs(evals)
    head = ["run", "method"] + [label for _, label in columns] + (["win rate vs SFT"] if judged else [])
    rows = []
    for name, result in evals.items():
        row = [html.escape(name), html.escape(str(methods.get(name) or "—"))]
        row += [_fmt(result.get(key)) for key, _ in columns]
        if judged:
            row.append(_pct(judged[name]["win_rate"]) if name in judged else "—")
        rows.append(row)
    return _table(head, rows)


def judge_table(evals: dict[str, dict]) -> str:
    judged = {n: e["judge"] for n, e in evals.items() if e.get("judge")}
    if not judged:
        return ('<p class="note">No judge configured (<code>evaluate.judge: none</code>): set it to '
                "<code>reward_model</code> or <code>llm</code> for a win rate against the SFT model.</p>")
    extra = any(j.get("unparseable") is not None for j in judged.values())
    head = ["run", "judge", "win rate", "95% CI", "wins / ties / losses", "prompts", "mean reward SFT",
            "mean reward aligned"] + (["unparseable", "order-inconsistent"] if extra else [])
    rows = []
    for name, j in judged.items():
        interval = "—" if j.get("ci_low") is None else f"{_pct(j['ci_low'])} – {_pct(j['ci_high'])}"
        row = [html.escape(name), f'<span class="name">{html.escape(str(j["name"]))}</span>', _pct(j.get("win_rate")),
               interval,
               f"{j.get('wins', 0)} / {j.get('ties', 0)} / {j.get('losses', 0)}", str(j.get("n", 0)),
               _fmt(j.get("mean_reward_sft")), _fmt(j.get("mean_reward_aligned"))]
        if extra:
            row += [str(j.get("unparseable", "—")), str(j.get("inconsistent", "—"))]
        rows.append(row)
    note = ('<p class="note">Each held-out prompt scores 1 when the aligned answer wins, ½ for a tie, 0 when the SFT '
            "answer wins; the interval is a bootstrap over prompts. 50% is no change.</p>")
    return _table(head, rows) + note


def length_table(evals: dict[str, dict]) -> str:
    rows = []
    for name, result in evals.items():
        length = result.get("length")
        if not length:
            continue
        ratio = length.get("ratio")
        grew = ratio is not None and ratio > LENGTH_GROWTH_FLAG
        flag = ('<span class="flag">⚠ grew by more than 20%: read the samples — longer, or better?</span>' if grew
                else "ok")
        rows.append([html.escape(name), str(length["n"]), _fmt(length["sft_mean_tokens"], 1),
                     _fmt(length["aligned_mean_tokens"], 1), "—" if ratio is None else f"×{ratio:.2f}",
                     f"{_pct(length.get('sft_capped_share'))} / {_pct(length.get('aligned_capped_share'))}", flag])
    if not rows:
        return '<p class="note">No answers generated (<code>evaluate.num_samples: 0</code> and no judge).</p>'
    return _table(["run", "prompts", "SFT mean tokens", "aligned mean tokens", "ratio", "cut at max_new_tokens "
                   "(SFT / aligned)", ""], rows)


def lm_eval_table(benchmarks: dict[str, dict]) -> str:
    """task | metric | SFT | each run, from the lm_eval rules' results."""
    if not benchmarks:
        return ""
    runs = list(benchmarks)
    tasks: dict[tuple[str, str], dict] = {}
    for run, result in benchmarks.items():
        for task, metrics in (result.get("lm_eval") or {}).items():
            for metric, pair in metrics.items():
                cell = tasks.setdefault((task, metric), {"sft": pair.get("sft")})
                cell[run] = pair.get("aligned")
    rows = [[html.escape(task), html.escape(metric), _fmt(values.get("sft"), 4)]
            + [_fmt(values.get(run), 4) for run in runs] for (task, metric), values in tasks.items()]
    first = next(iter(benchmarks.values()))
    limit, shots = first.get("limit"), first.get("num_fewshot")
    settings = (f"lm-eval {html.escape(str(first.get('lm_eval_version')))}; "
                f"{'every document' if limit is None else f'at most {limit} documents'} per task; "
                f"{'each task’s own few-shot setting' if shots is None else f'{shots}-shot'}"
                f"{'; prompts in the chat template' if first.get('apply_chat_template') else ''}")
    return (_table(["task", "metric", "SFT"] + [html.escape(r) for r in runs], rows)
            + f'<p class="note">{settings}.</p>')


def _clip(text: str) -> str:
    text = text if len(text) <= SAMPLE_CHARS else text[:SAMPLE_CHARS] + " …"
    return f'<div class="text">{html.escape(text)}</div>'


def samples_section(evals: dict[str, dict]) -> str:
    parts = []
    for i, (name, result) in enumerate(evals.items()):
        samples = result.get("samples") or []
        if not samples:
            continue
        rows = [[_clip(s["prompt"]), _clip(s["sft"]), _clip(s["aligned"])] for s in samples]
        parts.append(f"<details{' open' if i == 0 else ''}><summary>{html.escape(name)}: {len(samples)} held-out "
                     f"prompts, greedy decoding</summary>"
                     + _table(["prompt", "SFT answer", f"{html.escape(name)} answer"], rows, "samples")
                     + "</details>")
    return "\n".join(parts) or '<p class="note">No samples (<code>evaluate.num_samples: 0</code>).</p>'


def at_a_glance(evals: dict[str, dict], benchmarks: dict[str, dict]) -> str:
    items = []
    for name, result in evals.items():
        parts = [f"preference accuracy {result['preference_accuracy']:.2f} on {result['pairs']} held-out pairs"]
        judge = result.get("judge") or {}
        if judge.get("win_rate") is not None:
            parts.append(f"win rate {_pct(judge['win_rate'])} against SFT (95% CI {_pct(judge['ci_low'])} – "
                         f"{_pct(judge['ci_high'])}, {html.escape(str(judge['name']))})")
        length = result.get("length") or {}
        if length.get("ratio") is not None:
            text = f"answers ×{length['ratio']:.2f} the SFT length"
            parts.append(f'<span class="flag">{text}</span>' if length["ratio"] > LENGTH_GROWTH_FLAG else text)
        for task, metrics in (benchmarks.get(name, {}).get("lm_eval") or {}).items():
            metric, pair = next(iter(metrics.items()), (None, None))
            if metric and pair.get("aligned") is not None and pair.get("sft") is not None:
                parts.append(f"{html.escape(task)} {html.escape(metric)} {pair['sft']:.3f} → {pair['aligned']:.3f}")
        items.append(f"<li><b>{html.escape(name)}</b>: {'; '.join(parts)}.</li>")
    return f"<ul>{''.join(items)}</ul>"


def validation_text(report: dict) -> str:
    text = (f"{report['input_rows']} rows read: {report['train_rows']} train, {report['eval_rows']} eval, "
            f"{report['rejected_rows']} rejected.")
    bias = report.get("length_bias") or {}
    if bias.get("chosen_longer_share") is not None:
        correlation = bias.get("correlation")
        text += (f" The chosen answer is the longer one in {100 * bias['chosen_longer_share']:.1f}% of pairs "
                 f"(correlation of length difference and preference "
                 f"{'—' if correlation is None else f'{correlation:+.2f}'}): a strong link lets DPO learn "
                 f"“longer” instead of “better”.")
    labels = (report.get("labels") or {}).get("train")
    if labels:
        text += f" Unpaired rows (KTO) in train: {labels['desirable']} desirable, {labels['undesirable']} undesirable."
    for run, balance in (report.get("balance") or {}).items():
        ratio = balance["weighted_ratio"]
        text += (f" KTO balance of run {run}: (desirable_weight × desirable) / (undesirable_weight × undesirable) = "
                 f"{'undefined' if ratio is None else f'{ratio:.2f}'} under desirable_weight "
                 f"{balance['desirable_weight']:g} and undesirable_weight {balance['undesirable_weight']:g}, "
                 f"{'outside' if balance['warning'] else 'inside'} the recommended [1, 1.33].")
    return html.escape(text)


def online_table(rounds: list[dict]) -> str:
    """One row per round: its samples (drawn from the model it started from) and its model's evaluation."""
    rows = []
    for number, figures in enumerate(rounds, start=1):
        sampled, e = figures["samples"], figures["evaluation"]
        interval = "—" if e.get("ci_low") is None else f"{_pct(e['ci_low'])} – {_pct(e['ci_high'])}"
        rows.append([str(number), str(sampled["completions"]), f"{sampled['selected']} / {sampled['ties']}",
                     _fmt(sampled["mean_score"]), _fmt(sampled["mean_tokens"], 1), _fmt(e.get("mean_score")),
                     _pct(e.get("win_rate")), interval, _fmt(e.get("mean_tokens"), 1), _fmt(e.get("kl_to_reference")),
                     html.escape(str(e.get("reference") or "—"))])
    first = rounds[0]["evaluation"] if rounds else {}
    # Round 1's reference is the starting model: "start" where there was no SFT step (finetune.method: none).
    start, model = ("start", "the starting model") if first.get("reference") == "start" else ("SFT", "the SFT model")
    note = (f'<p class="note">Samples: the round\'s completions, drawn from the model it started from (round 1: '
            f"{start}), scored by the round's judge. Evaluation: the round's model against {model}, greedy, on "
            f"{first.get('prompts', '—')} {'held-out ' if first.get('held_out') else ''}prompts (judge "
            f"{html.escape(str(first.get('judge')))}; {start}'s own mean score "
            f"{_fmt(first.get('mean_score_sft'))}, its answers {_fmt(first.get('sft_mean_tokens'), 1)} tokens); "
            f"KL: a Monte Carlo estimate per prompt on the round model's samples.</p>")
    return _table(["round", "samples", "pairs / ties", "mean score of samples", "sample tokens",
                   "mean score (greedy)", f"win rate vs {start}", "95% CI", "answer tokens (greedy)",
                   "KL to reference", "reference"], rows, "online") + note


IFEVAL_FIGURES = (("prompt_level_strict_acc", "prompt strict"), ("inst_level_strict_acc", "instruction strict"),
                  ("prompt_level_loose_acc", "prompt loose"), ("inst_level_loose_acc", "instruction loose"))


def ifeval_table(rounds: list[dict]) -> str:
    """With judge ifeval: IFEval's four figures (95% intervals) of the starting model and of each round's, on the
    held-out prompts, with the answers cut at the token limit; empty otherwise."""
    if not rounds or not rounds[0]["evaluation"].get("ifeval"):
        return ""

    def cells(figures: dict) -> list[str]:
        return [f"{_pct(figures[key]['value'])} ({_pct(figures[key]['ci_low'])} – {_pct(figures[key]['ci_high'])})"
                for key, _ in IFEVAL_FIGURES]

    first = rounds[0]["evaluation"]
    rows = [["start", *cells(first["ifeval"]["sft"]), _pct(first.get("capped_share_sft"))]]
    for number, figures in enumerate(rounds, start=1):
        e = figures["evaluation"]
        if e.get("ifeval"):
            rows.append([f"round {number}", *cells(e["ifeval"]["aligned"]), _pct(e.get("capped_share"))])
    return (f"<h3>IFEval on {first.get('prompts')} held-out prompts</h3>"
            + _table(["model", *(label for _, label in IFEVAL_FIGURES), "answers cut at the limit"], rows, "ifeval"))


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>LexAlign report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:0.5em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}img{{max-width:100%;margin:0.5em 0}}
table.samples td,table.samples th{{text-align:left;vertical-align:top;width:33%}}
.text{{white-space:pre-wrap;font-family:monospace;font-size:85%;max-height:14em;overflow:auto}}
.flag{{color:#b00;font-weight:bold}}.name{{display:block;text-align:left}}.note{{color:#555;font-size:90%}}
summary{{cursor:pointer;margin:0.4em 0;font-weight:bold}}</style></head>
<body data-images-loaded="pending">
<h1>LexAlign report</h1>
<p>{summary}</p>
{offline}
{online}
<script>
window.addEventListener("load", function () {{
  var imgs = Array.from(document.images);
  var ok = imgs.filter(function (i) {{ return i.complete && i.naturalWidth > 0; }}).length;
  document.body.setAttribute("data-images-loaded", ok + "/" + imgs.length);
}});
</script>
</body></html>
"""


OFFLINE = """{glance}
<h2>Evaluation on held-out data</h2>
{table}
{eval_images}
<h2>Judge: aligned against SFT</h2>
{judge}
<h2>Answer length</h2>
{length}
{benchmarks}
<h2>Answers side by side</h2>
{samples}
<h2>Training curves</h2>
{curve_images}
<h2>Validated data</h2>
<p>{validation}</p>
{length_images}"""
"""The offline runs' sections (none when the pipeline runs the online rounds alone: online.offline false)."""


def _images(paths: list[Path], page: Path) -> str:
    return "\n".join(f'<img src="{p.relative_to(page.parent).as_posix()}" alt="{p.stem}">' for p in paths)


def plain_section(rounds: list[Path]) -> str:
    """The last round's and the starting model's answers to questions asked without instructions (MT-Bench's),
    side by side: a model the rounds broke would show it here first."""
    last = read_json(Path(rounds[-1]) / "eval.json") if (Path(rounds[-1]) / "eval.json").is_file() else {}
    samples = last.get("plain_samples") or []
    if not samples:
        return ""
    rows = [[_clip(s["prompt"]), _clip(s["sft"]), _clip(s["aligned"])] for s in samples]
    return (f"<details open><summary>Plain questions: the starting model and round {len(rounds)}'s, greedy"
            "</summary>" + _table(["question", "starting model", f"round {len(rounds)}"], rows, "samples")
            + "</details>")


def online_section(rounds: list[Path], plots: Path, page: Path) -> str:
    """The online rounds' section (empty without rounds): the per-round plot and table."""
    if not rounds:
        return ""
    figures = [round_figures(folder) for folder in rounds]
    return (f"<h2>Online rounds</h2>\n{online_table(figures)}\n{ifeval_table(figures)}\n"
            f"{plain_section(rounds)}\n{_images([plot_online(figures, plots)], page)}")


def build_report(evals: dict[str, Path], models: dict[str, Path], validated: Path | None, tokenizer_dir: Path,
                 page: Path, plots: Path, benchmarks: dict[str, Path] | None = None,
                 online: list[Path] | None = None) -> Path:
    """Write the plots into `plots` and the page to `page` (images linked relatively). `benchmarks`: each run's
    lm-eval result (none when no lm-eval task is configured); `online`: the online rounds' folders, in order.
    Without offline runs (`evals` empty: online.offline false) the page holds the rounds alone."""
    plots.mkdir(parents=True, exist_ok=True)
    rounds = online_section(list(online or []), plots, page)
    if not evals:
        atomic_write_text(page, PAGE.format(summary=f"{len(online or [])} online round(s), each model against the "
                                                    "starting model on held-out prompts.", offline="", online=rounds))
        return page
    from lexalign.core.lineage import read_lineage

    results = {name: read_json(path) for name, path in evals.items()}
    lm = {name: read_json(path) for name, path in (benchmarks or {}).items()}
    methods = {name: ((read_lineage(path) or {}).get("config") or {}).get("method") for name, path in models.items()}
    curves = plot_curves(models, plots)
    comparison = plot_eval(results, plots)
    lengths = plot_lengths(validated, tokenizer_dir, plots)
    report = read_json(validated / "report.json")
    bench = lm_eval_table(lm)
    atomic_write_text(page, PAGE.format(
        summary=f"{len(results)} run(s) aligned from one SFT model and compared on the same held-out data.",
        offline=OFFLINE.format(
            glance=at_a_glance(results, lm), table=eval_table(results, methods),
            eval_images=_images([comparison], page), judge=judge_table(results), length=length_table(results),
            benchmarks=f"<h2>Benchmarks (lm-evaluation-harness)</h2>\n{bench}" if bench else "",
            samples=samples_section(results), curve_images=_images(curves, page), validation=validation_text(report),
            length_images=_images([lengths], page)),
        online=rounds))
    return page


def round_figures(folder) -> dict:
    """A round's figures from its files, for the report and the lineage: its samples (generations/report.json,
    selection.json: sampled from the model the round started from) and its model's evaluation (eval.json)."""
    folder = Path(folder)
    generated = read_json(folder / "generations" / "report.json")
    selection = read_json(folder / "selection.json")
    evaluation = read_json(folder / "eval.json") if (folder / "eval.json").is_file() else {}
    judged, length = evaluation.get("judge") or {}, evaluation.get("length") or {}
    return {"samples": {"policy": generated["policy"], "completions": generated["completions"],
                        "mean_tokens": generated.get("mean_completion_tokens"),
                        "truncated": generated["truncated"], "mean_score": selection.get("mean_score"),
                        "selected": selection.get("selected"), "ties": selection.get("ties"),
                        "temperature": generated["sampling"]["temperature"]},
            "evaluation": {"judge": judged.get("name"), "prompts": evaluation.get("prompts"),
                           "held_out": evaluation.get("held_out"), "win_rate": judged.get("win_rate"),
                           "ci_low": judged.get("ci_low"), "ci_high": judged.get("ci_high"),
                           "mean_score_sft": judged.get("mean_reward_sft"),
                           "mean_score": judged.get("mean_reward_aligned"),
                           "sft_mean_tokens": length.get("sft_mean_tokens"),
                           "mean_tokens": length.get("aligned_mean_tokens"),
                           "kl_to_reference": evaluation.get("kl_to_reference"),
                           "reference": evaluation.get("reference_name"),
                           "capped_share_sft": length.get("sft_capped_share"),
                           "capped_share": length.get("aligned_capped_share"),
                           # judge ifeval: IFEval's four figures of the starting model and of this round's
                           "ifeval": judged.get("ifeval")}}
