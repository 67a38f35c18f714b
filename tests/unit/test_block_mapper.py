"""BlockMapper: engine block hashes -> router block hashes."""

from __future__ import annotations

import random
from collections.abc import Iterator

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blocks.block_map import BlockMap
from blocks.delta import OP_CLEAR, OP_REMOVE, OP_STORE, EngineHash, KvDelta, KvOp
from blocks.hashing import block_hashes, root_seed
from blocks.tiers import TIER_DISK, TIER_GPU, TIER_HOST
from engine_adapters import native
from engine_adapters.block_mapper import BlockMapper, tenancy
from engine_adapters.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, SkippedEvent


# Every test here runs against both implementations: the pure-Python
# reference and the native one (engine_adapters/native.py), skipped loudly
# only when the native module is not built.
@pytest.fixture(scope="module", autouse=True, params=["python", "native"])
def implementation(request: pytest.FixtureRequest) -> Iterator[str]:
    global BlockMapper
    if request.param == "native" and not native.NATIVE_BUILT:
        pytest.skip(f"NATIVE PATH NOT TESTED: {native.NOT_BUILT_REASON}")
    saved = BlockMapper
    if request.param == "native":
        BlockMapper = native.NativeBlockMapper
    yield request.param
    BlockMapper = saved


MODEL = "llama-test"
BS = 4


def _stored(hashes: list, parent, tokens: list[int], **kw) -> BlockStored:
    return BlockStored(hashes, parent, tokens, BS, **kw)


def test_mapping_equals_router_hashing_of_the_same_tokens() -> None:
    tokens = list(range(100, 124))  # 6 blocks
    expected = block_hashes(tokens, BS, root_seed(MODEL))
    m = BlockMapper(MODEL, "e1")
    # The engine stores the prompt in two events: 2 blocks, then 4 chained to them.
    d1 = m.map_batch([_stored([2**64 - 1, b"\x01" * 32], None, tokens[:8])], seq=0)
    d2 = m.map_batch([_stored([-3, 7, 8, 9], b"\x01" * 32, tokens[8:])], seq=1)
    assert d1.worker == "e1" and d1.seq == 0
    assert d1.ops == [KvOp(OP_STORE, expected[:2], [2**64 - 1, b"\x01" * 32])]
    assert d2.ops == [KvOp(OP_STORE, expected[2:], [-3, 7, 8, 9])]
    assert m.router_hash(9) == expected[-1]
    assert m.live_router_hashes() == set(expected)


def test_lora_and_cache_salt_change_the_root() -> None:
    tokens = list(range(8))

    def mapped(ev: BlockStored) -> list[int]:
        return BlockMapper(MODEL).map_batch([ev], 0).ops[0].hashes

    plain = mapped(_stored([1, 2], None, tokens))
    lora = mapped(_stored([3, 4], None, tokens, lora_name="a", extra_keys=[["a"], ["a"]]))
    # vLLM 0.33: the untagged salt in the first block's extra keys; SGLang: a field
    salted_vllm = mapped(_stored([5, 6], None, tokens, extra_keys=[["s"], None]))
    salted_sgl = mapped(_stored([7, 8], None, tokens, cache_salt="s"))
    both = mapped(_stored([9, 10], None, tokens, lora_name="a", extra_keys=[["a", "s"], ["a"]]))
    assert plain == block_hashes(tokens, BS, root_seed(MODEL))
    assert lora == block_hashes(tokens, BS, root_seed(MODEL, "a"))
    assert salted_vllm == salted_sgl == block_hashes(tokens, BS, root_seed(MODEL, None, "s"))
    assert both == block_hashes(tokens, BS, root_seed(MODEL, "a", "s"))
    assert len({plain[0], lora[0], salted_vllm[0], both[0]}) == 4


