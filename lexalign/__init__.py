"""LexAlign: from a downloaded model to an aligned checkpoint, as a Snakemake workflow.

Heavy libraries (torch, transformers, trl) are imported lazily inside the
functions that need them, so `lexalign --help` and the Snakefile stay fast.
"""

__version__ = "0.1.0"
