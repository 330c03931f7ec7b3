# On-policy rounds (docs/online-plan.md): the jobs of each round; settings and helpers in online_common.smk.


rule online_prompts:
    input:
        # The validated preference data's train prompts (from: preference_data), or the user's file.
        [_ON["prompts"]["path"]] if _ON["prompts"]["from"] == "path" else [],  # edited: rerun
        data=[f"{RESULTS}/data/preferences"] if _ON["prompts"]["from"] == "preference_data" else [],
        code=step_code("online_prompts"),
    output:
        output=f"{RESULTS}/online/prompts.json",
    params:
        # Not per_round nor rounds: every round slices this one order, so raising them replans no round.
        prompts={k: v for k, v in _ON["prompts"].items() if k != "per_round"},
        seed=config["seed"],
    conda:
        conda_env()
    log:
        f"{LOGS}/online/prompts.log",
    script:
        "../scripts/step.py"

rule online_generate:
    input:
        model=online_policy,
        prompts=f"{RESULTS}/online/prompts.json",
        code=step_code("online_generate"),
    output:
        output=directory(f"{ONLINE_ROUND}/generations"),
        # Generation tokens/s (Snakemake's benchmark beside it times the whole job).
        throughput=f"{RESULTS}/benchmarks/online/round-{{r}}/generation.json",
    # scale.generate: several processes (and nodes) each sample their share of the shards; the main process joins
    # them into the generations one process writes.
    resources:
        **scale_resources("generate"),
    params:
        number=lambda wc: int(wc.r),
        sampling=online_sampling,
        device=config["device"],
    conda:
        conda_env()
    log:
        f"{LOGS}/online/round-{{r}}/generate.log",
    benchmark:
        f"{RESULTS}/benchmarks/online/round-{{r}}/generate.tsv"
    script:
        "../scripts/step.py"

rule online_score:
    input:
        # A reward function's file: editing it rescores (its cache identity holds the file), never samples again.
        judge_files(_ON["judge"]),
        generations=f"{ONLINE_ROUND}/generations",
        # The prompts' other fields: what the ifeval judge and a reward function of the user's read.
        prompts=f"{RESULTS}/online/prompts.json",
        reward_model=lambda wc: [f"{RESULTS}/models/reward"] if wc.judge == "reward_model" else [],
        code=step_code("online_score"),
    output:
        output=f"{ONLINE_ROUND}/scores-{{judge}}.parquet",
    # scale.score, for the reward model: several processes each score a share of the batches (the demo and LLM
    # judges score in one process, and ask for nothing).
    resources:
        **(scale_resources("score") if _ON["judge"] == "reward_model" else {}),
    params:
        judge=lambda wc: _ON["judge"] if wc.judge == judge_name(_ON["judge"]) else wc.judge,
        llm_judge=lambda wc: config["evaluate"]["llm_judge"] if wc.judge == "llm" else None,
        nltk_data=lambda wc: config["evaluate"]["ifeval"]["nltk_data"] if wc.judge == "ifeval" else None,
        # Shared by every round and rerun: a score is never asked twice.
        cache=lambda wc: f"{RESULTS}/cache/scores/{wc.judge}.jsonl",
        device=config["device"],
    wildcard_constraints:
        judge="demo|reward_model|llm|ifeval|python",
    conda:
        conda_env()
    log:
        f"{LOGS}/online/round-{{r}}/score-{{judge}}.log",
    script:
        "../scripts/step.py"

rule online_select:
    input:
        generations=f"{ONLINE_ROUND}/generations",
        scores=f"{ONLINE_ROUND}/scores-{judge_name(_ON['judge'])}.parquet",
        code=step_code("online_select"),
    output:
        output=f"{ONLINE_ROUND}/selection.jsonl",
        report=f"{ONLINE_ROUND}/selection.json",
    params:
        select=online_selection,
    conda:
        conda_env()
    log:
        f"{LOGS}/online/round-{{r}}/select.log",
    script:
        "../scripts/step.py"

# The round's selection through the existing validation (its report counts ties and length bias per round).
use rule validate_preferences as online_validate with:
    input:
        raw=f"{ONLINE_ROUND}/selection.jsonl",
        tokenizer=f"{RESULTS}/models/base",
        code=step_code("online_validate"),
    output:
        output=directory(f"{ONLINE_ROUND}/preferences"),
    params:
        dataset=online_validation,
        seed=config["seed"],
        trust_remote_code=config["model"]["trust_remote_code"],
        kto_weights=None,
        pairs_only=True,
    log:
        f"{LOGS}/online/round-{{r}}/validate.log",

