"""A scoring step's batches over the processes of a launch, gathered into what one process writes.

The reference step and evaluation run in every process of their allocation
(`scale.reference`, `scale.evaluate`: lexalign.pipeline.launch starts them as it starts
training). Every process plans the batches the single process would score (the
packed batches of `lexalign.models.packing`, the prompt batches of generation) and
scores every `world`-th of them, dealt in turn over the whole step (`deal`).
Dealing whole batches, not rows, keeps each value computed on exactly the input
one process computes it on (the same packed row, the same padding, the same
seeded sampling), so the gathered values are the single process's; and batches
planned by a token budget give every process about the same tokens.

Each process writes its values, with their rows, to a part file beside the
step's output (atomically); after a barrier the main process reads every part,
puts each value back at its row (`restore`: every row exactly once, or a clear
error), removes the parts and writes the output as one process writes it. The
processes exchange nothing but barriers (gloo, on GPUs too: the values go
through the shared filesystem), each bounded by `scale.timeout`
(LEXALIGN_COLLECTIVE_TIMEOUT, set by the launcher): a process that died fails the
step within that time instead of hanging it.

An online round's steps use the same machinery (`scale.generate`,
`scale.score`): generation deals its resumable shards by number (shard n is
process n % N's, `lexalign.generation.sampling`) and gathers only each process's
count, the main process joining the shards from disk; reward-model scoring deals
the batches of the scores missing from the cache as above.

Outside a launcher, `Share()` is the whole step in one process: every batch is
its own, and nothing is written or waited for.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lexalign.core.errors import LexAlignError

COLLECTIVE_TIMEOUT_ENV = "LEXALIGN_COLLECTIVE_TIMEOUT"
"""scale.timeout in seconds, set by lexalign.pipeline.launch for the processes it starts: how long a collective
(a barrier here, an all-reduce in training: TrainingArguments.ddp_timeout) waits for the others."""


def chunks(n: int, size: int) -> list[list[int]]:
    """Rows 0..n-1 in batches of `size`, in order (generation's and the padded path's batches)."""
    return [list(range(start, min(start + size, n))) for start in range(0, n, size)]


def deal(batches: list, rank: int, world: int, start: int = 0) -> list:
    """Process `rank`'s batches: every `world`-th, counting on from the `start` batches dealt before in the step
    (so a step of many small lists of batches still spreads them over every process)."""
    return [batch for index, batch in enumerate(batches, start) if index % world == rank]


def piece(batches: list[list[int]], values: list) -> dict:
    """The values of the rows in `batches` (from a list of every row's value), with their rows."""
    rows = [row for batch in batches for row in batch]
    return {"rows": rows, "values": [values[row] for row in rows]}


def restore(pieces: list[dict], n: int, name: str = "values") -> list:
    """The values of rows 0..n-1 in row order from every process's piece; each row must be in exactly one."""
    out, seen = [None] * n, [False] * n
    for part in pieces:
        for row, value in zip(part["rows"], part["values"], strict=True):
            if not 0 <= row < n or seen[row]:
                raise LexAlignError(f"The processes' parts of {name} disagree: row {row} of {n} is "
                                    + ("out of range" if not 0 <= row < n else "in two parts"),
                                    hint="Every process must plan the same batches: rerun the step")
            seen[row], out[row] = True, value
    missing = seen.count(False)
    if missing:
        raise LexAlignError(f"{missing} of the {n} rows of {name} are in no process's part",
                            hint="Every process must plan the same batches: rerun the step")
    return out


@dataclass
class Share:
    """This process's place in a scoring step: its rank among `world` processes, and the step's output (its
    processes' parts lie beside it)."""

    rank: int = 0
    world: int = 1
    output: Path | None = None
    dealt: int = 0
    """Batches dealt so far in the step: the next list of batches is dealt on from there."""

    @property
    def main(self) -> bool:
        return self.rank == 0

    def take(self, batches: list) -> list:
        """This process's share of `batches` (all of them in one process)."""
        mine = deal(batches, self.rank, self.world, self.dealt)
        self.dealt += len(batches)
        return mine

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """The main process runs the block first (it fills a cache), then the others (they read it)."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()

    def part_path(self, rank: int) -> Path:
        output = Path(self.output or "step")
        return output.parent / f".{output.name}.part-{rank}-of-{self.world}.json"

    def gather(self, pieces: dict[str, dict], sizes: dict[str, int]) -> dict[str, list] | None:
        """Every process's pieces (name → piece), restored to row order on the main process; None elsewhere."""
        if self.world == 1:
            return {name: restore([pieces[name]], n, name) for name, n in sizes.items()}
        own = self.part_path(self.rank)
        write_part(own, pieces)
        try:
            self.barrier()  # every part is on disk
        except BaseException:
            own.unlink(missing_ok=True)  # a peer is gone: no part is left behind for a rerun to trip over
            raise
        return self.read_parts(sizes) if self.main else None

    def read_parts(self, sizes: dict[str, int]) -> dict[str, list]:
        """The main process: every process's part, restored; the parts are removed, read or not."""
        paths = [self.part_path(rank) for rank in range(self.world)]
        try:
            parts = [read_part(path, rank) for rank, path in enumerate(paths)]
            values = {name: restore([part[name] for part in parts], n, name) for name, n in sizes.items()}
            shares = [sum(len(found["rows"]) for found in part.values()) for part in parts]
            print(f"Gathered the values of {self.world} processes ({', '.join(map(str, shares))} each)", flush=True)
            return values
        finally:
            for path in paths:
                path.unlink(missing_ok=True)


def write_part(path: Path, pieces: dict[str, dict]) -> None:
    """A process's pieces as JSON (floats keep every bit), renamed into place once complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{path.name}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(pieces), encoding="utf-8")
    os.replace(tmp, path)


def read_part(path: Path, rank: int) -> dict:
    if not path.is_file():
        raise LexAlignError(f"Process {rank}'s part is missing: {path}",
                            hint="With several nodes the results folder must be on a filesystem every node shares")
    return json.loads(path.read_text(encoding="utf-8"))


_SESSIONS = itertools.count()
"""Sessions started in this process (the same sequence in every process of a launch: they run the same specs)."""


def collective_timeout() -> int | None:
    value = os.environ.get(COLLECTIVE_TIMEOUT_ENV, "")
    return int(value) if value.isdigit() else None


@contextlib.contextmanager
def session(output: str | Path) -> Iterator[Share]:
    """This process's Share for a step that writes `output`. Inside a launcher (WORLD_SIZE > 1) the process group
    (gloo, barriers bounded by scale.timeout) is started for the step and ended after it, so a training step
    launched after it in the same processes starts its own; a GPU process uses its own GPU (LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield Share(output=Path(output))
        return
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    started = not dist.is_initialized()
    if started:
        timeout = collective_timeout()
        store, rank, world = next(dist.rendezvous("env://"))
        # A group of its own in the launcher's store: a group started again after destroy_process_group takes its
        # first one's name, and would read the addresses its first one left there (and wait for them in vain).
        dist.init_process_group("gloo", store=dist.PrefixStore(f"lexalign-shares-{next(_SESSIONS)}", store),
                                rank=rank, world_size=world,
                                **({"timeout": timedelta(seconds=timeout)} if timeout else {}))
    if torch.cuda.is_available():  # "cuda" is then this process's GPU, not the first one
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    try:
        yield Share(rank=dist.get_rank(), world=dist.get_world_size(), output=Path(output))
    finally:
        if started:
            dist.destroy_process_group()
