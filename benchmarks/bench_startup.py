"""Benchmark (not a test): what starting costs. A no-op `snakemake --cores 1 results/aligned` against
`snakemake --version`, and `lexalign --help` against `python -c pass`.

    .venv/bin/python benchmarks/bench_startup.py                # copies the workflow and runs it once first
    .venv/bin/python benchmarks/bench_startup.py --workdir DIR  # a copy that has already run (results/aligned)

In a temporary copy of the workflow (never this checkout's results/), one real
`snakemake --cores 2 results/aligned` runs first, so the timed call has nothing
to do (it must say "Nothing to be done"). Then the four commands take turns,
`--repeats` times; each figure is the median. Both clocks are shown: wall time,
and the CPU time of the command's processes (user + system, from the
children's rusage), which other jobs on a shared machine disturb far less.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))

from lexalign.pipeline.workflow_files import copy_workflow  # noqa: E402 - this checkout's package, as the benchmark times it


def timed(cmd: list[str], cwd: Path, expect: str | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command's processes)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0 or (expect and expect not in result.stdout + result.stderr):
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="a workflow copy that has already run results/aligned")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    snakemake, lexalign = str(BIN / "snakemake"), str(BIN / "lexalign")
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        workdir = args.workdir
        if workdir is None:
            workdir = copy_workflow(Path(tmp))
            print("One real run first: snakemake --cores 2 results/aligned ...", flush=True)
            timed([snakemake, "--cores", "2"], workdir)
        empty = Path(tmp) / "empty-workflow"
        empty.mkdir()
        (empty / "Snakefile").write_text('rule all:\n    input: "present.txt"\n')
        (empty / "present.txt").write_text("")
        commands = {
            "snakemake --cores 1 results/aligned (no-op)": ([snakemake, "--cores", "1", "results/aligned"],
                                                            "Nothing to be done"),
            "snakemake --cores 1 (no-op, every target)": ([snakemake, "--cores", "1"], "Nothing to be done"),
            "snakemake --version": ([snakemake, "--version"], None),
            # Snakemake's own cost of a run with nothing to do, whatever the workflow: a Snakefile of one rule
            # whose input exists. What a no-op plan costs beyond this is the workflow's (its parsing, config, DAG).
            "snakemake --cores 1 (empty Snakefile)": ([snakemake, "--cores", "1"], "Nothing to be done", empty),
            "lexalign --help": ([lexalign, "--help"], "Usage"),
            "python -c pass": ([sys.executable, "-c", "pass"], None),
        }
        for cmd, expect, *where in commands.values():  # warm the file cache
            timed(cmd, where[0] if where else workdir, expect)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
        for r in range(args.repeats):
            names = list(commands)
            for name in names[r % len(names):] + names[:r % len(names)]:
                cmd, expect, *where = commands[name]
                times[name].append(timed(cmd, where[0] if where else workdir, expect))

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"\nStart-up costs ({cores} cores, no GPU; median of {args.repeats}, by turns)")
    median = {name: tuple(statistics.median(t[i] for t in runs) for i in (0, 1)) for name, runs in times.items()}
    for name, (wall, cpu) in median.items():
        print(f"  {name:<44} wall {wall:6.2f} s   cpu {cpu:6.2f} s")
    for ours, base in (("snakemake --cores 1 results/aligned (no-op)", "snakemake --version"),
                       ("snakemake --cores 1 (no-op, every target)", "snakemake --version"),
                       ("snakemake --cores 1 (empty Snakefile)", "snakemake --version"),
                       ("snakemake --cores 1 results/aligned (no-op)", "snakemake --cores 1 (empty Snakefile)"),
                       ("lexalign --help", "python -c pass")):
        (w1, c1), (w0, c0) = median[ours], median[base]
        print(f"  {ours} / {base}: wall {w1 / w0:.2f}x (+{w1 - w0:.2f} s), cpu {c1 / c0:.2f}x (+{c1 - c0:.2f} s)")


if __name__ == "__main__":
    main()
