"""Did alignment work: the held-out figures of each run, lm-evaluation-harness benchmarks, and the report page."""
