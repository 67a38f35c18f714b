from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Batch(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[Envelope]
    def __init__(self, messages: _Optional[_Iterable[_Union[Envelope, _Mapping]]] = ...) -> None: ...

class DeliverReply(_message.Message):
    __slots__ = ("accepted", "rejected")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    rejected: int
    def __init__(self, accepted: _Optional[int] = ..., rejected: _Optional[int] = ...) -> None: ...

class Envelope(_message.Message):
    __slots__ = ("src", "dst", "ping", "ack", "ping_req", "nack", "gossip", "join", "join_reply", "push_pull", "state_push", "sync_request", "sync_reply")
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    PING_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    PING_REQ_FIELD_NUMBER: _ClassVar[int]
    NACK_FIELD_NUMBER: _ClassVar[int]
    GOSSIP_FIELD_NUMBER: _ClassVar[int]
    JOIN_FIELD_NUMBER: _ClassVar[int]
    JOIN_REPLY_FIELD_NUMBER: _ClassVar[int]
    PUSH_PULL_FIELD_NUMBER: _ClassVar[int]
    STATE_PUSH_FIELD_NUMBER: _ClassVar[int]
    SYNC_REQUEST_FIELD_NUMBER: _ClassVar[int]
    SYNC_REPLY_FIELD_NUMBER: _ClassVar[int]
    src: str
    dst: str
    ping: Ping
    ack: Ack
    ping_req: PingReq
    nack: Nack
    gossip: Gossip
    join: Join
    join_reply: JoinReply
    push_pull: PushPull
    state_push: StatePush
    sync_request: SyncRequest
    sync_reply: SyncReply
    def __init__(self, src: _Optional[str] = ..., dst: _Optional[str] = ..., ping: _Optional[_Union[Ping, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., ping_req: _Optional[_Union[PingReq, _Mapping]] = ..., nack: _Optional[_Union[Nack, _Mapping]] = ..., gossip: _Optional[_Union[Gossip, _Mapping]] = ..., join: _Optional[_Union[Join, _Mapping]] = ..., join_reply: _Optional[_Union[JoinReply, _Mapping]] = ..., push_pull: _Optional[_Union[PushPull, _Mapping]] = ..., state_push: _Optional[_Union[StatePush, _Mapping]] = ..., sync_request: _Optional[_Union[SyncRequest, _Mapping]] = ..., sync_reply: _Optional[_Union[SyncReply, _Mapping]] = ...) -> None: ...

class Alive(_message.Message):
    __slots__ = ("node", "addr", "incarnation")
    NODE_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    node: str
    addr: str
    incarnation: int
    def __init__(self, node: _Optional[str] = ..., addr: _Optional[str] = ..., incarnation: _Optional[int] = ...) -> None: ...

class Suspect(_message.Message):
    __slots__ = ("node", "incarnation", "accuser")
    NODE_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    ACCUSER_FIELD_NUMBER: _ClassVar[int]
    node: str
    incarnation: int
    accuser: str
    def __init__(self, node: _Optional[str] = ..., incarnation: _Optional[int] = ..., accuser: _Optional[str] = ...) -> None: ...

class Dead(_message.Message):
    __slots__ = ("node", "incarnation", "accuser")
    NODE_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    ACCUSER_FIELD_NUMBER: _ClassVar[int]
    node: str
    incarnation: int
    accuser: str
    def __init__(self, node: _Optional[str] = ..., incarnation: _Optional[int] = ..., accuser: _Optional[str] = ...) -> None: ...

class Leave(_message.Message):
    __slots__ = ("node", "incarnation")
    NODE_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    node: str
    incarnation: int
    def __init__(self, node: _Optional[str] = ..., incarnation: _Optional[int] = ...) -> None: ...

class Update(_message.Message):
    __slots__ = ("alive", "suspect", "dead", "leave")
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    SUSPECT_FIELD_NUMBER: _ClassVar[int]
    DEAD_FIELD_NUMBER: _ClassVar[int]
    LEAVE_FIELD_NUMBER: _ClassVar[int]
    alive: Alive
    suspect: Suspect
    dead: Dead
    leave: Leave
    def __init__(self, alive: _Optional[_Union[Alive, _Mapping]] = ..., suspect: _Optional[_Union[Suspect, _Mapping]] = ..., dead: _Optional[_Union[Dead, _Mapping]] = ..., leave: _Optional[_Union[Leave, _Mapping]] = ...) -> None: ...

class MemberRecord(_message.Message):
    __slots__ = ("node", "addr", "incarnation", "state")
    NODE_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    node: str
    addr: str
    incarnation: int
    state: str
    def __init__(self, node: _Optional[str] = ..., addr: _Optional[str] = ..., incarnation: _Optional[int] = ..., state: _Optional[str] = ...) -> None: ...

class Ping(_message.Message):
    __slots__ = ("seq", "target", "source", "updates")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    seq: int
    target: str
    source: str
    updates: _containers.RepeatedCompositeFieldContainer[Update]
    def __init__(self, seq: _Optional[int] = ..., target: _Optional[str] = ..., source: _Optional[str] = ..., updates: _Optional[_Iterable[_Union[Update, _Mapping]]] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("seq", "responder", "updates", "incarnation")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    RESPONDER_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    seq: int
    responder: str
    updates: _containers.RepeatedCompositeFieldContainer[Update]
    incarnation: int
    def __init__(self, seq: _Optional[int] = ..., responder: _Optional[str] = ..., updates: _Optional[_Iterable[_Union[Update, _Mapping]]] = ..., incarnation: _Optional[int] = ...) -> None: ...

class PingReq(_message.Message):
    __slots__ = ("seq", "target", "target_addr", "updates")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    TARGET_ADDR_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    seq: int
    target: str
    target_addr: str
    updates: _containers.RepeatedCompositeFieldContainer[Update]
    def __init__(self, seq: _Optional[int] = ..., target: _Optional[str] = ..., target_addr: _Optional[str] = ..., updates: _Optional[_Iterable[_Union[Update, _Mapping]]] = ...) -> None: ...

class Nack(_message.Message):
    __slots__ = ("seq",)
    SEQ_FIELD_NUMBER: _ClassVar[int]
    seq: int
    def __init__(self, seq: _Optional[int] = ...) -> None: ...

class Gossip(_message.Message):
    __slots__ = ("updates",)
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    updates: _containers.RepeatedCompositeFieldContainer[Update]
    def __init__(self, updates: _Optional[_Iterable[_Union[Update, _Mapping]]] = ...) -> None: ...

class Join(_message.Message):
    __slots__ = ("node", "members")
    NODE_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    node: str
    members: _containers.RepeatedCompositeFieldContainer[MemberRecord]
    def __init__(self, node: _Optional[str] = ..., members: _Optional[_Iterable[_Union[MemberRecord, _Mapping]]] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("node", "members")
    NODE_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    node: str
    members: _containers.RepeatedCompositeFieldContainer[MemberRecord]
    def __init__(self, node: _Optional[str] = ..., members: _Optional[_Iterable[_Union[MemberRecord, _Mapping]]] = ...) -> None: ...

class PushPull(_message.Message):
    __slots__ = ("node", "members", "reply")
    NODE_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    node: str
    members: _containers.RepeatedCompositeFieldContainer[MemberRecord]
    reply: bool
    def __init__(self, node: _Optional[str] = ..., members: _Optional[_Iterable[_Union[MemberRecord, _Mapping]]] = ..., reply: _Optional[bool] = ...) -> None: ...

class StatePush(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class SyncRequest(_message.Message):
    __slots__ = ("summary", "want_full")
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    WANT_FULL_FIELD_NUMBER: _ClassVar[int]
    summary: bytes
    want_full: bool
    def __init__(self, summary: _Optional[bytes] = ..., want_full: _Optional[bool] = ...) -> None: ...

class SyncReply(_message.Message):
    __slots__ = ("payloads", "summary", "full", "ready")
    PAYLOADS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    payloads: _containers.RepeatedScalarFieldContainer[bytes]
    summary: bytes
    full: bool
    ready: bool
    def __init__(self, payloads: _Optional[_Iterable[bytes]] = ..., summary: _Optional[bytes] = ..., full: _Optional[bool] = ..., ready: _Optional[bool] = ...) -> None: ...
