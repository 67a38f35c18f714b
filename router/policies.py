"""Routing policies: pick one healthy worker for a request and say why.

Every policy is a small class with a ``name``, ``choose(req, candidates, now,
rng) -> Decision`` and ``on_routed(req, worker, now)``. They are pure: the
caller passes the time and a ``random.Random``; the index, the approximate
tree, the mesh's route hints and the load numbers are passed in, never
fetched.

Contract for callers (the node): build candidates (see
:func:`candidates_from`), call ``choose``, and once the request is really
routed call ``on_routed(req, worker, now)`` so policies that learn from
routing (``cache_aware_approx``) record it.

Load is in-flight requests per worker, summed over the mesh
(:class:`router.load.MeshLoad`); ``Candidate.load_tokens`` optionally carries
the tokens of work in flight for the precise cost (the node counts a request's
uncached prompt tokens until its first token, then one block of decode).

Defaults, and why:
- Balance guard (``cache_aware_approx`` and ``precise``), SGLang's rule: the
  fleet is imbalanced when ``max_load - min_load > abs_threshold`` and
  ``max_load > rel_threshold * min_load``; then pure least load.
  ``abs_threshold=32`` (SGLang uses 64; an engine of our size saturates well
  before 64 concurrent long prompts), ``rel_threshold=1.5`` (as SGLang).
- ``cache_aware_approx`` ``cache_threshold=0.3`` (SGLang router's default): go
  to the best match when more than 30% of the prompt's full blocks were
  routed there before, else least load. A lower threshold keeps more locality
  for multi-turn chats whose history grows every turn.
- ``precise`` cost, in blocks of prefill work, after NVIDIA Dynamo's KV router
  (``logit = overlap_score_weight * prefill_blocks + decode_blocks``) with one
  change for a loaded fleet::

      cost = overlap_weight * uncached * (1 + delay_weight * in_flight) + load_blocks

  ``uncached = prompt_tokens / block_size - overlap`` is the prefill this
  worker would have to do; ``load_blocks = in-flight tokens / block_size`` is
  the work queued ahead of it (uncached prompt tokens of requests before their
  first token, one block per decoding request). Dynamo's rule is the case
  ``overlap_weight = 1, delay_weight = 0``: it minimises this request's own
  wait, so under load it sends a request with a few dozen cached blocks to a
  less busy engine and recomputes the prefix. But prefill on an engine also
  stalls every request in flight there (chunked prefill shares each step with
  their decode), so the ``(1 + delay_weight * in_flight)`` factor charges
  recomputation by the requests it delays. On an idle fleet the cost is
  Dynamo's up to the weight; near capacity a cache hit is worth more than the
  queue difference. ``overlap_weight=4, delay_weight=0.25`` came out of a sweep
  of both weights on the chat and trace workloads: the cache hit rate of
  SGLang's rule on chat at a lower TTFT, and most of the ideal hit rate on
  the trace. The sweep (command, date, table) is in docs/benchmarks.md,
  section Evidence for defaults.
- ``precise`` cache tiers. Engines that offload KV (vLLM's CPU/storage
  offloading, SGLang's hierarchical cache) hold blocks off the GPU too; the
  index reports, per worker, how many blocks of the prompt's prefix each
  tier holds (:meth:`PrefixIndex.match_tiers`), and ``overlap`` above is the
  credit they earn::

      overlap = gpu + host_tier_weight * host + disk_tier_weight * disk
                + external_tier_weight * external

  A lower-tier block saves the recompute of a block but costs its copy to
  the GPU, so its weight is ``1 - copy time / recompute time``. The figures,
  for Llama-3-8B in bf16 (128 KiB of KV per token, 2 MiB per 16-token block)
  on an A100, as the simulated engine's timing: recomputing costs ~0.1 ms
  per prompt token (1.6 ms a block). A host block crosses PCIe 4.0 x16
  (~25 GB/s from pinned memory): ~0.08 ms, 5% of its recompute, so 0.95 in
  theory; ``host_tier_weight=0.9`` leaves room for copies that reach only
  half of PCIe's rate (chunked transfers, a link shared with other traffic).
  A disk block (NVMe, read through host memory, ~3 GB/s as a KV store's
  files really read) takes ~0.7 ms, about half its recompute:
  ``disk_tier_weight=0.5``. An external pool (another node's memory or a
  storage service: Mooncake, LMCache) is anywhere between RDMA at host
  speed and TCP at disk speed, plus a lookup: ``external_tier_weight=0.5``.
  Models without grouped-query attention hold several times more KV per
  token for the same compute, and their copies cost proportionally more:
  lower the weights for them. NVIDIA Dynamo credits the same way (blocks
  extending the device prefix on a lower tier, times a per-tier weight)
  with ``host_cache_hit_weight=0.75`` and ``disk_cache_hit_weight=0.25``
  (disk and external alike), more cautious than the copy times say; any of
  the three is a ``--policy-opt``. The mesh's route hints count as GPU
  blocks (a routed prefix is computed on the GPU).
"""

