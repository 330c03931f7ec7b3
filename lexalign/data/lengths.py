"""Token lengths with the model's tokenizer: prompt plus each response, measured as the trainer sees them.

The trainers' sequences follow `lexalign.core.tokens`: chat-rendered texts as the
template wrote them, plain text with the tokenizer's prefix (BOS) and EOS once;
a row's length is the longest of its prompt + response sequences. Whole batches go through
the fast tokenizer at once (`encode_batch_fast`, on all cores unless
TOKENIZERS_PARALLELISM=false); only the token counts are kept.

Rows longer than `max_length` follow `length_policy`: `drop` (rejected as
`too_long`), `truncate` (responses cut to fit after the prompt; a prompt that
alone fills the budget is rejected as `prompt_too_long`, responses that become
identical as `identical_after_truncation`) or `fail` (every row is still
measured, then validation stops, naming the share and the first row). The
share over the limit is reported under every policy.
"""

from __future__ import annotations

import numpy as np

from lexalign.core import tokens
from lexalign.core.errors import LexAlignError
from lexalign.data.common import reject

# Texts per tokenizer call: enough for every core, few enough that the encodings stay small.
ENCODE_BATCH = 4096


class LengthCheck:
    def __init__(self, tokenizer, max_length: int, policy: str, chat: bool = False):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.policy = policy
        backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        if backend is not None and (backend.truncation is not None or backend.padding is not None):
            backend = None  # lengths would be cut or padded: use the tokenizer's own call
        self.backend = backend
        # What the trainers add around each text (lexalign.core.tokens): BOS ids before it, EOS after it (plain text).
        self.prefix, self.eos = tokens.added_tokens(tokenizer, chat)
        self.lengths: list[np.ndarray] = []
        self.over = 0
        self.truncated = 0
        self.first_over: tuple | None = None

    def count(self, texts: list[str], special: bool = False) -> np.ndarray:
        """Tokens in each text, a few thousand texts per call: encodings are large, only their lengths are kept."""
        out = np.zeros(len(texts), dtype=np.int64)
        for start in range(0, len(texts), ENCODE_BATCH):
            part = texts[start:start + ENCODE_BATCH]
            if self.backend is not None:
                encode = getattr(self.backend, "encode_batch_fast", None) or self.backend.encode_batch
                encoded = encode(part, add_special_tokens=special)
            else:
                encoded = self.tokenizer(part, add_special_tokens=special)["input_ids"]
            out[start:start + len(part)] = np.fromiter(map(len, encoded), dtype=np.int64, count=len(part))
            del encoded  # free this batch's encodings before the next is made
        return out

    def _ids(self, text: str) -> list[int]:
        if self.backend is not None:
            return self.backend.encode(text, add_special_tokens=False).ids
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __call__(self, table, file: str, names: tuple[str, str, str] = ("prompt", "chosen", "rejected")
                 ) -> tuple[object, list[dict]]:
        """Measure every row; apply the policy. `names`: the user's prompt/chosen/rejected fields, for rejects."""
        import pyarrow as pa

        n = table.num_rows
        if n == 0:
            return table, []
        ranked = "responses" in table.column_names
        unpaired = "label" in table.column_names
        prompts = table.column("prompt").to_pylist()
        if ranked:
            groups = table.column("responses").to_pylist()
        elif unpaired:  # one completion per row
            groups = [[c] for c in table.column("completion").to_pylist()]
        else:
            groups = list(zip(table.column("chosen").to_pylist(), table.column("rejected").to_pylist(), strict=False))
        sizes = np.fromiter(map(len, groups), dtype=np.int64, count=n)
        texts = [p + r for p, group in zip(prompts, groups, strict=False) for r in group]
        lengths = self.count(texts) + self.prefix
        if self.eos:
            lengths += ~np.fromiter((t.endswith(self.eos) for t in texts), dtype=bool, count=len(texts))
        longest = np.maximum.reduceat(lengths, np.concatenate(([0], np.cumsum(sizes)[:-1])))
        self.lengths.append(longest)
        over = longest > self.max_length
        count = int(over.sum())
        if not count:
            return table, []
        self.over += count
        rows = table.column("_row").to_numpy()
        index = np.flatnonzero(over)
        if self.first_over is None:
            self.first_over = (int(rows[index[0]]), file, int(longest[index[0]]))
        if self.policy == "fail":
            return table, []
        rejects, keep = [], ~over

        def data(i: int) -> dict:
            if ranked:
                return {names[0]: prompts[i], "responses": list(groups[i])}
            if unpaired:
                return {names[0]: prompts[i], "completion": groups[i][0]}
            return {names[0]: prompts[i], names[1]: groups[i][0], names[2]: groups[i][1]}

        if self.policy == "drop":
            for i in index.tolist():
                rejects.append(reject(int(rows[i]), file, "too_long",
                                      f"{longest[i]} tokens > max_length {self.max_length}", data(i)))
            return table.filter(pa.array(keep)), rejects
        columns = {name: table.column(name).to_pylist() for name in table.column_names}
        prompt_tokens = self.count([prompts[i] for i in index]) + self.prefix
        for i, used in zip(index.tolist(), prompt_tokens.tolist(), strict=False):
            budget = self.max_length - used - (1 if self.eos else 0)
            if budget < 1:
                rejects.append(reject(int(rows[i]), file, "prompt_too_long",
                                      f"the prompt alone has {used} tokens; max_length is {self.max_length}", data(i)))
                continue
            cut = [r if len(ids) <= budget else self.tokenizer.decode(ids[:budget])
                   for r, ids in ((r, self._ids(r)) for r in groups[i])]
            if len(set(cut)) < len(cut):
                rejects.append(reject(int(rows[i]), file, "identical_after_truncation",
                                      f"responses are identical once cut to {budget} tokens", data(i)))
                continue
            keep[i] = True
            self.truncated += 1
            if unpaired:
                columns["completion"][i] = cut[0]
                continue
            columns["chosen"][i], columns["rejected"][i] = cut[0], cut[-1]
            if ranked:
                columns["responses"][i] = cut
        return pa.table(columns, schema=table.schema).filter(pa.array(keep)), rejects

    def report(self, rows_in: int) -> dict:
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, dtype=np.int64)
        checked = len(lengths)
        out = {
            "checked": True,
            "max_length": self.max_length,
            "length_policy": self.policy,
            "rows_checked": checked,
            "over_max_length": self.over,
            "over_max_length_share": self.over / checked if checked else 0.0,
            "truncated": self.truncated,
        }
        if checked:
            q = np.percentile(lengths, [50, 90, 99])
            out["tokens"] = {"p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2]),
                             "max": int(lengths.max()), "mean": float(lengths.mean())}
        return out

    def raise_if_failed(self) -> None:
        if self.policy != "fail" or not self.over:
            return
        checked = sum(len(x) for x in self.lengths)
        row, file, tokens = self.first_over
        raise LexAlignError(
            f"{self.over} of {checked} rows ({100 * self.over / checked:.1f}%) are longer than "
            f"max_length {self.max_length} tokens",
            f"First: row {row} of {file}, {tokens} tokens",
            hint="Raise dataset.max_length, or set dataset.length_policy to drop or truncate",
        )
