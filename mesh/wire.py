"""Mapping between the pure mesh messages and their protobuf wire form.

The pure cores speak frozen dataclasses (membership: ``mesh/swim_messages.py``;
replicated state: ``mesh/state_messages.py``); ``proto/kvmesh/mesh/v1/mesh.proto``
declares the wire. Field names are the same on both sides, so the mapping is
by name: scalars are copied, ``updates`` and ``members`` are converted item
by item. Anything malformed raises :class:`WireError` and the message is
dropped; nothing half-decoded escapes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kvmesh_pb.mesh.v1 import mesh_pb2 as pb
from mesh import state_messages as sm
from mesh import swim_messages as sw


class WireError(ValueError):
    """A mesh message that cannot be decoded or encoded."""


# envelope oneof field name <-> message class
_BODY: dict[str, type] = {
    "ping": sw.Ping,
    "ack": sw.Ack,
    "ping_req": sw.PingReq,
    "nack": sw.Nack,
    "gossip": sw.Gossip,
    "join": sw.Join,
    "join_reply": sw.JoinReply,
    "push_pull": sw.PushPull,
    "state_push": sm.StatePush,
    "sync_request": sm.SyncRequest,
    "sync_reply": sm.SyncReply,
}
_NAME_OF: dict[type, str] = {cls: name for name, cls in _BODY.items()}

_UPDATE: dict[str, type] = {"alive": sw.Alive, "suspect": sw.Suspect, "dead": sw.Dead, "leave": sw.Leave}
_UPDATE_NAME: dict[type, str] = {cls: name for name, cls in _UPDATE.items()}


def _update_pb(u: Any) -> pb.Update:
    name = _UPDATE_NAME.get(type(u))
    if name is None:
        raise WireError(f"not a membership update: {type(u).__name__}")
    out = pb.Update()
    getattr(out, name).CopyFrom(getattr(pb, type(u).__name__)(**dataclasses.asdict(u)))
    return out


def _update_from(p: pb.Update) -> Any:
    kind = p.WhichOneof("kind")
    if kind is None:
        raise WireError("empty membership update")
    sub = getattr(p, kind)
    cls = _UPDATE[kind]
    return cls(**{f.name: getattr(sub, f.name) for f in dataclasses.fields(cls)})


def _member_pb(r: sw.MemberRecord) -> pb.MemberRecord:
    return pb.MemberRecord(node=r.node, addr=r.addr, incarnation=r.incarnation, state=r.state)


def _member_from(p: pb.MemberRecord) -> sw.MemberRecord:
    return sw.MemberRecord(node=p.node, addr=p.addr, incarnation=p.incarnation, state=p.state)


def to_envelope(msg: Any) -> pb.Envelope:
    name = _NAME_OF.get(type(msg))
    if name is None:
        raise WireError(f"not a mesh message: {type(msg).__name__}")
    env = pb.Envelope(src=msg.src, dst=msg.dst)
    body = getattr(env, name)
    body.SetInParent()
    for f in dataclasses.fields(msg):
        if f.name in ("src", "dst"):
            continue
        value = getattr(msg, f.name)
        if f.name == "updates":
            body.updates.extend(_update_pb(u) for u in value)
        elif f.name == "members":
            body.members.extend(_member_pb(r) for r in value)
        else:
            try:
                if isinstance(value, (tuple, list)):
                    getattr(body, f.name).extend(value)
                else:
                    setattr(body, f.name, value)
            except (AttributeError, TypeError, ValueError) as e:
                raise WireError(f"cannot encode {name}.{f.name}: {e}") from None
    return env


def from_envelope(env: pb.Envelope) -> Any:
    name = env.WhichOneof("body")
    if name is None:
        raise WireError("envelope without a message")
    if not env.src or not env.dst:
        raise WireError(f"{name} without src/dst")
    cls = _BODY[name]
    body = getattr(env, name)
    kwargs: dict[str, Any] = {"src": env.src, "dst": env.dst}
    for f in dataclasses.fields(cls):
        if f.name in ("src", "dst"):
            continue
        value = getattr(body, f.name)
        if f.name == "updates":
            kwargs[f.name] = tuple(_update_from(u) for u in value)
        elif f.name == "members":
            kwargs[f.name] = tuple(_member_from(r) for r in value)
        elif not isinstance(value, (str, bytes, int, float, bool)):
            kwargs[f.name] = tuple(value)
        else:
            kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise WireError(f"bad {name}: {e}") from None