from __future__ import annotations

import inspect
import random as _random
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeAlias

import xxhash

from blocks.hashing import DEFAULT_BLOCK_SIZE
from blocks.tiers import TIER_DISK, TIER_EXTERNAL, TIER_GPU, TIER_HOST
from router.approx_tree import DEFAULT_MAX_BLOCKS_PER_WORKER, ApproxTree
from router.errors import NoEngineAvailable
from router.index import PrefixIndex, TierBlocks

__all__ = [
    "POLICY_NAMES",
    "ApproxCacheAware",
    "Candidate",
    "CandidateScore",
    "ConsistentHash",
    "Decision",
    "HintOverlap",
    "LeastLoad",
    "NoEngineAvailable",
    "Policy",
    "PowerOfTwo",
    "Precise",
    "RandomPolicy",
    "RoundRobin",
    "RouteRequest",
    "candidates_from",
    "is_imbalanced",
    "make_policy",
]

_xxh3 = xxhash.xxh3_64_intdigest

# The mesh's route hints (``MeshCore.hint_overlap``): for a prompt's block
# hashes at a time, per worker, how many leading blocks any node just routed
# there (counted as cached until that engine's events arrive).
HintOverlap: TypeAlias = Callable[[list[int], float], Mapping[str, int]]


@dataclass(frozen=True, slots=True)
class RouteRequest:
    request_id: str
    block_hashes: list[int]  # router block hashes of the prompt's full blocks
    prompt_tokens: int
    session_key: str | None = None
    block_size: int = DEFAULT_BLOCK_SIZE

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
        if not isinstance(self.prompt_tokens, int) or self.prompt_tokens < 0:
            raise ValueError(f"prompt_tokens must be a non-negative int, got {self.prompt_tokens!r}")


@dataclass(frozen=True, slots=True)
class Candidate:
    worker: str
    load: float = 0.0  # in-flight requests (mesh-wide)
    healthy: bool = True
    load_tokens: float | None = None  # tokens of work in flight, when tracked


@dataclass(frozen=True, slots=True)
class CandidateScore:
    worker: str
    overlap_blocks: int  # leading prompt blocks on its GPUs (with the mesh's route hints)
    load: float
    score: float
    chosen: bool
    healthy: bool = True
    # Prompt blocks past those, on its other cache tiers (PrefixIndex.match_tiers).
    host_blocks: int = 0
    disk_blocks: int = 0
    external_blocks: int = 0

    @property
    def cached_blocks(self) -> int:
        """Prompt blocks the worker would not recompute: GPU and every other tier."""
        return self.overlap_blocks + self.host_blocks + self.disk_blocks + self.external_blocks

    def tiers_text(self) -> str:
        """`` (+3 host, +1 disk)`` for the tiers other than the GPU with blocks, else ""."""
        return _tiers_text((self.overlap_blocks, self.host_blocks, self.disk_blocks, self.external_blocks))


def _tiers_text(tiers: TierBlocks) -> str:
    parts = [f"+{n} {name}" for n, name in zip(tiers[TIER_HOST:], ("host", "disk", "external")) if n]
    return f" ({', '.join(parts)})" if parts else ""


