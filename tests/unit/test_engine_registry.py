import pytest

from router.circuit_breaker import CLOSED, BreakerConfig
from router.engine_registry import EngineSpec, EngineSpecError, EngineTable


def test_parse_full_spec():
    s = EngineSpec.parse(
        "id=e1,url=http://127.0.0.1:8000/,kv=tcp://127.0.0.1:5557,"
        "replay=tcp://127.0.0.1:5558,model=m,block_size=32,dp=2,topic=kv"
    )
    assert s.engine_id == "e1" and s.endpoint == "http://127.0.0.1:8000"
    assert s.block_size == 32 and s.data_parallel_size == 2 and s.topic == "kv"
    assert s.workers == ["e1", "e1#dp1"]


@pytest.mark.parametrize(
    "text",
    [
        "url=http://h:1",  # no id
        "id=e1",  # no url
        "id=e1,url=ftp://h",  # bad scheme
        "id=e#1,url=http://h:1",  # reserved char
        "id=e1,url=http://h:1,block_size=abc",  # not an int
        "id=e1,url=http://h:1,block_size=0",
        "id=e1,url=http://h:1,bogus=1",
        "id=e1,url=http://h:1,kv=udp://x:1",
        "id=e1,url=http://h:1,kv=tcp://127.0.0.1:abc",  # ZMQ would refuse it only on connect
        "id=e1,url=http://h:1,kv=tcp://",
        "id=e1,url=http://h:1,kv=tcp://h:99999",
        "id=e1,url=http://h:1,kv=tcp://h:65535,dp=2",  # rank 1's port would be 65536
        "id=e1,url=http://h:1,kv=tcp://h:1,replay=tcp://h:x",
        "id=e1,url=http://h:1,replay=tcp://h:2",  # replay without events
    ],
)
def test_bad_specs_are_clear_errors(text):
    with pytest.raises(EngineSpecError):
        EngineSpec.parse(text)


def test_defaults_of_an_engine_spec():
    s = EngineSpec.parse("id=e1,url=http://h:1")
    assert (s.model, s.block_size, s.data_parallel_size, s.workers) == ("sim-model", 16, 1, ["e1"])


def test_engine_table_keeps_one_record_per_engine_in_registration_order():
    t = EngineTable(BreakerConfig(failure_threshold=1))
    a = EngineSpec.parse("id=a,url=http://h:1,model=m,block_size=4")
    assert t.put(a) and t.put(EngineSpec.parse("id=b,url=http://h:2,model=n"))
    t["a"].breaker.on_failure(0.0)
    t["a"].healthy = False
    assert not t.put(EngineSpec.parse("id=a,url=http://h:1,model=m,block_size=4"))  # same spec: kept
    assert not t["a"].healthy
    assert t.put(EngineSpec.parse("id=a,url=http://h:9,model=m,block_size=4"))  # changed: afresh
    assert t["a"].healthy and t["a"].breaker.state == CLOSED
    assert t["a"].breaker.config.failure_threshold == 1
    assert list(t) == ["a", "b"] and "a" in t and len(t) == 2
    assert t.models() == {"m", "n"} and t.block_size("m") == 4 and t.block_size("n") == 16
    assert [r.spec.engine_id for r in t.of_model("m")] == ["a"]
    with pytest.raises(KeyError):
        t.block_size("other")
    assert t.pop("a") is not None and t.pop("a") is None and t.get("a") is None


def test_engines_of_one_model_must_share_a_block_size():
    t = EngineTable()
    t.put(EngineSpec.parse("id=a,url=http://h:1,model=m,block_size=16"))
    with pytest.raises(EngineSpecError, match="engines of one model must share a block size"):
        t.check_compatible(EngineSpec.parse("id=b,url=http://h:2,model=m,block_size=32"))
    t.check_compatible(EngineSpec.parse("id=a,url=http://h:1,model=m,block_size=32"))  # a itself may change
    t.check_compatible(EngineSpec.parse("id=c,url=http://h:3,model=other,block_size=32"))