@pytest.mark.parametrize(
    "fields,want",
    [
        # vLLM 0.33, untagged (what every release publishes)
        ({"extra_keys": [None, None]}, (None, None)),
        ({"extra_keys": [["tenant-1"], None]}, (None, "tenant-1")),
        ({"lora_name": "sql", "extra_keys": [["sql"], ["sql"]]}, ("sql", None)),
        ({"lora_name": "sql", "extra_keys": [["sql", "tenant-1"], ["sql"]]}, ("sql", "tenant-1")),
        ({"lora_name": "x", "extra_keys": [["x", "x"]]}, ("x", "x")),  # a salt equal to the adapter name
        ({"extra_keys": [[["img-0", 1], "tenant-1"], [["img-0", -3]]]}, (None, "tenant-1")),  # multimodal
        ({"extra_keys": [[b"\x01" * 32, "tenant-1"]]}, (None, "tenant-1")),  # prompt-embeds digest
        ({"lora_name": "sql", "extra_keys": [["sql", ["img-0", 0]]]}, ("sql", None)),
        # tagged keys, as vLLM hashes them, and the tagged map
        ({"lora_name": "sql", "extra_keys": [[["lora", "sql", "/p"], ["cache_salt", "t"]]]}, ("sql", "t")),
        ({"extra_keys": [[["mm", "img-0", 1]]]}, (None, None)),
        ({"extra_keys": [[{"type": "cache_salt", "salt": "t"}], None]}, (None, "t")),
        # SGLang's fields
        ({"cache_salt": "t", "lora_name": "sql"}, ("sql", "t")),
        ({"lora_name": ""}, (None, None)),
    ],
)
def test_tenancy_in_every_form_the_engines_publish(fields: dict, want: tuple) -> None:
    assert tenancy(_stored([1], None, [1, 2, 3, 4], **fields)) == want


def test_a_skipped_event_is_counted_and_the_rest_of_the_batch_applies() -> None:
    tokens = list(range(8))
    m = BlockMapper(MODEL, "w")
    d = m.map_batch(
        [
            SkippedEvent(0, "no_token_ids", "placeholder"),
            _stored([1, 2], None, tokens),
            SkippedEvent(2, "undecodable", "?"),
            SkippedEvent(3, "no_token_ids", "placeholder"),
        ],
        seq=5,
    )
    assert d.ops == [KvOp(OP_STORE, block_hashes(tokens, BS, root_seed(MODEL)), [1, 2])]
    assert m.stats.skipped_events == 3
    assert m.stats.skipped_by_reason == {"no_token_ids": 2, "undecodable": 1}


def test_unknown_parent_blocks_are_skipped_and_counted() -> None:
    m = BlockMapper(MODEL)
    d = m.map_batch([_stored([10, 11], 999, list(range(8)))], 0)
    assert d.ops == []
    assert m.stats.unknown_parent == 2
    assert len(m) == 0
    # children of skipped blocks are unplaceable too
    d = m.map_batch([_stored([12], 11, list(range(4)))], 1)
    assert d.ops == [] and m.stats.unknown_parent == 3


def test_remove_forgets_and_unknown_removals_are_ignored() -> None:
    tokens = list(range(12))
    expected = block_hashes(tokens, BS, root_seed(MODEL))
    m = BlockMapper(MODEL)
    m.map_batch([_stored([1, 2, 3], None, tokens)], 0)
    d = m.map_batch([BlockRemoved([3, 404, 2])], 1)
    assert d.ops == [KvOp(OP_REMOVE, [expected[2], expected[1]], [3, 2])]  # 404: unknown
    assert m.stats.unknown_removed == 1 and m.stats.removed == 2
    assert len(m) == 1
    # a child of an evicted block cannot be placed any more
    assert m.map_batch([_stored([4], 3, list(range(4)))], 2).ops == []