@dataclass(frozen=True, slots=True)
class Decision:
    policy: str
    worker: str
    reason: str
    candidates: list[CandidateScore]
    score_meaning: str = ""  # what CandidateScore.score is for this policy
    prompt_blocks: int = 0
    imbalanced: bool = False

    def explain(self) -> str:
        """Multi-line, human-readable account of the decision."""
        lines = [f"policy={self.policy} chosen={self.worker}: {self.reason}"]
        if self.score_meaning:
            lines.append(f"score = {self.score_meaning}")
        for c in self.candidates:
            mark = "*" if c.chosen else " "
            health = "" if c.healthy else " (unhealthy)"
            lines.append(
                f"{mark} {c.worker}: overlap {c.overlap_blocks}/{self.prompt_blocks} blocks{c.tiers_text()}, "
                f"load {_fmt(c.load)}, score {_fmt(c.score)}{health}"
            )
        return "\n".join(lines)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.3f}"


class Policy(Protocol):
    name: str

    def choose(
        self, req: RouteRequest, candidates: Sequence[Candidate], now: float, rng: _random.Random
    ) -> Decision: ...

    def on_routed(self, req: RouteRequest, worker: str, now: float) -> None: ...


def candidates_from(
    workers: Iterable[str],
    load: Mapping[str, float],
    unhealthy: Collection[str] = (),
    tokens: Mapping[str, float] | None = None,
) -> list[Candidate]:
    """Candidates for ``workers``, in that order, with their in-flight requests
    (``load``) and, when given, tokens of work (``tokens``); absent workers are idle."""
    return [
        Candidate(
            worker=w,
            load=float(load.get(w, 0.0)),
            healthy=w not in unhealthy,
            load_tokens=None if tokens is None else float(tokens.get(w, 0.0)),
        )
        for w in workers
    ]


def is_imbalanced(
    loads: Iterable[float], abs_threshold: float, rel_threshold: float
) -> tuple[bool, float, float]:
    """SGLang's balance guard. Returns (imbalanced, max, min)."""
    ls = list(loads)
    if not ls:
        return False, 0.0, 0.0
    hi, lo = max(ls), min(ls)
    return (hi - lo > abs_threshold and hi > rel_threshold * lo), hi, lo


# -- shared helpers ------------------------------------------------------------


def _healthy(policy: str, candidates: Sequence[Candidate]) -> list[Candidate]:
    if not candidates:
        raise NoEngineAvailable(f"{policy}: no candidate workers")
    seen: set[str] = set()
    for c in candidates:
        if c.worker in seen:
            raise ValueError(f"{policy}: duplicate candidate {c.worker!r}")
        seen.add(c.worker)
    healthy = [c for c in candidates if c.healthy]
    if not healthy:
        raise NoEngineAvailable(
            f"{policy}: none of {len(candidates)} candidates is healthy "
            f"({', '.join(c.worker for c in candidates)})"
        )
    return healthy


def _pick_min(
    items: list[Candidate], key: Callable[[Candidate], tuple[float, ...]], rng: _random.Random
) -> Candidate:
    """Lowest key; exact ties broken by the seeded rng, never by position."""
    best = min(key(c) for c in items)
    ties = [c for c in items if key(c) == best]
    return ties[0] if len(ties) == 1 else rng.choice(ties)


def _least_load(healthy: list[Candidate], rng: _random.Random) -> Candidate:
    return _pick_min(healthy, lambda c: (c.load,), rng)


_NO_TIERS: TierBlocks = (0, 0, 0, 0)


def _decision(
    policy: str,
    req: RouteRequest,
    candidates: Sequence[Candidate],
    chosen: str,
    reason: str,
    overlaps: Mapping[str, int] | Mapping[str, TierBlocks] | None,
    scores: Mapping[str, float] | None,
    score_meaning: str,
    imbalanced: bool = False,
) -> Decision:
    """``overlaps``: per worker its GPU blocks, or its blocks per tier."""
    rows = []
    for c in candidates:
        ov = overlaps.get(c.worker, 0) if overlaps else 0
        tiers = ov if isinstance(ov, tuple) else (ov, 0, 0, 0)
        rows.append(
            CandidateScore(
                worker=c.worker,
                overlap_blocks=tiers[TIER_GPU],
                load=c.load,
                score=scores.get(c.worker, 0.0) if scores else c.load,
                chosen=c.worker == chosen,
                healthy=c.healthy,
                host_blocks=tiers[TIER_HOST],
                disk_blocks=tiers[TIER_DISK],
                external_blocks=tiers[TIER_EXTERNAL],
            )
        )
    return Decision(
        policy=policy,
        worker=chosen,
        reason=reason,
        candidates=rows,
        score_meaning=score_meaning,
        prompt_blocks=len(req.block_hashes),
        imbalanced=imbalanced,
    )


