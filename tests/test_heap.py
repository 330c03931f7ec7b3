"""A CPU training job keeps its memory to what its steps use (lexalign.train.callbacks.HeapCallback): the effect on a
real job is in BENCHMARKS.md (SmolLM2 training: peak RSS); here, that glibc does what the callback asks of it."""

from __future__ import annotations

import ctypes
import ctypes.util
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(
    ctypes.CDLL(ctypes.util.find_library("c")), "mallinfo2"), reason="glibc's allocator (2.33 or later)")

PROBE = textwrap.dedent("""
    import ctypes, ctypes.util, sys, torch
    from lexalign.train.callbacks import HeapCallback

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                         "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = Mallinfo2

    def mapped_mib(size_mib: int) -> float:
        before = libc.mallinfo2().hblkhd
        tensor = torch.ones(size_mib << 18)
        grew = (libc.mallinfo2().hblkhd - before) / 2**20
        del tensor
        return grew

    heap = HeapCallback()
    training = sys.argv[1] == "training"
    if training:  # glibc serves a block from free heap space first: the job sets it up before its first step
        heap.on_train_begin(None, None, None)
    for _ in range(3):  # glibc's own threshold rises as mapped blocks are freed, as after loading a model
        mapped_mib(24)
    print(sys.argv[1], mapped_mib(3), "small", mapped_mib(0))
    heap.on_step_end(None, None, None)
    heap.on_train_end(None, None, None)
    print("after", mapped_mib(3))
""")


def mapped(mode: str) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    said = done.stdout.split()
    return {said[i]: float(said[i + 1]) for i in range(0, len(said), 2)}


def test_a_layers_activation_is_mapped_while_training_and_given_back_when_freed():
    # glibc alone: a 3 MiB tensor comes from the heap, where its pages stay when it is freed; while training it is
    # mapped (and unmapped when freed); small tensors stay on the heap; after training glibc's ways are back.
    alone, training = mapped("glibc"), mapped("training")
    assert alone["glibc"] == 0 and training["training"] >= 3
    assert training["small"] == 0 and training["after"] == 0


def test_a_cpu_job_keeps_its_heap_small(tmp_path, demo_model_dir):
    import pandas as pd

    from lexalign.config.loader import section_defaults
    from lexalign.config.sections import AlignConfig
    from lexalign.train.align import AlignJob
    from lexalign.train.callbacks import HeapCallback, InterruptCallback

    job = AlignJob(model_path=demo_model_dir, train=pd.DataFrame(), eval=pd.DataFrame(),
                   cfg=AlignConfig.from_dict(section_defaults("alignment", {})), output_dir=tmp_path / "out",
                   checkpoint_dir=tmp_path / "ckpt", device="cpu")
    assert sum(isinstance(c, HeapCallback) for c in job.callbacks(InterruptCallback())) == 1
