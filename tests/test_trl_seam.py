"""The seam into TRL (lexalign/train/trl_seam.py) and the lean LM head in every trainer LexAlign builds.

The seam's checker is tested by breaking TRL on purpose (a missing or changed
attribute): the error must name TRL's version and the attribute. The lean head
is tested by training each method a step with TRL's own head made to fail: the
lean head must have scored every batch.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import trl
from trl.trainer import dpo_trainer, kto_trainer

from lexalign.config.loader import section_defaults
from lexalign.config.sections import AlignConfig
from lexalign.core.errors import LexAlignError
from lexalign.demo import task
from lexalign.models import logprobs
from lexalign.train import trl_seam

VERSION = trl.__version__


def test_the_installed_trl_has_every_internal_lexalign_uses():
    trl_seam.check_internals(trl_seam.DPO)
    trl_seam.check_internals(trl_seam.KTO)


@pytest.mark.parametrize("owner, name, where", [
    (dpo_trainer.DPOTrainer, "_precompute_ref_logps", "trl.trainer.dpo_trainer.DPOTrainer._precompute_ref_logps"),
    (dpo_trainer.DPOTrainer, "_prepare_dataset", "trl.trainer.dpo_trainer.DPOTrainer._prepare_dataset"),
    (dpo_trainer, "add_fused_lm_head", "trl.trainer.dpo_trainer.add_fused_lm_head"),
    (kto_trainer, "hash_module", "trl.trainer.kto_trainer.hash_module"),
])
def test_a_missing_internal_is_named_with_trls_version(monkeypatch, owner, name, where):
    monkeypatch.delattr(owner, name)
    with pytest.raises(LexAlignError) as err:
        trl_seam.check_internals(trl_seam.DPO + trl_seam.KTO)
    assert err.value.message == f"TRL {VERSION}: {where} is missing"
    assert err.value.details[0].startswith("LexAlign uses it: ")


def test_an_internal_with_other_parameters_is_named_with_what_changed(monkeypatch):
    monkeypatch.setattr(dpo_trainer.DPOTrainer, "_precompute_ref_logps", lambda self, dataset, name, size: dataset)
    with pytest.raises(LexAlignError) as err:
        trl_seam.check_internals(trl_seam.DPO)
    assert err.value.message == f"TRL {VERSION}: trl.trainer.dpo_trainer.DPOTrainer._precompute_ref_logps has changed"
    assert err.value.details[0] == "expected parameters (self, dataset, name, batch_size), found " \
                                   "(self, dataset, name, size)"


def test_a_trainer_is_refused_before_it_is_built_when_trl_changed(monkeypatch, demo_tokenizer, tmp_path):
    """The check runs first, in __init__: no model is needed to see it fail."""
    from lexalign.train.ranked_trainer import RankedConfig, RankedTrainer

    monkeypatch.setattr(dpo_trainer, "hash_module", lambda module, seed: "")
    with pytest.raises(LexAlignError, match=rf"TRL {VERSION}: trl.trainer.dpo_trainer.hash_module has changed"):
        RankedTrainer(model=None, args=RankedConfig(output_dir=str(tmp_path), use_cpu=True, group_size=2),
                    processing_class=demo_tokenizer)


# --- the lean head in every trainer -------------------------------------------------------------------------


def _job(tmp_path: Path, model: Path, method: str, use_lora: bool):
    from lexalign.train.align import AlignJob

    if method == "gdpo":
        frame, keys = pd.DataFrame(task.ranked_rows(0, 8, k=3)), {"group_delay_size": 3}
    else:
        frame, keys = pd.DataFrame(task.preference_rows(0, 8)), {}
    frame["source_row"] = range(1, len(frame) + 1)
    params = {"learning_rate": 1e-3, "batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 1,
              "warmup_steps": 0, "max_length": 64, "save_steps": 1000, "logging_steps": 1, "lora_dropout": 0.0,
              "method": method, "use_lora": use_lora, **keys}
    return AlignJob(model_path=model, train=frame, eval=frame.iloc[:0], output_dir=tmp_path / "out",
                    cfg=AlignConfig.from_dict(section_defaults("alignment", params)),
                    checkpoint_dir=tmp_path / "checkpoints", device="cpu", seed=3)


@pytest.fixture
def heads(monkeypatch):
    """Counts the lean head's calls; TRL's own head fails the test if it runs at all."""
    import trl.trainer.utils as trl_utils

    calls = {"lean": 0}
    lean = logprobs.chunked_token_logps

    def counted(*args, **kwargs):
        calls["lean"] += 1
        return lean(*args, **kwargs)

    class TRLHead:
        @staticmethod
        def apply(*args, **kwargs):
            raise AssertionError("TRL's own fused LM head ran instead of LexAlign's lean head")

    monkeypatch.setattr(logprobs, "chunked_token_logps", counted)
    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", TRLHead)
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("method, use_lora", [
    ("dpo", False),  # a reference model beside the policy: both get the lean head
    ("gdpo", True), ("kto", True), ("orpo", True), ("simpo", False), ("cpo", True),
])
def test_every_trainer_trains_on_the_lean_head(tmp_path, sft_model_dir, heads, method, use_lora):
    trainer, _, _ = _job(tmp_path, sft_model_dir, method, use_lora).setup()
    assert heads["lean"] == 0
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses and all(math.isfinite(v) for v in losses)
    # one policy pass a step, plus the reference's where it is computed online (DPO and GDPO, KTO's KL term)
    assert heads["lean"] >= 1, method


def test_a_trainer_built_without_calling_trls_head_global_fails_loudly(monkeypatch, tmp_path, sft_model_dir):
    """If TRL stops installing its head through `add_fused_lm_head` in its trainer module, the lean head would
    silently be missing (TRL's gives the same numbers): building the trainer must fail instead."""
    from trl.trainer.utils import add_fused_lm_head

    original = dpo_trainer.DPOTrainer.__init__

    def trl_elsewhere(self, *args, **kwargs):  # as if TRL called its helper some other way
        swapped, dpo_trainer.add_fused_lm_head = dpo_trainer.add_fused_lm_head, add_fused_lm_head
        try:
            original(self, *args, **kwargs)
        finally:
            dpo_trainer.add_fused_lm_head = swapped

    monkeypatch.setattr(dpo_trainer.DPOTrainer, "__init__", trl_elsewhere)
    with pytest.raises(LexAlignError, match=rf"TRL {VERSION}: trl.trainer.dpo_trainer.add_fused_lm_head was not "
                                            "called while the trainer was built"):
        _job(tmp_path, sft_model_dir, "simpo", True).setup()
