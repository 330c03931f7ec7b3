"""Benchmark (not a test): DPO tokens/s on one node and on two, on the tests' two-node SLURM cluster.

    sudo .venv/bin/python benchmarks/bench_multinode.py              # 1 → 2 nodes, 1 CPU process each
    sudo .venv/bin/python benchmarks/bench_multinode.py --steps 40

Brings up the cluster of testkit/slurm_cluster.py (two slurmd, each in its own network namespace on one
machine; root, Debian's SLURM packages), aligns the demo model on the demo pairs with DPO as the align rule
does on several nodes (`lexalign.pipeline.launch.run_on_nodes`: srun, one `accelerate launch` per node), once on one
node and once on two, the same batch per process (so two nodes train twice the tokens per step), and prints
the training tokens per second of each (tokens in the batches / Trainer's train_runtime). Both "nodes"
share this machine's cores and network stack: the figure shows the direction only, never a cluster's
speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]


def _prepare(root: Path, steps: int, batch: int) -> dict:
    from lexalign.config.loader import section_defaults
    from lexalign.demo import task
    from lexalign.demo.model import write_demo_model
    from lexalign.steps import inputs

    model = root / "model"
    write_demo_model(model, seed=0)
    raw = root / "raw/train.jsonl"
    raw.parent.mkdir(parents=True)
    raw.write_text("".join(json.dumps(row) + "\n" for row in task.preference_rows(0, 256)))
    inputs.validate(raw=raw.parent, tokenizer=model, output=root / "data", dataset={"eval_fraction": 0.05,
                                                                                     "max_length": 64})
    alignment = section_defaults("alignment", {"max_steps": steps, "batch_size": batch, "logging_steps": 1,
                                               "save_steps": 10_000, "max_length": 64, "learning_rate": 1e-3})
    return {"model": str(model), "data": str(root / "data"), "alignment": alignment, "device": "cpu", "seed": 0,
            "trust_remote_code": False}


def _tokens_per_second(out: Path) -> tuple[float, int]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tokens = max(float(r["num_tokens"]) for r in rows if "num_tokens" in r)
    runtime = next(float(r["train_runtime"]) for r in rows if "train_runtime" in r)
    return tokens / runtime, int(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4, help="per process")
    args = parser.parse_args()

    from testkit import slurm_cluster as sc

    if sc.skip_reason():
        sys.exit(sc.skip_reason())
    sc.install_slurm()
    root = Path(tempfile.mkdtemp(prefix="lxbench-"))
    root.chmod(0o700)
    cluster = sc.Cluster(root / "slurm", [])
    (root / "slurm").mkdir(mode=0o700)
    results = {}
    try:
        arguments = _prepare(root / "work", args.steps, args.batch)
        cluster.start()
        for nodes in (1, 2):
            run = root / f"nodes-{nodes}"
            run.mkdir()
            spec = {**arguments, "output": str(run / "model"), "checkpoint_dir": str(run / "checkpoints")}
            (run / "arguments.json").write_text(json.dumps(spec))
            if nodes == 1:  # as the align rule runs one node × one process: the step in the job's own process
                script = ("import json; from lexalign.steps.training import align; "
                          "align(**json.load(open('arguments.json')))")
            else:
                script = (f"import json; from lexalign.pipeline import launch; "
                          f"launch.run_on_nodes('align', json.load(open('arguments.json')), {nodes}, 1, "
                          f"{{'mpi': 'srun', 'cpus_per_task': 1}}, log_dir='.')")
            env = {**cluster.env, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
            # As the SLURM executor runs an `mpi` rule: the script on the allocation's first node, undivided.
            cmd = cluster.in_ctl(["sbatch", "--wait", f"--nodes={nodes}", f"--ntasks={nodes}", "--cpus-per-task=1",
                                  "--mem=2000", f"--output={run}/job.log", f"--chdir={run}",
                                  f"--wrap={sys.executable} -c \"{script}\""])
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                log = (run / "job.log").read_text()[-3000:] if (run / "job.log").is_file() else ""
                sys.exit(f"{nodes} node(s) failed:\n{done.stderr[-3000:]}\n{log}")
            results[nodes] = _tokens_per_second(run / "model")
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    for nodes, (rate, tokens) in results.items():
        print(f"{nodes} node(s) × 1 process, batch {args.batch} per process, {args.steps} steps: "
              f"{rate:.0f} tokens/s ({tokens} tokens)")
    print(f"1 → 2 nodes: × {results[2][0] / results[1][0]:.2f} tokens/s (one machine: direction only)")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
