"""LexAlign's sampler: K answers per prompt on the model's own forward pass, without the work generate() wastes.

It samples what `generate(do_sample=True, num_return_sequences=K)` samples from, the model as loaded: the next-token
logits in float32, divided by the temperature, cut to the top_p nucleus exactly as transformers' TopPLogitsWarper
cuts them (so top_p ~ 0 is greedy decoding, token for token). What it does not do (measured on SmolLM2-135M on a
2-core CPU, BENCHMARKS.md "Sampling speed on SmolLM2-135M-Instruct"):

1. compute a prompt K times: generate() copies each prompt K times before the prefill; here the prompt's KV cache
   is computed once and copied to its K rows;
2. compute finished answers: generate() runs every row until the longest answer of the batch ends; here a row that
   ends leaves the batch (a live row moves into its place: a copy of the moved rows only), and the next prompts
   take the free rows (continuous batching: a batch's long tail no longer runs with a few rows alone);
3. copy the cache every step: DynamicCache grows by torch.cat (the whole cache copied each token); here each layer's
   cache is allocated once (`Preallocated`).

The cache's columns are shared by its rows: every live row's tokens end at the last column (a row that joins later
has its prompt right-aligned there, masked padding to its left). When the columns run out, they are reframed: every
row's tokens move left by the same amount (one copy of the cache, once every `SLACK` steps or more).

Randomness: answer (i, j) (prompt i of its batch, its j-th sample) draws its t-th token by the inverse CDF at
u[i, j, t], uniforms of its own drawn up front from (the batch's seed, i, j) (`draws`). An answer's tokens so depend
on (seed, i, j) and its logits only: not on which rows share the batch, when they finish or join, how many prompts
or samples there are, nor on max_new_tokens but for where it is cut (the rows beside it may change its logits in
the last float bits).

Where the cache is not plain attention (a sliding window shorter than prompt + answer: Gemma-2, Mistral, Phi-3 with
long contexts; linear attention; encoder-decoders), `sample` returns None and the caller uses generate().
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Callable

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

Answers = list[tuple[list[int], bool]]
"""A prompt's K answers: (completion ids through the end id, truncated)."""
SLACK = 64
"""Columns beyond the longest prompt + max_new_tokens: the cache is reframed (copied once) at most every SLACK
steps."""