def test_ops_keep_event_order_and_clear_drops_everything() -> None:
    t = list(range(8))
    h = block_hashes(t, BS, root_seed(MODEL))
    m = BlockMapper(MODEL)
    d = m.map_batch(
        [
            _stored([1], None, t[:4]),
            _stored([2], 1, t[4:]),  # merged with the previous store
            BlockRemoved([2]),
            AllBlocksCleared(),
            _stored([1], None, t[:4]),
        ],
        seq=5,
    )
    assert d.ops == [
        KvOp(OP_STORE, [h[0], h[1]], [1, 2]),
        KvOp(OP_REMOVE, [h[1]], [2]),
        KvOp(OP_CLEAR, []),
        KvOp(OP_STORE, [h[0]], [1]),
    ]
    assert m.stats.cleared == 1 and len(m) == 1


def test_router_hash_shared_by_two_engine_blocks_is_removed_with_the_last() -> None:
    # vLLM hashes extra keys (e.g. multimodal inputs) the router does not see:
    # two engine blocks, same tokens, same router hash.
    t = list(range(4))
    h = block_hashes(t, BS, root_seed(MODEL))[0]
    m = BlockMapper(MODEL)
    assert m.map_batch([_stored([1], None, t)], 0).ops == [KvOp(OP_STORE, [h], [1])]
    # already live for the router; the binding is still logged (for a new owner)
    assert m.map_batch([_stored([2], None, t)], 1).ops == [KvOp(OP_STORE, [h], [2])]
    assert m.map_batch([_stored([2], None, t)], 2).ops == []  # stored again: nothing new
    assert m.map_batch([BlockRemoved([1])], 3).ops == [KvOp(OP_REMOVE, [], [1])]
    assert m.map_batch([BlockRemoved([2])], 4).ops == [KvOp(OP_REMOVE, [h], [2])]
    assert m.live_router_hashes() == set()


def test_engine_hash_reused_for_other_tokens_replaces_the_old_block() -> None:
    a, b = [1, 1, 1, 1], [2, 2, 2, 2]
    ha = block_hashes(a, BS, root_seed(MODEL))[0]
    hb = block_hashes(b, BS, root_seed(MODEL))[0]
    m = BlockMapper(MODEL)
    m.map_batch([_stored([7], None, a)], 0)
    d = m.map_batch([_stored([7], None, b)], 1)
    assert d.ops == [KvOp(OP_REMOVE, [ha], [7]), KvOp(OP_STORE, [hb], [7])]
    assert m.live_router_hashes() == {hb}
    assert BlockMap.from_pairs([(7, ha)]) != m.block_map
    replayed = BlockMap.from_pairs([(7, ha)])
    for op in d.ops:
        replayed.apply(op)
    assert replayed == m.block_map


def test_invalid_token_ids_are_skipped_not_raised() -> None:
    m = BlockMapper(MODEL)
    d = m.map_batch([_stored([1], None, [-1, 2, 3, 4]), _stored([2], None, [1, 2, 3, 4])], 0)
    assert d.ops == [KvOp(OP_STORE, block_hashes([1, 2, 3, 4], BS, root_seed(MODEL)), [2])]
    assert m.stats.invalid_tokens == 1


def test_export_restore_hands_the_mapping_over() -> None:
    t = list(range(8))
    a = BlockMapper(MODEL)
    a.map_batch([_stored([1, b"x"], None, t)], 0)
    b = BlockMapper(MODEL)
    b.restore(a.export())
    # the new owner can place children and removals of blocks it never saw stored
    child = b.map_batch([_stored([3], b"x", list(range(4)))], 1)
    assert child.ops and b.stats.unknown_parent == 0
    rh1 = a.router_hash(1)
    assert rh1 is not None
    assert b.map_batch([BlockRemoved([1])], 2).ops == [KvOp(OP_REMOVE, [rh1], [1])]
    c = BlockMapper.from_pairs(MODEL, "w", a.export())
    assert c.worker == "w" and c.block_map == a.block_map and c.live_router_hashes() == a.live_router_hashes()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), steps=st.integers(1, 60))
