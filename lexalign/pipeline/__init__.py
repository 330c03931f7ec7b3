"""The Snakemake-facing layer (TODO)."""