class _Base:
    name = ""

    def __init__(self, index: PrefixIndex | None = None) -> None:
        # With an index, load-only policies still report each candidate's
        # cached overlap, so decisions of every policy can be compared.
        self.index = index

    def _info_overlaps(
        self, req: RouteRequest, candidates: Sequence[Candidate]
    ) -> dict[str, TierBlocks] | None:
        if self.index is None:
            return None
        return self.index.match_tiers(req.block_hashes, [c.worker for c in candidates])

    def _decide(
        self,
        req: RouteRequest,
        candidates: Sequence[Candidate],
        chosen: str,
        reason: str,
        score_meaning: str,
        scores: Mapping[str, float] | None = None,
    ) -> Decision:
        """The decision of a policy that chose without the cache: the
        overlaps shown are for comparison only (``_info_overlaps``)."""
        return _decision(
            self.name,
            req,
            candidates,
            chosen,
            reason,
            self._info_overlaps(req, candidates),
            scores,
            score_meaning,
        )

    def on_routed(self, req: RouteRequest, worker: str, now: float) -> None:
        return None


# -- load-only policies --------------------------------------------------------


class RoundRobin(_Base):
    """Cycle over the healthy candidates in worker-id order."""

    name = "round_robin"

    def __init__(self, index: PrefixIndex | None = None) -> None:
        super().__init__(index)
        self._next = 0

    def choose(
        self, req: RouteRequest, candidates: Sequence[Candidate], now: float, rng: _random.Random
    ) -> Decision:
        healthy = sorted(_healthy(self.name, candidates), key=lambda c: c.worker)
        i = self._next % len(healthy)
        self._next = (self._next + 1) % (1 << 62)
        c = healthy[i]
        return self._decide(
            req,
            candidates,
            c.worker,
            f"turn {i + 1} of {len(healthy)} healthy workers -> {c.worker}",
            "load (not used)",
        )


class RandomPolicy(_Base):
    name = "random"

    def choose(
        self, req: RouteRequest, candidates: Sequence[Candidate], now: float, rng: _random.Random
    ) -> Decision:
        healthy = _healthy(self.name, candidates)
        c = rng.choice(healthy)
        return self._decide(
            req,
            candidates,
            c.worker,
            f"uniform random over {len(healthy)} healthy workers -> {c.worker}",
            "load (not used)",
        )


class LeastLoad(_Base):
    name = "least_load"

    def choose(
        self, req: RouteRequest, candidates: Sequence[Candidate], now: float, rng: _random.Random
    ) -> Decision:
        healthy = _healthy(self.name, candidates)
        c = _least_load(healthy, rng)
        return self._decide(
            req,
            candidates,
            c.worker,
            f"least load {_fmt(c.load)} on {c.worker}",
            "in-flight requests (lowest wins)",
        )


class PowerOfTwo(_Base):
    """Two distinct random healthy candidates; the less loaded one wins."""

    name = "power_of_two"

    def choose(
        self, req: RouteRequest, candidates: Sequence[Candidate], now: float, rng: _random.Random
    ) -> Decision:
        healthy = _healthy(self.name, candidates)
        if len(healthy) == 1:
            c = healthy[0]
            reason = f"only healthy worker {c.worker}"
        else:
            a, b = rng.sample(healthy, 2)
            c = b if b.load < a.load else a  # sample order is random, so ties are too
            other = b if c is a else a
            reason = (
                f"sampled {a.worker} (load {_fmt(a.load)}) and {b.worker} (load {_fmt(b.load)}) -> {c.worker}"
            )
            if c.load == other.load:
                reason += " (tie)"
        return self._decide(
            req, candidates, c.worker, reason, "in-flight requests (lower of two samples wins)"
        )


