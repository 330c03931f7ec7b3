"""Standard benchmarks through EleutherAI's lm-evaluation-harness (the `lm_eval` package: `pip install
"lexalign[eval]"`), on the SFT model and on each aligned model.

The pipeline runs it in rules of their own (`lm_eval_sft`, `lm_eval`, `lm_eval_run`), so changing
`evaluate.lm_eval` reruns only them and the report. The SFT model is evaluated once; each aligned model's
result holds `lm_eval: {task: {metric: {sft, aligned}}}`. Besides lm-eval's own tasks, the local tasks in
`lexalign/demo/lm_eval_tasks/` are registered (the demo's `lexalign_demo_polite` runs offline).
"""

from __future__ import annotations

import difflib
from pathlib import Path

from lexalign.core.errors import LexAlignError
from lexalign.demo.benchmark import TASKS_DIR

KEY = "evaluate.lm_eval.tasks"


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise LexAlignError(f"{KEY} is set, but EleutherAI's lm-evaluation-harness is not installed",
                            str(err), hint='pip install "lexalign[eval]" (or pip install "lm-eval>=0.4"), or set '
                                           f"{KEY}: []") from None


def task_manager(tasks: list[str]):
    """lm-eval's TaskManager knowing LexAlign's local tasks (and lm-eval's own, unless every task is local: the
    full index takes seconds to build); an unknown task is an error naming `evaluate.lm_eval.tasks`."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    if all(task in local.all_tasks for task in tasks):
        return local
    manager = TaskManager(include_path=str(TASKS_DIR))
    known = set(manager.all_tasks)
    unknown = [task for task in tasks if task not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
        raise LexAlignError(f'lm-eval knows no task "{unknown[0]}" ({KEY})',
                            f"Unknown: {', '.join(unknown)}",
                            f"Did you mean: {', '.join(close)}?" if close else "",
                            hint="Use lm-eval's task, group or tag names (lm-eval ls tasks lists them), or the "
                                 "demo's lexalign_demo_polite")
    return manager


def _metrics(values: dict) -> dict:
    """lm-eval's `{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": …}` as `{"acc": 0.5, "acc_stderr": 0.1}`."""
    out = {}
    for key, value in values.items():
        if "," not in key:
            continue
        metric, _, kind = key.partition(",")
        name = metric if kind == "none" else f"{metric} ({kind})"
        out[name] = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    return out


def run_harness(model_dir: Path, cfg: dict, device: str, seed: int = 42) -> dict:
    """lm-eval's `simple_evaluate` on the model at `model_dir` (loaded by lexalign.models.loading, wrapped in HFLM)."""
    tasks = list(cfg.get("tasks") or [])
    if not tasks:
        raise LexAlignError(f"{KEY} is empty: no benchmark to run", hint=f"List lm-eval tasks in {KEY}")
    manager = task_manager(tasks)  # before any model is loaded: an unknown task fails in seconds
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM

    from lexalign.core.paths import require_model
    from lexalign.models.loading import load_causal_lm, load_tokenizer

    require_model(model_dir, "snakemake results/aligned")
    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, device).to(device).eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=int(cfg.get("batch_size") or 8))
    try:
        out = evaluator.simple_evaluate(
            model=lm, tasks=tasks, num_fewshot=cfg.get("num_fewshot"), limit=cfg.get("limit"),
            task_manager=manager, log_samples=False, apply_chat_template=bool(cfg.get("apply_chat_template")),
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            bootstrap_iters=1000)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as err:
        raise LexAlignError(f"lm-eval failed on {', '.join(tasks)} ({KEY})", f"{type(err).__name__}: {str(err)[:500]}",
                            hint="A task from the Hub needs its dataset: run once where the Hub is reachable (it is "
                                 "cached in HF_DATASETS_CACHE), or drop the task") from None
    import lm_eval

    return {
        "model": str(model_dir),
        "tasks": tasks,
        "limit": cfg.get("limit"),
        "num_fewshot": cfg.get("num_fewshot"),
        "apply_chat_template": bool(cfg.get("apply_chat_template")),
        "results": {task: _metrics(values) for task, values in out["results"].items()},
        "documents": {task: n.get("effective") for task, n in out.get("n-samples", {}).items()},
        "higher_is_better": out.get("higher_is_better", {}),
        "versions": {task: str(v) for task, v in out.get("versions", {}).items()},
        "lm_eval_version": getattr(lm_eval, "__version__", None),
    }


def compare(sft: dict, aligned: dict) -> dict:
    """`{task: {metric: {sft, aligned}}}` from two `results` blocks (standard errors left out)."""
    return {task: {metric: {"sft": sft.get(task, {}).get(metric), "aligned": value}
                   for metric, value in metrics.items() if "_stderr" not in metric}
            for task, metrics in aligned.items()}


def summary(result: dict) -> str:
    lines = [f"lm-eval on {result['model']}:"]
    table = result.get("lm_eval")
    for task, metrics in result["results"].items():
        for metric, value in metrics.items():
            if "_stderr" in metric or value is None:
                continue
            sft = (table or {}).get(task, {}).get(metric, {}).get("sft")
            lines.append(f"  {task} {metric}: {value:.4f}" + (f" (SFT {sft:.4f})" if sft is not None else ""))
    return "\n".join(lines)