class Preallocated(DynamicLayer):
    """One layer's keys and values in buffers of `max_rows` x heads x `capacity` x head_dim. The model reads views of
    the first `self.rows` rows and `self.length` columns (what DynamicLayer would hold) and writes the next column."""

    def __init__(self, rows: int, capacity: int):
        super().__init__()
        self.max_rows, self.capacity, self.rows, self.length = rows, capacity, 0, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        def buffer(states):  # zeros: a row's masked columns hold finite numbers (a NaN times 0 is still NaN)
            return states.new_zeros((self.max_rows, states.shape[1], self.capacity, states.shape[3]))

        self.device, self.key_buffer, self.value_buffer = key_states.device, buffer(key_states), buffer(value_states)
        self.is_initialized = True

    def _views(self) -> None:
        self.keys = self.key_buffer[:self.rows, :, :self.length]
        self.values = self.value_buffer[:self.rows, :, :self.length]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.rows, end = key_states.shape[0], self.length + key_states.shape[2]
        self.key_buffer[:self.rows, :, self.length:end] = key_states
        self.value_buffer[:self.rows, :, self.length:end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Row r becomes old row indices[r]. Only the rows that change are copied (the right-hand side is gathered
        before the write, so a row may move onto one that moves away)."""
        changed = (indices != torch.arange(len(indices), device=indices.device)).nonzero().squeeze(1)
        if changed.numel():
            for buffer in (self.key_buffer, self.value_buffer):
                buffer[changed, :, :self.length] = buffer[indices[changed], :, :self.length]
        self.rows = len(indices)
        self._views()

    def join(self, other: Preallocated, repeats: int) -> None:
        """Append `other`'s rows (a prefill of `other.length` columns), each `repeats` times, right-aligned at this
        cache's last column."""
        rows, start = self.rows + other.rows * repeats, self.length - other.length
        if not self.is_initialized:
            self.lazy_initialization(other.key_buffer, other.value_buffer)
        for mine, theirs in ((self.key_buffer, other.key_buffer), (self.value_buffer, other.value_buffer)):
            mine[self.rows:rows, :, start:self.length] = theirs[:other.rows, :, :other.length].repeat_interleave(
                repeats, dim=0)
        self.rows = rows
        self._views()

    def reframe(self, width: int, length: int) -> None:
        """Move the last `width` columns to end at column `length` (left to free columns, or right to make room)."""
        if self.is_initialized and self.rows:
            for buffer in (self.key_buffer, self.value_buffer):
                kept = buffer[:self.rows, :, self.length - width:self.length].clone()
                buffer[:self.rows, :, length - width:length] = kept
        self.length = length
        if self.is_initialized:
            self._views()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("LexAlign's sampler never crops its cache")


def preallocated_cache(model, rows: int, capacity: int, span: int | None = None) -> Cache | None:
    """A cache of `Preallocated` layers, or None where a layer is not plain attention over a row's `span` (its
    prompt and answer; default: the capacity): a sliding window at least that long is (Gemma-2's 4096 with short
    prompts: a row's own columns are its last `span` ones), a shorter one or anything else (linear attention,
    chunked, shared layers) is not."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return None
    try:
        layers = DynamicCache(config=config).layers
    except Exception:  # noqa: BLE001 - a config this cache cannot describe: generate() knows it
        return None
    for layer in layers:
        if type(layer) is DynamicSlidingWindowLayer and layer.sliding_window >= (span or capacity):
            continue
        if type(layer) is not DynamicLayer:
            return None
    return Cache(layers=[Preallocated(rows, capacity) for _ in layers])


def cache_argument(model) -> str | None:
    """The forward's name for the cache: `cache` (transformers 5.x) or `past_key_values` (4.x)."""
    # The class's forward: a scoring head installed on the instance (lexalign.models.logprobs) hides the cache
    # argument behind **kwargs, and passes it through.
    parameters = inspect.signature(type(model).forward).parameters
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
    """u[i, j, t], the uniform answer (i, j)'s t-th token is drawn at, from a generator of its own (on the CPU: the
    same on every device) seeded by (seed, i, j): the same whatever the number of prompts or K, and a longer
    max_new_tokens only adds uniforms after them."""
    def generator(i: int, j: int) -> torch.Generator:
        digest = hashlib.sha256(f"{seed}:{i}:{j}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)

    return torch.stack([torch.stack([torch.rand(max_new_tokens, generator=generator(i, j), dtype=torch.float64)
                                     for j in range(k)]) for i in range(prompts)])


def left_pad(batch: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask, each prompt right-aligned (the padding id is masked out: 0 does)."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.zeros(len(batch), width, dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
    attention = (torch.arange(width) >= width - torch.tensor([len(ids) for ids in batch])[:, None]).long()
    return input_ids.to(device), attention.to(device)


def forward(model, name: str, cache: Cache, input_ids, mask, position) -> torch.Tensor:
    """The next-token logits of the rows (the head on the last position only)."""
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=position, use_cache=True, logits_to_keep=1,
                **{name: cache})
    return out.logits[:, -1]


def compaction(finished: torch.Tensor) -> torch.Tensor:
    """The new row order once `finished` rows leave: live rows keep their place, except the last ones, which move
    into the holes the finished rows leave among the first (so the cache copies only the moved rows)."""
    live = (~finished).nonzero().squeeze(1)
    n = len(live)
    order = torch.arange(n, device=finished.device)
    order[finished[:n].nonzero().squeeze(1)] = live[live >= n]
    return order


# --- the loop ------------------------------------------------------------------------------------------------------


class Rows:
    """The live rows [0, n) of the cache: each row's answer (its row in the output), its tokens so far, its last
    token's position and id, its prompt's length, and its attention mask over the cache's columns."""

    def __init__(self, rows: int, capacity: int, device):
        def zeros():
            return torch.zeros(rows, dtype=torch.long, device=device)

        self.n, self.answer, self.count, self.position, self.last, self.prompt = 0, *(zeros() for _ in range(5))
        self.mask = torch.zeros(rows, capacity, dtype=torch.long, device=device)

    def keep(self, order: torch.Tensor) -> None:
        """The live rows become `order` (old row numbers)."""
        for name in ("answer", "count", "position", "last", "prompt", "mask"):
            tensor = getattr(self, name)
            tensor[:len(order)] = tensor[order]
        self.n = len(order)


class Sampler:
    """Answers to a queue of prompts in a fixed number of rows, prompts joining as rows free up."""

    def __init__(self, model, name, cache, rows, capacity, k, temperature, top_p, max_new_tokens, stops, uniforms,
                 device):
        self.model, self.name, self.cache, self.k = model, name, cache, k
        self.temperature, self.top_p, self.max_new_tokens, self.uniforms = temperature, top_p, max_new_tokens, uniforms
        self.stops = torch.tensor(stops, device=device)
        self.rows, self.live = rows, Rows(rows, capacity, device)
        self.out = torch.zeros(uniforms.shape[0], max_new_tokens, dtype=torch.long, device=device)
        self.length = torch.zeros(uniforms.shape[0], dtype=torch.long, device=device)
        self.ended = torch.zeros(uniforms.shape[0], dtype=torch.bool, device=device)
        self.columns, self.capacity, self.device = 0, capacity, device

    def free(self) -> int:
        return self.rows - self.live.n

    def admit(self, prompts: list[list[int]], answers: list[int]) -> list[int]:
        """Prefill `prompts` once, copy each to K rows (answers[i] .. + K - 1) right-aligned at the last column, and
        draw their first tokens. Returns the answers that ended."""
        live, k = self.live, self.k
        input_ids, attention = left_pad(prompts, self.device)
        width = input_ids.shape[1]
        if width > self.columns or live.n == 0:  # room on the left (prompts come longest first: rarely)
            self._reframe(max(width, self.columns) if live.n else width)
        prefill = preallocated_cache(self.model, len(prompts), width)
        position = (attention.cumsum(dim=1) - 1).clamp_(min=0)
        logits = forward(self.model, self.name, prefill, input_ids, attention, position).repeat_interleave(k, dim=0)
        for layer, new in zip(self.cache.layers, prefill.layers, strict=True):
            layer.join(new, k)
        new = slice(live.n, live.n + len(prompts) * k)
        live.answer[new] = (torch.tensor(answers, device=self.device)[:, None] + torch.arange(k, device=self.device)
                            ).flatten()
        live.count[new], live.position[new] = 0, attention.sum(dim=1).repeat_interleave(k) - 1
        live.prompt[new] = live.position[new] + 1
        live.mask[new] = 1
        live.mask[new, :self.columns] = 0
        live.mask[new, self.columns - width:self.columns] = attention.repeat_interleave(k, dim=0)
        live.n = new.stop
        return self._advance(logits, new)

    def step(self) -> list[int]:
        """Every live row one token further. Returns the answers that ended."""
        live = self.live
        if self.columns == self.capacity:
            self._reframe(int((live.prompt[:live.n] + live.count[:live.n]).max()))
        live.position[:live.n] += 1
        logits = forward(self.model, self.name, self.cache, live.last[:live.n, None],
                         live.mask[:live.n, :self.columns + 1], live.position[:live.n, None])
        self.columns += 1
        return self._advance(logits, slice(0, live.n))

    def _advance(self, logits, rows: slice) -> list[int]:
        """Draw the next token of `rows`, record it, and drop the rows whose answer ended."""
        live = self.live
        answer, count = live.answer[rows].clone(), live.count[rows].clone()
        token = next_tokens(logits, self.uniforms[answer, count], self.temperature, self.top_p)
        self.out[answer, count] = token
        live.last[rows], live.count[rows] = token, count + 1
        stopped = torch.isin(token, self.stops)
        finished = torch.zeros(live.n, dtype=torch.bool, device=self.device)
        finished[rows] = stopped | (count + 1 == self.max_new_tokens)
        if not bool(finished.any()):
            return []
        ended = live.answer[:live.n][finished]
        self.length[ended] = live.count[:live.n][finished]
        self.ended[answer[stopped]] = True
        order = compaction(finished)
        self.cache.batch_select_indices(order)
        live.keep(order)
        return ended.tolist()

    def _reframe(self, columns: int) -> None:
        """The live rows' tokens (each row's last `width` columns at most) moved to end at column `columns`."""
        live = self.live
        width = min(self.columns, columns, int((live.prompt[:live.n] + live.count[:live.n]).max()) if live.n else 0)
        for layer in self.cache.layers:
            layer.reframe(width, columns)
        if live.n:
            kept = live.mask[:live.n, self.columns - width:self.columns].clone()
            live.mask[:live.n] = 1
            live.mask[:live.n, :columns - width] = 0
            live.mask[:live.n, columns - width:columns] = kept
        self.columns = columns

    def results(self, k: int) -> list[Answers]:
        rows, length, ended = self.out.tolist(), self.length.tolist(), self.ended.tolist()
        answers = [(rows[a][:length[a]], not ended[a]) for a in range(len(rows))]
        return [answers[i:i + k] for i in range(0, len(answers), k)]


@torch.no_grad()
def sample(model, batches: list[list[list[int]]], seeds: list[int], stops: list[int], k: int, temperature: float,
           top_p: float, max_new_tokens: int, rows: int | None = None, on_prompt: Callable[[int], None] | None = None,
           slack: int = SLACK) -> list[list[Answers]] | None:
    """For each batch of prompt ids (batch b drawing from seeds[b]), K (completion ids through the end id,
    truncated) per prompt; None where the model's cache is not one this sampler handles (see the module doc).
    At most `rows` answers at once (default: the largest batch's K answers); prompts join in order as rows free up.
    `on_prompt(n)`: n more prompts have all their answers. `slack`: see SLACK (tests reframe at every step)."""
    k_rows = rows or max(len(batch) for batch in batches) * k
    prompts = [ids for batch in batches for ids in batch]
    span, name = max(map(len, prompts)) + max_new_tokens, cache_argument(model)
    capacity = span + slack
    cache = preallocated_cache(model, k_rows, capacity, span) if name else None
    if cache is None or k_rows < k:
        return None
    device = next(model.parameters()).device
    uniforms = torch.cat([draws(seed, len(batch), k, max_new_tokens).flatten(0, 1)
                          for batch, seed in zip(batches, seeds, strict=True)]).to(device)
    sampler = Sampler(model, name, cache, k_rows, capacity, k, temperature, top_p, max_new_tokens, stops, uniforms,
                      device)
    waiting, answers_left = 0, [k] * len(prompts)

    def report(ended: list[int]) -> None:
        done = 0
        for answer in ended:
            answers_left[answer // k] -= 1
            done += answers_left[answer // k] == 0
        if done and on_prompt is not None:
            on_prompt(done)

    while waiting < len(prompts) or sampler.live.n:
        joining = min(sampler.free() // k, len(prompts) - waiting)
        if joining:
            report(sampler.admit(prompts[waiting:waiting + joining], [a * k for a in range(waiting,
                                                                                         waiting + joining)]))
            waiting += joining
        if sampler.live.n:
            report(sampler.step())
    results, start = sampler.results(k), 0
    out = []
    for batch in batches:
        out.append(results[start:start + len(batch)])
        start += len(batch)
    return out
