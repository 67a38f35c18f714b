"""Worker ids: the cache a block lives in.

An engine with data parallelism holds one independent KV cache per rank, and
each rank publishes its own event stream. Routing, the index and load all
count per cache, so each has an id: the engine id for rank 0, and
``"<engine_id>#dp<rank>"`` for the others (rank 0 keeps the plain id, so an
engine without data parallelism has one worker named like itself).
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["DP_SEPARATOR", "WorkerId", "engine_of", "split_worker_id", "worker_id"]

DP_SEPARATOR = "#dp"


class WorkerId(NamedTuple):
    engine_id: str
    rank: int

    def __str__(self) -> str:
        return worker_id(self.engine_id, self.rank)


def worker_id(engine_id: str, dp_rank: int) -> str:
    """The id of data-parallel rank ``dp_rank`` of ``engine_id``."""
    return engine_id if dp_rank == 0 else f"{engine_id}{DP_SEPARATOR}{dp_rank}"


def split_worker_id(worker: str) -> WorkerId:
    """``"e1#dp2"`` -> ``WorkerId("e1", 2)``; a plain engine id is rank 0."""
    engine_id, sep, rank = worker.rpartition(DP_SEPARATOR)
    # isdecimal, not isdigit: "²" is a digit that int() refuses, and a worker
    # id arrives in replicated log entries written by any node.
    if sep and rank.isdecimal():
        return WorkerId(engine_id, int(rank))
    return WorkerId(worker, 0)


def engine_of(worker: str) -> str:
    """The engine a worker belongs to."""
    return split_worker_id(worker).engine_id
