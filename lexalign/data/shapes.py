"""The shapes preference data comes in, each normalised to prompt / responses (best first) / scores.

(Longer than most modules on purpose: every shape's reader side by side, so a new shape is written against the
others and reads the same fields, messages and scores the same way.)

- `pairs`: `prompt`, `chosen` and `rejected` strings (the fast, column-wise path).
- `implicit_prompt`: no prompt column; chosen and rejected are whole transcripts
  (Anthropic HH-RLHF: `\\n\\nHuman: … \\n\\nAssistant: …`). Their shared prefix,
  cut after its last `Assistant:` marker, is the prompt.
- `conversational`: chosen and rejected are lists of `{role, content}` messages,
  either whole conversations sharing every turn but the last (UltraFeedback
  binarized) or the answers alone with a separate prompt (a string or messages).
  Messages are rendered to strings with the tokenizer's chat template, as TRL
  does: prompt = template(prompt, add_generation_prompt), response = the rest
  of template(prompt + response).
- `unpaired`: a prompt, one completion and a label saying whether it is
  desirable (TRL's unpaired format, what KTO learns from): strings, or chat
  messages rendered like the conversational shape. Labels are booleans; 1/0 and
  "true"/"false" (CSV) are read too.
- `ranked`: a prompt with a list of responses, best first, or with scores: a
  `scores` list, or score keys inside each item (raw UltraFeedback
  `completions` with `overall_score`). Responses are sorted by score, best
  first and stable; when only an order is given the scores are K-1, …, 0.

A row that cannot be normalised is rejected with a reason code (see
`lexalign.data.validation`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from lexalign.core.errors import LexAlignError
from lexalign.data.ranking import order_best_first, select_indices
from lexalign.methods import Layout

TEXT_KEYS = ("response", "text", "content", "completion", "output", "answer")
SCORE_KEYS = ("score", "overall_score", "fine-grained_score", "rating", "reward")
ROLES = ("system", "user", "assistant")
_SURROGATE = re.compile("[\ud800-\udfff]")
_ASSISTANT = "Assistant:"
_HUMAN_TURN = re.compile(r"\n\s*Human:")
_MISSING = object()


class Rejected(Exception):
    """A row that cannot be used: `reason` is the code in report.json, `detail` says where."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Plan:
    """How to read one dataset: its shape and the names of its fields."""

    shape: str
    """How the source writes its rows: pairs, conversational, implicit_prompt, unpaired or ranked."""
    prompt: str
    chosen: str
    rejected: str
    responses: str
    scores: str
    group_size: int | None = None
    counts: dict = field(default_factory=dict)
    completion: str = "completion"
    label: str = "label"
    chat: bool = False
    """Rows are conversations, rendered with the model's chat template (every row of the dataset)."""

    @property
    def layout(self) -> Layout:
        """The layout the rows are validated into (lexalign.methods): the shape says how the source writes them
        (pairs as strings, conversations or transcripts with an implicit prompt are all pairs)."""
        return {"ranked": Layout.RANKED, "unpaired": Layout.UNPAIRED}.get(self.shape, Layout.PAIRS)

    @property
    def columns(self) -> list[str]:
        if self.layout is Layout.RANKED:
            return [self.prompt, self.responses, self.scores]
        if self.layout is Layout.UNPAIRED:
            return [self.prompt, self.completion, self.label]
        return [self.prompt, self.chosen, self.rejected]

    @property
    def fast_fields(self) -> list[str] | None:
        """String fields the column-wise path reads, or None when rows need Python."""
        return [self.prompt, self.chosen, self.rejected] if self.shape == "pairs" else None


def missing_field_error(name: str, available: list[str], plan_fields: tuple[str, str, str],
                        ranked_hint: str | None = None) -> LexAlignError:
    prompt, chosen, rejected = plan_fields
    expected = f"Expected format: {{{prompt}: str, {chosen}: str, {rejected}: str}}"
    if ranked_hint:
        expected += f" or {ranked_hint}"
    return LexAlignError(f'Dataset missing required field "{name}"',
                         f"Available fields: {', '.join(available) or '(none)'}", hint=expected)


