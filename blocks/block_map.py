"""One worker's live blocks as a map: engine block hash -> router block hash.

The ops of :mod:`blocks.delta` describe changes to this map; the block
mapper keeps one while it translates an engine's events, and the mesh log's
owner and replicas rebuild the same map from the ops.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from itertools import islice
from operator import eq

from blocks.delta import OP_CLEAR, OP_REMOVE, OP_STORE, EngineHash, KvOp

try:  # C helper behind Counter.update: mapping[x] = mapping.get(x, 0) + 1 per item
    from collections import _count_elements  # type: ignore[attr-defined]  # private, no stub
except ImportError:  # pragma: no cover - other Pythons

    def _count_elements(mapping: dict[int, int], iterable: Iterable[int]) -> None:
        get = mapping.get
        for x in iterable:
            mapping[x] = get(x, 0) + 1


# Runs an iterator to its end in C, keeping nothing.
_consume: Callable[[Iterable[object]], None] = deque[object](maxlen=0).extend


def ehash_bytes(eh: EngineHash) -> int:
    """Upper bound of the msgpack size of one engine hash."""
    if eh.__class__ is int:
        return 9
    n = len(eh)  # type: ignore[arg-type]  # bytes here: ints returned above (class test mypy cannot narrow)
    return n + (2 if n < 256 else 3 if n < 65536 else 5)


def _new_ebytes(ehs: Sequence[EngineHash], rhs: Sequence[int]) -> int:
    """``ebytes`` of the pairs ``zip(ehs, rhs)`` (identity pairs cost nothing).

    In C for the usual case (int engine hashes, no identity pair); a Python
    loop only for bytes hashes or identity pairs.
    """
    if ehs is rhs:  # an op without engine hashes: all identity pairs
        return 0
    n = len(ehs)
    if list(map(type, ehs)).count(int) == n and not any(map(eq, ehs, rhs)):
        return 9 * n
    return sum(ehash_bytes(eh) for eh, rh in zip(ehs, rhs) if eh != rh)


class BlockMap:
    """One worker's live blocks: engine hash -> router hash.

    The router's live set is the set of mapped router hashes: several engine
    blocks can name one router block, which goes only with the last of them.
    ``BlockMapper`` keeps one while translating, with ``refs`` (router hash ->
    engine blocks naming it) to know when a router hash goes; the mesh log's
    owner and replay rebuild the same mapping from the ops (:meth:`apply`) and
    need no refcounts (``refs=False`` saves a dict per worker: the live set is
    derived on demand). ``ebytes`` is the encoded size of the non-identity
    engine hashes, so a snapshot's size is known without encoding it: the
    log's maps (``refs=False``) track it as they change, since the owner reads
    it on every append; a refcounted map (the mapper's, whose hot path never
    needs it) computes it when asked.
    """

    __slots__ = ("_eb", "refs", "to_router")

    def __init__(self, refs: bool = True) -> None:
        self.to_router: dict[EngineHash, int] = {}
        # router hash -> engine blocks naming it; None when not tracked
        self.refs: dict[int, int] | None = {} if refs else None
        self._eb: int | None = None if refs else 0  # ebytes, when tracked

    @property
    def ebytes(self) -> int:
        if self._eb is not None:
            return self._eb
        return sum(ehash_bytes(eh) for eh, rh in self.to_router.items() if eh != rh)

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[EngineHash, int]], refs: bool = True) -> BlockMap:
        m = cls(refs)
        for eh, rh in pairs:
            m.bind(eh, rh)
        return m

    def __len__(self) -> int:
        return len(self.to_router)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlockMap) and self.to_router == other.to_router

    def __repr__(self) -> str:
        return f"BlockMap({len(self.to_router)} engine blocks, {len(self.live())} router)"

    def live(self) -> set[int]:
        """The live router hashes."""
        return set(self.refs) if self.refs is not None else set(self.to_router.values())

    def counts(self) -> dict[int, int]:
        """Router hash -> engine blocks naming it."""
        if self.refs is not None:
            return dict(self.refs)
        out: dict[int, int] = {}
        for rh in self.to_router.values():
            out[rh] = out.get(rh, 0) + 1
        return out

    def pairs(self) -> list[tuple[EngineHash, int]]:
        return list(self.to_router.items())

    def bind(self, eh: EngineHash, rh: int) -> tuple[int | None, bool]:
        """Map ``eh`` to ``rh`` (replacing its old binding).

        Returns (old router hash if this dropped its last ref, rh newly
        live); without refcounts, (None, False).
        """
        old = self.to_router.get(eh)
        if old == rh:
            return None, False
        if old is None and self._eb is not None and eh != rh:
            self._eb += ehash_bytes(eh)
        self.to_router[eh] = rh
        refs = self.refs
        if refs is None:
            return None, False
        dropped = old if old is not None and self._unref(refs, old) else None
        n = refs.get(rh, 0) + 1
        refs[rh] = n
        return dropped, n == 1

    def bind_new(self, ehs: Sequence[EngineHash], rhs: Sequence[int]) -> bool:
        """Bind ``ehs[i]`` to ``rhs[i]`` in bulk, if every engine hash is new.

        Returns False, changing nothing, if one is already mapped or repeats
        in ``ehs`` (the caller then binds one by one). This is the common case
        of a fresh prefill and costs a few C-level passes instead of a Python
        call per block.
        """
        n = len(ehs)
        if len(rhs) != n:
            raise ValueError(f"bind_new of {n} engine and {len(rhs)} router hashes")
        to = self.to_router
        if n and ehs[0] in to:  # cheap early out: a re-store or a reused hash
            return False
        n0 = len(to)
        _consume(map(to.setdefault, ehs, rhs))  # inserts only the new ones
        added = len(to) - n0
        if added != n:
            # Some engine hash was mapped already or repeats: undo. The keys
            # inserted are the last `added` ones (dicts keep insertion order).
            for eh in list(islice(reversed(to), added)):
                del to[eh]
            return False
        if self.refs is not None:
            _count_elements(self.refs, rhs)
        else:
            self._eb += _new_ebytes(ehs, rhs)  # type: ignore[operator]  # _eb is an int whenever refs is None
        return True

    def unbind(self, eh: EngineHash) -> tuple[int | None, bool]:
        """Forget ``eh``: (its router hash or None if unknown, that hash no
        longer live; False without refcounts)."""
        rh = self.to_router.pop(eh, None)
        if rh is None:
            return None, False
        if self._eb is not None and eh != rh:
            self._eb -= ehash_bytes(eh)
        refs = self.refs
        return rh, refs is not None and self._unref(refs, rh)

    @staticmethod
    def _unref(refs: dict[int, int], rh: int) -> bool:
        left = refs[rh] - 1
        if left:
            refs[rh] = left
            return False
        del refs[rh]
        return True

    def compact(self) -> None:
        """Rebuild the dicts without the slots of deleted entries.

        A dict under churn keeps deleted slots until it resizes, and then
        sizes itself well above its live entries, so it holds much more
        memory than the same dict built by insertions only. Called on log
        compaction.
        """
        self.to_router = dict(self.to_router)
        if self.refs is not None:
            self.refs = dict(self.refs)

    def clear(self) -> None:
        self.to_router.clear()
        if self.refs is not None:
            self.refs.clear()
        if self._eb is not None:
            self._eb = 0

    def apply(self, op: KvOp) -> None:
        """Apply one op (see :mod:`blocks.delta` for what its lists mean)."""
        kind = op.kind
        if kind == OP_STORE:
            self._store(op)
        elif kind == OP_REMOVE:
            self._remove(op.ehashes or op.hashes)
        elif kind == OP_CLEAR:
            self.clear()
        else:
            raise ValueError(f"unknown KvOp kind {op.kind!r}")

    def _store(self, op: KvOp) -> None:
        ehs: Sequence[EngineHash] = op.ehashes or op.hashes
        if len(ehs) != len(op.hashes):
            raise ValueError(f"STORE with {len(op.hashes)} router and {len(ehs)} engine hashes")
        if self.bind_new(ehs, op.hashes):  # all new: in bulk
            return
        if self.refs is not None:
            bind = self.bind
            for eh, rh in zip(ehs, op.hashes):
                bind(eh, rh)
            return
        # No refcounts (the mesh log's case): bind() inlined, it is the
        # owner's hot path.
        to = self.to_router
        eb = 0
        for eh, rh in zip(ehs, op.hashes):
            if eh not in to and eh != rh:
                eb += 9 if eh.__class__ is int else ehash_bytes(eh)
            to[eh] = rh
        self._eb += eb  # type: ignore[operator]  # _eb is an int whenever refs is None

    def _remove(self, ehs: Sequence[EngineHash]) -> None:
        if self.refs is not None:
            unbind = self.unbind
            for eh in ehs:
                unbind(eh)
            return
        pop: Callable[[EngineHash, None], int | None] = self.to_router.pop
        eb = 0
        for eh in ehs:
            gone = pop(eh, None)
            if gone is not None and eh != gone:
                eb += 9 if eh.__class__ is int else ehash_bytes(eh)
        self._eb -= eb  # type: ignore[operator]  # _eb is an int whenever refs is None

    def snapshot_ops(self) -> list[KvOp]:
        """``[CLEAR, STORE(...)]`` that rebuild this map on an empty one.

        Identity pairs (router-hash-named blocks) go in a STORE without
        engine hashes, so they cost what they did before ehashes existed.
        """
        ops = [KvOp(OP_CLEAR, [])]
        ident: list[int] = []
        hs: list[int] = []
        ehs: list[EngineHash] = []
        for eh, rh in self.to_router.items():
            if eh == rh:
                ident.append(rh)
            else:
                ehs.append(eh)
                hs.append(rh)
        if ident:
            ops.append(KvOp(OP_STORE, ident))
        if hs:
            ops.append(KvOp(OP_STORE, hs, ehs))
        return ops
