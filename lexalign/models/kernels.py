"""Liger kernels on one model, not on the rest of the process.

Liger patches the architecture's modeling module process-wide (the Trainer's
`use_liger_kernel` too): it replaces classes (`LlamaRMSNorm`, `LlamaMLP`),
functions (`apply_rotary_pos_emb`) and class methods (`LlamaForCausalLM.forward`),
besides the layers of the model it is given. Every model of that architecture
built afterwards in the same process then runs Triton kernels, and one on the
CPU fails ("Pointer argument cannot be accessed from Triton (cpu tensor?)"),
for example evaluating on the CPU after aligning on the GPU through the Python
API. `apply_liger` keeps the patches on the given model's layers (RMSNorm,
SwiGLU MLP: their memory and speed gains) and puts the modules back at once.
The fused RoPE function is module-level, so it goes too; the fused linear
cross-entropy stays off, as TRL's trainers need the model's own LM head.

On the CPU, where Triton does not run, `apply_lean_layers` gives a training model the memory half of the same
idea in torch ops (below).
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator


def _modeling_modules() -> list:
    return [module for name, module in list(sys.modules.items())
            if name.startswith("transformers.models.") and name.rsplit(".", 1)[-1].startswith("modeling_")
            and module is not None]


def _snapshot(modules: list) -> dict:
    """Each module's namespace, and the methods of the classes defined in it."""
    saved = {}
    for module in modules:
        names = dict(vars(module))
        methods = {cls: dict(vars(cls)) for cls in names.values()
                   if isinstance(cls, type) and cls.__module__ == module.__name__}
        saved[module] = (names, methods)
    return saved


def _restore(saved: dict) -> None:
    for module, (names, methods) in saved.items():
        for name, value in names.items():
            if vars(module).get(name) is not value:
                setattr(module, name, value)
        for cls, attributes in methods.items():
            for name, value in attributes.items():
                if name not in ("__dict__", "__weakref__") and vars(cls).get(name) is not value:
                    setattr(cls, name, value)


@contextlib.contextmanager
def modeling_modules_kept() -> Iterator[None]:
    """Undo, on leaving, what was patched in transformers' modeling modules imported on entering."""
    saved = _snapshot(_modeling_modules())
    try:
        yield
    finally:
        _restore(saved)


def liger_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def apply_liger(model) -> bool:
    """Liger's layer kernels on `model` alone (already loaded, so its modeling module is imported).

    Returns whether any were applied: Liger knows the architecture and is installed.
    """
    if not liger_installed():
        return False
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance

    if getattr(model.config, "model_type", None) not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return False
    with modeling_modules_kept():
        # The same call the Trainer makes for `use_liger_kernel`, without its process-wide side effects.
        _apply_liger_kernel_to_instance(model=model, fused_linear_cross_entropy=False, cross_entropy=False)
    return True


# --- lean layers on the CPU ------------------------------------------------------------------------------------------
# Where Liger's Triton kernels cannot run, the same idea in torch ops: a layer that keeps, for the backward pass, its
# inputs alone and recomputes the rest. Autograd around transformers' SwiGLU MLP keeps gate, silu(gate) and up, and
# the product too when the down projection trains; `silu_mul` keeps gate and up. The RMSNorm keeps its input and one
# float a row (transformers' also keeps the normed rows when its weight trains). Measured on SmolLM2 under LoRA:
# 19% less kept for the backward pass (benchmarks/profile_train_step.py --memory-only); more in full fine-tuning.
# Outputs are bit for bit transformers'; gradients equal up to float rounding (tests/test_kernels.py).


def silu_mul_backward(grad, gate, up, needed):
    """The gradients of silu(gate) * up given the product's, for the inputs `needed` says."""
    import torch

    sigmoid = torch.sigmoid(gate)
    grad_up = grad * (gate * sigmoid) if needed[1] else None
    # d silu(g) / dg = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
    grad_gate = grad * up * sigmoid * (1 + gate * (1 - sigmoid)) if needed[0] else None
    return grad_gate, grad_up


@functools.cache
def silu_mul():
    """An autograd function: silu(gate) * up, keeping gate and up for the backward pass (silu and the product
    recomputed there). Built on first use: torch is imported lazily here."""
    import torch

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, gate, up):
            ctx.save_for_backward(gate, up)
            return torch.nn.functional.silu(gate) * up

        @staticmethod
        def backward(ctx, grad):
            gate, up = ctx.saved_tensors
            return silu_mul_backward(grad, gate, up, ctx.needs_input_grad)

    return Function


@functools.cache
def rms_norm():
    """An autograd function: transformers' Llama RMSNorm (float32 statistics, `weight * normed.to(input dtype)`),
    keeping the input and the reciprocal root mean square for the backward pass."""
    import torch

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, eps):
            x = hidden.to(torch.float32)
            rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # transformers' order of operations
            ctx.save_for_backward(hidden, weight, rstd)
            return weight * (x * rstd).to(hidden.dtype)

        @staticmethod
        def backward(ctx, grad):
            hidden, weight, rstd = ctx.saved_tensors
            normed = hidden.to(torch.float32) * rstd
            grad_weight = None
            if ctx.needs_input_grad[1]:
                grad_weight = (grad * normed.to(hidden.dtype)).reshape(-1, grad.shape[-1]).sum(0)
                grad_weight = grad_weight.to(weight.dtype)
            grad_hidden = None
            if ctx.needs_input_grad[0]:
                g = (grad * weight).to(torch.float32)
                grad_hidden = (rstd * (g - normed * (g * normed).mean(-1, keepdim=True))).to(hidden.dtype)
            return grad_hidden, grad_weight, None

    return Function


def _source(function) -> str | None:
    import inspect
    import textwrap

    try:
        return textwrap.dedent(inspect.getsource(function))
    except (OSError, TypeError):
        return None


def _lean_targets() -> tuple[str | None, str | None]:
    """The forward source of transformers' Llama RMSNorm and SwiGLU MLP: a layer whose class's forward is this very
    text computes what the lean layers compute (Qwen2, Qwen3, Mistral, SmolLM2 ... copy Llama's)."""
    from transformers.models.llama import modeling_llama

    return _source(modeling_llama.LlamaRMSNorm.forward), _source(modeling_llama.LlamaMLP.forward)


def apply_lean_layers(model) -> int:
    """Lean RMSNorm and SwiGLU layers on `model`'s modules whose forward is Llama's (on this model only: the
    instances' forward is replaced, no class is patched). Returns how many layers were replaced."""
    import types

    norm_source, mlp_source = _lean_targets()
    lean_silu_mul, lean_rms_norm = silu_mul(), rms_norm()
    sources: dict[type, str | None] = {}
    replaced = 0

    def lean_norm(self, hidden_states):
        return lean_rms_norm.apply(hidden_states, self.weight, self.variance_epsilon)

    def lean_mlp(self, x):
        return self.down_proj(lean_silu_mul.apply(self.gate_proj(x), self.up_proj(x)))

    for module in model.modules():
        cls = type(module)
        if cls not in sources:
            sources[cls] = _source(cls.forward)
        if sources[cls] is None:
            continue
        if sources[cls] == norm_source and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(lean_norm, module)
            replaced += 1
        elif sources[cls] == mlp_source and _is_silu(getattr(module, "act_fn", None)):
            module.forward = types.MethodType(lean_mlp, module)
            replaced += 1
    return replaced


def _is_silu(activation) -> bool:
    import torch

    if isinstance(activation, torch.nn.SiLU):
        return True
    return type(activation).__name__ in ("SiLUActivation",) or getattr(activation, "__name__", None) == "silu"
