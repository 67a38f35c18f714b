"""The simulated engine's prefix cache: vLLM-like hits, eviction and events."""

from __future__ import annotations

from typing import cast

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from engine_adapters.completion_request import Tenancy
from engine_adapters.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    KVEventBatch,
    decode_batch,
    encode_batch,
)
from engine_adapters.sim_engine.cache import NotEnoughBlocks, PrefixCache, engine_block_hash

BS = 4


def toks(n: int, start: int = 100) -> list[int]:
    return list(range(start, start + n))


def replay(events: list[KVEvent], into: set[int] | None = None) -> set[int]:
    s = set() if into is None else into
    for e in events:
        if isinstance(e, BlockStored):
            s.update(e.block_hashes)  # type: ignore[arg-type]  # ints here; the wire type also admits bytes
        elif isinstance(e, BlockRemoved):
            for h in e.block_hashes:
                assert h in s, "BlockRemoved for a block never stored"
                s.discard(h)
        else:
            s.clear()
    return s


def test_hash_is_unsigned_64_and_not_the_routers() -> None:
    values = [engine_block_hash(p, [p, p + 1]) for p in range(200)]
    assert all(0 <= v < 2**64 for v in values)
    assert any(v >= 2**63 for v in values)  # like vLLM's opaque ids
    # chained: the parent matters
    assert engine_block_hash(1, [5, 6]) != engine_block_hash(2, [5, 6])


def test_hash_seed_changes_ids() -> None:
    a = PrefixCache(8, BS, hash_seed=1).chain_hashes(toks(8))
    b = PrefixCache(8, BS, hash_seed=2).chain_hashes(toks(8))
    assert len(a) == 2 and not set(a) & set(b)


def test_miss_then_hit_and_stored_event_shape() -> None:
    c = PrefixCache(16, BS)
    prompt = toks(10)  # 2 full blocks + 2 tokens
    assert c.allocate("a", prompt, reserve_tokens=2) == (0, 3)
    stored = c.commit_full_blocks("a", prompt)
    assert len(stored) == 1  # consecutive new blocks: one event, like vLLM
    ev = stored[0]
    h = c.chain_hashes(prompt)
    assert ev.block_hashes == h and ev.parent_block_hash is None
    assert ev.token_ids == prompt[:8] and ev.block_size == BS
    # generated tokens fill block 3: cached too, parent = block 2
    more = c.commit_full_blocks("a", prompt + [7, 8])
    assert len(more) == 1 and more[0].parent_block_hash == h[1]
    assert more[0].token_ids == prompt[8:] + [7, 8]
    assert c.drain_events() == stored + more
    c.release("a")
    assert c.num_pinned() == 0 and c.num_cached() == 3
    # second request with the same prefix: hits its full blocks
    assert c.lookup(prompt + [7, 8, 9]) == c.chain_hashes(prompt + [7, 8])
    hit, new = c.allocate("b", prompt + [7, 8, 9], reserve_tokens=0)
    assert (hit, new) == (3, 1)
    assert c.drain_events() == []  # hits are not re-stored


def test_last_prompt_token_is_never_a_hit() -> None:
    c = PrefixCache(16, BS)
    p = toks(8)
    c.allocate("a", p)
    c.commit_full_blocks("a", p)
    c.release("a")
    # whole prompt cached: vLLM still recomputes the last token, so only 1 block hits
    assert c.allocate("b", p) == (1, 1)


def test_lru_eviction_emits_removed_and_keeps_pinned() -> None:
    c = PrefixCache(4, BS)
    a, b = toks(8, 100), toks(8, 200)
    c.allocate("a", a)
    c.commit_full_blocks("a", a)
    c.release("a")
    c.allocate("b", b)
    c.commit_full_blocks("b", b)  # b pinned: 4 blocks in use
    c.drain_events()
    with pytest.raises(NotEnoughBlocks):
        c.allocate("x", toks(12, 300))  # a's 2 + 0 free < 3
    assert c.drain_events() == [] and c.num_cached() == 4  # nothing changed
    c.allocate("c", toks(8, 300))  # evicts a's two blocks (b is pinned)
    ev = c.drain_events()
    assert [type(e) for e in ev] == [BlockRemoved, BlockRemoved]
    # tail first: a's second block is evicted before its first
    ha = c.chain_hashes(a)
    assert [e.block_hashes[0] for e in ev if isinstance(e, BlockRemoved)] == [ha[1], ha[0]]
    assert set(c.chain_hashes(b)) <= c.cached_hashes()


