"""Profile (not a test): where one LexAlign training step's time and memory go on SmolLM2-135M-Instruct on the CPU.

    .venv/bin/python benchmarks/profile_train_step.py --model /tmp/research/gguf/smollm2-135m-instruct

One packed row of `--tokens` tokens (a third prompt, two thirds answers: the answers are the scored positions), the
model as `lexalign align` trains it on the CPU (float32, LoRA r 16 on q/v, SDPA, the lean LM head on the scored
positions, the lean RMSNorm and SwiGLU layers), forward and backward of the summed log-probabilities, after one
warm-up step. Printed: the step's time split by operator group (torch.profiler, self CPU time), the forward's and
the backward's wall time, and what autograd keeps for the backward pass (bytes of saved activations, by width), with
and without the lean layers (`--memory-only`: just that). A step of the real job differs in its mask (prefix
sharing: an explicit mask instead of a causal one) and its loss (DPO's few ops on per-sequence sums): both small
beside the body.
"""

from __future__ import annotations

import argparse
import collections
import copy
import time

GROUPS = {
    "matmul (linear layers, LoRA, LM head tiles)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul",
                                                    "aten::linear"),
    "attention (SDPA forward and backward)": ("scaled_dot_product", "_flash_attention", "_efficient_attention"),
    "LM head folds (logsumexp, exp, gather)": ("aten::logsumexp", "aten::exp", "aten::gather", "aten::max",
                                               "aten::sub_", "aten::exp_", "aten::log"),
}


def group_of(name: str) -> str:
    for group, keys in GROUPS.items():
        if any(key in name for key in keys):
            return group
    return "elementwise and copies (norms, SwiGLU, RoPE, residuals, casts)"


def saved_bytes(model, ids, labels) -> collections.Counter:
    """Bytes of the activations autograd keeps (each storage once; the weights it references are not counted: they
    are there anyway), by the last dimension of the tensor first seen on each storage."""
    import torch

    weights = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    seen: dict[int, tuple[int, int]] = {}

    def pack(tensor):
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in weights and pointer not in seen:
            seen[pointer] = (tensor.shape[-1] if tensor.dim() else 1, tensor.untyped_storage().nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs.sum()
    widths: collections.Counter = collections.Counter()
    for width, nbytes in seen.values():
        widths[width] += nbytes
    return widths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="/tmp/research/gguf/smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=1200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-only", action="store_true", help="what autograd keeps, no timing")
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from torch.profiler import ProfilerActivity, profile

    from lexalign.models import kernels
    from lexalign.models.loading import load_causal_lm
    from lexalign.models.logprobs import add_lean_lm_head

    torch.set_num_threads(args.threads)
    base = load_causal_lm(args.model, "cpu")
    plain = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                                          task_type="CAUSAL_LM"))
    lean = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                           task_type="CAUSAL_LM"))
    kernels.apply_lean_layers(lean)
    for model in (plain, lean):
        add_lean_lm_head(model.get_base_model())
    ids = torch.randint(0, base.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :args.tokens // 3] = -100

    for name, model in (("lean layers", lean), ("transformers' layers", plain)):
        widths = saved_bytes(model, ids, labels)
        total = sum(widths.values())
        print(f"{name}: autograd keeps {total / 2**20:.0f} MiB for {args.tokens} tokens "
              f"({total / args.tokens / 2**10:.0f} KiB a token); by width: "
              + ", ".join(f"{w}: {b / 2**20:.0f}" for w, b in widths.most_common(6)), flush=True)
    if args.memory_only:
        return

    def step(model):
        started = time.perf_counter()
        out = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs.sum()
        middle = time.perf_counter()
        out.backward()
        model.zero_grad(set_to_none=True)
        return middle - started, time.perf_counter() - middle

    for name, model in (("lean layers", lean), ("transformers' layers", plain)):
        step(model)  # warm-up
        forward, backward = step(model)
        print(f"{name}: forward {forward:.2f} s, backward {backward:.2f} s "
              f"({args.tokens / (forward + backward):.0f} tokens/s)", flush=True)

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(lean)
    groups: collections.Counter = collections.Counter()
    for event in prof.key_averages():
        groups[group_of(event.key)] += event.self_cpu_time_total
    total = sum(groups.values())
    print("\nthe lean step's self CPU time by operator group:")
    for group, micros in groups.most_common():
        print(f"  {group:58s} {micros / 1e6:6.2f} s  {micros / total:5.1%}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
