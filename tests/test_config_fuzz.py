"""Property-based tests: every config, however broken, gives a result or a clear error."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lexalign.config.loader import _root_schema, validate_config
from lexalign.config.sections import AlignConfig, FinetuneConfig
from lexalign.core.errors import LexAlignError

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["1e-5", "auto", "dpo", "gdpo", "lora", "sigmoid", ""]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=8)


def known_keys(section: str) -> list[str]:
    return list(_root_schema()["$defs"][section]["properties"])


def section(name: str):
    return st.dictionaries(st.sampled_from(known_keys(name) + ["bogus"]), values, max_size=6)


def check(data, kind: str) -> None:
    try:
        config = validate_config(data, kind, source="fuzz")
        if kind == "align":
            AlignConfig.from_dict(config["alignment"])
        if kind == "finetune":
            FinetuneConfig.from_dict(config["finetune"])
    except LexAlignError as err:
        text = err.render()
        assert text.startswith("Error: ") and "Traceback" not in text


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.fixed_dictionaries({"model": st.one_of(values, st.fixed_dictionaries({"path": values})),
                              "dataset": st.one_of(values, section("dataset")),
                              "alignment": st.one_of(values, section("alignment"))},
                             optional={"device": values, "seed": values}))
def test_align_configs_never_crash(data):
    check(data, "align")


@SETTINGS
@given(st.fixed_dictionaries({"model": st.fixed_dictionaries({"path": values}),
                              "dataset": st.one_of(values, section("sft_dataset")),
                              "finetune": st.one_of(values, section("finetune"))}))
def test_finetune_configs_never_crash(data):
    check(data, "finetune")


@SETTINGS
@given(values)
def test_any_yaml_value_is_handled(data):
    for kind in ("align", "finetune", "download", "pipeline"):
        check(data, kind)


@pytest.mark.parametrize("text", ["1e-5", "1E-5", "3e-3", "2.5e+2", ".5", "+1e-3"])
def test_scientific_notation_is_a_number(text):
    config = validate_config({"model": {"path": "m"}, "dataset": {"path": "d"},
                              "alignment": {"learning_rate": text}}, "align")
    assert config["alignment"]["learning_rate"] == float(text)