def _first(records: list[dict], name: str) -> Any:
    return next((r[name] for r in records if r.get(name) is not None), None)


def detect_plan(records: list[dict], names: list[str], cfg, text_cells: bool = False) -> Plan:
    """The shape of a dataset from a sample of its rows and its field names (`text_cells`: CSV/TSV)."""
    plan = Plan("pairs", cfg.prompt_field, cfg.chosen_field, cfg.rejected_field,
                getattr(cfg, "responses_field", "responses"), getattr(cfg, "scores_field", "scores"),
                getattr(cfg, "group_size", None), completion=getattr(cfg, "completion_field", "completion"),
                label=getattr(cfg, "label_field", "label"))
    present = set(names)
    ranked_hint = (f"{{{plan.prompt}: str, {plan.responses}: [str], {plan.scores}: [float]}}"
                   if plan.group_size else None)
    fields = (plan.prompt, plan.chosen, plan.rejected)
    if plan.chosen in present and plan.rejected in present:
        value = _decode_cell(_first(records, plan.chosen), text_cells)
        prompt = _decode_cell(_first(records, plan.prompt), text_cells)
        if isinstance(value, list) or isinstance(prompt, list):
            plan.shape, plan.chat = "conversational", True
        elif plan.prompt not in present:
            transcripts = [r.get(plan.chosen) for r in records[:200]]
            if not any(isinstance(t, str) and _ASSISTANT in t for t in transcripts):
                raise missing_field_error(plan.prompt, names, fields, ranked_hint)
            plan.shape = "implicit_prompt"
        return plan
    if plan.completion in present and plan.label in present and plan.responses not in present:
        if plan.prompt not in present:
            raise missing_field_error(plan.prompt, names, fields, f"{{{plan.prompt}: str, {plan.completion}: str, "
                                                                  f"{plan.label}: bool}}")
        if plan.group_size and plan.group_size > 2:
            raise LexAlignError(f"GDPO needs {plan.group_size} ranked responses per prompt, and the data are "
                                f"unpaired rows ({plan.prompt}, {plan.completion}, {plan.label})",
                                hint="Use method: kto for unpaired rows, or give ranked responses")
        plan.shape = "unpaired"
        plan.chat = any(isinstance(_decode_cell(_first(records, name), text_cells), list)
                        for name in (plan.prompt, plan.completion))
        return plan
    if plan.responses in present:
        if plan.prompt not in present:
            raise missing_field_error(plan.prompt, names, fields, ranked_hint)
        plan.shape = "ranked"
        plan.chat = isinstance(_decode_cell(_first(records, plan.prompt), text_cells), list)
        return plan
    if plan.completion in present:  # an unpaired row without its label (or prompt)
        missing = plan.prompt if plan.prompt not in present else plan.label
        raise missing_field_error(missing, names, fields, f"{{{plan.prompt}: str, {plan.completion}: str, "
                                                          f"{plan.label}: bool}} (unpaired, for KTO)")
    missing = next(f for f in (plan.prompt, plan.chosen, plan.rejected) if f not in present)
    raise missing_field_error(missing, names, fields, ranked_hint)


# --- values ------------------------------------------------------------------------------------


def _decode_cell(value: Any, text_cells: bool) -> Any:
    """CSV/TSV cells are text: a cell holding a JSON list is read as that list."""
    if text_cells and isinstance(value, str) and value.lstrip().startswith("["):
        try:
            decoded = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            return value
        return decoded if isinstance(decoded, list) else value
    return value


def _get(record: dict, name: str, text_cells: bool = False) -> Any:
    value = record.get(name, _MISSING)
    if value is _MISSING:
        raise Rejected("missing_field", f"{name} is missing")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise Rejected("null_field", f"{name} is null")
    return _decode_cell(value, text_cells)


def text(value: Any, where: str, allow_empty: bool = False) -> str:
    if value is None:
        raise Rejected("null_field", f"{where} is null")
    if not isinstance(value, str):
        raise Rejected("non_string_field", f"{where} is {type(value).__name__}, not a string")
    if not value.isascii() and _SURROGATE.search(value):
        raise Rejected("undecodable_bytes", f"{where} holds bytes that are not valid UTF-8 (or a lone surrogate)")
    if not allow_empty and not value.strip():
        raise Rejected("empty_field", f"{where} is {'empty' if not value else 'whitespace only'}")
    return value


