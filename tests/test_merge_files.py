"""lexalign.models.merge: an adapter merged into the base's files tensor by tensor must give exactly what PEFT's
merge into the base loaded again gives (the route it replaces for bf16 and 4-bit jobs), on real-architecture
models; what it cannot merge it leaves to PEFT, writing nothing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from lexalign.models.loading import load_causal_lm, merged_model
from lexalign.models.merge import merge_into_files


def trained_adapter(base, folder, **lora) -> None:
    """A LoRA adapter on `base` whose B (and DoRA's magnitude) is no longer zero, saved in `folder`."""
    model = get_peft_model(load_causal_lm(base, "cpu"),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], **lora))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(folder)


def state(folder) -> dict:
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


@pytest.mark.parametrize("family", ["llama3", "gemma"])  # untied and tied embeddings
@pytest.mark.parametrize("lora", [{}, {"use_rslora": True}], ids=["lora", "rslora"])
def test_merged_files_equal_peft_merging_into_the_reloaded_base(tmp_path, zoo_models, family, lora):
    base = zoo_models(family)
    trained_adapter(base, tmp_path / "adapter", **lora)
    expected = merged_model(tmp_path / "adapter", base).state_dict()
    (tmp_path / "out").mkdir()
    assert merge_into_files(tmp_path / "adapter", base, tmp_path / "out")
    got = state(tmp_path / "out")
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[k], expected[k]) for k in got), [k for k in got if not torch.equal(got[k], expected[k])]
    assert {v.dtype for v in got.values()} == {torch.float32}
    changed = [k for k, v in state(base).items() if not torch.equal(v, got[k])]
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight")) for k in changed)


def test_a_bf16_sharded_base_is_merged_shard_by_shard_into_float32(tmp_path, zoo_models):
    """A base stored as the Hub often has it: bf16, in shards with an index. The merge keeps the shards and the
    names, writes float32 (as the reload route does), and equals PEFT's merge into the base loaded in float32."""
    source = zoo_models("llama3")
    base = tmp_path / "base"
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(base, max_shard_size=total // 3)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (source / name).is_file():
            shutil.copy(source / name, base / name)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "the test needs a sharded base"
    trained_adapter(base, tmp_path / "adapter")
    expected = merged_model(tmp_path / "adapter", base).state_dict()
    (tmp_path / "out").mkdir()
    assert merge_into_files(tmp_path / "adapter", base, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert written["weight_map"] == index["weight_map"]
    got = state(tmp_path / "out")
    assert all(torch.equal(got[k], expected[k]) for k in expected) and got.keys() == expected.keys()
    assert {v.dtype for v in got.values()} == {torch.float32}


def test_dora_is_left_to_peft_and_nothing_is_written(tmp_path, zoo_models):
    base = zoo_models("llama3")
    trained_adapter(base, tmp_path / "adapter", use_dora=True)
    (tmp_path / "out").mkdir()
    assert not merge_into_files(tmp_path / "adapter", base, tmp_path / "out")
    assert not any((tmp_path / "out").iterdir())
