"""What a client sends and gets back, as plain typed values.

Requests are built from keyword arguments (:func:`generate_request`,
:func:`route_request`); answers come back as frozen dataclasses instead of
protobuf messages. A ``Generate`` stream is a :class:`Routed` (where the
request went; one per attempt when the node retried on another engine
before the first token), :class:`Chunk` s, and a final :class:`Result`,
folded from the wire by :class:`GenerateFold`. Pure: no I/O.

The sampling values and token ids are checked against their ranges (and
the ids for being integers) before the request is built: protobuf would refuse some (a negative ``max_tokens``
or token id, one past ``uint32``) with a bare ``ValueError`` and send others
as ``inf``, and the node refuses the rest for the field alone. The error is
the one a node gives a bad field, :class:`KvmeshError` INVALID_ARGUMENT
``invalid_request``, raised before any I/O.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, TypedDict

import grpc

from kvmesh.client.errors import KvmeshError, from_rpc_error, invalid_request
from kvmesh.client.results import (
    Candidate,
    Chunk,
    Decision,
    Event,
    Prompt,
    Result,
    Routed,
    RouteResult,
)
from kvmesh_pb.v1 import router_pb2 as pb

__all__ = [
    "Candidate",
    "Chunk",
    "Decision",
    "Event",
    "GenerateFold",
    "GenerateOptions",
    "Prompt",
    "Result",
    "RouteOptions",
    "RouteResult",
    "Routed",
    "generate_request",
    "route_request",
]


class GenerateOptions(TypedDict, total=False):
    """The keyword arguments of :func:`generate_request` (and of the clients' ``generate``)."""

    model: str
    max_tokens: int
    temperature: float
    top_p: float
    stop: Sequence[str]
    ignore_eos: bool
    seed: int | None
    request_id: str
    session_key: str
    policy: str
    lora_name: str
    cache_salt: str


class RouteOptions(TypedDict, total=False):
    """The keyword arguments of :func:`route_request` (and of the clients' ``route``)."""

    model: str
    request_id: str
    session_key: str
    policy: str
    lora_name: str
    cache_salt: str
    dry_run: bool


_UINT32_MAX = 2**32 - 1  # max_tokens, token ids
_UINT64_MAX = 2**64 - 1  # seed
_FLOAT32_MAX = 3.4028234663852886e38  # temperature, top_p: larger is inf on the wire


def _prompt(prompt: Prompt) -> pb.Prompt:
    if isinstance(prompt, str):
        return pb.Prompt(text=prompt)
    try:
        ids = [operator.index(i) for i in prompt]  # ints, numpy's among them; 1.5 or "7" is not an id
    except TypeError:
        bad = next(i for i in prompt if not hasattr(i, "__index__"))
        raise invalid_request(f"token ids must be integers, got {bad!r}") from None
    if ids:
        for bad in (min(ids), max(ids)):
            if not 0 <= bad <= _UINT32_MAX:
                raise invalid_request(f"token id {bad} is out of range (0..{_UINT32_MAX})")
    return pb.Prompt(token_ids=pb.TokenIds(ids=ids))


def _check_sampling(max_tokens: int, temperature: float, top_p: float, seed: int | None) -> None:
    """The node's checks of each field alone (router/request_path.py ``validate``,
    its words), where zero still means the node's default; the upper bounds are the wire's."""
    if max_tokens < 0:
        raise invalid_request(f"max_tokens must be >= 1, got {max_tokens} (0: the node's default)")
    if max_tokens > _UINT32_MAX:
        raise invalid_request(f"max_tokens must be at most {_UINT32_MAX}, got {max_tokens}")
    if not 0 <= temperature <= _FLOAT32_MAX:  # NaN fails every comparison
        raise invalid_request(f"temperature must be a number >= 0, got {temperature}")
    if not 0 <= top_p <= 1:
        raise invalid_request(f"top_p must be in (0, 1], got {top_p} (0: 1, no cut)")
    if seed is not None and not 0 <= seed <= _UINT64_MAX:
        raise invalid_request(f"seed must be in 0..{_UINT64_MAX}, got {seed}")


def generate_request(
    prompt: Prompt,
    *,
    model: str = "",
    max_tokens: int = 0,
    temperature: float = 0.0,
    top_p: float = 0.0,
    stop: Sequence[str] = (),
    ignore_eos: bool = False,
    seed: int | None = None,
    request_id: str = "",
    session_key: str = "",
    policy: str = "",
    lora_name: str = "",
    cache_salt: str = "",
) -> pb.GenerateRequest:
    """A Generate request. Zero/empty means the node's default (``max_tokens``
    0: the node's default; ``model`` "": the only model served; ``policy``
    "": the node's policy); ``temperature`` 0 is greedy. Raises
    :class:`KvmeshError` (INVALID_ARGUMENT) for a value the request cannot carry."""
    _check_sampling(max_tokens, temperature, top_p, seed)
    sampling = pb.SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=list(stop), ignore_eos=ignore_eos
    )
    if seed is not None:
        sampling.seed = seed
    return pb.GenerateRequest(
        request_id=request_id,
        model=model,
        prompt=_prompt(prompt),
        sampling=sampling,
        session_key=session_key,
        policy=policy,
        lora_name=lora_name,
        cache_salt=cache_salt,
    )