class ConsistentHash(_Base):
    """Rendezvous (highest random weight) hashing of the session key.

    Removing a worker moves only the keys that were on it. Without a session
    key the chained hash of the first ``prefix_blocks`` blocks is the key, so
    prompts sharing that prefix land together; with no full block either, the
    request id is hashed (effectively random).
    """

    name = "consistent_hash"

    def __init__(self, index: PrefixIndex | None = None, prefix_blocks: int = 4) -> None:
        super().__init__(index)
        if prefix_blocks < 1:
            raise ValueError(f"prefix_blocks must be >= 1, got {prefix_blocks!r}")
        self.prefix_blocks = prefix_blocks

    def _key(self, req: RouteRequest) -> tuple[int, str]:
        if req.session_key is not None:
            return _xxh3(req.session_key.encode("utf-8")), f"session key {req.session_key!r}"
        if req.block_hashes:
            k = min(self.prefix_blocks, len(req.block_hashes))
            return req.block_hashes[k - 1], f"first {k} prompt block(s)"
        return _xxh3(str(req.request_id).encode("utf-8")), "request id (no session key, no full block)"

    def choose(
        self, req: RouteRequest, candidates: Sequence[Candidate], now: float, rng: _random.Random
    ) -> Decision:
        healthy = _healthy(self.name, candidates)
        key, what = self._key(req)
        # exact 64-bit ints: floats would round distinct weights into ties
        weights = {c.worker: _xxh3(c.worker.encode("utf-8"), key) for c in candidates}
        c = max(healthy, key=lambda c: (weights[c.worker], c.worker))
        return self._decide(
            req,
            candidates,
            c.worker,
            f"rendezvous hash of {what} -> {c.worker}",
            "rendezvous weight, 64-bit (highest wins)",
            weights,
        )


# -- cache-aware policies ------------------------------------------------------


class _Guarded(_Base):
    def __init__(self, index: PrefixIndex | None, abs_threshold: float, rel_threshold: float) -> None:
        super().__init__(index)
        if abs_threshold < 0 or rel_threshold < 1:
            raise ValueError(
                f"need abs_threshold >= 0 and rel_threshold >= 1, got {abs_threshold}, {rel_threshold}"
            )
        self.abs_threshold = abs_threshold
        self.rel_threshold = rel_threshold

    def _guard(
        self,
        req: RouteRequest,
        candidates: Sequence[Candidate],
        healthy: list[Candidate],
        overlaps: Mapping[str, int] | Mapping[str, TierBlocks],
        rng: _random.Random,
    ) -> Decision | None:
        imb, hi, lo = is_imbalanced((c.load for c in healthy), self.abs_threshold, self.rel_threshold)
        if not imb:
            return None
        c = _least_load(healthy, rng)
        return _decision(
            self.name,
            req,
            candidates,
            c.worker,
            f"imbalanced: max {_fmt(hi)} min {_fmt(lo)} -> least load {c.worker}",
            overlaps,
            None,
            "in-flight requests (imbalanced fleet: lowest wins)",
            imbalanced=True,
        )


class ApproxCacheAware(_Guarded):
    """SGLang-style cache-aware routing from a tree of what this router routed."""

    name = "cache_aware_approx"

    def __init__(
        self,
        tree: ApproxTree | None = None,
        index: PrefixIndex | None = None,
        cache_threshold: float = 0.3,
        abs_threshold: float = 32,
        rel_threshold: float = 1.5,
        max_blocks_per_worker: int = DEFAULT_MAX_BLOCKS_PER_WORKER,
    ) -> None:
        super().__init__(index, abs_threshold, rel_threshold)
        if not 0 <= cache_threshold <= 1:
            raise ValueError(f"cache_threshold must be in [0, 1], got {cache_threshold!r}")
        self.tree = tree if tree is not None else ApproxTree()
        self.tree.bound(max_blocks_per_worker)  # also on the node's tree: the option is this policy's
        self.cache_threshold = cache_threshold

    def choose(
        self, req: RouteRequest, candidates: Sequence[Candidate], now: float, rng: _random.Random
    ) -> Decision:
        healthy = _healthy(self.name, candidates)
        overlaps = self.tree.match(req.block_hashes, [c.worker for c in candidates], now)
        guarded = self._guard(req, candidates, healthy, overlaps, rng)
        if guarded is not None:
            return guarded
        n = len(req.block_hashes)
        best = max(overlaps[c.worker] for c in healthy)
        rate = best / n if n else 0.0
        if rate > self.cache_threshold:
            c = _pick_min(healthy, lambda c: (-overlaps[c.worker], c.load), rng)
            reason = (
                f"best match {best}/{n} blocks ({rate:.0%} > {self.cache_threshold:.0%}) "
                f"on {c.worker}, load {_fmt(c.load)}"
            )
        else:
            c = _least_load(healthy, rng)
            reason = (
                f"best match {best}/{n} blocks ({rate:.0%} <= {self.cache_threshold:.0%}) "
                f"-> least load {_fmt(c.load)} on {c.worker}"
            )
        scores = {w: (v / n if n else 0.0) for w, v in overlaps.items()}
        return _decision(
            self.name, req, candidates, c.worker, reason, overlaps, scores, "routed-prefix match rate"
        )

    def on_routed(self, req: RouteRequest, worker: str, now: float) -> None:
        self.tree.insert(worker, req.block_hashes, now)


