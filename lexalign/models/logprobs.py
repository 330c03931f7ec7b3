"""Log-probabilities of the tokens that are there, without the [tokens x vocabulary] logits.

DPO, GDPO, KTO and the reference step need log π(token) of the completion
tokens only. Computing the full logits and a log-softmax over them in fp32 is
the memory peak with modern vocabularies (Qwen's 151k, Llama-3's 128k,
Gemma's 256k). `add_lean_lm_head` gives a model a forward that returns
per-token log-probabilities straight from the final hidden states:

- only the scored positions (label != -100) go through the LM head: prompt,
  padding and sequence starts cost nothing there. TRL's own fused head
  (`trl.trainer.utils.add_fused_lm_head`) does this only where Triton runs
  (CUDA/XPU); elsewhere it projects every position, padding included;
- the projection and the logsumexp run a tile at a time ([TOKEN_TILE x
  VOCAB_TILE]) and each tile is recomputed in the backward pass instead of
  stored (TRL's `ChunkedLogProbFunction`, the kernel both heads share). TRL's
  tiles are [4096 x 32768]: on the CPU, where the tile is folded with torch
  ops that each allocate a tile-sized temporary, that is several 512 MB
  buffers at once; here a tile is 32 MB.

The call is the one TRL's trainers make, `model(..., labels=labels,
fused_lm_head=True)` returning a `FusedCausalLMOutput`, so DPOTrainer,
KTOTrainer and ours use it unchanged once it is installed.
"""

from __future__ import annotations

import contextlib
import types

import torch

TOKEN_TILE = 1024
"""Scored positions per call of the chunked kernel."""
VOCAB_TILE = 8192
"""Vocabulary columns per tile: a [TOKEN_TILE x VOCAB_TILE] fp32 tile is 32 MB."""

ACCELERATOR_VOCAB_TILE = 32768
"""Vocabulary columns per tile where TRL's Triton kernel folds the tiles (TRL's own width)."""

DEFAULT_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")
"""What DPOTrainer's metrics read (entropy, logits/*, mean_token_accuracy) beside the log-probs."""


def logit_transform(config) -> tuple[float | None, float]:
    """(final_logit_softcapping, logit_scale) of an architecture, read as TRL's fused head reads them: Gemma-2
    caps its logits, Cohere scales them, Granite divides them."""
    text = config.get_text_config()
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        if getattr(text, name, None) is not None:
            scale = getattr(text, name)
            break
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scale = text.logits_scaling if text.model_type == "hyperclovax" else 1 / text.logits_scaling
    return getattr(text, "final_logit_softcapping", None), 1.0 if scale is None else scale


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None,
            scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A [n, c] tile of logits in fp32 (a fresh tensor the caller may overwrite), and tanh of the capped
    logits where the architecture soft-caps them (what the backward pass needs). Under autocast the product
    runs in the autocast dtype, as TRL's kernel projects, and is folded in fp32."""
    z = (hidden @ weight.float().t()).float()
    if bias is not None:
        z += bias.float()
    if scale != 1.0:
        z *= scale
    if softcap is None:
        return z, None
    t = torch.tanh(z / softcap)
    return torch.mul(t, softcap, out=z), t