def test_random_cache_churn_matches_router_hashing(seed: int, steps: int) -> None:
    """A toy engine cache (prefix tree, random eviction of leaves): the mapped
    live set always equals the router hashes of the cached token prefixes,
    and the mapper's memory equals the number of live blocks."""
    rng = random.Random(seed)
    m = BlockMapper(MODEL)
    index: set[int] = set()
    # engine state: engine hash -> (parent engine hash, router hash); children count
    cached: dict[int, tuple[int | None, int]] = {}
    by_prefix: dict[tuple[int, ...], int] = {}
    children: dict[int, int] = {}
    next_hash = 2**63  # engine hashes above 2**63
    for s in range(steps):
        events: list = []
        if rng.random() < 0.6 or not cached:
            n_blocks = rng.randint(1, 5)
            tokens = [rng.randint(0, 3) for _ in range(n_blocks * BS)]  # small alphabet: shared prefixes
            parent: int | None = None
            new_hashes: list[EngineHash] = []
            new_tokens: list[int] = []
            first_parent: int | None = None
            for i in range(n_blocks):
                prefix = tuple(tokens[: (i + 1) * BS])
                eh = by_prefix.get(prefix)
                if eh is not None and eh in cached and not new_hashes:
                    parent = eh
                    continue
                if not new_hashes:
                    first_parent = parent
                eh = next_hash
                next_hash += 1
                by_prefix[prefix] = eh
                rh = block_hashes(list(prefix), BS, root_seed(MODEL))[-1]
                cached[eh] = (parent, rh)
                if parent is not None:
                    children[parent] = children.get(parent, 0) + 1
                new_hashes.append(eh)
                new_tokens.extend(prefix[-BS:])
                parent = eh
            if new_hashes:
                events.append(BlockStored(new_hashes, first_parent, new_tokens, BS))
        else:
            leaves = [h for h in cached if not children.get(h)]
            gone = rng.sample(leaves, k=min(len(leaves), rng.randint(1, 3)))
            for h in gone:
                p, _ = cached.pop(h)
                if p is not None:
                    children[p] -= 1
            removed: list[EngineHash] = list(gone)
            events.append(BlockRemoved(removed))
        delta = m.map_batch(events, s)
        for op in delta.ops:
            if op.kind == OP_STORE:
                index.update(op.hashes)
            elif op.kind == OP_REMOVE:
                index.difference_update(op.hashes)
        want = {rh for _, rh in cached.values()}
        assert index == want == m.live_router_hashes()
        assert len(m) == len(cached)
    assert m.stats.unknown_parent == 0 and m.stats.unknown_removed == 0


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32), steps=st.integers(1, 40))
def test_deltas_carry_the_mapping_exactly(seed: int, steps: int) -> None:
    """Replaying a mapper's deltas (through their wire encoding) onto an empty
    BlockMap gives the mapper's own map, and the router hashes in the ops give
    its live set: shared router hashes, engine-hash reuse, unknown removals,
    clears and several events per batch included."""
    rng = random.Random(seed)
    m = BlockMapper(MODEL, "w")
    replayed = BlockMap()
    lean = BlockMap(refs=False)  # as the mesh log keeps it
    index: set[int] = set()
    pool: list = [rng.getrandbits(64) for _ in range(12)]
    pool += [rng.randbytes(32) for _ in range(4)]
    for s in range(steps):
        events: list = []
        for _ in range(rng.randint(1, 4)):
            r = rng.random()
            live = list(m.block_map.to_router)
            if r < 0.55:
                n = rng.randint(1, 3)
                parent = rng.choice(live) if live and rng.random() < 0.5 else None
                tokens = [rng.randint(0, 2) for _ in range(n * BS)]  # tiny alphabet: shared router hashes
                events.append(BlockStored(rng.sample(pool, n), parent, tokens, BS))
            elif r < 0.9:
                gone = rng.sample(live, min(len(live), rng.randint(1, 3))) + [rng.choice(pool)]
                events.append(BlockRemoved(gone))
            else:
                events.append(AllBlocksCleared())
        d = msgspec.msgpack.decode(msgspec.msgpack.encode(m.map_batch(events, s)), type=KvDelta)
        assert isinstance(d, KvDelta)
        for op in d.ops:
            replayed.apply(op)
            lean.apply(op)
            if op.kind == OP_STORE:
                assert len(op.ehashes) == len(op.hashes)
                index.update(op.hashes)
            elif op.kind == OP_REMOVE:
                index.difference_update(op.hashes)
            else:
                assert op.ehashes == [] and op.hashes == []
                index.clear()
        assert replayed == m.block_map
        assert replayed.refs == m.block_map.refs == lean.counts()
        assert lean == m.block_map and lean.live() == m.live_router_hashes()
        assert index == m.live_router_hashes() == set(replayed.to_router.values())
        assert replayed.ebytes == m.block_map.ebytes == lean.ebytes  # computed == tracked
    # the pairs restore the same state
    assert BlockMapper.from_pairs(MODEL, "w", replayed.pairs()).block_map.refs == m.block_map.refs


