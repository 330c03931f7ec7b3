"""Load YAML safely and validate it against the schema beside it, `config.schema.yaml`.

The pipeline (`rules/common.smk`) and the CLI use the same schema file, so a
key means the same thing in both. Errors name the file, the key, the value
found and what is expected.
"""

from __future__ import annotations

import copy
import difflib
import functools
import re
from pathlib import Path
from typing import Any

import yaml

from lexalign import methods
from lexalign.core.errors import LexAlignError, warn

SCHEMA_PATH = Path(__file__).resolve().parent / "config.schema.yaml"

# PyYAML follows YAML 1.1, where `1e-5` (no dot) is a string, not a float.
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def load_yaml(path: str | Path) -> Any:
    """`yaml.safe_load` a file, turning every failure into a clear error."""
    path = Path(path)
    if not path.is_file():
        raise LexAlignError(f'Config file not found: "{path}"', hint="Copy an example from config/*.example")
    try:
        with path.open(encoding="utf-8") as handle:
            return yaml.safe_load(handle)
    except yaml.constructor.ConstructorError as err:
        raise LexAlignError(
            f'Config file "{path}" uses a YAML tag that is not allowed',
            f"{err.problem} {err.problem_mark}".strip(),
            hint="Remove tags such as !!python/object: configs hold plain values only",
        ) from None
    except yaml.YAMLError as err:
        raise LexAlignError(f'Config file "{path}" is not valid YAML', str(err)) from None
    except UnicodeDecodeError as err:
        raise LexAlignError(f'Config file "{path}" is not UTF-8 text', str(err)) from None


@functools.cache
def _root_schema() -> dict:
    # libyaml's safe loader where PyYAML has it: the schema is read on every plan, a dry run included, and the
    # pure-Python loader takes a quarter of a second over it (benchmarks/bench_startup.py).
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with SCHEMA_PATH.open(encoding="utf-8") as handle:
        return yaml.load(handle, Loader=loader)  # noqa: S506 - a safe loader, C or Python


def schema_for(kind: str) -> dict:
    """The JSON schema of one config kind: pipeline, align, finetune or download."""
    root = _root_schema()
    defs = root["$defs"]

    def obj(properties: dict, required: list[str]) -> dict:
        return {
            "type": "object",
            "additionalProperties": False,
            "properties": properties,
            "required": required,
            "$defs": defs,
        }

    model_ref = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "path": {"type": "string", "description": "The model to start from (a folder)."},
            "base_model": {"type": ["string", "null"], "default": None,
                           "description": "Tokenizer source, if not in path."},
            "trust_remote_code": {"type": "boolean", "default": False},
            "allow_pickle": {"type": "boolean", "default": False},
        },
        "required": ["path"],
    }
    device = {"$ref": "#/$defs/device"}
    if kind == "pipeline":
        return root
    if kind == "align":
        return obj(
            {
                "model": model_ref,
                "dataset": {"$ref": "#/$defs/dataset"},
                "alignment": {"$ref": "#/$defs/alignment"},
                "evaluate": {"$ref": "#/$defs/evaluate"},
                "device": device,
                "seed": {"type": "integer", "default": 42},
            },
            ["model", "dataset", "alignment"],
        )
    if kind == "finetune":
        return obj(
            {
                "model": model_ref,
                "dataset": {"$ref": "#/$defs/sft_dataset"},
                "finetune": {"$ref": "#/$defs/finetune"},
                "output_dir": {"type": "string", "default": "results/models/sft"},
                "checkpoint_dir": {"type": ["string", "null"], "default": None},
                "device": device,
                "seed": {"type": "integer", "default": 42},
            },
            ["model", "dataset", "finetune"],
        )
    if kind == "download":
        items = {"type": "array", "items": {"$ref": "#/$defs/source"}, "default": []}
        return obj({"models": items, "datasets": items, "seed": {"type": "integer", "default": 42}}, [])
    raise ValueError(f"unknown config kind {kind!r}")


