"""Validation of what the SWIM state machine receives: messages, and its own arguments.

Messages come off the network (``mesh/wire.py`` only checks the protobuf
shape, not the values) and from tests. :func:`check_message` runs before
:class:`~mesh.membership.Membership` touches its state, so a malformed message
raises :class:`MembershipError` and changes nothing; a half-applied message
could leave a member half-updated.

Only what the state machine relies on is checked: ids and addresses are
non-empty strings, sequence numbers and incarnations are ints >= 0, member
states are known, update and member lists are sequences of the right types.
``dst`` is not checked: the transport delivered the message, so it was ours.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mesh.swim_messages import (
    STATES,
    Ack,
    Alive,
    Dead,
    Gossip,
    Join,
    JoinReply,
    Leave,
    MemberRecord,
    Nack,
    Ping,
    PingReq,
    PushPull,
    Suspect,
)

__all__ = ["MembershipError", "check_message", "check_number", "check_text"]


class MembershipError(ValueError):
    """A malformed message or argument; the state machine was not changed."""


def check_text(value: Any, what: str) -> None:
    """``value`` is a non-empty string (a node id or an address)."""
    if not isinstance(value, str) or not value:
        raise MembershipError(f"{what} must be a non-empty string, got {value!r}")


def check_number(value: Any, what: str) -> None:
    """``value`` is an int >= 0 (an incarnation or a sequence number); bools are not numbers."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise MembershipError(f"{what} must be an int >= 0, got {value!r}")


def _check_update(u: Any) -> None:
    if not isinstance(u, (Alive, Suspect, Dead, Leave)):
        raise MembershipError(f"unknown gossip update {type(u).__name__}")
    check_text(u.node, "update.node")
    check_number(u.incarnation, "update.incarnation")
    if isinstance(u, Alive):
        check_text(u.addr, "Alive.addr")
    elif not isinstance(u, Leave):
        check_text(u.accuser, "update.accuser")


def _check_updates(updates: Any) -> None:
    if not isinstance(updates, (tuple, list)):
        raise MembershipError(f"updates must be a tuple, got {type(updates).__name__}")
    for u in updates:
        _check_update(u)


def _check_record(r: Any) -> None:
    if not isinstance(r, MemberRecord):
        raise MembershipError(f"member list holds a {type(r).__name__}, not a MemberRecord")
    check_text(r.node, "MemberRecord.node")
    check_text(r.addr, "MemberRecord.addr")
    check_number(r.incarnation, "MemberRecord.incarnation")
    if r.state not in STATES:
        raise MembershipError(f"MemberRecord.state must be one of {STATES}, got {r.state!r}")


def _check_ping(msg: Ping) -> None:
    check_number(msg.seq, "seq")
    check_text(msg.target, "target")
    check_text(msg.source, "source")
    _check_updates(msg.updates)


def _check_ack(msg: Ack) -> None:
    check_number(msg.seq, "seq")
    check_text(msg.responder, "responder")
    check_number(msg.incarnation, "incarnation")
    _check_updates(msg.updates)


def _check_ping_req(msg: PingReq) -> None:
    check_number(msg.seq, "seq")
    check_text(msg.target, "target")
    check_text(msg.target_addr, "target_addr")
    _check_updates(msg.updates)


def _check_nack(msg: Nack) -> None:
    check_number(msg.seq, "seq")


def _check_gossip(msg: Gossip) -> None:
    _check_updates(msg.updates)


def _check_member_list(msg: Join | JoinReply | PushPull) -> None:
    check_text(msg.node, "node")
    if not isinstance(msg.members, (tuple, list)):
        raise MembershipError(f"members must be a tuple, got {type(msg.members).__name__}")
    for r in msg.members:
        _check_record(r)


_CHECKS: dict[type, Callable[[Any], None]] = {
    Ping: _check_ping,
    Ack: _check_ack,
    PingReq: _check_ping_req,
    Nack: _check_nack,
    Gossip: _check_gossip,
    Join: _check_member_list,
    JoinReply: _check_member_list,
    PushPull: _check_member_list,
}


def check_message(msg: Any) -> None:
    """Raise :class:`MembershipError` unless ``msg`` is a well-formed membership message."""
    check = _CHECKS.get(type(msg))
    if check is None:
        raise MembershipError(f"not a membership message: {type(msg).__name__}")
    check_text(msg.src, "src")
    check(msg)
