"""A router node's configuration: the one home of every default of a node.

``kvmesh router`` (kvmesh/cli/router.py) builds its flags from these fields:
each flag's default and the numbers in its help are read from here. The
mesh's timing knobs live in :class:`mesh.membership.MembershipConfig` and
:class:`mesh.core.MeshConfig`, the mesh transport's in :class:`mesh.transport.TransportConfig`, the circuit
breaker's in :class:`router.circuit_breaker.BreakerConfig`, the engine HTTP
client's in :class:`engine_adapters.proxy.EngineClientConfig`, the KV-event
subscription's in :class:`engine_adapters.event_adapter.EventAdapterConfig`;
this config holds one of each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine_adapters.event_adapter import EventAdapterConfig
from engine_adapters.proxy import EngineClientConfig
from engine_adapters.tokenizer import BUILTIN
from mesh.core import MeshConfig
from mesh.transport import TransportConfig
from router.admission import AdmissionConfig
from router.approx_tree import ApproxTree
from router.auth import ApiAuthConfig
from router.circuit_breaker import BreakerConfig
from router.engine_registry import EngineSpec
from router.index import PrefixIndex
from router.policies import POLICY_NAMES, make_policy
from router.request_path import RetryPolicy

__all__ = ["LOG_FORMATS", "LOG_LEVELS", "RouterConfig", "check_policy_opts"]

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("console", "json")


@dataclass(slots=True)
class RouterConfig:
    # --- addresses -------------------------------------------------------------------
    listen: str = "127.0.0.1:50051"  # gRPC HOST:PORT (port 0: any free port)
    advertise: str = ""  # HOST:PORT other nodes reach this one at; "": the listen address
    node_id: str = ""  # unique in the mesh; "": the advertised address
    # The node-to-node port: "" serves the mesh on the public port. A port of
    # its own takes mutual TLS (TransportConfig) and keeps mesh traffic apart
    # from client load; seeds (``join``) then name mesh ports.
    mesh_listen: str = ""
    mesh_advertise: str = ""  # HOST:PORT other nodes reach the mesh port at; "": from mesh_listen
    # Seeds to join the mesh through (HOST:PORT, a DNS name may stand for
    # several nodes); none: this node starts a new mesh.
    join: list[str] = field(default_factory=list)
    seed_resolve_timeout: float = 30.0  # seconds to wait for a seed's DNS name to resolve
    seed_resolve_retry: float = 1.0  # seconds between DNS attempts
    # Seconds between re-resolutions of the seed names once this node has
    # peers (until then every seed_resolve_retry): two meshes that started
    # apart behind one name find each other and merge.
    seed_refresh_interval: float = 30.0

    # --- routing ---------------------------------------------------------------------
    policy: str = "precise"  # default routing policy (a request may name another)
    policy_opts: dict[str, dict[str, float]] = field(default_factory=dict)  # policy -> option -> value
    engines: list[EngineSpec] = field(default_factory=list)  # registered at start
    tokenizers: dict[str, str] = field(default_factory=dict)  # model -> tokenizer.json path or "builtin"
    default_tokenizer: str = BUILTIN  # for models without an entry in ``tokenizers``
    seed: int | None = None  # seeds random policy choices (never the mesh's ids)
    # A pick answered by the Route RPC (the caller sends the request itself)
    # counts as load on that worker for this long.
    route_load_ttl: float = 2.0

    # --- requests --------------------------------------------------------------------
    retry: RetryPolicy = field(default_factory=RetryPolicy)  # attempts per request, backoff
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)  # what this node takes on
    default_max_tokens: int = 16  # when a request does not say (OpenAI's completions default)
    max_prompt_tokens: int = 1 << 20
    max_request_bytes: int = 32 << 20  # one gRPC message on the public API
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    engine_client: EngineClientConfig = field(default_factory=EngineClientConfig)
    health_interval: float = 2.0  # seconds between engine health probes
    health_down_after: int = 2  # failed probes in a row that take an engine out

    # --- the process -----------------------------------------------------------------
    metrics_port: int = 0  # Prometheus /metrics; 0: off
    metrics_addr: str = "127.0.0.1"
    log_level: str = "info"
    log_format: str = "console"
    # On SIGTERM or Admin.Drain: health goes NOT_SERVING and new requests are
    # refused at once; requests in flight get this long to finish.
    drain_timeout: float = 30.0
    stop_grace: float = 2.0  # seconds RPCs still open after the drain get when the server stops
    leave_timeout: float = 3.0  # seconds to hand engines over and tell the mesh on leave
    mesh: MeshConfig = field(default_factory=MeshConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)  # also bounds the server's messages
    api_auth: ApiAuthConfig = field(default_factory=ApiAuthConfig)  # TLS and tokens of the public port
    # Serve a port without authentication (no TLS or tokens on the public
    # port, no mTLS or secret on the mesh): only when the operator says so.
    insecure: bool = False
    event_adapter: EventAdapterConfig = field(default_factory=EventAdapterConfig)  # owned engines' events

    def __post_init__(self) -> None:
        # Fail at start, not on the first request.
        if self.policy not in POLICY_NAMES:
            raise ValueError(f"unknown policy {self.policy!r}; one of {', '.join(POLICY_NAMES)}")
        check_policy_opts(self.policy_opts)
        for name in ("seed_resolve_retry", "seed_refresh_interval"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        self.api_auth.check()
        self.transport.check()
        if self.transport.tls and not self.mesh_listen:
            raise ValueError("mesh TLS needs the mesh on a port of its own (--mesh-listen)")

    @property
    def mesh_addr(self) -> str:
        """The address other nodes reach this node's mesh port at."""
        return self.mesh_advertise or (self.mesh_listen or self.advertise or self.listen)

    def unauthenticated_ports(self) -> list[str]:
        """The ports this config would serve without authentication."""
        out = []
        if not self.api_auth.authenticated:
            out.append("the public API (no TLS, no tokens)")
        if not self.transport.authenticated:
            out.append("the mesh (no mutual TLS, no shared secret)")
        return out


def check_policy_opts(policy_opts: dict[str, dict[str, float]]) -> None:
    """Build each policy with its options once: unknown or out-of-range
    options raise ValueError, in the policy's own words."""
    for name, opts in policy_opts.items():
        given: dict[str, Any] = dict(opts)  # numbers from the command line; each policy checks its own
        make_policy(name, PrefixIndex(), ApproxTree(), **given)