def test_hit_blocks_are_pinned_against_eviction() -> None:
    c = PrefixCache(3, BS)
    p = toks(9)
    c.allocate("a", p)
    c.commit_full_blocks("a", p)
    c.release("a")  # 2 cached unpinned blocks + 1 free
    assert c.allocate("b", p) == (2, 1)  # pins both, takes the free one
    with pytest.raises(NotEnoughBlocks):
        c.allocate("c", toks(4, 500))
    assert c.num_cached() == 2


def test_duplicate_block_is_shared_not_stored_twice() -> None:
    c = PrefixCache(16, BS)
    p = toks(9)
    c.allocate("a", p)
    c.allocate("b", p)  # concurrently: both miss
    s1 = c.commit_full_blocks("a", p)
    s2 = c.commit_full_blocks("b", p)
    assert len(s1) == 1 and s2 == []
    assert c.request_blocks("a")[:2] == c.request_blocks("b")[:2]
    c.release("a")
    c.release("b")
    assert replay(c.drain_events()) == c.cached_hashes()
    assert c.num_pinned() == 0


def test_clear_emits_all_cleared_and_stops_caching_inflight() -> None:
    c = PrefixCache(16, BS)
    p = toks(8)
    c.allocate("a", p, reserve_tokens=8)
    c.commit_full_blocks("a", p)
    ev = c.clear()
    assert isinstance(ev, AllBlocksCleared)
    assert c.num_cached() == 0 and c.snapshot() == []
    assert c.commit_full_blocks("a", p + toks(4, 900)) == []
    c.release("a")
    assert c.num_pinned() == 0 and replay(c.drain_events()) == set()


def test_snapshot_lists_parent_and_tokens() -> None:
    c = PrefixCache(16, BS)
    p = toks(8)
    c.allocate("a", p)
    c.commit_full_blocks("a", p)
    h = c.chain_hashes(p)
    snap = sorted(c.snapshot(), key=lambda d: d["parent"] is not None)
    base = {"lora_name": None, "cache_salt": None}
    assert snap == [
        {"hash": h[0], "parent": None, "tokens": p[:4], **base},
        {"hash": h[1], "parent": h[0], "tokens": p[4:], **base},
    ]


def test_events_survive_the_wire_format() -> None:
    c = PrefixCache(2, BS)
    c.allocate("a", toks(8))
    c.commit_full_blocks("a", toks(8))
    c.release("a")
    c.allocate("b", toks(8, 50))
    c.clear()
    events = c.drain_events()
    for fmt in ("map", "array"):
        got = decode_batch(encode_batch(KVEventBatch(ts=1.0, events=events), fmt))
        assert [type(e) for e in got.events] == [BlockStored, BlockRemoved, BlockRemoved, AllBlocksCleared]
        first = got.events[0]
        assert isinstance(first, BlockStored) and first.block_hashes == c.chain_hashes(toks(8))


# --- properties ---------------------------------------------------------------------

NUM_BLOCKS = 10
_prefixes = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9], [5, 5, 5, 5]]