def test_block_map_without_engine_hashes_names_blocks_by_router_hash() -> None:
    # Ops written before ehashes existed (or without engine hashes): pair (h, h).
    bm = BlockMap()
    bm.apply(KvOp(OP_STORE, [5, 6]))
    bm.apply(KvOp(OP_STORE, [5]))  # re-store: set semantics
    bm.apply(KvOp(OP_REMOVE, [6, 7]))
    assert bm.pairs() == [(5, 5)] and bm.live() == {5} and bm.ebytes == 0
    assert bm.snapshot_ops() == [KvOp(OP_CLEAR, []), KvOp(OP_STORE, [5])]
    bm.apply(KvOp(OP_STORE, [9], [b"e" * 32]))
    assert bm.ebytes == 34
    assert bm.snapshot_ops() == [KvOp(OP_CLEAR, []), KvOp(OP_STORE, [5]), KvOp(OP_STORE, [9], [b"e" * 32])]


# --- cache tiers --------------------------------------------------------------


def test_each_tier_binds_and_forgets_its_own_copy() -> None:
    tokens = list(range(12))
    rh = block_hashes(tokens, BS, root_seed(MODEL))
    m = BlockMapper(MODEL, "w")
    d = m.map_batch(
        [
            _stored([1, 2, 3], None, tokens, medium="GPU"),
            _stored([1, 2, 3], None, tokens, medium="CPU", locality="LOCAL"),  # offloaded copies
            BlockRemoved([3], medium="GPU"),  # the GPU evicts its copy of block 3
        ],
        seq=0,
    )
    assert d.ops == [
        KvOp(OP_STORE, rh, [1, 2, 3], TIER_GPU),
        KvOp(OP_STORE, rh, [1, 2, 3], TIER_HOST),
        KvOp(OP_REMOVE, [rh[2]], [3], TIER_GPU),
    ]
    assert m.live_by_tier() == {TIER_GPU: set(rh[:2]), TIER_HOST: set(rh)}
    # A store chained to a block only the host tier still holds is mapped.
    more = list(range(12, 16))
    d = m.map_batch([_stored([4], 3, more, medium="CPU_PINNED")], seq=1)
    assert d.ops == [KvOp(OP_STORE, block_hashes(more, BS, rh[2]), [4], TIER_HOST)]
    # A clear empties every tier.
    d = m.map_batch([AllBlocksCleared()], seq=2)
    assert d.ops == [KvOp(OP_CLEAR, [], [], TIER_GPU)] and m.live_by_tier() == {} and len(m) == 0