class TiledLogProbs(torch.autograd.Function):
    """log softmax(hidden @ weight.T + bias)[target] a [TOKEN_TILE x VOCAB_TILE] tile at a time, in fp32, on the
    CPU: the tile is folded with in-place ops (about four passes over it, where TRL's torch fallback makes
    a dozen, most of them allocating a tile-sized temporary) and recomputed in the backward pass.

    Also returns, without gradient (metrics: DPO's entropy, logits/*, mean_token_accuracy), each position's
    entropy, mean logit and whether the target is the most likely token (a tie counts). Under autocast the
    projection runs in the autocast dtype (as TRL's kernel runs it) and everything after it in fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, scale, stats: bool):
        n_tokens, vocab = hidden.shape[0], weight.shape[0]
        h = hidden.float()
        lse = torch.empty(n_tokens, dtype=torch.float32, device=h.device)
        target_z = torch.zeros_like(lse)
        entropy, mean_logit, top = (torch.empty_like(lse) for _ in range(3)) if stats else (None, None, None)
        for a in range(0, n_tokens, TOKEN_TILE):
            rows = h[a:a + TOKEN_TILE]
            peak = torch.full((rows.shape[0],), float("-inf"), device=h.device)
            sum_exp, sum_exp_z, sum_z = (torch.zeros_like(peak) for _ in range(3))
            for v in range(0, vocab, VOCAB_TILE):
                z, _ = _logits(rows, weight[v:v + VOCAB_TILE], None if bias is None else bias[v:v + VOCAB_TILE],
                               softcap, scale)
                local = targets[a:a + TOKEN_TILE] - v  # the target's logit, from the tile it falls in
                here = (local >= 0) & (local < z.shape[1])
                picked = z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None]).view(-1)
                target_z[a:a + TOKEN_TILE] = torch.where(here, picked, target_z[a:a + TOKEN_TILE])
                if stats:
                    sum_z += z.sum(-1)
                new_peak = torch.maximum(peak, z.amax(-1))
                rescale = torch.exp(peak - new_peak)
                z -= new_peak[:, None]  # z' = z - peak, so exp never overflows
                e = torch.exp(z)
                tile_sum = e.sum(-1)
                if stats:  # Σ e^(z - peak)·z = e·z' + peak·Σ e
                    sum_exp_z = sum_exp_z * rescale + torch.bmm(e[:, None], z[:, :, None]).view(-1) \
                        + new_peak * tile_sum
                sum_exp = sum_exp * rescale + tile_sum
                peak = new_peak
            lse[a:a + TOKEN_TILE] = peak + torch.log(sum_exp)
            if stats:
                entropy[a:a + TOKEN_TILE] = lse[a:a + TOKEN_TILE] - sum_exp_z / sum_exp
                mean_logit[a:a + TOKEN_TILE] = sum_z / vocab
                top[a:a + TOKEN_TILE] = peak
        logp = target_z - lse
        ctx.save_for_backward(hidden, weight, bias, targets, lse, target_z)
        ctx.softcap, ctx.scale = softcap, scale
        if not stats:
            return logp, None, None, None
        is_top1 = target_z >= top
        ctx.mark_non_differentiable(entropy, mean_logit, is_top1)
        return logp, entropy, mean_logit, is_top1

    @staticmethod
    def backward(ctx, grad_logp, *_):
        hidden, weight, bias, targets, lse, target_z = ctx.saved_tensors
        softcap, scale = ctx.softcap, ctx.scale
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        h, g = hidden.float(), grad_logp.float()
        grad_h = torch.zeros_like(h) if need_hidden else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        for a in range(0, h.shape[0], TOKEN_TILE):
            rows, g_rows, lse_rows = h[a:a + TOKEN_TILE], g[a:a + TOKEN_TILE, None], lse[a:a + TOKEN_TILE, None]
            for v in range(0, weight.shape[0], VOCAB_TILE):
                w = weight[v:v + VOCAB_TILE].float()
                z, t = _logits(rows, w, None if bias is None else bias[v:v + VOCAB_TILE], softcap, scale)
                p = z.sub_(lse_rows).exp_()  # softmax of the tile's columns
                # d log p_target / d raw logit_j = (1[j = target] - p_j) · dz_j/draw_j; the p part here:
                p *= g_rows * scale
                if t is not None:
                    p *= 1 - t * t
                if grad_h is not None:
                    grad_h[a:a + TOKEN_TILE].addmm_(p, w, alpha=-1)
                if grad_w is not None:
                    grad_w[v:v + VOCAB_TILE].addmm_(p.t(), rows, alpha=-1)
                if grad_b is not None:
                    grad_b[v:v + VOCAB_TILE] -= p.sum(0)
        # ... and the target's part, once per position.
        factor = g * scale if softcap is None else g * scale * (1 - (target_z / softcap) ** 2)
        if grad_h is not None:
            grad_h += factor[:, None] * weight[targets].float()
        if grad_w is not None:
            grad_w.index_add_(0, targets, factor[:, None] * h)
        if grad_b is not None:
            grad_b.index_add_(0, targets, factor)
        return (None if grad_h is None else grad_h.to(hidden.dtype),
                None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None)


def chunked_token_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        targets: torch.Tensor, outputs: tuple[str, ...] = ("log_probs",),
                        softcap: float | None = None, logit_scale: float = 1.0) -> tuple:
    """log softmax(hidden @ weight.T + bias)[target] for [N, H] hidden states, a tile at a time.

    Returns (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1), each [N] or None when not in
    `outputs`; log_probs is differentiable in `hidden`, `weight` and `bias`. On the CPU `TiledLogProbs`;
    elsewhere TRL's `ChunkedLogProbFunction` (its Triton kernels), given the scored positions only.
    """
    if hidden.device.type == "cpu" and "log_sum_sq_probs" not in outputs:
        stats = any(name in outputs for name in ("entropy", "mean_logits", "is_top1"))
        logp, entropy, mean_logit, is_top1 = TiledLogProbs.apply(hidden, weight, bias, targets, softcap,
                                                                 logit_scale, stats)
        keep = lambda name, value: value if name in outputs else None  # noqa: E731
        return logp, keep("entropy", entropy), None, keep("mean_logits", mean_logit), keep("is_top1", is_top1)
    from trl.kernels import ChunkedLogProbFunction

    # TRL's kernel tiles the tokens itself; on an accelerator its vocabulary width is TRL's own default.
    return ChunkedLogProbFunction.apply(hidden, weight, bias, targets, 1.0, ACCELERATOR_VOCAB_TILE, softcap,
                                        logit_scale, outputs)


def add_lean_lm_head(model, outputs: tuple[str, ...] = ("log_probs",)) -> None:
    """Give `model` the lean head: `model(..., labels=labels, fused_lm_head=True)` scores the labelled positions
    only, in tiles. Calls without `fused_lm_head` (generation, plain forwards) go to the forward it had.

    Install it on the model itself (the PEFT model's `get_base_model()`), after TRL's trainer has installed its
    own fused head, which it replaces. A mixture-of-experts model keeps TRL's head (its auxiliary loss).
    """
    from trl.trainer.utils import FusedCausalLMOutput

    text = model.config.get_text_config()
    if getattr(text, "output_router_logits", False):
        return
    previous = model.forward
    softcap, logit_scale = logit_transform(model.config)

    def lean_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                     **kwargs):
        if not fused_lm_head:
            extra = {name: value for name, value in (("labels", labels), ("shift_labels", shift_labels),
                                                     ("num_items_in_batch", num_items_in_batch))
                     if value is not None}
            return previous(*args, **kwargs, **extra)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:  # position t scores token t + 1
            hidden, targets = hidden[:, :-1], labels[:, 1:]
        else:
            targets = shift_labels
        head = self.get_output_embeddings()
        hidden, targets = hidden.to(head.weight.device), targets.to(head.weight.device)
        mask = targets != -100
        per_token = chunked_token_logps(hidden[mask], head.weight, head.bias, targets[mask], outputs, softcap,
                                        logit_scale)
        # masked_scatter keeps an all-masked batch connected to the graph (a differentiable zero).
        log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = (
            None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x) for x in per_token)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs, entropy=entropy,
                                   log_sum_sq_probs=log_sum_sq_probs, mean_logits=mean_logits, is_top1=is_top1,
                                   label_mask=mask)

    lean_forward.lean_outputs = outputs
    model.forward = types.MethodType(lean_forward, model)


def has_lean_head(model) -> bool:
    return getattr(getattr(model.forward, "__func__", None), "lean_outputs", None) is not None


def ensure_lean_head(model) -> None:
    """The lean head on a model used for scoring only (evaluation), once."""
    if not has_lean_head(model):
        add_lean_lm_head(model)


@contextlib.contextmanager
def lean_heads(trainer_module):
    """While a TRL trainer is built, the fused LM head its module installs is the lean head.

    TRL's DPOTrainer and KTOTrainer call `add_fused_lm_head` in their __init__ on
    the policy (under PEFT, its base model) and on a reference model, before
    accelerate wraps the reference for mixed precision; the lean head is put in
    at that very point, so those wrappers (bf16 autocast) stay around it.
    `trainer_module` is the module whose `add_fused_lm_head` the trainer calls
    (`trl.trainer.dpo_trainer`, `trl.trainer.kto_trainer`).
    """
    original = trainer_module.add_fused_lm_head

    def install(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",)):
        if temperature != 1.0 or cast_lm_head_to_fp32:  # settings the lean head does not have: TRL's head
            return original(model, temperature=temperature, cast_lm_head_to_fp32=cast_lm_head_to_fp32,
                            outputs=outputs)
        return add_lean_lm_head(model, outputs)

    trainer_module.add_fused_lm_head = install
    try:
        yield
    finally:
        trainer_module.add_fused_lm_head = original
