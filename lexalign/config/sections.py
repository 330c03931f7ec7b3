"""One config dataclass per config section, built from a schema-validated mapping.

Defaults live in `lexalign/config/config.schema.yaml` (one place, shared with
Snakemake's `validate`); these classes give each field a type and a meaning,
and hold the checks a JSON schema cannot express.

Longer than most modules on purpose: every section side by side, each field with its docstring (the schema's
meaning in Python), so a key is read in one place and the schema test (tests/test_architecture.py) holds the
two together.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from lexalign import methods
from lexalign.config.loader import resolve_source, section_defaults, unused_keys
from lexalign.core.errors import LexAlignError
from lexalign.core.formats import FORMATS, unsupported_format

METHODS = methods.NAMES
"""Every alignment method (lexalign.methods)."""


class _FromDict:
    SECTION: ClassVar[str | None] = None
    """The schema section (`$defs` of lexalign/config/config.schema.yaml) this class is built from."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """The config from a mapping, checked against the schema section: its defaults filled in, its bounds
        held, and an unknown key an error that names it (never dropped without a word)."""
        if cls.SECTION:
            data = section_defaults(cls.SECTION, data)
        return cls._build(data)

    @classmethod
    def _build(cls, data: dict[str, Any]):
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise LexAlignError(f'Unknown key "{unknown[0]}" in the {cls.SECTION or cls.__name__} config',
                                f"Allowed keys: {', '.join(sorted(names))}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_list(value):
    """A list as it is, a string as a list of one (`loss_type: sigmoid` is `[sigmoid]`), anything else as it is."""
    return [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else value


@dataclass
class SourceConfig(_FromDict):
    """Where a model or a dataset comes from: one shape for the demo, a local path and the Hub.

    Used by `lexalign download` (the `models:` and `datasets:` lists of
    config/downloads.yaml) and by the pipeline's download rules.
    """

    SECTION: ClassVar[str | None] = "source"

    source: str | None = None
    """`demo` (built offline), `local` (a path on disk) or `hub` (a Hugging Face repo); by default
    the one the keys name (`resolve_source`: repo_id → hub, path → local, neither → demo)."""
    repo_id: str | None = None
    """Hub repo id (`owner/name`), for `source: hub`."""
    path: str | None = None
    """File or folder copied into place, for `source: local` (the way to work offline); a model's GGUF file
    (ending in .gguf) is converted into a model folder instead (lexalign.hub.gguf)."""
    gguf_file: str | None = None
    """A GGUF file inside the folder `path`, converted as a `path` ending in .gguf is: for a folder holding
    several quantizations of one model (`source: local` only)."""
    revision: str = "main"
    """Hub branch, tag or commit; the commit it resolves to is recorded in lineage.json."""
    repo_type: str | None = None
    """`model` or `dataset`; by default `model` for a model and `dataset` for data."""
    allow_patterns: list[str] | str | None = None
    """Only files matching one of these glob patterns are fetched (e.g. `["*.json", "*.safetensors"]`)."""
    ignore_patterns: list[str] | str | None = None
    """Files matching one of these glob patterns are skipped."""
    skip_duplicate_weights: bool = True
    """When a model's selected files include safetensors weights, skip the same weights in other
    formats (*.bin, *.pt, *.pth, *.h5, *.msgpack, *.ckpt, *.ot)."""
    output: str | None = None
    """Where the download lands (`lexalign download`; default results/downloads/<models|datasets>/<name>)."""
    name: str | None = None
    """Short name: the default output folder, and what `lexalign download --only` selects."""
    trust_remote_code: bool = False
    """Run Python code shipped with a model. Off unless you trust the repo."""
    allow_pickle: bool = False
    """Load pickle-based weights (.bin, .pt) when a model has no safetensors. Pickles can run code."""

    def __post_init__(self):
        self.source = resolve_source(self.to_dict(), self.name or "source")
        if self.source == "hub" and not self.repo_id:
            raise LexAlignError('source "hub" needs a "repo_id"', hint='Add e.g. repo_id: "gpt2"')
        if self.source == "hub" and not str(self.revision or "").strip():
            raise LexAlignError(f'source "hub" ({self.repo_id}) needs a non-empty "revision"',
                                hint="Use a branch (main), a tag or a commit")
        if self.source == "local" and not self.path:
            raise LexAlignError('source "local" needs a "path"', hint="Add path: ./my-model")
        if self.gguf_file and self.source != "local":
            raise LexAlignError(f'gguf_file ({self.gguf_file}) needs source "local", not "{self.source}"',
                                "It names a GGUF file inside the local folder `path`",
                                hint="Set path to the folder that holds it, or remove gguf_file")
        if self.gguf_file and str(self.path).lower().endswith(".gguf"):
            raise LexAlignError(f'gguf_file ({self.gguf_file}) names a file inside the folder `path`, but path is '
                                f'a GGUF file itself: "{self.path}"', hint="Remove gguf_file (a .gguf path is enough)")

    def hub_repo_type(self, kind: str) -> str:
        """The repo type to ask the Hub for: the configured one, else from what is fetched."""
        return self.repo_type or ("model" if kind == "model" else "dataset")


@dataclass
class DatasetConfig(_FromDict):
    """A preference dataset and how to read it (validated by `lexalign validate` and the validate rule).

    Shapes read: prompt/chosen/rejected strings; chat messages (chosen and
    rejected as {role, content} lists, with or without a prompt); transcripts
    with an implicit prompt (Anthropic HH-RLHF); ranked responses, in order or
    with scores (raw UltraFeedback `completions`). See `lexalign.data.shapes`.
    """

    SECTION: ClassVar[str | None] = "dataset"

    path: str | None
    """File or folder with the data: JSON, JSON Lines, CSV/TSV, Parquet, a `datasets` save_to_disk folder,
    or a Hub dataset as the download step lands it."""
    format: str = "auto"
    """auto, json, jsonl, csv, tsv, parquet or arrow; auto detects from the extension and, for JSON, the content."""
    prompt_field: str = "prompt"
    """Column with the prompt (a string or chat messages); may be absent when chosen/rejected hold it."""
    chosen_field: str = "chosen"
    """Column with the preferred response (a string, or chat messages)."""
    rejected_field: str = "rejected"
    """Column with the dispreferred response (a string, or chat messages)."""
    responses_field: str = "responses"
    """Ranked data: column with a list of responses, best first, or scored (strings, or objects such as
    UltraFeedback's `completions` with `response` and `overall_score`). Used when chosen/rejected are absent."""
    scores_field: str = "scores"
    """Ranked data: column with one score per response (higher is better); when absent, scores come from
    the response objects, or the list order is the ranking."""
    completion_field: str = "completion"
    """Unpaired data (KTO): column with the response (a string, or chat messages), judged by `label_field`."""
    label_field: str = "label"
    """Unpaired data (KTO): column saying whether the completion is desirable (true) or not (false)."""
    group_size: int | None = None
    """Responses per prompt: None for pairs (DPO); K >= 2 for GDPO (from alignment.group_delay_size). Ranked
    groups keep the best, the worst and evenly spaced ones between; smaller groups are rejected; pairs are
    grouped by prompt into rankings (K > 2)."""
    train_split: str = "train"
    """Split used for training: the files named after it (`train.jsonl.gz`, every shard of
    `data/train-0000N-of-0000M.parquet`, `data/train_prefs-….parquet`) or in a folder of that name."""
    eval_split: str | None = None
    """An existing eval split (e.g. `test_prefs`); when absent, `eval_fraction` of prompts are held out."""
    eval_fraction: float = 0.1
    """Share of prompts held out for evaluation (split by prompt: no prompt leaks)."""
    data_dir: str | None = None
    """A sub-folder of the dataset (`helpful-base` of Anthropic/hh-rlhf) to read instead of all of it; on the
    Hub only that folder is downloaded."""
    max_length: int = 512
    """Longest prompt + response, in tokens of the model's tokenizer."""
    length_policy: str = "drop"
    """What happens to longer rows: drop (to rejects), truncate (the responses), or fail (the share is
    reported whichever is chosen)."""
    max_reject_fraction: float = 0.5
    """Validation fails (stopping the pipeline) when more than this share of rows is rejected."""
    source: str | None = None
    """Where the data comes from (pipeline only): demo, local or hub, by default from the keys given."""
    repo_id: str | None = None
    """Hub dataset repo id, for `source: hub` (pipeline only)."""
    revision: str = "main"
    """Hub branch, tag or commit (pipeline only)."""

    def __post_init__(self):
        if self.format not in FORMATS:
            raise unsupported_format(self.format)
        if self.length_policy not in ("drop", "truncate", "fail"):
            raise LexAlignError(f'Unknown length_policy "{self.length_policy}"', "Supported: drop, truncate, fail")
        if self.eval_split and self.eval_split == self.train_split:
            raise LexAlignError(f'eval_split "{self.eval_split}" is the train split',
                                hint="Use another split, or remove eval_split to hold out eval_fraction of prompts")


@dataclass
class SftDatasetConfig(_FromDict):
    """Supervised fine-tuning data: plain text, prompt/completion, or chat messages."""

    SECTION: ClassVar[str | None] = "sft_dataset"

    path: str | None
    """File or folder with the data."""
    format: str = "auto"
    """auto, json, jsonl, csv, tsv or parquet."""
    text_field: str = "text"
    """Column with plain text (language modelling on the whole text)."""
    prompt_field: str = "prompt"
    """Column with the prompt (loss on the completion only)."""
    completion_field: str = "completion"
    """Column with the completion."""
    messages_field: str = "messages"
    """Column with chat messages ({role, content} lists)."""
    train_split: str = "train"
    """Split used for training: the files named after it, or in a folder of that name."""
    eval_split: str | None = None
    """An existing eval split (e.g. `test_sft`); when absent, `eval_fraction` of rows are held out."""
    eval_fraction: float = 0.05
    """Share of rows held out for evaluation during training."""
    data_dir: str | None = None
    """A sub-folder of the dataset to read instead of all of it; on the Hub only that folder is downloaded."""
    source: str | None = None
    """Where the data comes from (pipeline only): demo, local or hub, by default from the keys given."""
    repo_id: str | None = None
    """Hub dataset repo id (pipeline only)."""
    revision: str = "main"
    """Hub branch, tag or commit (pipeline only)."""

    def __post_init__(self):
        if self.eval_split and self.eval_split == self.train_split:
            raise LexAlignError(f'eval_split "{self.eval_split}" is the train split',
                                hint="Use another split, or remove eval_split to hold out eval_fraction of rows")


@dataclass
class TrainingConfig(_FromDict):
    """Hyperparameters shared by the training steps (finetune, align)."""

    learning_rate: float
    """Peak learning rate of AdamW."""
    batch_size: int
    """Per-device batch size (TRL: per_device_train_batch_size)."""
    gradient_accumulation_steps: int
    """Micro-batches per optimizer step; effective batch = batch_size × this × processes."""
    num_epochs: float
    """Passes over the training data (TRL: num_train_epochs)."""
    warmup_steps: int
    """Linear warm-up steps of the learning rate."""
    weight_decay: float
    """AdamW weight decay."""
    save_steps: int
    """A resumable checkpoint every this many optimizer steps."""
    logging_steps: int
    """Metrics are logged every this many steps."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides num_epochs)."""
    eval_steps: int | None = None
    """Evaluate on the eval split every this many steps (default: at the end of each epoch)."""
    seed: int | None = None
    """Training seed (default: the pipeline seed)."""
    bf16: bool | str | None = None
    """bf16 training (TRL: bf16): frozen weights stored in bf16, steps autocast to it; fully trained weights stay
    float32. null: on a GPU that supports it; auto: also on a CPU that multiplies bf16 in hardware (avx512_bf16,
    AMX); true or false: everywhere or nowhere (lexalign.models.loading.training_bf16)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: float = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] | str = "auto"
    """Modules that get LoRA adapters: `auto` (per architecture), `all-linear`, or a list of names."""
    tensorboard: bool = False
    """Also log every metric to TensorBoard, under the run's checkpoint folder (a synonym of listing it in
    report_to)."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers the run reports to: tensorboard, mlflow, wandb, trackio (lexalign.train.tracking)."""


