"""A router node's configuration: the one home of every default of a node.

``kvmesh router`` (kvmesh/cli/router.py) builds its flags from these fields:
each flag's default and the numbers in its help are read from here. The
mesh's timing knobs live in :class:`mesh.membership.MembershipConfig` and
:class:`mesh.core.MeshConfig`, the mesh transport's in :class:`mesh.transport.TransportConfig`, the circuit
breaker's in :class:`router.circuit_breaker.BreakerConfig`, the engine HTTP
client's in :class:`engine_adapters.proxy.EngineClientConfig`, the KV-event
subscription's in :class:`engine_adapters.event_adapter.EventAdapterConfig`,
engine discovery's in :class:`router.discovery.DiscoveryConfig`, tracing's in
:class:`router.tracing.TracingConfig`, the event loop's lag probe's in
:class:`router.loop_lag.LoopLagConfig`; this config holds one of each.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from engine_adapters.event_adapter import EventAdapterConfig
from engine_adapters.proxy import EngineClientConfig
from engine_adapters.tokenizer import BUILTIN
from mesh.core import MeshConfig
from mesh.transport import TransportConfig
from router.addresses import check_address
from router.admission import AdmissionConfig
from router.approx_tree import ApproxTree
from router.auth import ApiAuthConfig
from router.circuit_breaker import BreakerConfig
from router.discovery import DiscoveryConfig
from router.engine_registry import EngineSpec
from router.index import PrefixIndex
from router.logs import LOG_LEVELS
from router.loop_lag import LoopLagConfig
from router.metrics import split_listen
from router.policies import POLICY_NAMES, make_policy
from router.request_path import RetryPolicy
from router.tracing import TracingConfig

__all__ = ["LOG_FORMATS", "LOG_LEVELS", "OpenPort", "RouterConfig", "check_policy_opts"]

LOG_FORMATS = ("console", "json")


class CertFile(NamedTuple):
    label: str  # the ``cert`` label of kvmesh_tls_cert_expiry_timestamp_seconds
    flag: str
    path: str
    ca: bool  # a file of authorities that are trusted, not a certificate served


class OpenPort(NamedTuple):
    """A port the config would serve without authentication."""

    port: str  # which one, in the operator's words
    fix: str  # the flags that would authenticate it


# RouterConfig fields that no flag of `kvmesh router` sets (embedding code
# may): a refusal names them as fields, every other one as its flag.
_NO_FLAG = frozenset({"seed_resolve_retry", "join_warn_interval"})


def _said(field: str) -> str:
    """How a refusal names ``field``: its ``--flag``, or the field where no flag sets it."""
    return field if field in _NO_FLAG else "--" + field.replace("_", "-")


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
    # The OpenAI-compatible HTTP API (router/http_front.py), with the public
    # port's TLS and tokens; "": off.
    http_listen: str = ""
    # Seeds to join the mesh through (HOST:PORT, a DNS name may stand for
    # several nodes); none: this node starts a new mesh.
    join: list[str] = field(default_factory=list)
    seed_resolve_timeout: float = 30.0  # seconds to wait for a seed's DNS name to resolve
    seed_resolve_retry: float = 1.0  # seconds between DNS attempts
    # Seconds between re-resolutions of the seed names once this node has
    # peers (until then every seed_resolve_retry): two meshes that started
    # apart behind one name find each other and merge.
    seed_refresh_interval: float = 30.0
    # Until a seed lets this node in, it waits (NOT_SERVING, no READY line) for
    # as long as it takes, and says so (router.join_waiting): once its first
    # Join has gone unanswered (membership.join_retry_interval), then every
    # this many seconds. A seed that is down or unreachable shows in the log.
    join_warn_interval: float = 10.0

    # --- routing ---------------------------------------------------------------------
    policy: str = "precise"  # default routing policy (a request may name another)
    policy_opts: dict[str, dict[str, float]] = field(default_factory=dict)  # policy -> option -> value
    engines: list[EngineSpec] = field(default_factory=list)  # registered at start
    # Engines of DNS names (--engines-from-dns), re-resolved while the node runs.
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    tokenizers: dict[str, str] = field(default_factory=dict)  # model -> tokenizer.json path or "builtin"
    default_tokenizer: str = BUILTIN  # for models without an entry in ``tokenizers``
    # model -> chat template file (.jinja, or JSON with chat_template): wins
    # over the one beside the model's tokenizer (engine_adapters/chat_template.py)
    chat_templates: dict[str, str] = field(default_factory=dict)
    seed: int | None = None  # seeds random policy choices (never the mesh's ids)
    # A pick answered by the Route RPC (the caller sends the request itself)
    # counts as load on that worker for this long.
    route_load_ttl: float = 2.0
    # Bound on the prefix index: distinct GPU blocks, and separately as many
    # lower-tier (host, disk, external) blocks; past it the least recently
    # matched go (routing treats them as cold; router/index.py). 0: no bound.
    max_index_blocks: int = 0

    # --- requests --------------------------------------------------------------------
    retry: RetryPolicy = field(default_factory=RetryPolicy)  # attempts per request, backoff
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)  # what this node takes on
    default_max_tokens: int = 16  # when a request does not say (OpenAI's completions default)
    max_prompt_tokens: int = 1 << 20
    # A text prompt longer than this (characters) is tokenized on a worker
    # thread, one such prompt at a time, so the event loop keeps serving.
    thread_tokenize_chars: int = 1 << 14
    max_request_bytes: int = 32 << 20  # one gRPC message on the public API
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    engine_client: EngineClientConfig = field(default_factory=EngineClientConfig)
    health_interval: float = 2.0  # seconds between engine health probes
    health_down_after: int = 2  # failed probes in a row that take an engine out

    # --- the process -----------------------------------------------------------------
    # Prometheus GET /metrics at HOST:PORT (port 0: any free port); "": off.
    # Off by default: tests and benchmarks run many nodes on one host. The
    # image turns it on for all interfaces (KVMESH_METRICS_LISTEN=0.0.0.0:9090);
    # it takes the public API's TLS and tokens (router/metrics.py).
    metrics_listen: str = ""
    log_level: str = "info"
    log_format: str = "console"
    loop_lag: LoopLagConfig = field(default_factory=LoopLagConfig)  # how the event loop's lag is watched
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
    # W3C traceparent always passes on to the engine; spans only with an OTLP endpoint (router/tracing.py).
    tracing: TracingConfig = field(default_factory=TracingConfig)

    def __post_init__(self) -> None:
        # Fail at start, not on the first request.
        if self.policy not in POLICY_NAMES:
            raise ValueError(f"unknown policy {self.policy!r}; one of {', '.join(POLICY_NAMES)}")
        check_policy_opts(self.policy_opts)
        if not isinstance(self.max_index_blocks, int) or self.max_index_blocks < 0:
            raise ValueError(f"--max-index-blocks must be >= 0 (0: no bound), got {self.max_index_blocks}")
        for name in (
            "seed_resolve_retry",
            "seed_refresh_interval",
            "join_warn_interval",
            "health_interval",
            "max_request_bytes",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{_said(name)} must be > 0, got {getattr(self, name)}")
        if not self.drain_timeout >= 0:
            raise ValueError(
                f"--drain-timeout must be >= 0 (0: cut what is in flight), got {self.drain_timeout}"
            )
        # The first attempt counts: 0 would still make one.
        if not self.retry.max_attempts >= 1:
            raise ValueError(f"--max-attempts must be >= 1 (1: no retry), got {self.retry.max_attempts}")
        if not self.engine_client.stream_idle_timeout > 0:
            raise ValueError(
                f"--stream-idle-timeout must be > 0, got {self.engine_client.stream_idle_timeout}"
            )
        self._check_addresses()
        # Two specs for one id: registration would keep the last without a word.
        twice = sorted(e for e, n in Counter(s.engine_id for s in self.engines).items() if n > 1)
        if twice:
            raise ValueError(f"--engine id {', '.join(map(repr, twice))} given more than once")
        self.api_auth.check()
        if self.metrics_listen:
            split_listen(self.metrics_listen)  # ValueError names the flag
        self.discovery.check()
        self.tracing.check()
        self.transport.check()
        if self.transport.tls and not self.mesh_listen:
            raise ValueError("mesh TLS needs the mesh on a port of its own (--mesh-listen)")
        if self.mesh_shares_tls_port and self.join:
            raise ValueError(
                "TLS on the public port (--tls-cert) needs the mesh on a port of its own (--mesh-listen)"
            )

    def _check_addresses(self) -> None:
        """Each address's syntax and port (AddressError, a ValueError naming
        the flag). Listen addresses take port 0 (any free port); addresses
        others dial do not."""
        check_address(self.listen, "--listen", any_port=True)
        for flag, listen in (("--mesh-listen", self.mesh_listen), ("--http-listen", self.http_listen)):
            if listen:
                check_address(listen, flag, any_port=True)
        for flag, addr in (("--advertise", self.advertise), ("--mesh-advertise", self.mesh_advertise)):
            if addr:
                check_address(addr, flag)
        for seed in self.join:
            check_address(seed, "--join")

    @property
    def mesh_shares_tls_port(self) -> bool:
        """The mesh on a public port that takes TLS: nodes dial each other's
        mesh address without the public port's TLS, so no node could join
        this one (a lone node is fine)."""
        return self.api_auth.tls and not self.mesh_listen

    @property
    def mesh_addr(self) -> str:
        """The address other nodes reach this node's mesh port at."""
        return self.mesh_advertise or (self.mesh_listen or self.advertise or self.listen)

    def certificates(self) -> list[CertFile]:
        """The certificate files this config serves and trusts (those set)."""
        a, t = self.api_auth, self.transport
        files = (
            CertFile("api", "--tls-cert", a.tls_cert, False),
            CertFile("api_client_ca", "--tls-client-ca", a.tls_client_ca, True),
            CertFile("mesh", "--mesh-tls-cert", t.tls_cert, False),
            CertFile("mesh_ca", "--mesh-tls-ca", t.tls_ca, True),
        )
        return [f for f in files if f.path]

    def unauthenticated_ports(self) -> list[OpenPort]:
        """The ports this config would serve without authentication."""
        out = []
        if not self.api_auth.authenticated:
            out.append(
                OpenPort("the public API (no TLS, no tokens)", "--tls-cert/--tls-key or --auth-token-file")
            )
        if not self.transport.authenticated:
            out.append(
                OpenPort("the mesh (no mutual TLS, no shared secret)", "--mesh-secret-file or --mesh-tls-*")
            )
        return out


def check_policy_opts(policy_opts: dict[str, dict[str, float]]) -> None:
    """Build each policy with its options once: unknown or out-of-range
    options raise ValueError, in the policy's own words."""
    for name, opts in policy_opts.items():
        given: dict[str, Any] = dict(opts)  # numbers from the command line; each policy checks its own
        make_policy(name, PrefixIndex(), ApproxTree(), **given)
