"""Load accounting (router/load.py): this node's tracker and the mesh-wide view."""

import pytest

from router.load import LoadTracker, MeshLoad


def test_load_tracker_counts_and_finish_is_idempotent():
    t = LoadTracker()
    t.start("a", "r1", 100)
    t.start("a", "r2", 50)
    t.start("b", "r3", 10)
    assert t.in_flight("a") == 2 and t.in_flight_tokens("a") == 150
    assert t.slot() == {"a": (2, 150), "b": (1, 10)}
    assert t.finish("r1") is True
    assert t.finish("r1") is False
    assert t.slot() == {"a": (1, 50), "b": (1, 10)}
    t.finish("r3")
    assert t.slot() == {"a": (1, 50)}  # idle workers drop out
    with pytest.raises(ValueError):
        t.start("a", "r2", 5)  # already in flight
    with pytest.raises(ValueError):
        t.start("a", "r9", -1)
    with pytest.raises(ValueError):
        t.start("", "r9", 1)
    assert t.slot() == {"a": (1, 50)}


def test_load_tracker_set_tokens_and_drop_worker():
    t = LoadTracker()
    t.start("a", "r1", 500)
    t.start("a", "r2", 10)
    assert t.set_tokens("r1", 16) is True  # prefill done: one block of decode left
    assert t.in_flight_tokens("a") == 26
    assert t.set_tokens("nope", 1) is False
    t.start("b", "r3", 10)
    assert sorted(t.drop_worker("a")) == ["r1", "r2"]
    assert t.slot() == {"b": (1, 10)} and t.finish("r1") is False


def test_mesh_load_adds_other_nodes_to_the_live_local_count():
    m = MeshLoad()
    m.local.start("a", "r1", 100)
    assert m.slot_to_publish() == {"a": (1, 100)}
    assert m.slot_to_publish() is None  # unchanged: nothing to publish
    # The mesh sums every live node's published slot, ours included.
    mesh_sum = {"a": (3.0, 164.0), "b": (4.0, 40.0)}
    v = m.view(mesh_sum)
    assert v.requests == {"a": 3.0, "b": 4.0} and v.tokens == {"a": 164.0, "b": 40.0}
    # Our own requests count at once, before the next publish...
    m.local.start("a", "r2", 20)
    m.local.start("c", "r3", 5)
    v = m.view(mesh_sum)
    assert v.of("a") == (4.0, 184.0) and v.of("c") == (1.0, 5.0) and v.of("idle") == (0.0, 0.0)
    # ... and once published (and gossiped back in the mesh sum) are not counted twice.
    assert m.slot_to_publish() == {"a": (2, 120), "c": (1, 5)}
    assert m.view({"a": (4.0, 184.0), "b": (4.0, 40.0), "c": (1.0, 5.0)}) == v


def test_mesh_load_never_goes_negative_when_the_mesh_lags_behind():
    m = MeshLoad()
    m.local.start("a", "r1", 100)
    m.slot_to_publish()
    m.local.finish("r1")
    # The mesh still shows our old slot, and no one else's.
    v = m.view({"a": (1.0, 100.0)})
    assert v.of("a") == (0.0, 0.0) and "a" not in v.requests
    # A remote slot is kept when only its tokens exceed ours.
    assert m.view({"a": (1.0, 130.0)}).of("a") == (0.0, 30.0)
