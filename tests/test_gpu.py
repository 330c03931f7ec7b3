"""The GPU defaults for real on a CUDA device: bf16, gradient checkpointing, SDPA/FlashAttention, Liger.

Skipped where there is no CUDA GPU (CI has none); run on a GPU machine with `pytest -m gpu`.
Each test trains the tiny demo model on the GPU and checks what the CPU tests check:
parameters change, the step-0 DPO loss is log 2 (policy = reference), the output loads.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from lexalign.config.loader import section_defaults
from lexalign.config.sections import AlignConfig, FinetuneConfig
from lexalign.demo import task
from lexalign.models import loading as models
from lexalign.train import runtime

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none): pytest -m gpu there"),
]

LOG2 = math.log(2)


def logged(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def weights(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.float32, "saved weights should be fp32, as the CPU run saves them"
    return {k: v.float() for k, v in model.state_dict().items()}


def finetune_job(tmp_path: Path, model: Path, method: str):
    from lexalign.train.finetune import FinetuneJob

    params = {"method": method, "learning_rate": 3e-3 if method != "full" else 1e-4, "batch_size": 16,
              "max_steps": 6, "max_length": 64, "lora_dropout": 0.0, "save_steps": 1000, "logging_steps": 1}
    return FinetuneJob(model_path=model, train=pd.DataFrame(task.sft_rows(0, 160)),
                       eval=pd.DataFrame(task.sft_rows(1, 16)), cfg=FinetuneConfig.from_dict(
                           section_defaults("finetune", {**params, "eval_steps": 3})),
                       output_dir=tmp_path / "sft", checkpoint_dir=tmp_path / "sft-ckpt", device="cuda")


def align_job(tmp_path: Path, model: Path, train: pd.DataFrame, reference: Path | None = None, **params):
    from lexalign.train.align import AlignJob

    values = {"learning_rate": 5e-3, "batch_size": 8, "gradient_accumulation_steps": 1, "max_steps": 4,
              "warmup_steps": 0, "max_length": 64, "save_steps": 1000, "logging_steps": 1, "lora_dropout": 0.0,
              "beta": 0.1, **params}
    name = "precomputed" if reference else "online"
    return AlignJob(model_path=model, train=train, eval=train.iloc[:0],
                    cfg=AlignConfig.from_dict(section_defaults("alignment", values)),
                    output_dir=tmp_path / name / "aligned", checkpoint_dir=tmp_path / name / "ckpt",
                    device="cuda", seed=3, reference_path=reference)


def test_the_defaults_switch_on(demo_model_dir):
    from transformers.models.llama import modeling_llama

    from lexalign.models.kernels import liger_installed

    defaults = runtime.gpu_defaults("cuda")
    assert defaults["bf16"] == torch.cuda.is_bf16_supported()
    assert defaults[runtime.checkpointing_argument()] is True
    assert models.attention_implementation("cuda") in ("sdpa", "flash_attention_2")
    assert models.resolve_device("auto") == "cuda"

    classes = (modeling_llama.LlamaRMSNorm, modeling_llama.LlamaForCausalLM.forward,
               modeling_llama.apply_rotary_pos_emb)
    model = models.load_causal_lm(demo_model_dir, "cuda")
    assert model.config._attn_implementation == models.attention_implementation("cuda")
    assert model.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)
    # Liger's kernels on this model's layers when installed, and on nothing else in the process.
    assert ("forward" in vars(model.model.norm)) == liger_installed()
    assert classes == (modeling_llama.LlamaRMSNorm, modeling_llama.LlamaForCausalLM.forward,
                       modeling_llama.apply_rotary_pos_emb)
    on_cpu = models.load_causal_lm(demo_model_dir, "cpu")
    assert "forward" not in vars(on_cpu.model.norm)
    on_cpu(torch.tensor([[1, 2, 3]]))  # a Triton kernel would refuse CPU tensors
    patched = model.cuda()(torch.tensor([[1, 2, 3]], device="cuda")).logits.float().cpu()
    plain = on_cpu(torch.tensor([[1, 2, 3]])).logits
    assert torch.allclose(patched, plain, atol=0.1), (patched - plain).abs().max()


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_finetune_on_the_gpu(tmp_path, demo_model_dir, method):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    job = finetune_job(tmp_path, demo_model_dir, method)
    trainer, tokenizer, interrupt = job.setup()
    assert trainer.args.bf16 == torch.cuda.is_bf16_supported() and trainer.args.gradient_checkpointing
    assert next(trainer.model.parameters()).device.type == "cuda"
    trained = [p for p in trainer.model.parameters() if p.requires_grad]
    # Full fine-tuning and LoRA keep the trained weights in fp32 (bf16 autocast); for 4-bit models TRL
    # casts the adapters to bf16, the QLoRA paper's recipe.
    expected = torch.bfloat16 if method == "qlora" and torch.cuda.is_bf16_supported() else torch.float32
    assert trained and all(p.dtype == expected for p in trained), {p.dtype for p in trained}
    if method == "qlora":
        assert any(type(m).__name__ == "Linear4bit" for m in trainer.model.modules())
    with job.training(trainer, interrupt) as resume:
        trainer.train(resume_from_checkpoint=resume)
    out = job.save(trainer, tokenizer)
    history = logged(out)
    assert len(history) == 6 and all(math.isfinite(e["loss"]) for e in history)
    assert history[-1]["loss"] < history[0]["loss"]
    assert any("eval_loss" in json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
    before, after = weights(demo_model_dir), weights(out)
    assert any(not torch.allclose(before[k], after[k]) for k in before), "parameters did not change"


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_dpo_on_the_gpu_starts_at_log2(tmp_path, sft_model_dir, method):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    params = {"use_lora": method != "full", "load_in_4bit": method == "qlora"}
    if method == "full":
        params["learning_rate"] = 1e-5  # small on purpose: fp32 master weights keep updates bf16 would lose
    out = align_job(tmp_path, sft_model_dir, pd.DataFrame(task.preference_rows(0, 48)), **params).run()
    history = logged(out)
    # Policy and reference are the same weights at step 1. bf16 kernels may differ between the policy's
    # pass (with gradients) and the reference's (without) by a few bf16 roundings of the summed log-probs.
    assert history[0]["loss"] == pytest.approx(LOG2, abs=5e-3)
    assert history[0]["rewards/margins"] == pytest.approx(0.0, abs=5e-2)
    assert history[-1]["rewards/margins"] > history[0]["rewards/margins"]
    before, after = weights(sft_model_dir), weights(out)
    assert any(not torch.allclose(before[k], after[k]) for k in before), "parameters did not change"


def test_gdpo_k4_on_the_gpu(tmp_path, sft_model_dir):
    groups = pd.DataFrame(task.ranked_rows(0, 32))
    out = align_job(tmp_path, sft_model_dir, groups, method="gdpo", group_delay_size=4, batch_size=4).run()
    history = logged(out)
    assert all(math.isfinite(e["loss"]) and math.isfinite(e["loss/group"]) for e in history)
    assert history[-1]["loss"] < history[0]["loss"]
    before, after = weights(sft_model_dir), weights(out)
    assert any(not torch.allclose(before[k], after[k]) for k in before)


@pytest.mark.parametrize("layout, method", [("pairs", "dpo"), ("k4", "gdpo")])
def test_reference_file_on_the_gpu_matches_the_cpu_and_online(tmp_path, sft_model_dir, layout, method):
    from lexalign.reference.keys import read_key
    from lexalign.reference.scoring import compute_reference, load_reference

    frame = pd.DataFrame(task.preference_rows(0, 32) if layout == "pairs" else task.ranked_rows(0, 32))
    files = {}
    for device in ("cpu", "cuda"):
        files[device] = tmp_path / device / "reference.parquet"
        compute_reference(sft_model_dir, frame, frame.iloc[:0], files[device], layout=layout,
                                    max_length=64, device=device)
    cpu, gpu = (torch.tensor(load_reference(f)["train"].column("ref_logps").to_pylist())
                for f in (files["cpu"], files["cuda"]))
    assert read_key(files["cuda"])["dtype"] in ("bfloat16", "float32")
    # bf16 weights and matmuls: summed log-probs of ~30 tokens agree to about 1%.
    assert torch.allclose(gpu, cpu, rtol=2e-2, atol=0.5), (gpu - cpu).abs().max()

    params = {"method": method, "learning_rate": 5e-3, "batch_size": 4}
    if method == "gdpo":
        params["group_delay_size"] = 4
    online = logged(align_job(tmp_path, sft_model_dir, frame, **params).run())
    precomputed = logged(align_job(tmp_path, sft_model_dir, frame, files["cuda"], **params).run())
    assert len(online) == len(precomputed) == 4
    for a, b in zip(online, precomputed, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=2e-2)
