"""One worker's live blocks as a map: engine block hash -> router block hash.

The ops of :mod:`blocks.delta` describe changes to this map; the block
mapper keeps one while it translates an engine's events, and the mesh log's
owner and replicas rebuild the same map from the ops.

One map per cache tier (:mod:`blocks.tiers`): the GPU's is the
:class:`BlockMap` itself (the hot path, unchanged by tiers), and the other
tiers' are maps of their own under :meth:`BlockMap.tier`, made on first use,
so a worker without offloading costs nothing for them. The same engine
block can be live on several tiers at once; each tier's map binds and
forgets it on its own, and a CLEAR empties them all.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from itertools import islice
from operator import eq

from blocks.delta import OP_CLEAR, OP_REMOVE, OP_STORE, EngineHash, KvOp
from blocks.tiers import TIER_GPU, tier_name

# One live block of a worker as handed over: (engine hash, router hash) on the
# GPU, (engine hash, router hash, tier) on another tier.
MappedBlock = tuple[EngineHash, int] | tuple[EngineHash, int, int]

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

    __slots__ = ("_eb", "lower", "refs", "to_router")

    def __init__(self, refs: bool = True) -> None:
        self.to_router: dict[EngineHash, int] = {}
        # router hash -> engine blocks naming it; None when not tracked
        self.refs: dict[int, int] | None = {} if refs else None
        self._eb: int | None = None if refs else 0  # ebytes, when tracked
        # tier -> that tier's map, for the tiers other than the GPU (this map)
        self.lower: dict[int, BlockMap] | None = None

    @property
    def ebytes(self) -> int:
        """Encoded size of the non-identity engine hashes, every tier."""
        eb = self._eb
        if eb is None:
            eb = sum(ehash_bytes(eh) for eh, rh in self.to_router.items() if eh != rh)
        if self.lower:
            eb += sum(m.ebytes for m in self.lower.values())
        return eb

    @classmethod
    def from_pairs(cls, pairs: Iterable[MappedBlock], refs: bool = True) -> BlockMap:
        """A map of ``(engine hash, router hash)`` pairs on the GPU and
        ``(engine hash, router hash, tier)`` triples on other tiers."""
        m = cls(refs)
        for p in pairs:
            if len(p) == 3:
                m.tier(p[2]).bind(p[0], p[1])
            else:
                m.bind(p[0], p[1])
        return m

    def tier(self, tier: int) -> BlockMap:
        """The map of ``tier``: this one for the GPU, another made empty on
        first use (ValueError for a number that is no tier)."""
        if tier == TIER_GPU:
            return self
        lower = self.lower
        if lower is None:
            lower = self.lower = {}
        m = lower.get(tier)
        if m is None:
            tier_name(tier)  # raises for an unknown tier
            m = lower[tier] = BlockMap(self.refs is not None)
        return m

    def tiers(self) -> list[tuple[int, BlockMap]]:
        """``(tier, map)`` of every tier with live blocks, GPU first, then in tier order."""
        out = [(TIER_GPU, self)] if self.to_router else []
        if self.lower:
            out += sorted((t, m) for t, m in self.lower.items() if m.to_router)
        return out

    def router_hash(self, eh: EngineHash) -> int | None:
        """The router hash of engine block ``eh`` on any tier, or None."""
        rh = self.to_router.get(eh)
        if rh is None and self.lower:
            for m in self.lower.values():
                rh = m.to_router.get(eh)
                if rh is not None:
                    break
        return rh

    def __len__(self) -> int:
        """Engine blocks mapped, every tier."""
        n = len(self.to_router)
        if self.lower:
            n += sum(len(m.to_router) for m in self.lower.values())
        return n

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlockMap) or self.to_router != other.to_router:
            return False
        mine = {t: m.to_router for t, m in (self.lower or {}).items() if m.to_router}
        theirs = {t: m.to_router for t, m in (other.lower or {}).items() if m.to_router}
        return mine == theirs

    def __repr__(self) -> str:
        per_tier = ", ".join(f"{tier_name(t)} {len(m.to_router)}" for t, m in self.tiers())
        return f"BlockMap({len(self)} engine blocks: {per_tier or 'none'})"

    def live(self) -> set[int]:
        """The live router hashes on the GPU."""
        return set(self.refs) if self.refs is not None else set(self.to_router.values())

    def live_by_tier(self) -> dict[int, set[int]]:
        """Tier -> its live router hashes, for every tier with live blocks."""
        return {t: m.live() for t, m in self.tiers()}

    def counts(self) -> dict[int, int]:
        """Router hash -> engine blocks naming it, on the GPU."""
        if self.refs is not None:
            return dict(self.refs)
        out: dict[int, int] = {}
        for rh in self.to_router.values():
            out[rh] = out.get(rh, 0) + 1
        return out

    def pairs(self) -> list[MappedBlock]:
        """Every live block: GPU pairs first, then the other tiers' triples
        (what :meth:`from_pairs` takes)."""
        out: list[MappedBlock] = list(self.to_router.items())
        if self.lower:
            for t, m in sorted(self.lower.items()):
                out += [(eh, rh, t) for eh, rh in m.to_router.items()]
        return out

    def bind(self, eh: EngineHash, rh: int) -> tuple[int | None, bool]:
        """Map ``eh`` to ``rh`` (replacing its old binding).

        Returns (old router hash if this dropped its last ref, rh newly
        live); without refcounts, (None, False).
        """
        old = self.to_router.get(eh)
        if old == rh:
            return None, False
        if self._eb is not None:
            # What (eh, rh) costs in a snapshot minus what (eh, old) did: an
            # identity pair costs nothing, so a rebinding can change it.
            if eh != rh:
                self._eb += ehash_bytes(eh)
            if old is not None and eh != old:
                self._eb -= ehash_bytes(eh)
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
        if self.lower:
            self.lower = {t: m for t, m in self.lower.items() if m.to_router}
            for m in self.lower.values():
                m.compact()

    def clear(self) -> None:
        """Forget every block, on every tier."""
        self.to_router.clear()
        if self.refs is not None:
            self.refs.clear()
        if self._eb is not None:
            self._eb = 0
        self.lower = None

    def apply(self, op: KvOp) -> None:
        """Apply one op (see :mod:`blocks.delta` for what its lists mean) to
        its tier's map; a CLEAR empties every tier."""
        kind = op.kind
        if op.tier and kind != OP_CLEAR:
            self.tier(op.tier).apply_here(op)
            return
        self.apply_here(op)

    def apply_here(self, op: KvOp) -> None:
        """Apply ``op`` to this map, whatever its tier."""
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
        get = to.get
        for eh, rh in zip(ehs, op.hashes):
            old = get(eh)
            if old != rh:  # as bind(): the new pair's cost minus the old one's
                size = 9 if eh.__class__ is int else ehash_bytes(eh)
                if eh != rh:
                    eb += size
                if old is not None and eh != old:
                    eb -= size
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
        """``[CLEAR, STORE(...)...]`` that rebuild this map on an empty one,
        one or two STOREs per tier with live blocks.

        Identity pairs (router-hash-named blocks) go in a STORE without
        engine hashes, so they cost what they did before ehashes existed.
        """
        ops = [KvOp(OP_CLEAR, [])]
        for t, m in self.tiers():
            ident: list[int] = []
            hs: list[int] = []
            ehs: list[EngineHash] = []
            for eh, rh in m.to_router.items():
                if eh == rh:
                    ident.append(rh)
                else:
                    ehs.append(eh)
                    hs.append(rh)
            if ident:
                ops.append(KvOp(OP_STORE, ident, [], t))
            if hs:
                ops.append(KvOp(OP_STORE, hs, ehs, t))
        return ops