def test_a_placeholder_maps_through_known_engine_hashes_else_is_skipped() -> None:
    tokens = list(range(8))
    rh = block_hashes(tokens, BS, root_seed(MODEL))
    m = BlockMapper(MODEL, "w", block_size=BS)
    placeholder = BlockStored([2], None, [], 0, medium="CPU")
    unknown = BlockStored([99], None, [], 0, medium="CPU")
    d = m.map_batch([_stored([1, 2], None, tokens), placeholder, unknown], seq=0)
    assert d.ops == [KvOp(OP_STORE, rh, [1, 2]), KvOp(OP_STORE, [rh[1]], [2], TIER_HOST)]
    assert m.stats.placeholder_blocks == 1 and m.stats.skipped_by_reason == {"no_token_ids": 1}
    assert m.stats.block_size_mismatch == 0  # a placeholder's block_size 0 is no mismatch


def test_a_lower_tier_block_announced_twice_goes_with_its_second_removal() -> None:
    # vLLM's offloading announces a block once per chunk holding it and
    # expects the consumer to count; the GPU keeps set semantics.
    tokens = list(range(4))
    (rh,) = block_hashes(tokens, BS, root_seed(MODEL))
    m = BlockMapper(MODEL, "w")
    m.map_batch([_stored([1], None, tokens, medium="CPU")] * 2, seq=0)
    assert m.map_batch([BlockRemoved([1], medium="CPU")], seq=1).ops == []
    assert m.live_by_tier() == {TIER_HOST: {rh}}
    assert m.map_batch([BlockRemoved([1], medium="CPU")], seq=2).ops == [
        KvOp(OP_REMOVE, [rh], [1], TIER_HOST)
    ]
    m.map_batch([_stored([1], None, tokens)] * 2, seq=3)
    assert m.map_batch([BlockRemoved([1])], seq=4).ops == [KvOp(OP_REMOVE, [rh], [1])]
    assert m.live_by_tier() == {}


def test_a_hybrid_models_block_stays_while_any_kv_cache_group_holds_it() -> None:
    # vLLM publishes each KV-cache group's stores and removals under the same
    # engine hashes (group_idx apart): a sliding-window group (1 here) frees
    # blocks long before the full-attention group (0) evicts them.
    tokens = list(range(12))
    rhs = block_hashes(tokens, BS, root_seed(MODEL))
    m = BlockMapper(MODEL, "w")
    d = m.map_batch([_stored([1, 2, 3], None, tokens, group_idx=g) for g in (0, 1)], seq=0)
    assert d.ops == [KvOp(OP_STORE, rhs, [1, 2, 3])]  # the second group's store adds no block
    assert m.map_batch([BlockRemoved([1, 2], group_idx=1)], seq=1).ops == []
    assert m.live_router_hashes() == set(rhs)
    assert m.map_batch([BlockRemoved([1], group_idx=0)], seq=2).ops == [KvOp(OP_REMOVE, [rhs[0]], [1])]
    # block 3: the full-attention group goes first, the window's group last
    assert m.map_batch([BlockRemoved([3], group_idx=0)], seq=3).ops == []
    assert m.map_batch([BlockRemoved([3], group_idx=1)], seq=4).ops == [KvOp(OP_REMOVE, [rhs[2]], [3])]
    # a group that stores again (a reused prefix) or removes twice changes nothing
    m.map_batch([_stored([2], 1, tokens[4:8], group_idx=0)] * 2, seq=5)
    assert m.map_batch([BlockRemoved([2], group_idx=1)], seq=6).ops == []
    assert m.map_batch([BlockRemoved([2], group_idx=0)], seq=7).ops == [KvOp(OP_REMOVE, [rhs[1]], [2])]
    assert len(m) == 0 and m.stats.unknown_removed == 0


