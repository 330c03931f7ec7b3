"""The groups' tokens, by LexAlign's one tokenization rule (`lexalign.core.tokens`), cached between runs.

Tokenization is batched (the fast tokenizer's Rust batch encoder, parallel over
the cores for large batches) and cached under a content key
(`results/cache/tokens/<key>.parquet`: the tokenizer's files and the texts), so a
new SFT model on the same data and tokenizer reuses the tokens and only reruns
the forward passes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from lexalign.core import tokens
from lexalign.reference.keys import FORMAT, groups_hash
from lexalign.reference.layout import Groups


def tokenize_groups(tokenizer, groups: Groups, workers: int | None = None) -> tuple[list, list]:
    """(prompt_ids, completion_ids) of every group: chat-rendered groups exactly as the model's template makes
    them, plain text with BOS and EOS once."""
    return tokens.tokenize_groups(tokenizer, groups.prompts, groups.responses, groups.chat, workers)


def token_table(tokenizer, groups: Groups, workers: int | None = None, chunk: int = 8192):
    """`tokenize_groups` into a pyarrow table (prompt_ids, completion_ids), `chunk` groups at a time,
    so a large dataset's tokens are held as int32 arrays rather than Python lists."""
    import pyarrow as pa

    ids = pa.list_(pa.int32())
    pieces = []
    for start in range(0, len(groups), chunk):
        part = Groups(groups.rows[start:start + chunk], groups.prompts[start:start + chunk],
                      groups.responses[start:start + chunk], groups.scores[start:start + chunk], chat=groups.chat)
        prompt_ids, completion_ids = tokenize_groups(tokenizer, part, workers)
        pieces.append(pa.table({"prompt_ids": pa.array(prompt_ids, type=ids),
                                "completion_ids": pa.array(completion_ids, type=pa.list_(ids))}))
    if not pieces:
        return pa.table({"prompt_ids": pa.array([], type=ids), "completion_ids": pa.array([], type=pa.list_(ids))})
    return pa.concat_tables(pieces).combine_chunks()


def cached_tokens(tokenizer, tokenizer_key: str, groups: Groups, cache_dir: str | Path | None,
                  workers: int | None = None):
    """`token_table`, read from `cache_dir` when the same tokenizer saw the same texts before.

    Returns (the table, whether the cache answered).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    key = hashlib.sha256(f"{FORMAT}:{tokenizer_key}:{groups_hash(groups, with_scores=False)}".encode()).hexdigest()
    file = Path(cache_dir) / f"{key}.parquet" if cache_dir else None
    if file is not None and file.is_file():
        try:
            table = pq.read_table(file)
            if table.num_rows == len(groups):
                return table, True
        except (OSError, pa.ArrowException):
            pass  # a damaged cache entry: tokenize again and replace it
    table = token_table(tokenizer, groups, workers)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.parent / f".{file.name}.tmp-{os.getpid()}"
        pq.write_table(table, tmp)
        os.replace(tmp, file)
    return table, False