def _resolve(schema: dict, root: dict) -> dict:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        merged = {k: v for k, v in schema.items() if k != "$ref"}
        schema = {**root["$defs"][name], **merged}
    return schema


def _types(schema: dict, root: dict) -> set[str]:
    schema = _resolve(schema, root)
    found = set()
    declared = schema.get("type")
    if isinstance(declared, str):
        found.add(declared)
    elif isinstance(declared, list):
        found.update(declared)
    for option in schema.get("anyOf", []):
        found |= _types(option, root)
    return found


def _normalise(data: Any, schema: dict, root: dict) -> Any:
    """Fill defaults and turn numeric strings (`1e-5`) into numbers where the schema wants one."""
    schema = _resolve(schema, root)
    types = _types(schema, root)
    if isinstance(data, str) and "boolean" in types and data.strip().lower() in ("true", "false"):
        return data.strip().lower() == "true"  # `snakemake --config key=true` passes a string
    if isinstance(data, str) and types & {"number", "integer"} and _NUMBER.match(data.strip()):
        value = float(data)
        return int(value) if "integer" in types and value.is_integer() and "number" not in types else value
    if isinstance(data, dict) and "properties" in schema:
        out = dict(data)
        for key, sub in schema["properties"].items():
            sub_resolved = _resolve(sub, root)
            if key in out:
                out[key] = _normalise(out[key], sub, root)
            elif "default" in sub_resolved:
                out[key] = copy.deepcopy(sub_resolved["default"])
            elif (sub_resolved.get("type") == "object" and "properties" in sub_resolved
                  and key not in schema.get("required", [])):
                out[key] = _normalise({}, sub, root)
        return out
    if isinstance(data, list) and "items" in schema:
        return [_normalise(item, schema["items"], root) for item in data]
    return data


def _describe(value: Any) -> str:
    kind = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "nothing (null)"}.get(type(value), type(value).__name__)
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{shown} ({kind})"


def _expected(error, root: dict) -> str:
    schema = _resolve(error.schema, root) if isinstance(error.schema, dict) else {}
    if schema.get("x-expected"):  # the schema's own words for what belongs there
        return schema["x-expected"]
    if error.validator == "enum":
        return "one of: " + ", ".join(str(v) for v in error.validator_value)
    if error.validator in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        sign = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}[error.validator]
        return f"a value {sign} {error.validator_value}"
    if error.validator == "type":
        wanted = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        names = {"number": "a number", "integer": "an integer", "string": "a string", "boolean": "true or false",
                 "object": "a mapping", "array": "a list", "null": "null"}
        return " or ".join(names.get(w, w) for w in wanted)
    if error.validator == "anyOf":
        return "a string or a list of strings"
    return schema.get("description") or error.message


def validate_config(data: Any, kind: str, source: str = "config") -> dict:
    """Validate `data` against the schema of `kind`; return it with defaults filled in.

    Raises LexAlignError naming the file, the key, the value and what is expected.
    """
    import jsonschema

    root = _root_schema()
    schema = schema_for(kind)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LexAlignError(f'Config "{source}" must be a mapping of keys to values', f"Found: {_describe(data)}")
    given = set(data)
    # The alignment keys as written, before defaults fill in every method's keys.
    written = dict(data["alignment"]) if kind in ("pipeline", "align") and isinstance(data.get("alignment"), dict) \
        else None
    data = _normalise(data, schema, root)
    _raise_first_error(jsonschema.Draft202012Validator(schema).iter_errors(data), root, source)
    if written is not None:
        defaults = section_defaults("alignment")
        for key in unused_keys(written, data["alignment"]["method"], source=source):
            data["alignment"][key] = defaults[key]
    if kind == "pipeline" and "sft_data" not in given and data["finetune"]["method"] != "none":
        # Never fall back to the demo's SFT data for a user's model.
        raise LexAlignError(f'Missing required key "sft_data" in {source}',
                            f'finetune.method is "{data["finetune"]["method"]}": supervised fine-tuning needs data',
                            hint="Add sft_data (repo_id or path), or set finetune.method: none to align the model "
                                 "as it is (an instruct model)")
    if kind == "pipeline" and "preference_data" not in given:
        _preference_data_unneeded(data, source)
    _resolve_sources(data, kind, source)
    return data


