"""Faults injected on purpose: SIGKILL at random moments, a full disk, hostile paths and weights."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_jsonl
from safetensors.torch import load_file

from lexalign.demo import task

LEXALIGN = str(Path(sys.executable).parent / "lexalign")
KILLS_PER_STAGE = 4  # 8 random kill points over finetune and align (suite time: each is a restart)
SAVE_STEPS = 2
MAX_STEPS = 120  # more than ten kills can reach: each lands 1-4 steps past a checkpoint, plus the steps a fast
# machine runs in the 0-0.3 s before the kill (on a quiet machine the demo model runs dozens of steps a second)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


# The chains below run side by side: one torch thread each, so they do not oversubscribe the cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def start(config: Path, stage: str) -> subprocess.Popen:
    return subprocess.Popen([LEXALIGN, stage, "--config", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, env=ENV)


def complete_checkpoints(folder: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*")
                  if (p / "lexalign_config_hash.txt").is_file())


def straight_run(config: Path, stage: str) -> None:
    done = subprocess.run([LEXALIGN, stage, "--config", str(config)], capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def kill_at_random_points(config: Path, stage: str, output: Path, checkpoints: Path, rng: random.Random,
                          kills: int) -> list[dict]:
    """SIGKILL `stage` `kills` times at random points, then let it finish.

    A point is either during start-up (loading, tokenization) or a random 1-4 steps past the newest
    checkpoint, read from the progress line `(step/total)`, plus a random fraction of a step: mid-step,
    or during a checkpoint save.
    """
    history = []
    for _ in range(kills):
        before = complete_checkpoints(checkpoints)
        proc = start(config, stage)
        lines = []
        if rng.random() < 0.25:
            time.sleep(rng.uniform(0.5, 3.0))
            point = "start-up"
        else:
            target = (before[-1] if before else 0) + rng.randint(1, 4)
            point = f"step {target}"
            for line in proc.stdout:
                lines.append(line)
                step = re.search(r"\((\d+)/\d+\)", line)
                if step and int(step.group(1)) >= target:
                    break
            time.sleep(rng.uniform(0.0, 0.3))
        os.killpg(proc.pid, signal.SIGKILL)
        log = "".join(lines) + proc.communicate()[0]
        history.append({"stage": stage, "point": point, "before": before, "after": complete_checkpoints(checkpoints),
                        "resumed": [int(n) for n in re.findall(r"Resuming from \S*checkpoint-(\d+)", log)],
                        "finished": output.exists()})
        assert not output.exists(), f"{stage} finished before kill {len(history)}"
    proc = start(config, stage)
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, log[-3000:]
    return history


def assert_nothing_lost(history: list[dict]) -> None:
    for kill in history:
        if kill["before"]:
            # A restart resumes from the newest complete checkpoint there was: only later steps are redone.
            assert kill["resumed"] in ([], [kill["before"][-1]]), kill
            assert not kill["after"] or kill["after"][-1] >= kill["before"][-1], kill


@pytest.mark.slow
def test_sigkill_at_random_points_loses_only_steps_since_the_last_checkpoint(tmp_path, demo_model_dir):
    sft_rows = write_jsonl(tmp_path / "sft.jsonl", task.sft_rows(0, 192))
    prefs = write_jsonl(tmp_path / "prefs.jsonl", task.preference_rows(0, 160))
    finetune = {"learning_rate": "3e-3", "batch_size": 4, "max_steps": MAX_STEPS, "save_steps": SAVE_STEPS,
                "max_length": 64, "logging_steps": 1, "lora_dropout": 0.0}
    alignment = {"learning_rate": "1e-3", "batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": MAX_STEPS,
                 "save_steps": SAVE_STEPS, "warmup_steps": 0, "max_length": 64, "logging_steps": 1,
                 "lora_dropout": 0.0}

    def configs(root: Path, sft_model: Path) -> tuple[Path, Path]:
        root.mkdir()
        ft = root / "finetune.yaml"
        ft.write_text(yaml.safe_dump({
            "model": {"path": str(demo_model_dir)}, "dataset": {"path": str(sft_rows)}, "finetune": finetune,
            "output_dir": str(root / "sft"), "checkpoint_dir": str(root / "ckpt-sft"), "device": "cpu"}))
        al = root / "align.yaml"
        al.write_text(yaml.safe_dump({
            "model": {"path": str(sft_model)}, "dataset": {"path": str(prefs), "max_length": 64},
            "alignment": {**alignment, "output_dir": str(root / "aligned"), "checkpoint_dir": str(root / "ckpt-al")},
            "device": "cpu"}))
        return ft, al

    # Both aligns start from the never-killed SFT model, so the killed finetune and the killed align
    # run side by side (with the never-killed runs), and each is compared with its never-killed twin.
    straight_sft = tmp_path / "straight" / "sft"
    straight_ft, straight_al = configs(tmp_path / "straight", straight_sft)
    killed_ft, killed_al = configs(tmp_path / "killed", straight_sft)
    root = tmp_path / "killed"
    with ThreadPoolExecutor(max_workers=2) as pool:
        killed_sft = pool.submit(kill_at_random_points, killed_ft, "finetune", root / "sft", root / "ckpt-sft",
                                 random.Random(20261122), KILLS_PER_STAGE)
        straight_run(straight_ft, "finetune")
        straight_aligned = pool.submit(straight_run, straight_al, "align")
        history = kill_at_random_points(killed_al, "align", root / "aligned", root / "ckpt-al",
                                        random.Random(20261123), KILLS_PER_STAGE)
        history = killed_sft.result() + history
        straight_aligned.result()
    (tmp_path / "kill-history.json").write_text(json.dumps(history, indent=1))
    assert len(history) == 2 * KILLS_PER_STAGE
    assert_nothing_lost(history)
    assert any(kill["resumed"] for kill in history), "no kill ever landed after a checkpoint"
    for name in ("sft", "aligned"):
        ref, got = weights(tmp_path / "straight" / name), weights(root / name)
        for key in ref:
            assert torch.allclose(ref[key], got[key], atol=1e-5), f"{name}: {key} differs from the run never killed"
    (tmp_path / "kill-history.json").write_text(json.dumps(history, indent=1))
    print(f"kills: {len(history)}, resumed: {sum(bool(k['resumed']) for k in history)}")


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB filesystem (tmpfs), where this machine lets us mount one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_gives_a_clear_error_and_keeps_the_previous_output(tiny_disk):
    import pandas as pd

    from lexalign.core.errors import LexAlignError
    from lexalign.core.io import write_json
    from lexalign.data.common import write_split_outputs

    def result(rows: int, width: int) -> dict:
        frame = pd.DataFrame({"prompt": [os.urandom(width).hex() for _ in range(rows)],
                              "chosen": ["a"] * rows, "rejected": ["b"] * rows, "source_row": range(rows)})
        return {"train": frame, "eval": frame.iloc[:0], "rejects": [], "report": {"rows": rows}}

    out = tiny_disk / "validated"
    write_split_outputs(out, result(10, 8))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(LexAlignError) as err:
        write_split_outputs(out, result(2000, 1024))  # ~4 MB of incompressible text on a 1 MiB disk
    assert err.value.render().startswith(f'Error: No space left on the device while writing "{out}"')
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["validated"], "temporaries left behind"
    with pytest.raises(LexAlignError, match="Could not write"):
        write_json(tiny_disk / "report.json", {"x": "y" * 2_000_000})
