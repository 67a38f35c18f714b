"""Every knob of a kvmesh client, with its default and why.

A client dials one *target*: a DNS name in front of every node
(``routers.example:50051``, dialed as ``dns:///routers.example:50051``) or
any gRPC target with its own scheme (``ipv4:10.0.0.1:50051,10.0.0.2:50051``,
``unix:/run/kvmesh.sock``). gRPC resolves the name to every address behind
it and balances calls over them (``round_robin``); a call that a node
refuses, or loses, before any answer is retried on another node
(:class:`RetryConfig`); calls carry a deadline (``timeout``).

gRPC's DNS resolver asks DNS again only when a connection fails, so a node
*added* behind the name gets no call from a channel that is doing fine.
The client therefore dials the name afresh every ``reresolve_interval``
seconds (new calls go to the new channel once it is connected; the old one
closes when its last call ends). Servers that close connections after a
maximum age (``grpc.max_connection_age_ms``) have the same effect for every
gRPC client; this knob makes the Python client independent of that.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["DEFAULT_TARGET", "ONE_NODE", "ClientConfig", "ClientConfigError", "RetryConfig", "TlsConfig"]

# Where `kvmesh generate`/`kvmesh route` look when no --target is given: a node
# started with the router's default --listen on this machine.
DEFAULT_TARGET = "localhost:50051"

# gRPC caps a retry policy's maxAttempts at 5 (gRFC A6); more is silently cut.
_MAX_ATTEMPTS_CAP = 5
# gRPC's bound on retryThrottling.maxTokens.
_MAX_THROTTLE_TOKENS = 1000


class ClientConfigError(ValueError):
    """A client setting that cannot be used."""


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """TLS to the nodes' public port. All files are PEM."""

    ca_file: str = ""  # the CA that signed the nodes' certificates; "": the system's roots
    cert_file: str = ""  # this client's certificate, for nodes that require one (--tls-client-ca)
    key_file: str = ""
    server_name: str = ""  # the name to check the node's certificate against; "": the target's host

    def check(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ClientConfigError("a client certificate needs both its file and its key file")


@dataclass(frozen=True, slots=True)
class RetryConfig:
    """gRPC's retry policy (gRFC A6), applied by gRPC itself in the channel.

    A call is retried only while no answer has arrived: a node that refused
    it (UNAVAILABLE: draining, still joining) or whose connection died
    before its first message did no work for it, so another node may take
    it. Once a stream has sent its first message the call is committed and
    is never retried (its tokens may already be on the caller's screen);
    the exception says so (:attr:`kvmesh.client.KvmeshError.started`).

    The retry budget (``retryThrottling``) is a token bucket shared by the
    channel's calls: each failed attempt takes a token, each success gives
    back ``throttle_token_ratio``; below half of ``throttle_max_tokens``
    nothing is retried. So when most of the fleet is down, calls fail at
    once instead of multiplying the load; the bucket is sized so that the
    streams lost with one node (every call in flight on it fails at once)
    do not empty it.
    """

    max_attempts: int = 3  # first try included; 1 turns retries off
    initial_backoff: float = 0.1  # seconds: the first retry waits up to this (random, gRPC's jitter)
    max_backoff: float = 1.0  # seconds: no wait is longer
    backoff_multiplier: float = 2.0
    retryable_codes: tuple[str, ...] = ("UNAVAILABLE",)
    throttle_max_tokens: int = 100
    throttle_token_ratio: float = 0.1

    def check(self) -> None:
        if not 1 <= self.max_attempts <= _MAX_ATTEMPTS_CAP:
            raise ClientConfigError(f"max_attempts must be in 1..{_MAX_ATTEMPTS_CAP} (gRPC's cap)")
        if self.initial_backoff <= 0 or self.max_backoff < self.initial_backoff:
            raise ClientConfigError("backoffs must be positive, max_backoff >= initial_backoff")
        if self.backoff_multiplier <= 0:
            raise ClientConfigError("backoff_multiplier must be positive")
        if not self.retryable_codes:
            raise ClientConfigError("retryable_codes is empty: use max_attempts=1 to turn retries off")
        if not 0 < self.throttle_max_tokens <= _MAX_THROTTLE_TOKENS:
            raise ClientConfigError(f"throttle_max_tokens must be in 1..{_MAX_THROTTLE_TOKENS}")
        if self.throttle_token_ratio <= 0:
            raise ClientConfigError("throttle_token_ratio must be positive")


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """How a client dials, balances, retries and waits. See the module docstring."""

    # Deadline of each call, in seconds, unless the call gives its own; the node
    # stops the engine's work when it passes. math.inf: no deadline.
    timeout: float = 120.0
    # gRPC load-balancing policy over the addresses behind the target:
    # "round_robin" spreads calls over every node, "pick_first" sticks to one.
    load_balancing: str = "round_robin"
    retry: RetryConfig = field(default_factory=RetryConfig)
    # gRPC client-side health checking: a node whose health for this service is
    # not SERVING (still joining, draining) gets no new call. "": off.
    health_check_service: str = "kvmesh.v1.Router"
    # Seconds between fresh dials of the target, so that nodes added behind the
    # name get calls (module docstring). 0: never, only when connections fail.
    reresolve_interval: float = 30.0
    # Seconds at least between two DNS queries of one channel when connections
    # fail (gRPC's grpc.dns_min_time_between_resolutions_ms, 30 s by default):
    # a dead node leaves the address list sooner.
    dns_min_resolution_interval: float = 5.0
    # Largest request gRPC keeps to retry it (grpc.per_rpc_retry_buffer_size); a
    # larger request is sent once, never retried. Fits a prompt of a million token ids.
    retry_buffer_bytes: int = 16 << 20
    max_receive_bytes: int = 64 << 20  # largest answer accepted (an engine list of a big fleet)
    # Further gRPC channel arguments, applied last (they override the above).
    channel_options: tuple[tuple[str, int | str], ...] = ()

    def check(self) -> None:
        if not self.timeout > 0:  # NaN too
            raise ClientConfigError("timeout must be positive (math.inf: no deadline)")
        if self.load_balancing not in ("round_robin", "pick_first"):
            raise ClientConfigError("load_balancing must be round_robin or pick_first")
        if self.reresolve_interval < 0 or self.dns_min_resolution_interval < 0:
            raise ClientConfigError("intervals cannot be negative")
        if self.retry_buffer_bytes < 0 or self.max_receive_bytes <= 0:
            raise ClientConfigError("byte bounds must be positive")
        self.retry.check()


# For one node's own address, when what matters is what that node answers:
# every status as the node sent it (no retry, not even gRPC's transparent one),
# whatever its health says, over one channel for the client's life. Probes,
# benchmarks that measure a node, Admin calls aimed at one node (Drain), tests
# of the wire.
ONE_NODE = ClientConfig(
    load_balancing="pick_first",
    retry=RetryConfig(max_attempts=1),
    health_check_service="",
    reresolve_interval=0,
)
