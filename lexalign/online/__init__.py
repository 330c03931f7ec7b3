"""On-policy alignment in rounds (issue #25): sample K answers per prompt, judge them, select pairs or ranked
groups, align, repeat.

- `generate`: batched, length-sorted, seeded sampling from a model folder, written in resumable shards; the
  completions keep the ids the model sampled.
- `select`: from K judged completions per prompt, `best_worst` pairs or `ranked` groups, and the trainer's
  token table built from the sampled ids (never re-encoded).
- `score`: per-completion scores from the evaluate step's judges, cached so a rerun never asks twice.
"""
