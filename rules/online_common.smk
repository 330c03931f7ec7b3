# On-policy rounds: the settings and helpers rules/online.smk reads (kept apart: Snakemake's lint wants
# rules and functions in separate files).
# On-policy alignment in rounds (the config's `online` section; docs/online-plan.md). → lexalign.steps.training.online_*
# Round r: sample K completions per prompt from policy(r), judge them, select pairs (or ranked groups), validate
# them with the existing rule, the reference log-probs of the sampled ids, align with the existing rule. Round r+1
# samples from round r's model. Every output is a file of the DAG, so raising `rounds` plans only the new
# rounds, and the judge, a wildcard of the scores file, replans the scores and after, never the generations.
# Without an `online` section no rule here is defined and the offline pipeline's plan is unchanged.
ONLINE_ROUND = f"{RESULTS}/online/round-{{r}}"
# The rules read the settings as they are parsed (ONLINE, checked with the config in common.smk); without an
# online section they read placeholder settings and are never planned (no target asks for results/online/).
_ON = ONLINE or _checked["online_placeholder"]


def online_targets():
    """The default target's online part: the last round's model, only when the config has an online section."""
    return [f"{RESULTS}/online/final"] if ONLINE else []


def online_evaluations():
    """Every round's evaluation against the SFT model (the report's per-round plots), in round order; none
    without an online section."""
    return [f"{RESULTS}/online/round-{r}/eval.json" for r in range(1, ONLINE["rounds"] + 1)] if ONLINE else []


def online_alignment(wc):
    """Round r's alignment section (online.alignment: one for every round, or a list, one per round): each
    round's jobs read only their own, so changing round 2's replans round 2's align and what follows."""
    from lexalign.config.online import round_alignment

    return round_alignment(_ON, int(wc.r))


def online_policy(wc):
    """The model round r samples from and starts from: the SFT model, then the last round's."""
    r = int(wc.r)
    return sft_model() if r == 1 else f"{RESULTS}/online/round-{r - 1}/model"


def online_reference_model(wc):
    """Round r's reference (online.reference): the SFT model in every round (sft), or the model the round starts
    from (previous)."""
    return sft_model() if _ON["reference"] == "sft" else online_policy(wc)


def online_reference_file(wc):
    """Round r's reference log-probs (of the sampled ids); none for a reference-free method (lexalign.methods:
    ORPO, SimPO, CPO), so no reference job is planned."""
    from lexalign import methods
    from lexalign.reference.layout import setting_name

    alignment = online_alignment(wc)
    if not methods.of(alignment).needs_reference:
        return []
    return [f"{RESULTS}/reference/online-round-{wc.r}/{setting_name(alignment)}.parquet"]


def online_reference_input(wc):
    """The reference model align checks the reference file's key against (none without a file)."""
    return [online_reference_model(wc)] if online_reference_file(wc) else []


def online_sampling(wc):
    """What shapes round r's samples, and only that: the judge and the selection are not here."""
    from lexalign.config.online import round_sampling

    return round_sampling(_ON, int(wc.r))


def online_validation(wc):
    """The existing validation's settings for round r's selection."""
    from lexalign import methods

    alignment = online_alignment(wc)
    ranked = {"group_size": methods.of(alignment).responses(alignment)} if _ON["select"] == "ranked" else {}
    return {"eval_fraction": _ON["eval_fraction"], "max_length": alignment["max_length"], **ranked}


def online_selection(wc):
    """How round r's completions become training rows: pairs or ranked groups of the round's K."""
    from lexalign import methods

    alignment = online_alignment(wc)
    return {"select": _ON["select"], "truncated": _ON["truncated"],
            "group_size": methods.of(alignment).responses(alignment)}


wildcard_constraints:
    r=r"[1-9]\d*",