@dataclass
class FinetuneConfig(TrainingConfig):
    """Supervised fine-tuning: LoRA, QLoRA (4-bit) or full."""

    SECTION: ClassVar[str | None] = "finetune"

    method: str = "lora"
    """lora, qlora (4-bit NF4 base through bitsandbytes) or full."""
    merge: bool = True
    """Merge the adapter into the saved model; false saves the PEFT adapter alone."""
    max_length: int = 512
    """Sequences are truncated to this many tokens."""

    @property
    def uses_adapter(self) -> bool:
        return self.method in ("lora", "qlora")


@dataclass
class AlignConfig(TrainingConfig):
    """Preference alignment with one of the methods of lexalign.methods: DPO (TRL's DPOTrainer), GDPO (listwise),
    KTO (TRL's KTOTrainer), or the reference-free ORPO, SimPO and CPO.

    The keys every method shares are fields; a method's own keys (`Method.keys`: DPO's `loss_type`, GDPO's
    `group_delay_size`, SimPO's `gamma`, ...) are in `method_keys`, described in the schema, so a new method
    needs no field here. `to_dict` gives them back side by side with the rest, as the config writes them."""

    SECTION: ClassVar[str | None] = "alignment"

    method: str = "dpo"
    """dpo, gdpo, kto, orpo, simpo or cpo (lexalign.methods)."""
    beta: float = 0.1
    """Strength of the pull towards the reference (SFT) model; higher stays closer."""
    max_length: int | None = 512
    """Prompt + response tokens kept; longer sequences are truncated at the end."""
    padding_free: bool = True
    """Train on packed batches (no padding computed); false keeps TRL's padded batches."""
    use_lora: bool = True
    """Train a LoRA adapter (merged into the output) instead of every weight."""
    load_in_4bit: bool = False
    """QLoRA: hold the SFT weights in 4-bit NF4 while training the adapter (needs use_lora)."""
    output_dir: str | None = None
    """Where the aligned model is written."""
    checkpoint_dir: str | None = None
    """Where resumable checkpoints go; must lie outside output_dir."""
    method_keys: dict[str, Any] = field(default_factory=dict)
    """Every method's own keys (lexalign.methods): this method's as written, the others at their defaults."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        data = section_defaults(cls.SECTION, data)
        own = {key: data.pop(key) for key in list(data) if methods.key_owner(key)}
        return cls._build({**data, "method_keys": own})

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        return {**out.pop("method_keys"), **out}

    def __post_init__(self):
        if self.method not in METHODS:
            raise LexAlignError(f'Unknown alignment.method "{self.method}"', f"Supported: {', '.join(METHODS)}")
        if self.load_in_4bit and not self.use_lora:
            raise LexAlignError("load_in_4bit needs use_lora: true", hint="4-bit weights cannot be trained directly")
        self._drop_unused_keys()
        for method in methods.METHODS.values():
            if method.normalise:
                try:
                    self.method_keys.update(method.normalise({key: self.method_keys[key] for key in method.keys}))
                except ValueError as err:
                    raise LexAlignError(*map(str, err.args)) from None
        if self.of.reads_unpaired and self.batch_size < 2:
            raise LexAlignError(f"method {self.method} needs batch_size >= 2 (got: 1)",
                                "KTO's KL term compares each row with another row's completion in the same batch",
                                hint="Set batch_size: 2 or more")

    def _drop_unused_keys(self) -> None:
        """For a mapping built in code (the loader and run_alignment see the keys as written, before this): a key
        the method does not use, set away from its default, is named in a warning and set back to it."""
        defaults = section_defaults("alignment")
        written = {key: value for key, value in {**self.method_keys, "beta": self.beta}.items()
                   if _as_list(value) != _as_list(defaults[key])}
        for key in unused_keys(written, self.method):
            if key == "beta":
                self.beta = defaults[key]
            else:
                self.method_keys[key] = defaults[key]

    @property
    def of(self) -> methods.Method:
        """The method's registry entry."""
        return methods.method(self.method)

    @property
    def group_size(self) -> int | None:
        """K when the method reads ranked groups of K (> 2), else None (lexalign.methods: Method.group_size)."""
        return self.of.group_size(self.to_dict())

    @property
    def own_keys(self) -> dict[str, Any]:
        """The method's own keys and their values, but K (what its loss reads)."""
        return self.of.own_keys(self.method_keys)

    @property
    def reference_free(self) -> bool:
        """ORPO, SimPO and CPO: no reference model, no reference step."""
        return not self.of.needs_reference


