"""Models and the numerics on them: loading (and what is refused), Liger kernels, log-probabilities without the
logits, padding-free packing."""
