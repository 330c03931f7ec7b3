"""Kernel patches stay on the model they were applied to (lexalign.models.kernels), checked on the CPU
with a stand-in for Liger's process-wide patching; tests/test_gpu.py runs Liger itself on a GPU."""

from __future__ import annotations

import torch

from lexalign.models import kernels
from lexalign.models import loading as models
from lexalign.train import runtime


def patch_like_liger(model) -> None:
    """What Liger's apply_liger_kernel_to_llama does: module-level classes and functions, a class method,
    and the given model's layers."""
    from transformers.models.llama import modeling_llama

    class PatchedNorm(torch.nn.Module):
        pass

    modeling_llama.LlamaRMSNorm = PatchedNorm
    modeling_llama.apply_rotary_pos_emb = lambda *args, **kwargs: None
    modeling_llama.LlamaForCausalLM.forward = lambda self, *args, **kwargs: "patched"
    model.model.norm.forward = lambda hidden: hidden * 0  # an instance patch, as Liger binds its forward


def test_module_patches_are_undone_and_the_model_keeps_its_own(demo_model_dir):
    from transformers.models.llama import modeling_llama

    model = models.load_causal_lm(demo_model_dir, "cpu")
    originals = (modeling_llama.LlamaRMSNorm, modeling_llama.apply_rotary_pos_emb,
                 modeling_llama.LlamaForCausalLM.forward)
    with kernels.modeling_modules_kept():
        patch_like_liger(model)
        assert modeling_llama.LlamaRMSNorm is not originals[0]
    assert (modeling_llama.LlamaRMSNorm, modeling_llama.apply_rotary_pos_emb,
            modeling_llama.LlamaForCausalLM.forward) == originals
    assert "forward" in vars(model.model.norm), "the patched model keeps its layer patch"
    fresh = models.load_causal_lm(demo_model_dir, "cpu")
    assert type(fresh.model.norm) is originals[0] and "forward" not in vars(fresh.model.norm)
    assert fresh(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, fresh.config.vocab_size)


def test_liger_is_only_applied_on_the_gpu(demo_model_dir):
    model = models.load_causal_lm(demo_model_dir, "cpu")
    assert "forward" not in vars(model.model.norm)
    assert runtime.gpu_defaults("cpu") == {"bf16": False, runtime.checkpointing_argument(): False}
