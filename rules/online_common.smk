# On-policy rounds: the settings and helpers rules/online.smk reads (kept apart: Snakemake's lint wants
# rules and functions in separate files).
# On-policy alignment in rounds (the config's `online` section; docs/online-plan.md). → lexalign.stages.online_*
# Round r: sample K completions per prompt from policy(r), judge them, select pairs (or ranked groups), validate
# them with the existing rule, the reference log-probs of the sampled ids, align with the existing rule. Round r+1
# samples from round r's model. Every output is a file of the DAG, so raising `rounds` plans only the new
# rounds, and the judge, a wildcard of the scores file, replans the scores and after, never the generations.
# Without an `online` section no rule here is defined and the offline pipeline's plan is unchanged.
from lexalign.online.rounds import settings as _online_settings  # noqa: E402

try:
    ONLINE = _online_settings(config)
except LexAlignError as err:
    raise WorkflowError(err.render()) from None

ONLINE_ROUND = f"{RESULTS}/online/round-{{r}}"
# The rules read the settings as they are parsed; without an online section they read placeholder settings and
# are never planned (no target asks for results/online/).
_ON = ONLINE or _online_settings({**config, "online": {"rounds": 1, "judge": "demo", "alignment": {"method": "dpo"},
                                                       "sampling": {"max_new_tokens": 1}}})


def online_targets():
    """The default target's online part: the last round's model, only when the config has an online section."""
    return [f"{RESULTS}/online/final"] if ONLINE else []


def online_policy(wc):
    """The model round r samples from and starts from (its reference too): the SFT model, then the last round's."""
    r = int(wc.r)
    return sft_model() if r == 1 else f"{RESULTS}/online/round-{r - 1}/model"


def online_reference_file():
    from lexalign.reference.layout import setting_name

    return f"{RESULTS}/reference/online-round-{{r}}/{setting_name(_ON['alignment'])}.parquet"


wildcard_constraints:
    r=r"[1-9]\d*",
