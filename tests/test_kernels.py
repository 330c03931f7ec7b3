"""Kernel patches stay on the model they were applied to (lexalign.models.kernels), checked on the CPU
with a stand-in for Liger's process-wide patching; tests/test_gpu.py runs Liger itself on a GPU. The CPU's lean
layers compute what transformers computes and keep less for the backward pass."""

from __future__ import annotations

import pytest
import torch

from lexalign.models import kernels
from lexalign.models import loading as models
from lexalign.train import runtime
from testkit.zoo import FAMILIES


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


# --- lean layers on the CPU ----------------------------------------------------------------------------------------


def test_the_lean_layers_backward_is_the_derivative_of_their_forward():
    """The hand-written backward passes: SwiGLU's against finite differences of its forward (gradcheck, float64),
    the RMSNorm's against autograd through transformers' module."""
    torch.manual_seed(0)
    gate, up = (torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(kernels.silu_mul().apply, (gate, up))
    # The forward is transformers' own arithmetic, bit for bit.
    assert torch.equal(kernels.silu_mul().apply(gate, up), torch.nn.functional.silu(gate) * up)
    # The RMSNorm computes its statistics in float32 whatever the input (as transformers' does), which finite
    # differences cannot resolve: its gradients are checked against autograd through transformers' own module.
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8))
    hidden = torch.randn(3, 5, 8, requires_grad=True)
    weight = norm.weight.detach().clone().requires_grad_(True)
    grad = torch.randn(3, 5, 8)
    expected = norm(hidden)
    expected.backward(grad)
    expected_hidden, hidden.grad = hidden.grad, None
    got = kernels.rms_norm().apply(hidden, weight, 1e-6)
    got.backward(grad)
    assert torch.equal(got, expected)
    torch.testing.assert_close(hidden.grad, expected_hidden, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad, norm.weight.grad, rtol=1e-5, atol=1e-6)


def _saved_bytes(model, ids) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one forward (each storage once)."""
    seen: dict[int, int] = {}

    def pack(tensor):
        seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(ids).logits.sum()
    return sum(seen.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_lean_layers_compute_what_the_model_computes_and_keep_less(zoo_models, family):
    """On every zoo architecture: the layers whose forward is Llama's (RMSNorm, SwiGLU MLP) become lean, others are
    left alone; the logits are transformers' bit for bit, every gradient equal up to float rounding, trained in full
    and as LoRA trains (frozen projections, only q/v weights taking gradients), and what autograd keeps for the
    backward pass shrinks: by two intermediate-wide tensors a token a layer trained in full, by one under LoRA (where
    autograd already skips the SwiGLU product a frozen down projection does not need)."""
    path = zoo_models(family)
    config = None
    shrink = {}
    for frozen in (False, True):
        plain, lean = (models.load_causal_lm(path, "cpu") for _ in range(2))
        replaced = kernels.apply_lean_layers(lean)
        config = plain.config.get_text_config()
        if family in ("llama3", "qwen2", "mistral"):  # two norms and the MLP of each layer, and the final norm
            assert replaced == 3 * config.num_hidden_layers + 1
        assert all("forward" not in vars(module) for module in plain.modules())
        if frozen:
            for model in (plain, lean):
                for name, parameter in model.named_parameters():
                    parameter.requires_grad_(name.endswith(("q_proj.weight", "v_proj.weight", "qkv_proj.weight",
                                                            "c_attn.weight", "query_key_value.weight")))
        ids = torch.randint(0, config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(1))
        out_plain, out_lean = plain(ids).logits, lean(ids).logits
        assert torch.equal(out_plain, out_lean)
        weights = torch.randn(out_plain.shape, generator=torch.Generator().manual_seed(2))
        (out_plain * weights).sum().backward()
        (out_lean * weights).sum().backward()
        compared = 0
        for (name, a), b in zip(plain.named_parameters(), lean.parameters(), strict=True):
            assert (a.grad is None) == (b.grad is None), name
            if a.grad is not None:
                # float rounding of sums taken in another order: a millionth of the gradient's scale
                scale = float(a.grad.abs().max())
                torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6 * scale, msg=name)
                compared += 1
        assert compared >= config.num_hidden_layers
        shrink[frozen] = (_saved_bytes(plain, ids) - _saved_bytes(lean, ids)) / (
            config.intermediate_size * ids.numel() * config.num_hidden_layers * 4) if replaced else 0
    if family in ("llama3", "qwen2", "mistral"):
        assert shrink[False] >= 2 and shrink[True] >= 1, shrink
