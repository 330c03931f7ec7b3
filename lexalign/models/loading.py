"""Models and tokenizers: where they run, how they load, and what is refused.

Every step that loads a model or a tokenizer (finetune, reference, align,
evaluate, validate's length check, the report) comes here: the device choice,
safetensors only unless pickles are allowed, 4-bit NF4 for QLoRA, the attention
kernel, a pad-less tokenizer made usable, an adapter merged into its base.
Training arguments and checkpoints are in `lexalign.train.runtime`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lexalign.core.errors import LexAlignError, warn
from lexalign.core.paths import TOKENIZER_VOCAB_FILES, require_model


def resolve_device(requested: str) -> str:
    """`auto`, `cuda` or `cpu` → the device training will use."""
    import torch

    if requested == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if requested == "cuda":
        warn("CUDA requested but unavailable. Using CPU.", "Training will be significantly slower.")
    return "cpu"


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir() or not any((path / name).is_file() for name in TOKENIZER_VOCAB_FILES):
        require_model(path, "lexalign download --config config/downloads.yaml")  # names what is missing
        raise LexAlignError(f'No tokenizer at "{path}"', "The folder holds a model but no tokenizer files",
                            hint="Set model.base_model to the folder (or Hub download) with its tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise LexAlignError(f'Could not load the tokenizer at "{path}"', f"{type(err).__name__}: {str(err)[:300]}",
                            hint="Check the tokenizer files (tokenizer.json, tokenizer_config.json)") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_weights_format(path: Path, allow_pickle: bool) -> bool:
    """True to load safetensors. Pickle-based weights can run code when loaded: refused unless allowed."""
    files = [p.name for p in Path(path).glob("*") if p.is_file()]
    if any(name.endswith(".safetensors") for name in files):
        return True
    pickled = sorted(name for name in files if name.endswith(PICKLE_SUFFIXES))
    if pickled and not allow_pickle:
        raise LexAlignError(
            f'Model at "{path}" has only pickle-based weights ({", ".join(pickled[:3])})',
            "Loading a pickle can run arbitrary code on this machine.",
            hint="Convert them to safetensors, or set model.allow_pickle: true if you trust the source",
        )
    if pickled:
        warn(f'Loading pickle-based weights from "{path}" (allow_pickle: true)')
    return not pickled


def native_bf16(device: str) -> bool:
    """Whether `device` multiplies bfloat16 in hardware: a CUDA GPU that supports it, or a CPU with avx512_bf16 or
    AMX tiles (oneDNN's bf16 kernels: the sampler ran 1.9x its float32 speed on a Zen 4, BENCHMARKS.md)."""
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if str(device) != "cpu":
        return False
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def training_bf16(device: str, bf16: bool | str | None = None) -> bool:
    """Whether a training job (and the reference step, which must match it) runs in bf16: frozen weights stored
    in bf16, the Trainer's steps autocast to it. The finetune/alignment section's `bf16`: None (unset) on a GPU
    that supports it, float32 on a CPU; `auto` wherever the device multiplies bf16 in hardware (a CPU with
    avx512_bf16 or AMX too: 1.2x the float32 job's speed on SmolLM2, BENCHMARKS.md); True or False as said."""
    if bf16 is None:
        return str(device).startswith("cuda") and native_bf16(device)
    if bf16 == "auto":
        return native_bf16(device)
    return bool(bf16)


def load_causal_lm(path: str | Path, device: str, quantize_4bit: bool = False, trust_remote_code: bool = False,
                   allow_pickle: bool = False, train_all_weights: bool = False, bf16: bool | str | None = None):
    """Load a causal LM from safetensors; 4-bit NF4 through bitsandbytes for QLoRA.

    Where training runs in bf16 (`training_bf16(device, bf16)`: a GPU with bf16 unless the config says
    otherwise), frozen weights (LoRA's base, a reference) are stored in bf16. Weights that are all
    trained (`train_all_weights`, full fine-tuning) stay fp32 and the Trainer autocasts to bf16: AdamW's
    updates at alignment learning rates (1e-6 of a weight) are far below bf16's resolution (2**-8 of it)
    and would round away.
    """
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code,
                              "use_safetensors": check_weights_format(Path(path), allow_pickle)}
    if quantize_4bit:
        from transformers import BitsAndBytesConfig

        try:
            import bitsandbytes  # noqa: F401
        except ImportError as err:
            raise LexAlignError("QLoRA needs bitsandbytes, which could not be loaded", str(err),
                                hint="pip install bitsandbytes, or use method: lora") from None
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if device == "cuda" else torch.float32,
        )
        # This process's GPU: the first one alone, or the one a launched process was given (lexalign.core.shares).
        kwargs["device_map"] = {"": torch.cuda.current_device()} if device == "cuda" else {"": "cpu"}
        try:
            from peft import prepare_model_for_kbit_training

            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except (RuntimeError, ValueError, ImportError) as err:
            raise LexAlignError("4-bit (QLoRA) loading failed: bitsandbytes cannot run here", str(err).splitlines()[0],
                                hint="Use method: lora (or load_in_4bit: false)") from None
        # Norms in fp32 and input gradients on, as PEFT recommends for k-bit training.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=device == "cuda")
        if device == "cuda":
            from lexalign.models.kernels import apply_liger

            apply_liger(model)
        return model
    elif training_bf16(device, bf16) and not train_all_weights:
        kwargs["dtype"] = torch.bfloat16
    else:
        kwargs["dtype"] = torch.float32
    kwargs["attn_implementation"] = attention_implementation(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ValueError as err:
        if "attention implementation" not in str(err) and "does not support" not in str(err):
            raise
        # An architecture without SDPA/FlashAttention (Gemma-2 in transformers 5.x): its own eager attention.
        model = AutoModelForCausalLM.from_pretrained(path, **{**kwargs, "attn_implementation": "eager"})
    if device == "cuda":
        from lexalign.models.kernels import apply_liger

        apply_liger(model)
    return model


def lean_for_training(model, device: str, quantized: bool = False):
    """`model` with layers that keep less for the backward pass where Liger's kernels cannot run (the CPU: its
    RMSNorm and SwiGLU MLP in torch ops, `kernels.apply_lean_layers`; 4-bit models keep theirs). Same outputs."""
    if device == "cpu" and not quantized:
        from lexalign.models.kernels import apply_lean_layers

        apply_lean_layers(model)
    return model


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def attention_implementation(device: str) -> str:
    """FlashAttention 2 on a GPU where it is installed, else PyTorch's SDPA (fused kernels on GPU and CPU)."""
    return "flash_attention_2" if device == "cuda" and _installed("flash_attn") else "sdpa"


def merged_model(adapter_dir: Path, base_path: Path, trust_remote_code: bool = False):
    """Base weights in full precision with the adapter merged in (also undoes QLoRA's 4-bit)."""
    from peft import PeftModel

    base = load_causal_lm(base_path, "cpu", trust_remote_code=trust_remote_code)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


def check_reward_model(path: str | Path, key: str = "evaluate.reward_model", trust_remote_code: bool = False):
    """The config of a sequence-classification reward model (one score per text), or a clear error naming `key`:
    a model saved as anything else (a causal LM: its score head would be random) is refused."""
    from transformers import AutoConfig

    path = require_model(path, f"Fix {key} in config/config.yaml", key=key)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise LexAlignError(f'Could not read the reward model\'s config at "{path}" ({key})',
                            f"{type(err).__name__}: {str(err)[:300]}") from None
    architectures = list(getattr(config, "architectures", None) or [])
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        raise LexAlignError(f'{key} is not a sequence-classification reward model: "{path}"',
                            f"Its architecture: {', '.join(architectures) or '(none saved)'}",
                            "A reward model scores a text with one number (…ForSequenceClassification, num_labels 1); "
                            "a causal LM has no trained score head",
                            hint=f"Point {key} at a reward model (e.g. Skywork/Skywork-Reward-V2-Llama-3.1-8B, "
                                 "OpenAssistant/reward-model-deberta-v3-large-v2), or use evaluate.judge: llm")
    if getattr(config, "num_labels", 1) != 1:
        raise LexAlignError(f'{key} gives {config.num_labels} scores per text, not one: "{path}"',
                            f"Its architecture: {', '.join(architectures)} with num_labels {config.num_labels}",
                            hint=f"Point {key} at a reward model with num_labels 1")
    return config


def load_reward_model(path: str | Path, device: str, key: str = "evaluate.reward_model",
                      trust_remote_code: bool = False, allow_pickle: bool = False):
    """A sequence-classification reward model and its tokenizer, on `device`, for scoring (`check_reward_model`)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    check_reward_model(path, key, trust_remote_code)
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    model = AutoModelForSequenceClassification.from_pretrained(
        path, dtype=dtype, trust_remote_code=trust_remote_code,
        use_safetensors=check_weights_format(Path(path), allow_pickle)).to(device).eval()
    tokenizer = load_tokenizer(path, trust_remote_code)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
