"""Every mesh message survives the protobuf wire unchanged, and malformed
envelopes are rejected with WireError (never half-decoded)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmesh_pb.mesh.v1 import mesh_pb2 as pb
from mesh import state_messages as sm
from mesh import swim_messages as sw
from mesh.wire import _BODY, WireError, from_envelope, to_envelope

text = st.text(min_size=1, max_size=12)
u64 = st.integers(0, 2**64 - 1)
updates = st.lists(
    st.one_of(
        st.builds(sw.Alive, node=text, addr=text, incarnation=u64),
        st.builds(sw.Suspect, node=text, incarnation=u64, accuser=text),
        st.builds(sw.Dead, node=text, incarnation=u64, accuser=text),
        st.builds(sw.Leave, node=text, incarnation=u64),
    ),
    max_size=4,
).map(tuple)
members = st.lists(
    st.builds(
        sw.MemberRecord,
        node=text,
        addr=text,
        incarnation=u64,
        state=st.sampled_from(["alive", "suspect", "dead", "left"]),
    ),
    max_size=4,
).map(tuple)
blobs = st.binary(max_size=64)

messages = st.one_of(
    st.builds(sw.Ping, src=text, dst=text, seq=u64, target=text, source=text, updates=updates),
    st.builds(sw.Ack, src=text, dst=text, seq=u64, responder=text, incarnation=u64, updates=updates),
    st.builds(sw.PingReq, src=text, dst=text, seq=u64, target=text, target_addr=text, updates=updates),
    st.builds(sw.Nack, src=text, dst=text, seq=u64),
    st.builds(sw.Gossip, src=text, dst=text, updates=updates),
    st.builds(sw.Join, src=text, dst=text, node=text, members=members),
    st.builds(sw.JoinReply, src=text, dst=text, node=text, members=members),
    st.builds(sw.PushPull, src=text, dst=text, node=text, members=members, reply=st.booleans()),
    st.builds(sm.StatePush, src=text, dst=text, payload=blobs),
    st.builds(sm.SyncRequest, src=text, dst=text, summary=blobs, want_full=st.booleans()),
    st.builds(
        sm.SyncReply,
        src=text,
        dst=text,
        payloads=st.lists(blobs, max_size=3).map(tuple),
        summary=blobs,
        full=st.booleans(),
        ready=st.booleans(),
    ),
)


@given(st.lists(messages, min_size=1, max_size=5))
def test_round_trip_through_bytes(msgs):
    raw = pb.Batch(messages=[to_envelope(m) for m in msgs]).SerializeToString()
    batch = pb.Batch.FromString(raw)
    assert [from_envelope(e) for e in batch.messages] == msgs


def test_every_field_of_every_message_is_on_the_wire():
    # A field added to a dataclass but not to mesh.proto must fail here.
    for cls in _BODY.values():
        proto_fields = {f.name for f in getattr(pb, cls.__name__).DESCRIPTOR.fields}
        for f in dataclasses.fields(cls):
            if f.name not in ("src", "dst"):
                assert f.name in proto_fields, f"{cls.__name__}.{f.name} missing from mesh.proto"


def test_malformed_input_is_rejected():
    with pytest.raises(WireError):
        from_envelope(pb.Envelope(src="a", dst="b"))  # no body
    with pytest.raises(WireError):
        from_envelope(pb.Envelope(ping=pb.Ping(seq=1)))  # no src/dst
    env = pb.Envelope(src="a", dst="b", gossip=pb.Gossip(updates=[pb.Update()]))
    with pytest.raises(WireError):
        from_envelope(env)  # empty update
    with pytest.raises(WireError):
        to_envelope(object())
