"""Benchmark (not a test): preference validation against pyarrow's read_json, and its peak memory.

    .venv/bin/python benchmarks/bench_validate.py                      # 1,000,000 rows (~650 MB)
    .venv/bin/python benchmarks/bench_validate.py --rows 20000         # a quick run

One run writes a prompt/chosen/rejected JSON Lines file of `--rows` rows
(~650 bytes each, with a few duplicates, identical pairs and empty fields, as
real data has; no broken lines, which read_json cannot read), then times, each in a fresh process so its
peak RSS is its own:

* `read_json`: `pyarrow.json.read_json` of the whole file (the yardstick);
* `checks`: every check of the validate step except tokenization (parsing,
  field checks, duplicates, split by prompt), nothing written;
* `validate`: the same plus writing train/eval parquet, rejects.jsonl and
  report.json, as `lexalign validate` does (`validate_to_dir`).

The three take turns, `--rounds` times (default 3), so a busy machine slows
them alike; each figure is the best of its rounds (the median is shown too).
Imports happen before the clock starts in every phase. The issue asks checks
<= 2 x read_json and peak RSS <= 1.5 GB at 1M rows.

Then, on the first `--tokenize-rows` rows, the token-length check against
tokenizing the same texts (prompt + response, as the trainer does) alone with
the same fast tokenizer's `encode_batch_fast`, in batches of the same size;
the issue asks <= 1.3 x. The tokenizer is the demo's, built offline, or
`--tokenizer PATH` (the demo's small vocabulary makes ~300 tokens per text).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ("the model should answer politely and with care about data what is a good way to learn python quickly "
         "explain why sky blue because light scatters every response gets checked before training starts so "
         "nothing is lost silently").split()


def generate(path: Path, rows: int, seed: int = 0) -> dict:
    """Write the benchmark file; return what was planted in it."""
    rng = random.Random(seed)

    def sentences(n: int, words: int) -> list[str]:
        return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]

    prompts, chosen, rejected = sentences(1000, 22), sentences(1000, 42), sentences(1000, 40)
    planted = {"duplicate_row": 0, "chosen_equals_rejected": 0, "empty_field": 0}
    lines, last = [], ""
    for i in range(rows):
        roll = rng.random()
        if roll < 0.005 and last:
            line = last
            planted["duplicate_row"] += 1
        elif roll < 0.007:
            line = f'{{"prompt": "Q{i}: {prompts[i % 1000]}", "chosen": "same", "rejected": "same", "id": {i}}}'
            planted["chosen_equals_rejected"] += 1
        elif roll < 0.008:
            line = f'{{"prompt": "Q{i}: {prompts[i % 1000]}", "chosen": " ", "rejected": "no", "id": {i}}}'
            planted["empty_field"] += 1
        else:
            line = (f'{{"prompt": "Q{i}: {prompts[rng.randrange(1000)]}", "chosen": "{chosen[rng.randrange(1000)]}",'
                    f' "rejected": "{rejected[rng.randrange(1000)]}", "id": {i}}}')
        lines.append(line)
        last = line
        if len(lines) >= 100_000:
            with path.open("a", encoding="utf-8") as handle:
                handle.write("\n".join(lines) + "\n")
            lines = []
    with path.open("a", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n" if lines else "")
    return planted


def _phase(name: str, path: Path, out: Path, tokenizer: str | None, tokenize_rows: int) -> dict:
    """Runs in a fresh process; prints one JSON line."""
    import resource

    result: dict = {"phase": name}
    import pandas  # noqa: F401 - imports are outside every timed region
    import pyarrow.compute  # noqa: F401
    import pyarrow.json  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    if name == "read_json":
        import pyarrow.json as pj

        start = time.perf_counter()
        table = pj.read_json(path)
        result["seconds"] = time.perf_counter() - start
        result["rows"] = table.num_rows
    elif name in ("checks", "validate"):
        from lexalign.config.sections import DatasetConfig
        from lexalign.data.validation import check_only, validate_to_dir

        cfg = DatasetConfig(path=str(path))
        start = time.perf_counter()
        report = check_only(cfg) if name == "checks" else validate_to_dir(cfg, None, out)
        result["seconds"] = time.perf_counter() - start
        result["report"] = {k: report[k] for k in ("input_rows", "kept_rows", "rejected_rows", "reject_reasons")}
    elif name == "tokenize":
        import pyarrow as pa

        from lexalign.data.lengths import ENCODE_BATCH, LengthCheck

        if tokenizer:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(tokenizer)
        else:
            from lexalign.demo.model import build_tokenizer

            tok = build_tokenizer(0)
        rows = []
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                rows.append(row)
                if len(rows) >= tokenize_rows:
                    break
        table = pa.table({"prompt": [r["prompt"] for r in rows], "chosen": [r["chosen"] for r in rows],
                          "rejected": [r["rejected"] for r in rows], "_row": list(range(1, len(rows) + 1))})
        texts = [r["prompt"] + r[k] for r in rows for k in ("chosen", "rejected")]
        backend = tok.backend_tokenizer
        check = LengthCheck(tok, 10**9, "drop")
        alone, ours = [], []
        for _ in range(3):  # alternate, keep the best of each
            start = time.perf_counter()
            for at in range(0, len(texts), ENCODE_BATCH):  # in batches, as anyone tokenizing a large set would
                backend.encode_batch_fast(texts[at:at + ENCODE_BATCH], add_special_tokens=True)
            alone.append(time.perf_counter() - start)
            start = time.perf_counter()
            check(table, "bench.jsonl")
            ours.append(time.perf_counter() - start)
        result.update(rows=len(rows), alone_seconds=min(alone), check_seconds=min(ours),
                      tokens_p50=float(check.report(len(rows))["tokens"]["p50"]))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))
    return result


def _run(name: str, args, path: Path, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}  # all cores, as in the pipeline
    command = [sys.executable, __file__, "--phase", name, "--file", str(path), "--out", str(out),
               "--tokenize-rows", str(args.tokenize_rows)] + (["--tokenizer", args.tokenizer] if args.tokenizer else [])
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"phase {name} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--tokenize-rows", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3, help="turns of read_json / checks / validate")
    parser.add_argument("--tokenizer", help="a local tokenizer folder (default: the demo tokenizer, built offline)")
    parser.add_argument("--workdir", help="where the file and outputs go (default: a temporary folder)")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        _phase(args.phase, Path(args.file), Path(args.out), args.tokenizer, args.tokenize_rows)
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        path = Path(tmp) / "bench.jsonl"
        start = time.perf_counter()
        planted = generate(path, args.rows)
        size = path.stat().st_size
        print(f"{args.rows:,} rows, {size / 1e6:.0f} MB written in {time.perf_counter() - start:.1f} s "
              f"(planted: {planted}); {os.cpu_count()} CPUs", flush=True)
        rounds: dict[str, list[dict]] = {"read_json": [], "checks": [], "validate": []}
        for turn in range(args.rounds):
            for name in rounds:
                rounds[name].append(_run(name, args, path, Path(tmp) / "out"))
                shown = {k: (round(v, 3) if isinstance(v, float) else v)
                         for k, v in rounds[name][-1].items() if k != "report"}
                print(f"  round {turn + 1} {name}: {shown}", flush=True)
        tokenize = _run("tokenize", args, path, Path(tmp) / "out")
        print(f"  tokenize: {tokenize}", flush=True)
    best = {name: min(r["seconds"] for r in runs) for name, runs in rounds.items()}
    median = {name: statistics.median(r["seconds"] for r in runs) for name, runs in rounds.items()}
    runs = {"tokenize": tokenize, "validate": rounds["validate"][-1]}
    arrow = best["read_json"]
    figures = {
        "rows": args.rows,
        "file_mb": round(size / 1e6),
        "cpus": os.cpu_count(),
        "rounds": args.rounds,
        "read_json_s": round(arrow, 2),
        "checks_s": round(best["checks"], 2),
        "validate_s": round(best["validate"], 2),
        "checks_over_read_json": round(best["checks"] / arrow, 2),
        "validate_over_read_json": round(best["validate"] / arrow, 2),
        "median_s": {name: round(v, 2) for name, v in median.items()},
        "median_checks_over_read_json": round(median["checks"] / median["read_json"], 2),
        "read_json_peak_rss_mb": round(max(r["peak_rss_mb"] for r in rounds["read_json"])),
        "checks_peak_rss_mb": round(max(r["peak_rss_mb"] for r in rounds["checks"])),
        "validate_peak_rss_mb": round(max(r["peak_rss_mb"] for r in rounds["validate"])),
        "tokenize_rows": runs["tokenize"]["rows"],
        "tokenize_alone_s": round(runs["tokenize"]["alone_seconds"], 2),
        "length_check_s": round(runs["tokenize"]["check_seconds"], 2),
        "length_check_over_tokenize": round(runs["tokenize"]["check_seconds"] / runs["tokenize"]["alone_seconds"], 2),
        "report": runs["validate"]["report"],
    }
    print(json.dumps(figures, indent=2))
    print(f"checks: {figures['checks_over_read_json']} x read_json (goal <= 2), "
          f"with outputs written: {figures['validate_over_read_json']} x; "
          f"peak RSS {figures['validate_peak_rss_mb']} MB (goal <= 1536); "
          f"length check: {figures['length_check_over_tokenize']} x tokenizing alone (goal <= 1.3)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