rule online_reference:
    input:
        model=online_reference_model,
        data=f"{ONLINE_ROUND}/preferences",
        # The sampled ids: the reference and the trainer read them, never the text re-encoded.
        selection=f"{ONLINE_ROUND}/selection.jsonl",
        code=step_code("online_reference"),
    output:
        output=f"{RESULTS}/reference/online-round-{{r}}/{{setting}}.parquet",
    resources:
        # The offline reference step's processes (scale.reference): the same pass, on the sampled ids.
        **scale_resources("reference"),
    params:
        setting=lambda wc: parse_setting(wc.setting),
        device=config["device"],
        trust_remote_code=config["model"]["trust_remote_code"],
    wildcard_constraints:
        setting=SETTING_PATTERN,
    conda:
        conda_env()
    log:
        f"{LOGS}/online/round-{{r}}/reference-{{setting}}.log",
    script:
        "../scripts/step.py"

use rule align as online_align with:
    input:
        model=online_policy,
        data=f"{ONLINE_ROUND}/preferences",
        reference=online_reference_file,
        # What the reference file's key is checked against (reference: sft holds every round to the SFT model).
        reference_model=online_reference_input,
        # The sampled ids, for a method with no reference file (ORPO, SimPO, CPO): never the text re-encoded.
        selection=f"{ONLINE_ROUND}/selection.jsonl",
        code=step_code("online_align"),
    output:
        output=directory(f"{ONLINE_ROUND}/model"),
    params:
        alignment=online_alignment,
        device=config["device"],
        seed=training_seed(),
        trust_remote_code=config["model"]["trust_remote_code"],
        checkpoint_dir=lambda wc: f"{RESULTS}/checkpoints/online/round-{wc.r}",
        tracking=lambda wc: tracking_params(f"online-round-{wc.r}"),
    log:
        f"{LOGS}/online/round-{{r}}/align.log",
    benchmark:
        f"{RESULTS}/benchmarks/online/round-{{r}}/align.tsv"

rule online_evaluate:
    input:
        judge_files(_ON["judge"]),
        model=f"{ONLINE_ROUND}/model",
        sft=sft_model(),
        reference=online_reference_model,
        prompts=f"{RESULTS}/online/prompts.json",
        # The held-out prompts: the validated data's eval split (prompts from: preference_data).
        data=[f"{RESULTS}/data/preferences"] if _ON["prompts"]["from"] == "preference_data" else [],
        reward_model=[f"{RESULTS}/models/reward"] if _ON["judge"] == "reward_model" else [],
        code=step_code("online_evaluate"),
    output:
        output=f"{ONLINE_ROUND}/eval.json",
    params:
        number=lambda wc: int(wc.r),
        # The online judge (what the rounds optimise), with the evaluate section's decoding and judge settings.
        evaluate={**evaluate_params(), "judge": _ON["judge"]},
        held_out={"from": _ON["prompts"]["from"]},
        reference_name=lambda wc: start_name() if online_reference_model(wc) == sft_model() else f"round {int(wc.r) - 1}",
        seed=config["seed"],
        device=config["device"],
        # The SFT model's answers, decoded by the first round's evaluation and read back by the others.
        cache_dir=f"{RESULTS}/cache/answers",
    conda:
        conda_env()
    log:
        f"{LOGS}/online/round-{{r}}/evaluate.log",
    script:
        "../scripts/step.py"

rule online_final:
    input:
        [f"{RESULTS}/online/round-{r}/selection.json" for r in range(1, _ON["rounds"] + 1)],
        # Each round's figures go into the final model's lineage.
        online_evaluations(),
        model=f"{RESULTS}/online/round-{_ON['rounds']}/model",
        code=step_code("online_final"),
    output:
        output=directory(f"{RESULTS}/online/final"),
    params:
        rounds=[f"{RESULTS}/online/round-{r}" for r in range(1, _ON["rounds"] + 1)],
    conda:
        conda_env()
    log:
        f"{LOGS}/online/final.log",
    script:
        "../scripts/step.py"
