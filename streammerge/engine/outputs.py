"""One output of a pass: its plan, shards and folder, and on its writer thread the shard writers, what is left to
write in each shard, the journal's records for `--resume`, and how the output ended."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..adapter import Adapter
from ..io.journal import Journal, Resumable
from ..io.sharding import PlannedTensor, header_bytes
from ..io.writer import ShardWriter
from ..plan import Plan
from .pipeline import WriteBehind

# a shard being written records its durable part in the journal every this many bytes (at a tensor boundary)
CHECKPOINT_BYTES = 1 << 30


@dataclass
class Output:
    """One merge's output within a pass: its plan, shards and folder, the adapter, what a killed run left that
    can be reused, and how it ended (`error`)."""

    plan: Plan
    shards: list[list[PlannedTensor]]
    names: list[str]
    dest: Path
    lora: Adapter
    clamp_f16: bool = False
    journal: Journal | None = None
    reuse: Resumable | None = None
    error: BaseException | None = None
    written: int = 0

    def done(self) -> set[str]:
        """The tensors already in the staging folder: every tensor of a reused shard, the first ones of a partial
        shard."""
        if self.reuse is None:
            return set()
        names: set[str] = set()
        for shard, name in zip(self.shards, self.names):
            if name in self.reuse.complete:
                names.update(t.name for t in shard)
            elif name in self.reuse.partial:
                names.update(t.name for t in header_bytes(shard)[1][:self.reuse.partial[name][1]])
        return names


class OutputState:
    """An output's shard writers (opened on its writer thread when first needed) and what is left of each shard."""

    def __init__(self, out: Output, lane: WriteBehind, any_order: bool) -> None:
        self.out, self.lane, self.any_order = out, lane, any_order
        self.shard_of = {t.name: i for i, shard in enumerate(out.shards) for t in shard}
        self.remaining = [len(s) for s in out.shards]
        self.writers: dict[int, ShardWriter] = {}
        self.closed: set[int] = set()
        self.resume_at: dict[int, tuple[int, int]] = {}
        self.checkpointed: dict[int, int] = {}
        reuse = out.reuse or Resumable()
        for i, name in enumerate(out.names):
            if name in reuse.complete:
                self.closed.add(i)
                self.remaining[i] = 0
            elif name in reuse.partial:
                self.resume_at[i] = reuse.partial[name]
                self.remaining[i] -= reuse.partial[name][1]
                self.checkpointed[i] = reuse.partial[name][0]

    def writer(self, i: int) -> ShardWriter:
        if i not in self.writers:
            self.writers[i] = ShardWriter(self.out.dest / self.out.names[i], self.out.shards[i], writeback=True,
                                          any_order=self.any_order, resume=self.resume_at.get(i))
        return self.writers[i]

    def tensor_done(self, name: str) -> None:
        i = self.shard_of[name]
        self.remaining[i] -= 1
        if self.remaining[i] == 0:
            self.close(i)
        elif self.out.journal is not None and not self.any_order:
            w = self.writer(i)
            if w.position - self.checkpointed.get(i, 0) >= CHECKPOINT_BYTES:
                durable, tensors = w.sync()
                self.out.journal.checkpoint(self.out.names[i], durable, tensors)
                self.checkpointed[i] = durable

    def close(self, i: int) -> None:
        self.writer(i).close()
        self.closed.add(i)
        if self.out.journal is not None:
            self.out.journal.closed(self.out.names[i])

    def close_rest(self) -> None:
        """Close the shards not closed yet (those whose tensors are all zero-byte or that hold none)."""
        for i in range(len(self.out.shards)):
            if i not in self.closed:
                self.close(i)

    def abort_writers(self) -> None:
        for w in self.writers.values():
            w.abort()