def route_request(
    prompt: Prompt,
    *,
    model: str = "",
    request_id: str = "",
    session_key: str = "",
    policy: str = "",
    lora_name: str = "",
    cache_salt: str = "",
    dry_run: bool = False,
) -> pb.RouteRequest:
    """A Route request; ``dry_run`` False records the pick on the node (it counts
    as load on the engine for a few seconds: the caller sends the request itself).
    Raises :class:`KvmeshError` (INVALID_ARGUMENT) for a token id out of range."""
    return pb.RouteRequest(
        request_id=request_id,
        model=model,
        prompt=_prompt(prompt),
        session_key=session_key,
        policy=policy,
        lora_name=lora_name,
        cache_salt=cache_salt,
        dry_run=dry_run,
    )


def decision(d: pb.Decision) -> Decision:
    return Decision(
        policy=d.policy,
        reason=d.reason,
        candidates=tuple(
            Candidate(
                c.engine_id,
                c.overlap_blocks,
                c.load,
                c.score,
                c.chosen,
                c.host_blocks,
                c.disk_blocks,
                c.external_blocks,
            )
            for c in d.candidates
        ),
    )


def route_result(r: pb.RouteResponse) -> RouteResult:
    return RouteResult(
        r.request_id,
        r.engine_id,
        r.endpoint,
        r.predicted_cached_blocks,
        r.prompt_blocks,
        decision(r.decision),
    )


class GenerateFold:
    """Turns one Generate stream's messages into events, then its end into
    a :class:`Result` or a :class:`KvmeshError`."""

    __slots__ = ("_finished", "_routed", "_text", "_tokens", "started")

    def __init__(self) -> None:
        self.started = False  # a message arrived: the call is committed, never retried
        self._routed: Routed | None = None
        self._tokens: list[int] = []
        self._text: list[str] = []
        self._finished: pb.Finished | None = None

    def feed(self, msg: pb.GenerateResponse) -> Routed | Chunk | None:
        """The event for ``msg``; None for the ``finished`` message (see :meth:`result`)."""
        self.started = True
        kind = msg.WhichOneof("event")
        if kind == "chunk":
            ids = tuple(msg.chunk.token_ids)
            self._tokens.extend(ids)
            self._text.append(msg.chunk.text)
            return Chunk(ids, msg.chunk.text)
        if kind == "routed":
            r = msg.routed
            self._routed = Routed(
                r.request_id,
                r.engine_id,
                r.endpoint,
                r.predicted_cached_blocks,
                r.attempt,
                decision(r.decision),
            )
            return self._routed
        if kind == "finished":
            self._finished = msg.finished
        return None

    def _result(self) -> Result | None:
        f = self._finished
        if f is None:
            return None
        return Result(
            request_id=self._routed.request_id if self._routed else "",
            engine_id=f.engine_id,
            finish_reason=f.finish_reason,
            prompt_tokens=f.prompt_tokens,
            cached_prompt_tokens=f.cached_prompt_tokens,
            completion_tokens=f.completion_tokens,
            ttft_ms=f.ttft_ms,
            attempts=f.attempts,
            error=f.error,
            token_ids=tuple(self._tokens),
            text="".join(self._text),
            routed=self._routed,
        )

    def result(self) -> Result:
        """The stream ended OK: its result (an error if the node never said how it finished)."""
        result = self._result()
        if result is None:
            raise KvmeshError(
                grpc.StatusCode.INTERNAL,
                "the stream ended without a finished message",
                started=self.started,
                request_id=self._routed.request_id if self._routed else "",
            )
        return result

    def error(self, e: Any) -> KvmeshError:
        """The stream ended with ``e`` (a ``grpc.RpcError``)."""
        return from_rpc_error(
            e,
            started=self.started,
            request_id=self._routed.request_id if self._routed else "",
            result=self._result(),
        )