def _llm_judge_defaults() -> dict:
    return {"base_url": None, "model": None, "api_key_env": None, "timeout": 60}


def _lm_eval_defaults() -> dict:
    return {"tasks": [], "limit": None, "num_fewshot": None, "batch_size": 8, "apply_chat_template": False}


def _ifeval_defaults() -> dict:
    return {"prompts": None, "nltk_data": None}


JUDGES = ("none", "demo", "reward_model", "llm", "ifeval")
"""The judges by name; a judge of the user's own is {"python": "file.py:function"} (`judge_name`: python)."""


def judge_name(judge: str | dict) -> str:
    """A judge's name: its own, or `python` for a reward function of the user's ({"python": "file.py:fn"})."""
    return "python" if isinstance(judge, dict) else judge


@dataclass
class EvaluateConfig(_FromDict):
    """Evaluation of an aligned model against its SFT reference."""

    SECTION: ClassVar[str | None] = "evaluate"

    judge: str | dict = "none"
    """Who compares the SFT and the aligned answers: `none`, `demo` (the polite-greeting rule), `reward_model`
    (`reward_model` scores both), `llm` (a pairwise judge at `llm_judge`), `ifeval` (IFEval's checkers on the
    prompts of `ifeval`) or {"python": "file.py:function"} (the user's reward function); each gives a win rate."""
    num_prompts: int = 200
    """Held-out prompts for the KL estimate and the judge (greedy decoding)."""
    num_samples: int = 16
    """Held-out prompts whose SFT and aligned answers are kept side by side (and their lengths compared)."""
    max_new_tokens: int = 256
    """Tokens generated per prompt."""
    batch_size: int = 16
    """Prompts per forward pass."""
    reward_model: dict = field(default_factory=dict)
    """judge reward_model: a sequence-classification model, as a source (repo_id or path)."""
    llm_judge: dict = field(default_factory=_llm_judge_defaults)
    """judge llm: an OpenAI-compatible endpoint (base_url, model, api_key_env: the variable with the key, timeout)."""
    lm_eval: dict = field(default_factory=_lm_eval_defaults)
    """lm-evaluation-harness benchmarks (tasks, limit, num_fewshot, batch_size, apply_chat_template)."""
    ifeval: dict = field(default_factory=_ifeval_defaults)
    """judge ifeval: the held-out prompts in IFEval's format (`prompts`) and NLTK's punkt_tab data (`nltk_data`)."""

    def __post_init__(self):
        if self.judge == "reward_model" and not (self.reward_model.get("repo_id") or self.reward_model.get("path")):
            raise LexAlignError('evaluate.judge is "reward_model" but evaluate.reward_model names no model',
                                hint="Set evaluate.reward_model.repo_id (a Hub repo) or evaluate.reward_model.path "
                                     "(a local folder) to a sequence-classification reward model")
        if self.judge == "llm":
            for key in ("base_url", "model"):
                if not self.llm_judge.get(key):
                    raise LexAlignError(f'evaluate.judge is "llm" but evaluate.llm_judge.{key} is not set',
                                        hint="Set evaluate.llm_judge.base_url (an OpenAI-compatible endpoint, "
                                             "e.g. http://localhost:8000/v1) and evaluate.llm_judge.model")