# --- conversations -----------------------------------------------------------------------------


def _messages(value: Any, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise Rejected("non_string_field" if not isinstance(value, list) else "empty_field",
                       f"{where} is {'an empty list' if isinstance(value, list) else type(value).__name__}")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise Rejected("bad_message", f"{where}[{i}] is not a {{role, content}} message")
        role = message["role"]
        if role not in ROLES:
            raise Rejected("bad_message", f"{where}[{i}] has role {role!r}; expected one of {', '.join(ROLES)}")
        content = text(message["content"], f"{where}[{i}].content", allow_empty=role == "system")
        out.append({"role": role, "content": content})
    return out


def check_roles(messages: list[dict], where: str) -> None:
    """Optional system message, then user/assistant turns alternating from user, ending with assistant."""
    start = 1 if messages and messages[0]["role"] == "system" else 0
    for i, message in enumerate(messages[start:], start=start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise Rejected("roles_not_alternating", f"{where}: turn {i + 1} is {message['role']}, expected {expected}")
    if len(messages) <= start or messages[-1]["role"] != "assistant":
        raise Rejected("not_ending_with_assistant", f"{where} does not end with an assistant turn")


class ChatRenderer:
    """Renders messages with a tokenizer's chat template (TRL's convention for prompt and completion)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def _render(self, messages: list[dict], generation: bool) -> str:
        tokenizer = self.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise LexAlignError(
                "Conversational data needs a chat template, and the tokenizer has none",
                "Rows hold lists of {role, content} messages, which are rendered to text with the model's template",
                hint="Use a model whose tokenizer has a chat_template, "
                     "or convert the data to prompt/chosen/rejected strings",
            )
        try:
            rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        except Exception as err:  # noqa: BLE001 - a template may raise anything (jinja's raise_exception)
            raise Rejected("chat_template_error", f"{type(err).__name__}: {str(err)[:200]}") from None
        if not isinstance(rendered, str):
            raise Rejected("chat_template_error", f"the template returned {type(rendered).__name__}")
        return rendered

    def split(self, prompt: list[dict], turns_list: list[list[dict]]) -> tuple[str, list[str]]:
        """The rendered prompt and, for each completion, the text the full conversation adds after it."""
        prompt_text = self._render(prompt, True)
        completions = []
        for turns in turns_list:
            full = self._render(prompt + turns, False)
            if not full.startswith(prompt_text):
                raise Rejected("chat_template_mismatch",
                               "the rendered prompt is not a prefix of the rendered conversation")
            completions.append(full[len(prompt_text):])
        return prompt_text, completions


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix, by bisection on C-speed slice compares."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def implicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split HH-style transcripts into the shared prompt (through the last `Assistant:`) and the two answers."""
    shared = _common_prefix(chosen, rejected)
    cut = chosen.rfind(_ASSISTANT, 0, shared)
    while cut > 0 and chosen[cut - 1] != "\n":
        cut = chosen.rfind(_ASSISTANT, 0, cut)
    if cut < 0:
        raise Rejected("no_shared_prompt", 'chosen and rejected share no prefix ending with "Assistant:"')
    end = cut + len(_ASSISTANT)
    if _HUMAN_TURN.search(chosen, end) or _HUMAN_TURN.search(rejected, end):
        raise Rejected("no_shared_prompt", "chosen and rejected differ before their last assistant turn")
    return chosen[:end], chosen[end:], rejected[end:]


# --- rows --------------------------------------------------------------------------------------


def _conversational(plan: Plan, where: str) -> None:
    """Messages are read only in a conversational dataset; elsewhere a list is a value of the wrong type."""
    if plan.shape != "conversational":
        raise Rejected("non_string_field", f"{where} is a list, in a dataset of {plan.shape} strings")


def pair_row(record: dict, plan: Plan, renderer: ChatRenderer, text_cells: bool = False) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) strings from a pairwise row of any shape."""
    chosen = _get(record, plan.chosen, text_cells)
    rejected = _get(record, plan.rejected, text_cells)
    if plan.shape == "pairs":
        prompt = _get(record, plan.prompt, text_cells)
    else:  # the prompt may be implicit in the transcripts or conversations
        prompt = _decode_cell(record.get(plan.prompt), text_cells)
    if isinstance(chosen, str) and isinstance(rejected, str):
        chosen, rejected = text(chosen, plan.chosen), text(rejected, plan.rejected)
        if prompt is None:
            return implicit_prompt(chosen, rejected)
        if isinstance(prompt, str) and plan.chat:  # a plain row in a chat dataset: rendered like the others
            prompt = [{"role": "user", "content": text(prompt, plan.prompt)}]
        if isinstance(prompt, list):
            _conversational(plan, plan.prompt)
            prompt_messages = _messages(prompt, plan.prompt)
            check_roles(prompt_messages + [{"role": "assistant", "content": chosen}], plan.prompt)
            rendered, (c, r) = renderer.split(prompt_messages, [[{"role": "assistant", "content": chosen}],
                                                                 [{"role": "assistant", "content": rejected}]])
            return rendered, c, r
        return text(prompt, plan.prompt), chosen, rejected
    if not isinstance(chosen, list) or not isinstance(rejected, list):
        raise Rejected("non_string_field", f"{plan.chosen} is {type(chosen).__name__} and {plan.rejected} is "
                       f"{type(rejected).__name__}: both must be strings, or both lists of messages")
    _conversational(plan, plan.chosen)
    c_messages, r_messages = _messages(chosen, plan.chosen), _messages(rejected, plan.rejected)
    if isinstance(prompt, list):
        prompt_messages = _messages(prompt, plan.prompt)
        c_turns, r_turns = c_messages, r_messages
    elif len(c_messages) > 1 or len(r_messages) > 1:
        for messages, where in ((c_messages, plan.chosen), (r_messages, plan.rejected)):
            if messages[-1]["role"] != "assistant":
                raise Rejected("not_ending_with_assistant", f"{where} does not end with an assistant turn")
        if c_messages[:-1] != r_messages[:-1]:
            raise Rejected("prompt_mismatch", "chosen and rejected conversations differ before their last turn")
        prompt_messages, c_turns, r_turns = c_messages[:-1], c_messages[-1:], r_messages[-1:]
    elif prompt is None:
        reason = "null_field" if plan.prompt in record else "missing_field"
        raise Rejected(reason, f"{plan.prompt} is {'null' if plan.prompt in record else 'missing'} "
                       f"and {plan.chosen} holds the answer alone")
    else:
        prompt_messages = [{"role": "user", "content": text(prompt, plan.prompt)}]
        c_turns, r_turns = c_messages, r_messages
    check_roles(prompt_messages + c_turns, plan.chosen)
    check_roles(prompt_messages + r_turns, plan.rejected)
    rendered, (c, r) = renderer.split(prompt_messages, [c_turns, r_turns])
    return rendered, c, r


_LABELS = {"true": True, "false": False, "1": True, "0": False}


def label(value: Any, where: str) -> bool:
    """A desirability label: a boolean, 1/0, or "true"/"false" (any case) as CSV cells hold them."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _LABELS:
        return _LABELS[value.strip().lower()]
    raise Rejected("bad_label", f"{where} is {value!r}; expected true or false")


def unpaired_row(record: dict, plan: Plan, renderer: ChatRenderer, text_cells: bool = False
                 ) -> tuple[str, str, bool]:
    """(prompt, completion, label) from an unpaired row (TRL's unpaired format: strings or messages)."""
    prompt = _get(record, plan.prompt, text_cells)
    completion = _get(record, plan.completion, text_cells)
    desirable = label(_get(record, plan.label, text_cells), plan.label)
    if not plan.chat:
        for value, name in ((prompt, plan.prompt), (completion, plan.completion)):
            if isinstance(value, list):
                raise Rejected("non_string_field", f"{name} is a list, in a dataset of plain-text rows")
        return text(prompt, plan.prompt), text(completion, plan.completion), desirable
    prompt_messages = [{"role": "user", "content": text(prompt, plan.prompt)}] if isinstance(prompt, str) \
        else _messages(prompt, plan.prompt)
    turns = [{"role": "assistant", "content": text(completion, plan.completion)}] if isinstance(completion, str) \
        else _messages(completion, plan.completion)
    check_roles(prompt_messages + turns, plan.completion)
    rendered, (answer,) = renderer.split(prompt_messages, [turns])
    return rendered, answer, desirable


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise Rejected("bad_score", f"{where} is {value!r}, not a finite number")
    return float(value)


def ranked_row(record: dict, plan: Plan, renderer: ChatRenderer, text_cells: bool = False
               ) -> tuple[str, list[str], list[float], int]:
    """(prompt, responses best first, scores, responses in the input) from a ranked row."""
    prompt = _get(record, plan.prompt, text_cells)
    items = _get(record, plan.responses, text_cells)
    if not isinstance(items, list):
        raise Rejected("non_string_field", f"{plan.responses} is {type(items).__name__}, not a list")
    given = record.get(plan.scores)
    given = _decode_cell(given, text_cells)
    texts, item_scores = [], []
    for i, item in enumerate(items):
        where = f"{plan.responses}[{i}]"
        if isinstance(item, dict):
            key = next((k for k in TEXT_KEYS if k in item), None)
            if key is None:
                raise Rejected("bad_message", f"{where} has none of the keys {', '.join(TEXT_KEYS)}")
            texts.append(text(item[key], f"{where}.{key}"))
            score_key = next((k for k in SCORE_KEYS if k in item), None)
            item_scores.append(_number(item[score_key], f"{where}.{score_key}") if score_key else None)
        else:
            texts.append(text(item, where))
            item_scores.append(None)
    n_input = len(texts)
    if given is not None:
        if not isinstance(given, list) or len(given) != len(texts):
            size = len(given) if isinstance(given, list) else type(given).__name__
            raise Rejected("bad_score", f"{plan.scores} has {size} values for {len(texts)} responses")
        scores = [_number(v, f"{plan.scores}[{i}]") for i, v in enumerate(given)]
    elif texts and all(s is not None for s in item_scores):
        scores = item_scores
    elif any(s is not None for s in item_scores):
        raise Rejected("bad_score", "some responses have a score and some do not")
    else:
        scores = None
    order = order_best_first(scores) if scores else list(range(len(texts)))
    seen, ranked = set(), []
    for i in order:
        if texts[i] not in seen:
            seen.add(texts[i])
            ranked.append(i)
    if len(ranked) < len(order):
        merged = plan.counts.get("duplicate_responses_merged", 0)
        plan.counts["duplicate_responses_merged"] = merged + len(order) - len(ranked)
    k = plan.group_size or 2
    if len(ranked) < max(k, 2):
        raise Rejected("too_few_responses", f"{len(ranked)} distinct responses; group_size is {k}")
    ranked = [ranked[i] for i in select_indices(len(ranked), k)]
    if isinstance(prompt, list) and not plan.chat:
        raise Rejected("non_string_field", f"{plan.prompt} is a list, in a dataset of plain-text prompts")
    if plan.chat:  # every prompt of a chat dataset is rendered, a plain string as one user turn
        prompt_messages = [{"role": "user", "content": text(prompt, plan.prompt)}] if isinstance(prompt, str) \
            else _messages(prompt, plan.prompt)
        check_roles(prompt_messages + [{"role": "assistant", "content": "…"}], plan.prompt)
        prompt_text, responses = renderer.split(prompt_messages, [[{"role": "assistant", "content": texts[i]}]
                                                                  for i in ranked])
    else:
        prompt_text, responses = text(prompt, plan.prompt), [texts[i] for i in ranked]
    values = [scores[i] for i in ranked] if scores else [float(k - 1 - j) for j in range(k)]
    if values[0] == values[-1]:
        raise Rejected("all_tied", "every response has the same score: no preference to learn")
    return prompt_text, responses, values, n_input
