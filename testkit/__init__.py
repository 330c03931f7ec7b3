"""What the tests and the benchmarks share and users never install: a zoo of tiny random-weight models of real
architectures (`zoo`) and a SLURM cluster in network namespaces on this machine (`slurm_cluster`).

Outside the `lexalign` package on purpose: the wheel carries none of it (tests/test_installed.py checks its file
list). The tests find it through pytest's `pythonpath`, the benchmarks through `benchmarks/common.py`'s path.
"""
