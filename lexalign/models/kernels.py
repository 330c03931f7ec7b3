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
"""

from __future__ import annotations

import contextlib
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