def _preference_data_unneeded(data: dict, source: str) -> None:
    """Refuse a pipeline config without preference_data unless nothing reads it: online rounds alone
    (online.offline false) whose prompts come from elsewhere (never the demo's data for a user's pipeline)."""
    online = data.get("online") or {}
    if online and not online.get("offline", True) and online["prompts"]["from"] != "preference_data":
        return
    why = ("online.prompts.from is preference_data: the rounds read its prompts" if online and not
           online.get("offline", True) else "the offline pipeline (rule all) aligns on it")
    raise LexAlignError(f'Missing required key "preference_data" in {source}', why,
                        hint="Add preference_data (repo_id or path), or run the rounds alone: online: {offline: "
                             "false, prompts: {from: instructions}} (or from: path, demo)")


SOURCE_SECTIONS = {"pipeline": ("model", "sft_data", "preference_data"), "align": ("dataset",),
                   "finetune": ("dataset",)}
"""The sections of each config kind that say where something comes from (`source`, `repo_id`, `path`)."""


def _resolve_sources(data: dict, kind: str, source: str) -> None:
    """Fill in each `source` from the keys given (a repo_id means the Hub, a path local, neither the demo)."""
    entries = [(name, data[name]) for name in SOURCE_SECTIONS.get(kind, ()) if isinstance(data.get(name), dict)]
    if kind == "download":
        entries = [(f"{section}[{i}]", entry) for section in ("models", "datasets")
                   for i, entry in enumerate(data.get(section) or [])]
    for where, entry in entries:
        try:
            entry["source"] = resolve_source(entry, where)
        except LexAlignError as err:
            err.message = f"{err.message} in {source}"
            raise


def _raise_first_error(errors, root: dict, source: str, prefix: str = "") -> None:
    errors = sorted(errors, key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if not errors:
        return
    err = errors[0]
    where = ".".join([prefix] * bool(prefix) + [str(p) for p in err.absolute_path])
    if err.validator == "additionalProperties":
        allowed = sorted(_resolve(err.schema, root).get("properties", {}))
        unknown = sorted(set(err.instance) - set(allowed))
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        close = difflib.get_close_matches(unknown[0], allowed, n=1)
        raise LexAlignError(
            f'Unknown key "{key}" in {source}',
            f"Allowed keys{' under ' + where if where else ''}: {', '.join(allowed)}",
            hint=f'Did you mean "{close[0]}"?' if close else "Remove it or fix its spelling",
        )
    if err.validator in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        # The design's form: `group_delay_size must be >= 2 (got: 1)`, then where, then the schema's hint.
        sign = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}[err.validator]
        leaf = str(err.absolute_path[-1]) if err.absolute_path else where
        hint = _resolve(err.schema, root).get("x-hint") if isinstance(err.schema, dict) else None
        raise LexAlignError(f"{leaf} must be {sign} {err.validator_value} (got: {err.instance})",
                            f'Key: "{where}" in {source}', hint=hint)
    if err.validator == "required":
        missing = err.message.split("'")[1]
        key = f"{where}.{missing}" if where else missing
        raise LexAlignError(f'Missing required key "{key}" in {source}')
    raise LexAlignError(
        f'Invalid value for "{where or "(top level)"}" in {source}',
        f"Found: {_describe(err.instance)}",
        f"Expected: {_expected(err, root)}",
    )


def load_config(path: str | Path, kind: str) -> dict:
    """Load and validate a YAML config file of the given kind."""
    return validate_config(load_yaml(path), kind, source=str(path))


