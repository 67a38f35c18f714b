"""A Python client for kvmesh: every node, one name, typed answers.

::

    from kvmesh.client import Client, Chunk, Result

    with Client("routers.example:50051", token=TOKEN) as client:
        for event in client.generate("Hello there", max_tokens=32):
            if isinstance(event, Chunk):
                print(event.text, end="", flush=True)
            elif isinstance(event, Result):
                print(f"\\n{event.cached_prompt_tokens}/{event.prompt_tokens} prompt tokens cached")

:class:`AsyncClient` has the same calls for asyncio.

How it talks to the mesh (each knob in :class:`ClientConfig`):

* it dials ``dns:///HOST:PORT``: gRPC resolves the name to *every* node
  behind it, and the ``round_robin`` policy spreads calls over all of
  them (gRPC's default would put every call of the client on one node);
* a call that a node refuses (UNAVAILABLE: draining, joining) or loses
  before any answer is retried on another node by gRPC itself, within a
  retry budget; a stream that has answered is never retried
  (:class:`RetryConfig`, :mod:`kvmesh.client.service_config`, whose
  :data:`SERVICE_CONFIG_JSON` other languages can use as it is);
* nodes that report NOT_SERVING (joining, draining) get no new call;
* the name is resolved again every ``reresolve_interval`` seconds, so
  nodes added behind it get calls (:mod:`kvmesh.client.redial`);
* every call has a deadline (``timeout``), which the node passes on to
  the engine;
* TLS is on unless ``tls=False``; a token goes as ``authorization: Bearer``.

A failed call raises :class:`KvmeshError` with the status, the node's
``kvmesh-reason`` and its message.

Code that calls the generated stubs itself gets its channel from
:func:`channel` / :func:`aio_channel`, dialed the same way; :data:`ONE_NODE`
is the configuration for one node's own address when what that node
answers matters (no retry, no health gating).
"""

from kvmesh.client.aio import AsyncClient, stream_events
from kvmesh.client.channel import aio_channel, channel
from kvmesh.client.config import (
    DEFAULT_TARGET,
    ONE_NODE,
    ClientConfig,
    ClientConfigError,
    RetryConfig,
    TlsConfig,
)
from kvmesh.client.errors import KvmeshError
from kvmesh.client.messages import (
    Candidate,
    Chunk,
    Decision,
    Event,
    GenerateOptions,
    Prompt,
    Result,
    Routed,
    RouteOptions,
    RouteResult,
    generate_request,
    route_request,
)
from kvmesh.client.service_config import SERVICE_CONFIG_JSON, service_config
from kvmesh.client.sync import Client
from kvmesh.client.targets import TargetError, channel_target, static_target

__all__ = [
    "DEFAULT_TARGET",
    "ONE_NODE",
    "SERVICE_CONFIG_JSON",
    "AsyncClient",
    "Candidate",
    "Chunk",
    "Client",
    "ClientConfig",
    "ClientConfigError",
    "Decision",
    "Event",
    "GenerateOptions",
    "KvmeshError",
    "Prompt",
    "Result",
    "RetryConfig",
    "RouteOptions",
    "RouteResult",
    "Routed",
    "TargetError",
    "TlsConfig",
    "aio_channel",
    "channel",
    "channel_target",
    "generate_request",
    "route_request",
    "service_config",
    "static_target",
    "stream_events",
]
