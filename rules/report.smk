# Step 6: one report comparing every run (results/report.html), plots marked for `snakemake --report`.
# → lexalign.steps.training.report


report: "../report/workflow.rst"


rule report:
    input:
        # The offline runs (none with online.offline false: the report shows the rounds alone).
        evals=run_evaluations() if OFFLINE else [],
        lm_evals=run_benchmarks() if OFFLINE else [],
        models=[f"{RESULTS}/aligned"] + [f"{RESULTS}/runs/{run}/model" for run in RUNS] if OFFLINE else [],
        validated=[f"{RESULTS}/data/preferences"] if OFFLINE else [],
        tokenizer=f"{RESULTS}/models/base",
        # The online rounds' evaluations (none without an online section): the report's per-round section.
        online=online_evaluations(),
        code=step_code("report"),
    output:
        page=f"{RESULTS}/report.html",
        plots=report(
            directory(f"{RESULTS}/report"),
            patterns=["{name}.png"],
            caption="../report/plots.rst",
            category="LexAlign",
        ),
    params:
        runs=["aligned"] + list(RUNS) if OFFLINE else [],
    conda:
        conda_env()
    log:
        f"{LOGS}/report.log",
    script:
        "../scripts/step.py"