def brute_force_prefix(snapshot: list[dict[str, object]], tokens: list[int]) -> int:
    """Longest cached prefix, from (parent, tokens) links only (no hash function)."""
    by_link = {(d["parent"], tuple(cast(list[int], d["tokens"]))): d["hash"] for d in snapshot}
    parent: object = None
    n = 0
    for i in range(len(tokens) // BS):
        h = by_link.get((parent, tuple(tokens[i * BS : (i + 1) * BS])))
        if h is None:
            break
        parent, n = h, n + 1
    return n


class CacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.cache = PrefixCache(NUM_BLOCKS, BS, hash_seed=7)
        self.seen: set[int] = set()  # hashes per the event stream so far
        self.reqs: dict[str, tuple[list[int], int]] = {}  # id -> (tokens so far, capacity)
        self.n = 0

    @rule(
        prefix=st.sampled_from(_prefixes),
        tail=st.lists(st.integers(0, 3), max_size=9),
        reserve=st.integers(0, 8),
    )
    def allocate(self, prefix: list[int], tail: list[int], reserve: int) -> None:
        prompt = prefix + tail
        rid = f"r{self.n}"
        self.n += 1
        expect_hit = min(brute_force_prefix(self.cache.snapshot(), prompt), (len(prompt) - 1) // BS)
        before = self.cache.stats()
        try:
            hit, new = self.cache.allocate(rid, prompt, reserve_tokens=reserve)
        except NotEnoughBlocks:
            assert self.cache.stats() == before
            return
        assert hit == expect_hit  # the prefix hit is the longest cached prefix
        assert hit + new == self.cache.blocks_needed(len(prompt) + reserve)
        self.reqs[rid] = (prompt, (hit + new) * BS)
        self.cache.commit_full_blocks(rid, prompt)

    @rule(prefix=st.sampled_from(_prefixes), tail=st.lists(st.integers(0, 3), max_size=5))
    def allocate_twins(self, prefix: list[int], tail: list[int]) -> None:
        """Two requests computing the same blocks at once (both miss)."""
        prompt = prefix + tail
        ids = [f"r{self.n}", f"r{self.n + 1}"]
        self.n += 2
        for rid in ids:
            try:
                hit, new = self.cache.allocate(rid, prompt)
            except NotEnoughBlocks:
                continue
            self.reqs[rid] = (prompt, (hit + new) * BS)
        for rid in ids:
            if rid in self.reqs:
                self.cache.commit_full_blocks(rid, prompt)

    @precondition(lambda self: self.reqs)
    @rule(data=st.data(), k=st.integers(1, 6))
    def generate(self, data: st.DataObject, k: int) -> None:
        rid = data.draw(st.sampled_from(sorted(self.reqs)))
        tokens, cap = self.reqs[rid]
        extra = data.draw(st.lists(st.integers(0, 3), min_size=k, max_size=k))
        tokens = (tokens + extra)[:cap]
        self.reqs[rid] = (tokens, cap)
        self.cache.commit_full_blocks(rid, tokens)

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.reqs)))
        del self.reqs[rid]
        self.cache.release(rid)

    @rule()
    def clear(self) -> None:
        self.cache.clear()

    @invariant()
    def events_replay_to_cache_contents(self) -> None:
        replay(self.cache.drain_events(), self.seen)
        assert self.seen == self.cache.cached_hashes()

    @invariant()
    def block_accounting(self) -> None:
        st_ = self.cache.stats()
        assert 0 <= st_.pinned <= NUM_BLOCKS
        assert st_.pinned + st_.free_uncached + st_.evictable == NUM_BLOCKS
        held = {b for rid in self.reqs for b in self.cache.request_blocks(rid)}
        assert len(held) == st_.pinned  # every pinned block belongs to a live request

    @invariant()
    def pinned_blocks_never_evicted(self) -> None:
        cached = self.cache.cached_hashes()
        snap = {d["hash"]: d for d in self.cache.snapshot()}
        for rid, (tokens, _) in self.reqs.items():
            # A live request's committed full blocks are all still cached
            # (unless a clear() happened while it ran).
            if self.cache._reqs[rid].caching:
                for h in self.cache.chain_hashes(tokens):
                    assert h in cached
                    assert snap[h]["tokens"] is not None

    @invariant()
    def lookup_is_longest_cached_prefix(self) -> None:
        snap = self.cache.snapshot()
        for p in _prefixes:
            assert len(self.cache.lookup(p + [0, 1, 2, 3])) == brute_force_prefix(snap, p + [0, 1, 2, 3])


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = settings(
    max_examples=150,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_snapshot_router_hashes_are_the_routers_chain_of_each_cached_prefix() -> None:
    from blocks.hashing import block_hashes, root_seed
    from engine_adapters.sim_engine.cache import snapshot_router_hashes

    c = PrefixCache(num_gpu_blocks=64, block_size=4)
    a = list(range(100, 120))  # 5 blocks
    b = a[:8] + list(range(500, 512))  # shares 2 blocks with a, then 3 of its own
    for rid, toks in (("a", a), ("b", b)):
        c.allocate(rid, toks)
        c.commit_full_blocks(rid, toks)
        c.release(rid)
    seed = root_seed("m")
    want = set(block_hashes(a, 4, seed)) | set(block_hashes(b, 4, seed))
    assert len(want) == 8
    assert snapshot_router_hashes(c.snapshot(), "m") == want
    assert snapshot_router_hashes(c.snapshot(), "other-model").isdisjoint(want)


# --- tenancy: LoRA adapters and cache salts ---------------------------------------------


def _cache_and_commit(c: PrefixCache, rid: str, tokens: list[int], t: Tenancy) -> list[BlockStored]:
    c.allocate(rid, tokens, tenancy=t)
    stored = c.commit_full_blocks(rid, tokens)
    c.release(rid)
    return stored


def test_blocks_are_shared_only_within_one_tenancy() -> None:
    c = PrefixCache(64, BS, lora_ids={"sql": 1})
    p = toks(12)
    a, b, lora = Tenancy(cache_salt="a"), Tenancy(cache_salt="b"), Tenancy(lora_name="sql")
    _cache_and_commit(c, "a1", p, a)
    # tenant A's second request hits; B, the unsalted base model and the adapter do not
    assert c.allocate("a2", p + [1], tenancy=a)[0] == 3
    assert c.allocate("b", p + [1], tenancy=b)[0] == 0
    assert c.allocate("plain", p + [1])[0] == 0
    assert c.allocate("lora", p + [1], tenancy=lora)[0] == 0
    assert len({c.chain_hashes(p, tenancy=t)[0] for t in (a, b, lora, Tenancy())}) == 4
    assert c.lookup(p, tenancy=a) == c.chain_hashes(p, tenancy=a)
    assert c.lookup(p, tenancy=b) == []


def test_events_carry_vllm_untagged_extra_keys_and_the_lora_name() -> None:
    c = PrefixCache(64, BS, lora_ids={"sql": 7})
    p = toks(12)
    (salted,) = _cache_and_commit(c, "s", p, Tenancy(cache_salt="tenant-1"))
    assert salted.extra_keys == [("tenant-1",), None, None]
    assert salted.lora_name is None and salted.lora_id is None
    (both,) = _cache_and_commit(c, "sl", p, Tenancy(lora_name="sql", cache_salt="tenant-1"))
    assert both.extra_keys == [("sql", "tenant-1"), ("sql",), ("sql",)]
    assert both.lora_name == "sql" and both.lora_id == 7
    # a run that starts past the first block has no salt in it
    q = toks(4) + toks(8, start=900)
    c.allocate("part", q[:4] + [0], tenancy=Tenancy(lora_name="sql"))
    (first,) = c.commit_full_blocks("part", q[:4] + [0])
    c.release("part")
    (rest,) = _cache_and_commit(c, "rest", q, Tenancy(lora_name="sql"))
    assert first.extra_keys == [("sql",)] and rest.extra_keys == [("sql",), ("sql",)]
    assert rest.parent_block_hash == first.block_hashes[0]
    (plain,) = _cache_and_commit(c, "p", p, Tenancy())
    assert plain.extra_keys is None and plain.lora_name is None


def test_the_router_maps_salted_and_adapter_blocks_to_the_hashes_it_predicts() -> None:
    from blocks.hashing import block_hashes, root_seed
    from engine_adapters.block_mapper import BlockMapper
    from engine_adapters.sim_engine.cache import snapshot_router_hashes

    c = PrefixCache(64, BS, lora_ids={"sql": 1})
    p = toks(12)
    events: list[KVEvent] = []
    tenancies = [Tenancy(cache_salt="a"), Tenancy(lora_name="sql", cache_salt="a"), Tenancy(lora_name="sql")]
    for i, t in enumerate(tenancies):
        events += _cache_and_commit(c, f"r{i}", p, t)
    m = BlockMapper("m", "w")
    m.map_batch(decode_batch(encode_batch(KVEventBatch(ts=0.0, events=events))).events, 0)
    want = set()
    for t in tenancies:
        want |= set(block_hashes(p, BS, root_seed("m", t.lora_name or None, t.cache_salt or None)))
    assert m.live_router_hashes() == want == snapshot_router_hashes(c.snapshot(), "m")
    assert m.live_router_hashes().isdisjoint(block_hashes(p, BS, root_seed("m")))


# --- the host tier ------------------------------------------------------------------------------


def replay_tiers(events: list[KVEvent], into: dict[str, set[int]]) -> dict[str, set[int]]:
    """Per medium, the hashes the event stream says are live (set semantics on each)."""
    for e in events:
        if isinstance(e, BlockStored):
            into.setdefault(e.medium or "GPU", set()).update(e.block_hashes)  # type: ignore[arg-type]  # ints here
        elif isinstance(e, BlockRemoved):
            held = into.setdefault(e.medium or "GPU", set())
            for h in e.block_hashes:
                assert h in held, f"BlockRemoved on {e.medium} for a block never stored there"
                held.discard(h)
        else:
            into.clear()
    return into


def test_an_evicted_block_moves_to_the_host_tier_and_is_loaded_back() -> None:
    c = PrefixCache(4, BS, num_host_blocks=8)
    a = toks(12)
    _cache_and_commit(c, "a", a, Tenancy())
    c.drain_events()
    ha = c.chain_hashes(a)
    c.allocate("b", toks(12, 500))  # one free block, and a's tail two are evicted (tail first)
    ev = c.drain_events()
    assert [(type(e).__name__, e.medium, e.block_hashes) for e in ev] == [
        ("BlockStored", "CPU", [ha[2]]),  # copied to the host tier first
        ("BlockRemoved", "GPU", [ha[2]]),
        ("BlockStored", "CPU", [ha[1]]),
        ("BlockRemoved", "GPU", [ha[1]]),
    ]
    stored = ev[0]
    assert isinstance(stored, BlockStored) and stored.parent_block_hash == ha[1]
    assert stored.token_ids == a[8:12] and stored.block_size == BS
    assert c.host_hashes() == {ha[1], ha[2]} and c.cached_hashes() >= {ha[0]}
    c.release("b")
    # a again: block 0 from the GPU, blocks 1-2 loaded from the host tier, not recomputed
    hit, new = c.allocate("a2", a + [1])
    assert (hit, new, c.host_hit_blocks("a2")) == (1, 3, 2)
    loaded = [e for e in c.drain_events() if isinstance(e, BlockStored) and e.medium == "GPU"]
    assert [e.block_hashes for e in loaded] == [ha[1:]] and loaded[0].parent_block_hash == ha[0]
    assert c.cached_hashes() >= set(ha) and c.host_hashes() >= {ha[1], ha[2]}  # the copies stay


def test_the_host_tier_is_bounded_lru_and_cleared_with_the_pool() -> None:
    c = PrefixCache(2, BS, num_host_blocks=2)
    for i in range(4):  # four one-block prompts through a two-block pool
        _cache_and_commit(c, f"r{i}", toks(4, 100 * (i + 1)) + [0], Tenancy())
    c.allocate("x", toks(8, 9000))  # evicts the last two to the host tier
    seen = replay_tiers(c.drain_events(), {})
    st_ = c.stats()
    assert st_.host_cached == 2 and st_.host_evictions == 2 and st_.host_blocks == 2
    assert seen["CPU"] == c.host_hashes() and seen["GPU"] == c.cached_hashes()
    c.release("x")
    c.clear()
    assert c.host_hashes() == set() and replay_tiers(c.drain_events(), seen) == {}


def test_without_a_host_tier_nothing_is_offloaded() -> None:
    c = PrefixCache(2, BS)
    _cache_and_commit(c, "a", toks(8), Tenancy())
    c.allocate("b", toks(8, 500))
    assert {e.medium for e in c.drain_events() if isinstance(e, (BlockStored, BlockRemoved))} == {"GPU"}
    assert c.host_hashes() == set() and c.stats().host_blocks == 0


class HostTierMachine(CacheMachine):
    """The same rules on a cache with a small host tier: every event stream
    replays, medium by medium, to the GPU pool's and the host tier's
    contents, and a request is never short of blocks for what it loads."""

    def __init__(self) -> None:
        super().__init__()
        self.cache = PrefixCache(NUM_BLOCKS, BS, hash_seed=7, num_host_blocks=4)
        self.tiers: dict[str, set[int]] = {}

    @invariant()
    def events_replay_to_cache_contents(self) -> None:
        replay_tiers(self.cache.drain_events(), self.tiers)
        assert self.tiers.get("GPU", set()) == self.cache.cached_hashes()
        assert self.tiers.get("CPU", set()) == self.cache.host_hashes()
        assert len(self.cache.host_hashes()) <= 4


TestHostTierMachine = HostTierMachine.TestCase
TestHostTierMachine.settings = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_the_router_indexes_the_host_tier_the_engine_holds() -> None:
    from blocks.tiers import TIER_GPU, TIER_HOST
    from engine_adapters.block_mapper import BlockMapper
    from engine_adapters.sim_engine.cache import snapshot_router_hashes

    c = PrefixCache(4, BS, num_host_blocks=16)
    events: list[KVEvent] = []
    for i in range(6):
        c.allocate(f"r{i}", toks(12, 1000 * (i + 1)) + [0], tenancy=Tenancy(cache_salt="t"))
        c.commit_full_blocks(f"r{i}", toks(12, 1000 * (i + 1)))
        c.release(f"r{i}")
        events += c.drain_events()
    m = BlockMapper("m", "w", block_size=BS)
    m.map_batch(decode_batch(encode_batch(KVEventBatch(ts=0.0, events=events))).events, 0)
    both = c.snapshot() + [r for r in c.host_snapshot() if r["hash"] not in c.cached_hashes()]
    gpu = snapshot_router_hashes(c.snapshot(), "m")
    host = snapshot_router_hashes(both, "m", of=c.host_hashes())  # parents may be on the other tier
    assert c.host_hashes() and m.stats.unknown_parent == 0
    assert m.live_by_tier() == {TIER_GPU: gpu, TIER_HOST: host}