def section_defaults(section: str, values: dict | None = None, where: str | None = None) -> dict:
    """A validated `$defs` section (finetune, alignment, dataset, …) with defaults filled in. `where`: the
    section's place in the config for messages, when not its name (`online.alignment[1]`)."""
    import jsonschema

    root = _root_schema()
    schema = {**root["$defs"][section], "$defs": root["$defs"]}
    data = _normalise(dict(values or {}), schema, root)
    _raise_first_error(jsonschema.Draft202012Validator(schema).iter_errors(data), root, "config",
                       prefix=where or section)
    return data


def method_keys() -> dict[str, str]:
    """The alignment keys that belong to one method, and that method: the `x-method` marks of the schema's
    alignment section (lexalign.methods says the same: tests/test_methods.py checks that they agree)."""
    properties = _root_schema()["$defs"]["alignment"]["properties"]
    return {key: spec["x-method"] for key, spec in properties.items() if "x-method" in spec}


def unused_keys(written: dict, method: str, where: str = "alignment", method_key: str = "alignment.method",
                source: str | None = None) -> list[str]:
    """The keys of `written` (an alignment mapping as the user wrote it) that `method` does not use: another
    method's own keys (`loss_type` under gdpo, `group_delay_size` under dpo) and `beta` under a method without
    one (ORPO). Each is named once in a warning and the list returned, for the caller to set them back to their
    defaults, so no trainer reads them. One config then serves every method, as the design's align config does
    ("GDPO specific (only used if method: gdpo)"). A key no method knows is the schema's error, not this.

    `where`: the keys' place (`alignment`, or a sweep run's `runs.<name>`); `method_key`: the key that set
    `method` (a sweep run that gives no method inherits alignment.method)."""
    chosen = methods.method(method)
    unused = []
    for key in written:
        owner = methods.key_owner(key) if isinstance(key, str) else None
        if owner is not None and owner != method:
            why = f"it is a key of method {owner}"
        elif key == "beta" and not chosen.uses_beta:
            why = f"method {method} has no beta"
        else:
            continue
        unused.append(key)
        warn(f'{where}.{key} is ignored: {why}, and {method_key} is "{method}"{f" in {source}" if source else ""}',
             f"Remove {key}" + (f", or set method: {owner}" if owner else ""))
    return unused


def section_keys(section: str) -> list[str]:
    """The keys a `$defs` section of the schema allows."""
    return list(_root_schema()["$defs"][section].get("properties", {}))


SOURCE_KEYS = {"hub": "repo_id", "local": "path"}
"""The key that says where each kind of source is."""


def resolve_source(values: dict[str, Any], where: str = "model") -> str:
    """Which source a model or dataset entry means: the one its keys name.

    A `repo_id` means the Hub and a `path` a local file or folder; the demo only
    when asked for (`source: demo`) or when nothing at all is given. An explicit
    `source` that contradicts the keys is an error, never a silent demo.
    """
    given = values.get("source")
    named = [kind for kind, key in SOURCE_KEYS.items() if values.get(key)]
    if given is None:
        if len(named) > 1:
            raise LexAlignError(f"{where} has both repo_id and path: one source only",
                                f'repo_id: {values.get("repo_id")!r}, path: {values.get("path")!r}',
                                hint="Keep repo_id for the Hub, or path for a local copy")
        return named[0] if named else "demo"
    others = [kind for kind in named if kind != given]
    if others:
        key = SOURCE_KEYS[others[0]]
        raise LexAlignError(
            f'{where}.source is "{given}" but {where}.{key} is set',
            f"{where}.{key}: {values.get(key)!r} means source {others[0]}",
            hint=f"Remove source: {given} (a {key} alone is enough), or remove {key}",
        )
    return given


def download_source(section: dict) -> dict:
    """What the download step of a model or dataset section needs: its source keys (and a dataset's data_dir);
    never field names, splits or lengths, which are validation's (so changing them re-downloads nothing)."""
    keys = set(section_keys("source")) - {"name", "output"} | {"data_dir"}
    return {key: value for key, value in section.items() if key in keys}
