import pytest

from router.engine_registry import EngineSpec, EngineSpecError


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
        "id=e1,url=http://h:1,replay=tcp://h:2",  # replay without events
    ],
)
def test_bad_specs_are_clear_errors(text):
    with pytest.raises(EngineSpecError):
        EngineSpec.parse(text)
