"""`bf16` of the finetune and alignment sections: one rule decides it (lexalign.models.loading.training_bf16), and
the policy, the Trainer's autocast and the reference log-probs (their file's name and key) all follow it."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from lexalign.config.loader import section_defaults
from lexalign.config.sections import AlignConfig
from lexalign.core.errors import LexAlignError
from lexalign.demo import task
from lexalign.models import loading
from lexalign.reference import layout
from lexalign.reference.keys import compute_dtype, read_key
from lexalign.train.align import AlignJob, load_policy
from lexalign.train.runtime import gpu_defaults

LOG2 = math.log(2)


def bf16_job(root: Path, model: Path, train: pd.DataFrame, reference: Path, steps: int) -> AlignJob:
    """A LoRA DPO job with alignment.bf16: true on the CPU, reading `reference`."""
    params = {"learning_rate": 1e-3, "batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": steps,
              "warmup_steps": 0, "max_length": 64, "save_steps": 1000, "logging_steps": 1, "lora_dropout": 0.0,
              "bf16": True}
    return AlignJob(model_path=model, train=train, eval=train.iloc[:0], reference_path=reference,
                    cfg=AlignConfig.from_dict(section_defaults("alignment", params)), output_dir=root / "aligned",
                    checkpoint_dir=root / "checkpoints", device="cpu", seed=3)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_resolves_by_device_and_setting(monkeypatch, native):
    """Unset: bf16 on a GPU that has it, float32 on a CPU (as before the setting); auto: wherever the device
    multiplies bf16 in hardware; true/false: as said. Loading, the Trainer's autocast and the reference agree."""
    monkeypatch.setattr(loading, "native_bf16", lambda device: native)
    table = {(device, setting): loading.training_bf16(device, setting)
             for device in ("cpu", "cuda") for setting in (None, "auto", True, False)}
    assert table == {("cpu", None): False, ("cpu", "auto"): native, ("cpu", True): True, ("cpu", False): False,
                     ("cuda", None): native, ("cuda", "auto"): native, ("cuda", True): True, ("cuda", False): False}
    for (device, setting), bf16 in table.items():
        assert gpu_defaults(device, setting)["bf16"] is bf16
        assert compute_dtype(device, False, setting) == ("bfloat16" if bf16 else "float32")
        assert compute_dtype(device, True, setting) == "nf4"


def test_a_reference_file_is_named_by_the_bf16_setting():
    """Each setting has its own file (a change recomputes it, never reads the other's), and names from before the
    setting still parse (as unset)."""
    names = {}
    for bf16 in (None, True, False, "auto"):
        name = layout.setting_name({"method": "dpo", "max_length": 512, "load_in_4bit": False, "bf16": bf16})
        assert re.fullmatch(layout.SETTING_PATTERN, name)
        assert layout.parse_setting(name)["bf16"] == bf16
        names[bf16] = name
    assert names == {None: "pairs-max512", True: "pairs-max512-bf16", False: "pairs-max512-fp32",
                     "auto": "pairs-max512-bf16auto"}
    assert layout.parse_setting("k4-full-nf4")["bf16"] is None
    assert layout.parse_setting("k4-full-nf4-bf16") == {"layout": "k4", "max_length": None,
                                                         "truncation_mode": layout.TRUNCATION_MODE,
                                                         "load_in_4bit": True, "bf16": True}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama3", "gemma"])  # untied and tied embeddings
def test_a_bf16_lora_job_on_the_cpu_starts_at_its_bf16_reference_and_saves_float32(tmp_path, zoo_models, family):
    """alignment.bf16: true on the CPU: the reference log-probs are computed in bf16 (the file's key says so), the
    policy's frozen base is bf16 and its steps autocast, so the first DPO loss is log 2 (policy = reference); the
    saved model is the float32 base with the adapter merged, loadable as it is; and a float32 reference file is
    refused by name."""
    from lexalign.reference.scoring import compute_reference

    model = zoo_models(family)
    train = pd.DataFrame(task.preference_rows(0, 16))
    train["source_row"] = range(1, 17)
    out_file = tmp_path / "ref" / "pairs-max64-bf16.parquet"
    compute_reference(model, train, train.iloc[:0], out_file, layout="pairs", max_length=64, device="cpu",
                      bf16=True)
    assert read_key(out_file)["dtype"] == "bfloat16"
    job = bf16_job(tmp_path, model, train, out_file, steps=3)
    policy, _ = load_policy(job, "cpu")
    assert {p.dtype for p in policy.parameters()} == {torch.bfloat16}
    del policy

    out = job.run()
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(LOG2, abs=5e-3)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=0.05)
    before = AutoModelForCausalLM.from_pretrained(model).state_dict()
    saved = AutoModelForCausalLM.from_pretrained(out)
    after = saved.state_dict()
    assert {v.dtype for v in after.values()} == {torch.float32}
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all("proj" in k for k in changed), changed  # LoRA's targets only
    # The unchanged weights are the float32 base's exactly: the merge went into the base reloaded in float32, not
    # into the bf16 copy training used.
    assert all(torch.equal(before[k], after[k]) for k in before if "embed" in k or "norm" in k)

    fp32 = tmp_path / "ref32" / "pairs-max64-fp32.parquet"
    compute_reference(model, train, train.iloc[:0], fp32, layout="pairs", max_length=64, device="cpu", bf16=False)
    job = bf16_job(tmp_path / "again", model, train, fp32, steps=1)
    with pytest.raises(LexAlignError, match="were computed for other inputs") as refused:
        job.run()
    assert "Different: the dtype (device)" in refused.value.render()