def test_kv_cache_groups_come_and_go_with_the_block_and_engines_without_groups_are_unchanged() -> None:
    tokens = list(range(8))
    rhs = block_hashes(tokens, BS, root_seed(MODEL))
    m = BlockMapper(MODEL, "w")
    # only group 2 stored block 1: group 0's removal of it leaves it to group 2
    m.map_batch([_stored([1, 2], None, tokens, group_idx=2)], seq=0)
    assert m.map_batch([BlockRemoved([1], group_idx=0)], seq=1).ops == []
    assert m.map_batch([BlockRemoved([1], group_idx=2)], seq=2).ops == [KvOp(OP_REMOVE, [rhs[0]], [1])]
    # a removal without group_idx (an engine without groups) forgets the block
    assert m.map_batch([BlockRemoved([2])], seq=3).ops == [KvOp(OP_REMOVE, [rhs[1]], [2])]
    # AllBlocksCleared forgets the groups too: a later group-0 block goes with group 0
    m.map_batch([_stored([1], None, tokens[:4], group_idx=1), AllBlocksCleared()], seq=4)
    m.map_batch([_stored([1], None, tokens[:4], group_idx=0)], seq=5)
    assert m.map_batch([BlockRemoved([1], group_idx=0)], seq=6).ops == [KvOp(OP_REMOVE, [rhs[0]], [1])]
    # a group_idx that is no group is refused, the rest of the batch applies
    d = m.map_batch([_stored([1], None, tokens[:4], group_idx=64), BlockRemoved([9], group_idx=-1)], seq=7)
    assert d.ops == [] and m.stats.skipped_by_reason == {"undecodable": 2}


def test_after_a_handover_any_kv_cache_groups_removal_forgets_a_block() -> None:
    # The groups holding a block are the old owner's; a new owner does not
    # know them: a block goes with the first removal of any group (routed as
    # cold if another group still held it, never predicted once gone).
    tokens = list(range(8))
    rhs = block_hashes(tokens, BS, root_seed(MODEL))
    old = BlockMapper(MODEL, "w")
    old.map_batch([_stored([1, 2], None, tokens, group_idx=g) for g in (0, 1)], seq=0)
    old.map_batch([BlockRemoved([1], group_idx=0)], seq=1)  # block 1: group 1's alone now
    new = BlockMapper(MODEL, "w")
    new.restore(old.export())
    assert new.map_batch([BlockRemoved([1], group_idx=1)], seq=2).ops == [KvOp(OP_REMOVE, [rhs[0]], [1])]
    assert new.map_batch([BlockRemoved([2], group_idx=1)], seq=3).ops == [KvOp(OP_REMOVE, [rhs[1]], [2])]


def test_a_lower_tier_copy_leaves_the_gpu_blocks_groups_alone() -> None:
    tokens, other = list(range(4)), list(range(10, 14))
    (rh,) = block_hashes(tokens, BS, root_seed(MODEL))
    m = BlockMapper(MODEL, "w")
    m.map_batch([_stored([1], None, tokens, group_idx=2)], seq=0)
    m.map_batch([_stored([1], None, other, medium="CPU"), _stored([1], None, tokens, medium="CPU")], seq=1)
    assert m.map_batch([BlockRemoved([1], group_idx=0)], seq=2).ops == []  # group 2 still holds it
    assert m.map_batch([BlockRemoved([1], group_idx=2)], seq=3).ops == [KvOp(OP_REMOVE, [rh], [1])]


def test_a_store_of_another_block_size_is_refused_and_the_rest_applies() -> None:
    m = BlockMapper(MODEL, "w", block_size=16)
    page1 = BlockStored([1, 2, 3], None, [7, 8, 9], 1)  # SGLang's default page size
    good = BlockStored([4], None, list(range(16)), 16)
    d = m.map_batch([page1, good], seq=0)
    assert d.ops == [KvOp(OP_STORE, block_hashes(list(range(16)), 16, root_seed(MODEL)), [4])]
    assert m.stats.skipped_by_reason == {"block_size_mismatch": 1}
    assert m.stats.block_size_mismatch == 0  # the last store had the registered size
    m.map_batch([page1], seq=1)
    assert m.stats.block_size_mismatch == 1 and m.stats.skipped_events == 2


