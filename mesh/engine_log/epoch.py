"""Epochs: which document of an engine's log is authoritative.

An engine's log is a sequence of documents, one per *epoch*. An epoch is
``Epoch(term, owner, gen, doc)``, ordered lexicographically; a higher epoch
supersedes a lower one on every node, and updates of an epoch lower than the
highest one a node knows are ignored (*fencing*).

* ``term`` grows on every ownership change (a new owner takes the engine).
* ``gen`` grows on every compaction by the same owner.
* ``doc`` is the writer's random pycrdt client id.

The term comes first on purpose: with a single counter, a stale owner that
compacts (n -> n+1) concurrently with a takeover by a new owner (n -> n+1)
would win whenever its node id sorts higher, and the fenced writer would be
the legitimate one. With the term first, any takeover beats any number of
compactions of the previous term. The ``doc`` component keeps two documents
that would otherwise carry the same (term, owner, gen) -- a node restarted
without memory of its old epochs, say -- from ever being merged into one
(garbage) log: they are two distinct, ordered epochs.

Layout of one epoch document (a ``pycrdt.Doc`` whose client id is the epoch's
``doc`` field, so only the owner ever writes it):

* ``meta`` (Map): ``engine_id``, ``term``, ``owner``, ``gen``, ``doc``; written
  once, in the same transaction as the snapshot, never overwritten (no
  tombstones).
* ``log`` (Array): append-only entries (:mod:`mesh.engine_log.entry`). Entry 0
  is always a snapshot (:mod:`mesh.engine_log.snapshot`). Nothing is ever
  deleted from the Array, so a document carries no tombstones.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pycrdt

__all__ = ["CLIENT_ID_BITS", "Epoch", "EpochDoc", "empty_update"]

# yrs/JS-safe client ids: below 2**53.
CLIENT_ID_BITS = 53


class Epoch(msgspec.Struct, array_like=True, frozen=True, order=True, gc=False):
    """Identity of one epoch document; compared lexicographically."""

    term: int  # grows on each ownership change
    owner: str  # node id of the single writer
    gen: int  # grows on each compaction within a term
    doc: int  # the writer's pycrdt client id (random)


def empty_update(update: bytes) -> bool:
    """True if a v1 update carries no structs and no deletions."""
    return update in (b"\x00\x00", b"")


class EpochDoc:
    """One epoch of one engine's log: a pycrdt Doc with ``meta`` and ``log``."""

    __slots__ = ("doc", "engine_id", "epoch", "log", "meta")

    def __init__(self, engine_id: str, epoch: Epoch, *, writer: bool) -> None:
        self.engine_id = engine_id
        self.epoch = epoch
        # Replicas never write, so their client id is irrelevant; the writer's is
        # the epoch's doc id (a second writer would show up as a foreign client).
        self.doc: pycrdt.Doc[Any] = pycrdt.Doc(client_id=epoch.doc if writer else None)
        self.log: pycrdt.Array[bytes] = self.doc.get("log", type=pycrdt.Array)
        self.meta: pycrdt.Map[str | int] = self.doc.get("meta", type=pycrdt.Map)

    @classmethod
    def create(cls, engine_id: str, epoch: Epoch, snapshot_entry: bytes) -> EpochDoc:
        """A new writer document whose entry 0 is ``snapshot_entry`` (encoded deltas)."""
        ed = cls(engine_id, epoch, writer=True)
        with ed.doc.transaction():
            # meta first: it precedes the snapshot in the writer's clock order, so
            # a replica that sees entry 0 has seen the meta too.
            ed.meta["engine_id"] = engine_id
            ed.meta["term"] = epoch.term
            ed.meta["owner"] = epoch.owner
            ed.meta["gen"] = epoch.gen
            ed.meta["doc"] = str(epoch.doc)  # str: JSON numbers are floats
            ed.log.append(snapshot_entry)
        return ed

    def meta_matches(self) -> bool:
        m = self.meta
        try:
            return (
                m["engine_id"] == self.engine_id
                and int(m["term"]) == self.epoch.term
                and m["owner"] == self.epoch.owner
                and int(m["gen"]) == self.epoch.gen
                and m["doc"] == str(self.epoch.doc)
            )
        except (KeyError, TypeError, ValueError):
            return False

    def __len__(self) -> int:
        return len(self.log)

    def append(self, entry: bytes, index: int) -> None:
        """Writer only: append ``entry`` at ``index`` (== current length).

        The owner appends on every event batch, and ``Array.append`` goes
        through slice assignment and two ``len`` calls in Python, so the
        integrated array's insert is called directly. If pycrdt's internals
        change (it is pinned below 0.15), the public API takes over.
        """
        try:
            with self.doc.transaction() as txn:
                self.log.integrated.insert(txn._txn, index, entry)
        except AttributeError:
            self.log.append(entry)

    def entries(self) -> list[bytes]:
        return [bytes(e) for e in self.log.to_py() or ()]

    def state_vector(self) -> bytes:
        return self.doc.get_state()

    def update_since(self, state_vector: bytes | None = None) -> bytes:
        return self.doc.get_update(state_vector)

    def changes_since(self, state_vector: bytes) -> bytes | None:
        """What was added since ``state_vector``, None if nothing.

        One transaction for both reads: pycrdt commits every transaction,
        read-only or not, and a non-owner asks this once per log update it
        merges.
        """
        with self.doc.transaction():
            if self.doc.get_state() == state_vector:
                return None
            return self.doc.get_update(state_vector)
