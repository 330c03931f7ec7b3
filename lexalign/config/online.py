"""The config's `online` section as the rounds read it: checked once against the alignment each round trains
(`settings`, as Snakemake plans), and each round's own settings from it."""

from __future__ import annotations

from lexalign import methods
from lexalign.config.loader import section_defaults
from lexalign.config.sections import AlignConfig, run_alignment
from lexalign.core.errors import LexAlignError, warn


def selects(select: str, alignment: dict) -> bool:
    """Whether a round's `alignment` trains on what `select` makes (lexalign.methods says what each method reads):
    `best_worst` pairs, for a method reading pairs or unpaired rows (KTO: the best desirable, the worst not);
    `ranked` groups of K, for a method reading ranked groups of more than 2 (GDPO)."""
    method = methods.of(alignment)
    if select == "ranked":
        return method.group_size(alignment) is not None
    return method.layout is not methods.Layout.RANKED


def round_alignment(online: dict, number: int) -> dict:
    """Round `number`'s alignment section (1-based): its item of the `online.alignment` list, the last item for
    every later round."""
    alignments = online["alignment"]
    return alignments[min(number, len(alignments)) - 1]


def round_name(online: dict, index: int) -> str:
    """Where item `index` (0-based) of online.alignment is in the config, and which rounds it sets, for messages."""
    count = len(online["alignment"])
    if not online["listed"]:
        return "online.alignment (every round)"
    rounds = f"round {index + 1}" + (" and every later round" if index == count - 1 and index + 1 < online["rounds"]
                                     else "")
    return f"online.alignment[{index}] ({rounds})"


def max_prompt_tokens(online: dict, number: int) -> int | None:
    """The longest prompt round `number` samples from: online.max_prompt_tokens, or (null) what the round's
    alignment.max_length leaves after max_new_tokens, so a prompt and its completion are trained as sampled."""
    if online["max_prompt_tokens"] is not None:
        return online["max_prompt_tokens"]
    length = round_alignment(online, number)["max_length"]
    return None if length is None else max(length - online["sampling"]["max_new_tokens"], 0)


def round_sampling(online: dict, number: int) -> dict:
    """What shapes round `number`'s samples, and only that (the generate rule's params: the judge and the
    selection are not here, so changing them never samples again)."""
    return {**online["sampling"], "samples_per_prompt": online["samples_per_prompt"],
            "max_prompt_tokens": max_prompt_tokens(online, number), "per_round": online["prompts"]["per_round"]}


def settings(config: dict) -> dict | None:
    """The `online` section with its defaults, checked against the alignment each round trains; None when
    absent/empty. `alignment` becomes the list of every round's full alignment section (one mapping: a list of
    one), `listed` says whether the config gave a list."""

    section = config.get("online")
    if not section:
        return None
    online = section_defaults("online", section)
    online["prompts"] = section_defaults("online", {"rounds": 1, "prompts": online["prompts"]})["prompts"]
    online["listed"] = isinstance(online["alignment"], list)
    written = online["alignment"] if online["listed"] else [online["alignment"]]
    if len(written) > online["rounds"]:  # never trained: said, and left out of the checks
        unused = f"[{online['rounds']}]" if len(written) == online["rounds"] + 1 else \
            f"[{online['rounds']}] to [{len(written) - 1}]"
        warn(f"online.alignment has {len(written)} items and online.rounds is {online['rounds']}: "
             f"online.alignment{unused} will never be used",
             "Remove them, or raise online.rounds to train them")
        written = written[:online["rounds"]]
    online["alignment"] = written
    alignments = []
    for index, overrides in enumerate(written):
        where = round_name(online, index)
        try:
            alignment = run_alignment(config["alignment"], overrides,
                                      where=where.split(" ")[0] if online["listed"] else "online.alignment")
            AlignConfig.from_dict(alignment)
        except LexAlignError as err:
            err.details = [*err.details, f"In {where}"]
            raise
        alignments.append(alignment)
    online["alignment"] = alignments
    problems = []
    k = online["samples_per_prompt"]
    for index, alignment in enumerate(alignments):
        where, method = round_name(online, index), alignment["method"]
        if online["select"] == "best_worst" and not selects("best_worst", alignment):
            problems.append(f"{where}: select best_worst trains pairs (or KTO's unpaired rows), which method "
                            f"{method} does not read: use select ranked, or a pair method")
        ranking = [m for m in methods.METHODS.values() if m.group_key]
        if online["select"] == "ranked" and not (selects("ranked", alignment)
                                                 and methods.group_size(alignment) <= k):
            keys = " or ".join(f"{m.name} with 2 < {m.group_key} <= samples_per_prompt ({k})" for m in ranking)
            own = methods.of(alignment).group_key
            problems.append(f"{where}: select ranked trains on ranked groups: it needs method {keys} (it is method "
                            f"{method}{f', {own} {alignment[own]}' if own else ''})")
        length, new = alignment["max_length"], online["sampling"]["max_new_tokens"]
        budget = None if length is None else length - new
        wanted = online["max_prompt_tokens"]
        if budget is not None and (budget < 1 or (wanted is not None and wanted > budget)):
            problems.append(f"{where}: a prompt of max_prompt_tokens ({wanted or 'none left'}) and max_new_tokens "
                            f"({new}) must fit the round's alignment.max_length ({length}): training would cut "
                            f"the sampled tokens")
    prompts = online["prompts"]
    if prompts["from"] == "path" and not prompts["path"]:
        problems.append("online.prompts.from is path, but online.prompts.path is not set")
    if online["judge"] == "reward_model" and not (config["evaluate"]["reward_model"] or {}).get("repo_id") \
            and not (config["evaluate"]["reward_model"] or {}).get("path"):
        problems.append("online.judge reward_model reads evaluate.reward_model, which names no model")
    if online["judge"] == "llm" and not (config["evaluate"]["llm_judge"].get("base_url")
                                          and config["evaluate"]["llm_judge"].get("model")):
        problems.append("online.judge llm reads evaluate.llm_judge, which needs base_url and model")
    if problems:
        raise LexAlignError("Invalid online section", *problems, hint="Fix the online section of the config "
                            "(docs/online-plan.md)")
    return online

