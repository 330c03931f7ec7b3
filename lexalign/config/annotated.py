"""A complete pipeline config as YAML, every key commented with its meaning from the schema.

`lexalign init` writes it: the example's values where it sets them, the
schema's default everywhere else, so a user sees every setting once, in the
file they edit. Read back, it validates to exactly the example's config
(tests/test_project.py checks this for every example).
"""

from __future__ import annotations

import textwrap
from typing import Any

import yaml

from lexalign.config.loader import _resolve, _root_schema
from lexalign.methods import DEFAULT, key_owner

WIDTH = 100


def _scalar(value: Any) -> str:
    """One value in YAML's flow style (a string quoted only where YAML needs it)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, allow_unicode=True).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _comment(text: str | None, indent: str) -> list[str]:
    if not text:
        return []
    text = " ".join(text.split())
    return [f"{indent}# {line}" for line in textwrap.wrap(text, WIDTH - len(indent) - 2)]


def _is_section(schema: dict) -> bool:
    return schema.get("type") == "object" and "properties" in schema


def _other_methods_key(path: tuple[str, ...], values: dict) -> bool:
    """A key of the alignment section that the chosen method does not read: written commented out, so the file
    shows it without setting it."""
    if len(path) != 2 or path[0] != "alignment" or path[1] in values:
        return False
    owner = key_owner(path[1])
    return owner is not None and owner != values.get("method", DEFAULT)


def _lines(values: dict, schema: dict, root: dict, path: tuple[str, ...] = ()) -> list[str]:
    depth = len(path)
    indent = "  " * depth
    out = []
    for key, sub in schema["properties"].items():
        sub = _resolve(sub, root)
        out += _comment(sub.get("description"), indent)
        given = key in values
        value = values[key] if given else sub.get("default")
        if _is_section(sub) and value == {} and not given and sub.get("default") == {}:
            # Off unless set (the judge's reward model): its keys shown commented out, ready to fill in.
            out.append(f"{indent}# {key}:")
            for line in _lines({}, sub, root, (*path, key)):
                stripped = line.lstrip()
                out.append(line if stripped.startswith("#") else f"{line[:len(line) - len(stripped)]}# {stripped}")
        elif _is_section(sub) and (isinstance(value, dict) or value is None):
            out.append(f"{indent}{key}:")
            out += _lines(value or {}, sub, root, (*path, key))
        elif not given and "default" not in sub:
            out.append(f"{indent}# {key}:    (optional: no default)")
        elif _other_methods_key((*path, key), values):
            out.append(f"{indent}# {key}: {_scalar(value)}    (not read by method {values.get('method', DEFAULT)})")
        elif isinstance(value, dict) and value:
            # A free mapping (the sweep's runs): its entries as block YAML.
            block = yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=False, allow_unicode=True)
            out += [indent + line for line in block.rstrip().splitlines()]
        else:
            out.append(f"{indent}{key}: {_scalar(value)}")
        out.append("") if depth == 0 else None
    return out


def render_config(values: dict, title: str = "LexAlign pipeline configuration.") -> str:
    """The pipeline config `values` (as written: unset keys take the schema's defaults) with every key of the
    schema written out and described."""
    root = _root_schema()
    unknown = sorted(set(values) - set(root["properties"]))
    if unknown:
        raise ValueError(f"unknown top-level keys {unknown}")
    head = [f"# {title}",
            "# Every key is here with its meaning; values not set by the example are the defaults.",
            "# Run: snakemake --cores 1   (snakemake -n: what would run, and why)", ""]
    return "\n".join(head + _lines(values, root, root)).rstrip() + "\n"