class Precise(_Guarded):
    """KV-event-driven: overlap from the PrefixIndex, every cache tier
    credited by its weight (raised by the mesh's route hints, when given),
    weighed against load."""

    name = "precise"

    def __init__(
        self,
        index: PrefixIndex,
        overlap_weight: float = 4.0,
        abs_threshold: float = 32,
        rel_threshold: float = 1.5,
        delay_weight: float = 0.25,
        host_tier_weight: float = 0.9,
        disk_tier_weight: float = 0.5,
        external_tier_weight: float = 0.5,
        hint_overlap: HintOverlap | None = None,
    ) -> None:
        if index is None:
            raise ValueError("precise policy needs a PrefixIndex (index=...)")
        super().__init__(index, abs_threshold, rel_threshold)
        if overlap_weight < 0:
            raise ValueError(f"overlap_weight must be >= 0, got {overlap_weight!r}")
        if delay_weight < 0:
            raise ValueError(f"delay_weight must be >= 0, got {delay_weight!r}")
        for label, wt in (
            ("host_tier_weight", host_tier_weight),
            ("disk_tier_weight", disk_tier_weight),
            ("external_tier_weight", external_tier_weight),
        ):
            if not 0 <= wt <= 1:
                raise ValueError(f"{label} must be in [0, 1] (a fraction of a GPU block), got {wt!r}")
        self.overlap_weight = overlap_weight
        self.delay_weight = delay_weight
        # Credit of a block on each tier, in blocks.tiers order.
        self.tier_weights: tuple[float, ...] = (
            1.0,
            host_tier_weight,
            disk_tier_weight,
            external_tier_weight,
        )
        self.hint_overlap = hint_overlap
        self._index = index

    def _overlaps(
        self, req: RouteRequest, candidates: Sequence[Candidate], now: float
    ) -> dict[str, TierBlocks]:
        ov = self._index.match_tiers(req.block_hashes, [c.worker for c in candidates])
        if self.hint_overlap is not None:
            for w, v in self.hint_overlap(req.block_hashes, now).items():
                tb = ov.get(w)
                if tb is not None and v > tb[TIER_GPU]:
                    ov[w] = _with_gpu_prefix(tb, v)
        return ov

    def credit(self, tiers: TierBlocks) -> float:
        """The cached blocks a worker's per-tier blocks are worth (module docstring)."""
        g, h, d, e = tiers
        if not (h or d or e):
            return float(g)
        wt = self.tier_weights
        return g + wt[TIER_HOST] * h + wt[TIER_DISK] * d + wt[TIER_EXTERNAL] * e

    def choose(
        self, req: RouteRequest, candidates: Sequence[Candidate], now: float, rng: _random.Random
    ) -> Decision:
        healthy = _healthy(self.name, candidates)
        overlaps = self._overlaps(req, candidates, now)
        guarded = self._guard(req, candidates, healthy, overlaps, rng)
        if guarded is not None:
            return guarded
        bs = req.block_size
        prompt_blocks = req.prompt_tokens / bs
        w = self.overlap_weight
        costs: dict[str, float] = {}
        for c in candidates:
            busy = c.load_tokens if c.load_tokens is not None else c.load * req.prompt_tokens
            uncached = max(prompt_blocks - self.credit(overlaps[c.worker]), 0.0)
            costs[c.worker] = w * uncached * (1.0 + self.delay_weight * c.load) + busy / bs
        c = _pick_min(healthy, lambda c: (costs[c.worker], c.load), rng)
        n = len(req.block_hashes)
        tiers = overlaps[c.worker]
        reason = (
            f"best cost {_fmt(costs[c.worker])} on {c.worker}: "
            f"overlap {tiers[TIER_GPU]}/{n} blocks{_tiers_text(tiers)}, "
            f"load {_fmt(c.load)}"
        )
        wt = self.tier_weights
        return _decision(
            self.name,
            req,
            candidates,
            c.worker,
            reason,
            overlaps,
            costs,
            f"{_fmt(w)} x uncached prompt blocks x (1 + {_fmt(self.delay_weight)} x in-flight requests)"
            " + in-flight blocks (lowest wins); uncached = prompt blocks - GPU blocks"
            f" - {_fmt(wt[TIER_HOST])} x host - {_fmt(wt[TIER_DISK])} x disk"
            f" - {_fmt(wt[TIER_EXTERNAL])} x external blocks",
        )