def test_an_unknown_medium_is_skipped_not_guessed() -> None:
    m = BlockMapper(MODEL, "w")
    d = m.map_batch([_stored([1], None, [1, 2, 3, 4], medium="NVRAM"), BlockRemoved([1], medium="NVRAM")], 0)
    assert d.ops == [] and m.stats.skipped_by_reason == {"unknown_medium": 2}


def test_handover_carries_every_tier() -> None:
    tokens = list(range(8))
    a = BlockMapper(MODEL, "w")
    a.map_batch([_stored([1, 2], None, tokens), _stored([1, 2], None, tokens, medium="STORAGE")], 0)
    pairs = a.export()
    rh = block_hashes(tokens, BS, root_seed(MODEL))
    assert sorted(pairs, key=len) == [(1, rh[0]), (2, rh[1]), (1, rh[0], TIER_DISK), (2, rh[1], TIER_DISK)]
    b = BlockMapper.from_pairs(MODEL, "w", pairs)
    assert b.block_map == a.block_map and b.live_by_tier() == a.live_by_tier()
    # The new owner forgets a disk removal on the disk tier only.
    d = b.map_batch([BlockRemoved([2], medium="STORAGE")], 1)
    assert d.ops == [KvOp(OP_REMOVE, [rh[1]], [2], TIER_DISK)] and rh[1] in b.live_router_hashes()


_MEDIUMS = [None, "GPU", "CPU", "CPU_PINNED", "STORAGE", "EXTERNAL"]


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32), steps=st.integers(1, 40))
def test_deltas_carry_the_mapping_of_every_tier_exactly(seed: int, steps: int) -> None:
    """As above, with every event on a random medium: the replayed map and
    the per-tier index the ops describe equal the mapper's, tier by tier."""
    rng = random.Random(seed)
    m = BlockMapper(MODEL, "w")
    replayed = BlockMap()
    lean = BlockMap(refs=False)
    index: dict[int, set[int]] = {}
    pool: list = [rng.getrandbits(64) for _ in range(10)]
    for s in range(steps):
        events: list = []
        for _ in range(rng.randint(1, 4)):
            r = rng.random()
            medium = rng.choice(_MEDIUMS)
            live = [eh for p in m.export() for eh in p[:1]]
            if r < 0.55:
                n = rng.randint(1, 3)
                parent = rng.choice(live) if live and rng.random() < 0.5 else None
                tokens = [rng.randint(0, 2) for _ in range(n * BS)]
                events.append(BlockStored(rng.sample(pool, n), parent, tokens, BS, medium=medium))
            elif r < 0.93:
                gone = rng.sample(live, min(len(live), rng.randint(1, 3))) + [rng.choice(pool)]
                events.append(BlockRemoved(gone, medium=medium))
            else:
                events.append(AllBlocksCleared())
        d = msgspec.msgpack.decode(msgspec.msgpack.encode(m.map_batch(events, s)), type=KvDelta)
        for op in d.ops:
            replayed.apply(op)
            lean.apply(op)
            if op.kind == OP_STORE:
                index.setdefault(op.tier, set()).update(op.hashes)
            elif op.kind == OP_REMOVE:
                index.get(op.tier, set()).difference_update(op.hashes)
            else:
                index.clear()
        assert replayed == m.block_map == lean
        assert {t: hs for t, hs in index.items() if hs} == m.live_by_tier() == lean.live_by_tier()
        assert replayed.ebytes == m.block_map.ebytes == lean.ebytes
    restored = BlockMapper.from_pairs(MODEL, "w", replayed.pairs())
    assert restored.block_map == m.block_map and restored.live_by_tier() == m.live_by_tier()
