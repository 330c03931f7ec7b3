"""Plain pieces every layer uses: user-facing errors, atomic files and hashes, lineage files and model cards, the
one tokenization rule, the data formats' words, input paths checked before any work, and a process's share of a
step. Nothing here loads a model or reads a dataset."""