def _with_gpu_prefix(tiers: TierBlocks, gpu: int) -> TierBlocks:
    """``tiers`` with its GPU prefix raised to ``gpu`` blocks (a route hint):
    the blocks now counted on the GPU are taken from the lower tiers,
    fastest first (the blocks right past a GPU prefix are usually its host
    copies), and the prefix is at least ``gpu`` blocks long."""
    out = [gpu]
    drop = gpu - tiers[TIER_GPU]
    for n in tiers[TIER_HOST:]:
        take = min(n, drop)
        out.append(n - take)
        drop -= take
    return tuple(out)


# -- registry ------------------------------------------------------------------

# Constructors by name, in the order the command line lists them. Typed
# loosely on purpose: the options come from the command line as a dict, and
# each constructor checks its own (a wrong name is a TypeError, turned into
# ValueError by make_policy).
_FACTORIES: dict[str, Callable[..., Policy]] = {
    RoundRobin.name: RoundRobin,
    RandomPolicy.name: RandomPolicy,
    ConsistentHash.name: ConsistentHash,
    LeastLoad.name: LeastLoad,
    PowerOfTwo.name: PowerOfTwo,
    ApproxCacheAware.name: ApproxCacheAware,
    Precise.name: Precise,
}
POLICY_NAMES: tuple[str, ...] = tuple(_FACTORIES)
_WIRED = ("self", "index", "tree", "hint_overlap")  # given by the node, not options


def policy_options() -> dict[str, dict[str, object]]:
    """Per policy, its tunable options and their defaults (read from the constructors)."""
    out: dict[str, dict[str, object]] = {}
    for name, factory in _FACTORIES.items():
        params = inspect.signature(factory).parameters.values()
        out[name] = {p.name: p.default for p in params if p.name not in _WIRED}
    return out


def make_policy(
    name: str,
    index: PrefixIndex | None = None,
    approx_tree: ApproxTree | None = None,
    hint_overlap: HintOverlap | None = None,
    **opts: object,
) -> Policy:
    """Build a policy by name. Unknown names and options raise ValueError.

    ``hint_overlap`` (the mesh's route hints) is used by precise only. The
    options of each policy are its constructor's keyword arguments
    (:func:`policy_options`).
    """
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ValueError(f"unknown policy {name!r}; valid: {', '.join(POLICY_NAMES)}")
    given: dict[str, object] = {"index": index}
    if name == ApproxCacheAware.name:
        given["tree"] = approx_tree
    elif name == Precise.name:
        if index is None:
            raise ValueError("precise policy needs a PrefixIndex (index=...)")
        given["hint_overlap"] = hint_overlap
    known = policy_options()[name]
    unknown = sorted(set(opts) - set(known))
    if unknown:
        takes = f"it takes: {', '.join(known)}" if known else "it takes none"
        raise ValueError(f"policy {name!r} has no option {', '.join(unknown)}; {takes}")
    try:
        return factory(**given, **opts)
    except TypeError as e:  # an option of the wrong type
        raise ValueError(f"bad options for policy {name!r}: {e}") from None