@dataclass
class PublishConfig(_FromDict):
    """Publishing a model folder to the Hugging Face Hub (the publish rule, `lexalign push`)."""

    SECTION: ClassVar[str | None] = "publish"

    repo_id: str | None = None
    """The Hub model repo, owner/name; unset, the pipeline publishes nothing."""
    private: bool = False
    """Create the repo private; an existing public repo is refused rather than published to."""
    revision: str = "main"
    """The branch the commit goes to (created from main when missing)."""
    run: str = "aligned"
    """Which run the pipeline publishes: aligned (the primary run) or a sweep run's name."""
    commit_message: str | None = None
    """The commit's title (default: Upload <the model card's title> with LexAlign)."""


def run_alignment(base: dict, overrides: dict, name: str | None = None, where: str | None = None) -> dict:
    """A sweep run's alignment section: `base` (the alignment section) with the run's `overrides`, defaults
    filled. A run that changes the method leaves behind (back to their defaults) the base's keys its method
    does not use, so a KTO base with desirable_weight and beta can sweep an ORPO run. A key the run gives
    itself that its method does not use is named in a warning and set back to its default, as under alignment
    (unused_keys), whatever its value. `name`: the run's, for messages; `where`: the overrides' place in the config
    when they are no sweep run's (`online.alignment`), named in the messages of a bad key."""
    merged = dict(base)
    method = overrides.get("method", base.get("method", methods.DEFAULT))
    defaults = section_defaults("alignment")
    if method != base.get("method", methods.DEFAULT):  # the base's keys its method used, this run's does not
        behind = [key for key, owner in methods.METHOD_KEYS.items() if owner != method]
        for key in behind + ([] if methods.method(method).uses_beta else ["beta"]):
            if key in merged:
                merged[key] = defaults[key]
    merged.update(overrides)
    alignment = section_defaults("alignment", merged, where=where)
    where = where or (f"runs.{name}" if name else "run")
    for key in unused_keys(overrides, alignment["method"], where=where,
                           method_key=f"{where}.method" if "method" in overrides else "alignment.method"):
        alignment[key] = defaults[key]
    return alignment
