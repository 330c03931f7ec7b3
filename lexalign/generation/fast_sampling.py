"""LexAlign's sampler: K answers per prompt on the model's own forward pass, without the work generate() wastes.

It samples what `generate(do_sample=True, num_return_sequences=K)` samples from, the model as loaded: the next-token
logits in float32, divided by the temperature, cut to the top_p nucleus exactly as transformers' TopPLogitsWarper
cuts them (so top_p ~ 0 is greedy decoding, token for token). What it does not do (measured on SmolLM2-135M on a
2-core CPU, BENCHMARKS.md "Sampling speed"):

1. compute a prompt K times: generate() copies each prompt K times before the prefill; here the prompt's KV cache
   is computed once and copied to its K rows;
2. compute finished answers: generate() runs every row until the longest answer ends; here a row that ends leaves
   the batch (a live row is moved into its place in the cache: a copy of the moved rows only);
3. copy the cache every step: DynamicCache grows by torch.cat (the whole cache copied each token); here each layer's
   cache is allocated once, at the batch's final length (`Preallocated`).

Randomness: answer (i, j) (prompt i of the batch, its j-th sample) draws its t-th token by the inverse CDF at
u[i, j, t], uniforms drawn up front from the batch's seed. An answer's tokens so depend on (seed, i, j) and on its
logits only: not on which rows share the batch, when they finish, nor on how many prompts follow it (padding may
change its logits in the last float bits).

Where the cache is not plain attention (a sliding window shorter than prompt + answer: Gemma-2, Mistral, Phi-3 with
long contexts; linear attention; encoder-decoders), `sample` returns None and the caller uses generate().
"""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer


class Preallocated(DynamicLayer):
    """One layer's keys and values in buffers of `rows` x heads x `capacity` x head_dim, filled left to right: the
    model reads views of the first `self.rows` rows and `self.length` positions (what DynamicLayer would hold)."""

    def __init__(self, rows: int, capacity: int):
        super().__init__()
        self.max_rows, self.capacity, self.rows, self.length = rows, capacity, 0, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        def buffer(states):  # torch.empty: pages are touched only as the positions fill
            return states.new_empty((self.max_rows, states.shape[1], self.capacity, states.shape[3]))

        self.device, self.key_buffer, self.value_buffer = key_states.device, buffer(key_states), buffer(value_states)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        rows, new = key_states.shape[0], key_states.shape[2]
        self.rows, end = rows, self.length + new
        self.key_buffer[:rows, :, self.length:end] = key_states
        self.value_buffer[:rows, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:rows, :, :end], self.value_buffer[:rows, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def take(self, indices: torch.Tensor) -> None:
        """Row r becomes old row indices[r]. Only the rows that change are copied (the right-hand side is gathered
        before the write, so a row may move onto one that moves away)."""
        changed = (indices != torch.arange(len(indices), device=indices.device)).nonzero().squeeze(1)
        if changed.numel():
            for buffer in (self.key_buffer, self.value_buffer):
                buffer[changed, :, :self.length] = buffer[indices[changed], :, :self.length]
        self.rows = len(indices)
        self.keys = self.key_buffer[:self.rows, :, :self.length]
        self.values = self.value_buffer[:self.rows, :, :self.length]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.take(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.take(torch.arange(self.rows, device=self.device).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("LexAlign's sampler never crops its cache")


def preallocated_cache(model, rows: int, capacity: int) -> Cache | None:
    """A cache of `Preallocated` layers, or None where a layer is not plain attention over the whole context: a
    sliding window as long as prompt + answer is plain attention (Gemma-2's 4096 with short prompts), a shorter one
    or anything else (linear attention, chunked, shared layers) is not."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return None
    try:
        layers = DynamicCache(config=config).layers
    except Exception:  # noqa: BLE001 - a config this cache cannot describe: generate() knows it
        return None
    for layer in layers:
        if type(layer) is DynamicSlidingWindowLayer and layer.sliding_window >= capacity:
            continue
        if type(layer) is not DynamicLayer:
            return None
    return Cache(layers=[Preallocated(rows, capacity) for _ in layers])


def cache_argument(model) -> str | None:
    """The forward's name for the cache: `cache` (transformers 5.x) or `past_key_values` (4.x)."""
    parameters = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


# --- the next token ------------------------------------------------------------------------------------------------


def nucleus(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """transformers' TopPLogitsWarper: drop the least likely tokens whose probabilities sum to at most 1 - top_p,
    always keeping the most likely one."""
    sorted_scores, order = torch.sort(scores, descending=False)
    remove = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
    remove[..., -1:] = False
    return scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))


def next_tokens(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row, drawn from softmax(nucleus(logits / temperature)) by the inverse CDF at the row's uniform.
    The CDF is summed in float64: over 49k tokens a float32 sum would blur the least likely tokens' share."""
    scores = logits.float()
    if temperature != 1.0:
        scores = scores / temperature
    if top_p < 1.0:
        scores = nucleus(scores, top_p)
    cdf = scores.softmax(dim=-1).double().cumsum_(dim=-1)
    # u * total < total always (u < 1, and nextafter for the rounding), so the token found has a positive probability.
    total = cdf[:, -1:]
    point = torch.minimum(uniforms.unsqueeze(1) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, point, right=True).squeeze(1)


def draws(seed: int, prompts: int, k: int, max_new_tokens: int) -> torch.Tensor:
    """u[i, j, t], the uniform answer (i, j)'s t-th token is drawn at. Drawn in that order from one generator on the
    CPU (the same on every device), so prompt i's are the same whatever number of prompts follows it."""
    return torch.rand(prompts, k, max_new_tokens, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- the loop ------------------------------------------------------------------------------------------------------


class Batch:
    """The live rows: their answer's number (i * K + j), attention mask and next position; `keep` drops rows."""

    def __init__(self, attention: torch.Tensor, capacity: int, k: int):
        rows, width = attention.shape[0] * k, attention.shape[1]
        self.ids = torch.arange(rows, device=attention.device)
        # The mask over the whole capacity: the prompt's padding, then ones (an answer has no holes).
        self.mask = torch.ones(rows, capacity, dtype=attention.dtype, device=attention.device)
        self.mask[:, :width] = attention.repeat_interleave(k, dim=0)
        self.position = attention.sum(dim=1).repeat_interleave(k) - 1  # the last prompt token's

    def keep(self, order: torch.Tensor) -> None:
        self.ids, self.mask, self.position = self.ids[order], self.mask[order], self.position[order]


def compaction(finished: torch.Tensor) -> torch.Tensor:
    """The new row order once `finished` rows leave: live rows keep their place, except the last ones, which move
    into the holes the finished rows leave among the first (so the cache copies only the moved rows)."""
    live = (~finished).nonzero().squeeze(1)
    n = len(live)
    order = torch.arange(n, device=finished.device)
    holes = finished[:n].nonzero().squeeze(1)
    order[holes] = live[live >= n]
    return order


def forward(model, name: str, cache: Cache, input_ids, mask, position) -> torch.Tensor:
    """The next-token logits of the rows (the head on the last position only)."""
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=position, use_cache=True, logits_to_keep=1,
                **{name: cache})
    return out.logits[:, -1]


@torch.no_grad()
def sample(model, input_ids: torch.Tensor, attention: torch.Tensor, stops: list[int], k: int, temperature: float,
           top_p: float, max_new_tokens: int, seed: int) -> list[list[tuple[list[int], bool]]] | None:
    """K (completion ids through the end id, truncated) for each left-padded prompt row, or None where the model's
    cache is not one this sampler handles (see the module doc)."""
    prompts, width = input_ids.shape
    capacity, name = width + max_new_tokens, cache_argument(model)
    cache = preallocated_cache(model, prompts * k, capacity) if name else None
    if cache is None:
        return None
    device = input_ids.device
    uniforms = draws(seed, prompts, k, max_new_tokens).view(prompts * k, max_new_tokens).to(device)
    out = torch.zeros(prompts * k, max_new_tokens, dtype=torch.long, device=device)
    length = torch.full((prompts * k,), max_new_tokens, dtype=torch.long, device=device)
    ended = torch.zeros(prompts * k, dtype=torch.bool, device=device)
    stops_t = torch.tensor(stops, device=device)
    batch = Batch(attention, capacity, k)
    # The prompt once, its cache and last logits copied to its K rows.
    position = (attention.cumsum(dim=1) - 1).clamp_(min=0)
    logits = forward(model, name, cache, input_ids, attention, position).repeat_interleave(k, dim=0)
    cache.batch_repeat_interleave(k)
    for t in range(max_new_tokens):
        token = next_tokens(logits, uniforms[batch.ids, t], temperature, top_p)
        out[batch.ids, t] = token
        finished = torch.isin(token, stops_t)
        length[batch.ids[finished]], ended[batch.ids[finished]] = t + 1, True
        if t + 1 == max_new_tokens or bool(finished.all()):
            break
        if bool(finished.any()):
            order = compaction(finished)
            cache.batch_select_indices(order)
            batch.keep(order)
            token = token[order]
        batch.position += 1
        span = width + t + 1  # the prompt, the answer so far, and this token
        logits = forward(model, name, cache, token[:, None], batch.mask[:, :span], batch.position[:, None])
    rows, length, ended = out.tolist(), length.tolist(), ended.tolist()
    answers = [(rows[r][:length[r]], not ended[r]) for r in range(len(rows))]
    return [answers[i * k:(i + 1) * k] for i in range(prompts)]
