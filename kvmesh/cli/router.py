"""``kvmesh router``: run one router node.

Every flag's default, and every number in the help, is read from the config
dataclasses that own it: :class:`router.config.RouterConfig` for the node,
:class:`mesh.membership.MembershipConfig` for the mesh's timing,
:class:`router.engine_registry.EngineSpec` for an engine's fields.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import os
import signal
import ssl
import sys
import time

import structlog

from engine_adapters.chat_template import ChatTemplateError
from engine_adapters.event_adapter import EventAdapterConfig
from engine_adapters.proxy import EngineClientConfig
from engine_adapters.tokenizer import TokenizerError
from mesh.auth import MeshAuthError, MeshSecret
from mesh.core import MeshConfig
from mesh.membership import MembershipConfig
from mesh.transport import TransportConfig
from router import cert_validity
from router.addresses import AddressError, advertised_address, resolve_listen, resolve_seeds
from router.admission import AdmissionConfig
from router.auth import MIN_TOKEN_CHARS, ApiAuthConfig, AuthError, TokenTable
from router.config import LOG_FORMATS, LOG_LEVELS, RouterConfig, check_policy_opts
from router.discovery import DiscoveryConfig
from router.engine_registry import SPEC_KEYS, EngineSpec, EngineSpecError
from router.logs import configure_logging, toggle_debug
from router.loop_lag import LoopLagConfig
from router.node import RouterNode
from router.policies import POLICY_NAMES, policy_options
from router.request_path import RetryPolicy
from router.service import serve
from router.tracing import TracingConfig

__all__ = [
    "check_files",
    "config_from_args",
    "configure_parser",
    "parse_policy_opts",
    "parse_tokenizers",
    "run",
]

log = structlog.get_logger(__name__)
_PROG = "kvmesh router"


def _default(cls: type, name: str) -> object:
    """The default of dataclass field ``name`` of ``cls``."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def _engine_help() -> str:
    """The --engine help, written from the keys the parser takes
    (:data:`router.engine_registry.SPEC_KEYS`), with EngineSpec's defaults."""
    shown: dict[str, str] = {}  # field -> its keys and value, as written in the help
    for key, (name, value) in SPEC_KEYS.items():
        if name in shown:  # another key for a field already listed
            shown[name] += f" (or {key}=)"
            continue
        shown[name] = f"{key}={value}"
        default = _default(EngineSpec, name)
        if default not in (dataclasses.MISSING, "", 0):
            shown[name] += f" (default {default})"
    return (
        "engine to route to, repeatable: comma-separated KEY=VALUE, at least id= and url=; keys: "
        + ", ".join(shown.values())
    )


def configure_parser(p: argparse.ArgumentParser) -> None:
    d = RouterConfig()
    m = MembershipConfig()
    p.add_argument(
        "--listen",
        default=d.listen,
        help="gRPC address HOST:PORT (port 0: any free port; default %(default)s)",
    )
    p.add_argument(
        "--advertise",
        default=d.advertise,
        help="HOST:PORT other nodes reach this one at (default: the "
        "listen address; with 0.0.0.0, this host's address)",
    )
    p.add_argument(
        "--node-id",
        default=d.node_id,
        help="unique node name in the mesh (default: the advertised address); a node started with the "
        "id of a live member stops with an error",
    )
    p.add_argument(
        "--join",
        action="append",
        default=[],
        metavar="SEED",
        help="join the mesh through a live node, repeatable: HOST:PORT, or a DNS name:PORT that "
        "resolves to several nodes (each address is tried). Without it, this node starts a new mesh",
    )
    p.add_argument(
        "--seed-refresh-interval",
        type=float,
        default=d.seed_refresh_interval,
        help="seconds between re-resolutions of the --join names once this node has peers (until "
        f"then every {d.seed_resolve_retry} s); new addresses are merged into the mesh "
        "(default %(default)s)",
    )
    p.add_argument(
        "--probe-interval",
        type=float,
        default=m.probe_interval,
        help="SWIM probe interval, seconds (default %(default)s)",
    )
    p.add_argument(
        "--gossip-interval",
        type=float,
        default=m.gossip_interval,
        help="gossip interval, seconds, of both membership and state gossip (default %(default)s)",
    )
    p.add_argument(
        "--policy",
        default=d.policy,
        choices=POLICY_NAMES,
        help="default routing policy (default %(default)s)",
    )
    p.add_argument(
        "--policy-opt",
        action="append",
        default=[],
        metavar="POLICY.KEY=VALUE",
        help="tune a policy, repeatable; the options and their defaults: "
        + "; ".join(
            f"{name}: " + ", ".join(f"{k}={v}" for k, v in opts.items())
            for name, opts in policy_options().items()
            if opts
        ),
    )
    p.add_argument(
        "--engine",
        action="append",
        default=[],
        metavar="SPEC",
        help=_engine_help(),
    )
    _add_discovery_flags(p, d)
    p.add_argument(
        "--tokenizer",
        action="append",
        default=[],
        metavar="MODEL=SPEC",
        help="tokenizer for text prompts of MODEL: a local tokenizer.json, the model's directory "
        "holding one (and its tokenizer_config.json, whose chat template renders chat requests), "
        f"or 'builtin' (the simulated engine's); default for every model: {d.default_tokenizer!r}",
    )
    p.add_argument(
        "--chat-template",
        action="append",
        default=[],
        metavar="MODEL=FILE",
        help="chat template of MODEL for /v1/chat/completions (a .jinja file, or JSON with "
        "chat_template), instead of the one beside its tokenizer: give the engine the same file",
    )
    p.add_argument(
        "--http-listen",
        default=d.http_listen,
        metavar="HOST:PORT",
        help="serve the OpenAI-compatible API there too (/v1/completions, /v1/chat/completions, "
        "/v1/models, /health), with the same TLS and tokens as gRPC (default: off)",
    )
    p.add_argument(
        "--max-attempts",
        type=int,
        default=d.retry.max_attempts,
        help="engines tried per request before failing (default %(default)s)",
    )
    _add_overload_flags(p, d)
    _add_security_flags(p, d)
    p.add_argument(
        "--health-interval",
        type=float,
        default=d.health_interval,
        help="seconds between engine health probes (default %(default)s)",
    )
    p.add_argument(
        "--replay-probe-after",
        type=float,
        default=d.event_adapter.replay_probe_after,
        help="seconds without a KV-event batch from an owned engine before its replay socket is "
        "asked for anything newer: a lost last batch is applied within about this (0: never; "
        "default %(default)s)",
    )
    p.add_argument(
        "--metrics-listen",
        default=os.environ.get("KVMESH_METRICS_LISTEN", d.metrics_listen),
        metavar="HOST:PORT",
        help="serve Prometheus GET /metrics here (port 0: any free port, printed in the READY line); "
        "with the public API's TLS and tokens. Default $KVMESH_METRICS_LISTEN, else off; the image "
        "sets 0.0.0.0:9090",
    )
    p.add_argument(
        "--otlp-endpoint",
        default=d.tracing.otlp_endpoint,
        metavar="URL",
        help="export OpenTelemetry spans of routing and proxying to this OTLP/gRPC collector, "
        "http://HOST:PORT or https://HOST:PORT (needs the tracing extra: pip install 'kvmesh[tracing]'). "
        "Default off; a client's W3C traceparent reaches the engine either way",
    )
    # The image sets KVMESH_LOG_FORMAT=json: a container's logs go to a pipeline.
    p.add_argument(
        "--log-level",
        default=os.environ.get("KVMESH_LOG_LEVEL", d.log_level),
        choices=LOG_LEVELS,
        help=f"(default $KVMESH_LOG_LEVEL, else {d.log_level}); changed while running by "
        "Admin.SetLogLevel, and SIGHUP toggles debug",
    )
    p.add_argument(
        "--log-format",
        default=os.environ.get("KVMESH_LOG_FORMAT", d.log_format),
        choices=LOG_FORMATS,
        help=f"one event per line, key=value text or JSON (default $KVMESH_LOG_FORMAT, else {d.log_format})",
    )
    p.add_argument(
        "--loop-stall",
        type=float,
        default=d.loop_lag.stall,
        metavar="SECONDS",
        help="the node's event loop running its lag probe later than this is a stall: counted "
        "(kvmesh_event_loop_stalls_total) and logged as router.loop_stalled (default %(default)s)",
    )
    p.add_argument(
        "--loop-stall-log-every",
        type=float,
        default=d.loop_lag.log_every,
        metavar="SECONDS",
        help="at most one router.loop_stalled log this often, with the count not logged "
        "(default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="seed for random policy choices")
    p.add_argument(
        "--max-index-blocks",
        type=int,
        default=d.max_index_blocks,
        metavar="N",
        help="bound on the prefix index: at most N distinct GPU blocks (and N lower-tier blocks); "
        "past it the least recently matched are dropped (routed as cold, counted in "
        "kvmesh_index_evicted_blocks_total). 0: no bound (default %(default)s)",
    )


def _add_discovery_flags(p: argparse.ArgumentParser, d: RouterConfig) -> None:
    """Engines of DNS names (router/discovery.py explains the rules)."""
    dd = d.discovery
    p.add_argument(
        "--engines-from-dns",
        action="append",
        default=[],
        metavar="NAME[:PORT][=TEMPLATE]",
        help="route to every IPv4 address NAME resolves to (a headless Service), repeatable: each "
        "address becomes an engine of the --engine-template (or of this name's own TEMPLATE), with "
        f"{{host}} the address and {{port}} PORT (default {dd.port}); NAME is resolved again every "
        "--discovery-interval, new addresses are registered mesh-wide, and an engine whose address "
        "has been missing for --discovery-grace is removed (by its owner). Engines registered by "
        "hand are never removed by discovery",
    )
    p.add_argument(
        "--engine-template",
        default=dd.template,
        metavar="SPEC",
        help="the --engine SPEC of a discovered address, with {host} and {port} placeholders, e.g. "
        "url=http://{host}:8000,kv=tcp://{host}:5557,replay=tcp://{host}:5558,model=M; the id, when "
        "given, must contain {host} (default id: NAME's first label and the address, "
        "e.g. engines-10-0-0-5; default template %(default)s)",
    )
    p.add_argument(
        "--discovery-interval",
        type=float,
        default=dd.interval,
        help="seconds between resolutions of each --engines-from-dns name; a resolution that takes "
        "longer fails, and a failed one changes nothing (default %(default)s)",
    )
    p.add_argument(
        "--discovery-grace",
        type=float,
        default=dd.grace,
        help="seconds an address must be missing from the answers of the engine's owner before the "
        "engine is removed (default %(default)s)",
    )


def _add_overload_flags(p: argparse.ArgumentParser, d: RouterConfig) -> None:
    """Admission, stalls and drain: what keeps a node's latency bounded."""
    a = d.admission
    p.add_argument(
        "--max-in-flight",
        type=int,
        default=a.max_in_flight,
        help="Generate requests this node has on engines at once; more wait here (default %(default)s)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=a.max_queue,
        help="requests waiting on this node for a slot; past it new ones get RESOURCE_EXHAUSTED "
        "(default %(default)s)",
    )
    p.add_argument(
        "--max-queue-wait",
        type=float,
        default=a.max_queue_wait,
        help="seconds: a request the fleet would start later than this (estimated from the rate "
        "at which it starts this node's requests) is shed at once with RESOURCE_EXHAUSTED "
        "(default %(default)s)",
    )
    p.add_argument(
        "--stream-idle-timeout",
        type=float,
        default=d.engine_client.stream_idle_timeout,
        help="seconds without a token from the engine once a stream has started: the engine "
        "request is aborted and the client gets DEADLINE_EXCEEDED (default %(default)s)",
    )
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=d.max_request_bytes,
        help="largest request the public API accepts, in bytes; a larger one is refused with "
        "RESOURCE_EXHAUSTED request_too_large (default %(default)s; when the mesh shares the port, "
        "gRPC reads messages up to the mesh's bound before this check: --mesh-listen keeps the "
        "port's own bound this small)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=d.drain_timeout,
        help="seconds requests in flight get to finish on SIGTERM, SIGINT or Admin.Drain, while new "
        "ones are refused; a second SIGTERM or SIGINT ends the wait (default %(default)s)",
    )


def _add_security_flags(p: argparse.ArgumentParser, d: RouterConfig) -> None:
    """Who may call the node, and how nodes know each other (router/auth.py, mesh/auth.py)."""
    p.add_argument(
        "--insecure",
        action="store_true",
        help="serve a port without authentication (the public API without TLS or tokens, the mesh "
        "without mutual TLS or a shared secret); without this flag the node refuses to start so",
    )
    p.add_argument("--tls-cert", default=d.api_auth.tls_cert, help="PEM certificate of the public port (TLS)")
    p.add_argument("--tls-key", default=d.api_auth.tls_key, help="its PEM private key")
    p.add_argument(
        "--tls-client-ca",
        default=d.api_auth.tls_client_ca,
        help="PEM CA: clients must present a certificate it signed (mutual TLS)",
    )
    p.add_argument(
        "--auth-token-file",
        default=d.api_auth.token_file,
        help=f"bearer tokens, one a line: TOKEN [client|admin], each at least {MIN_TOKEN_CHARS} "
        "characters; calls carry 'authorization: Bearer TOKEN'; Admin calls need an admin token",
    )
    p.add_argument(
        "--mesh-listen",
        default=d.mesh_listen,
        help="HOST:PORT of the node-to-node port (default: the mesh shares --listen); seeds given "
        "with --join then name mesh ports",
    )
    p.add_argument(
        "--mesh-advertise", default=d.mesh_advertise, help="HOST:PORT other nodes reach the mesh port at"
    )
    t = d.transport
    p.add_argument(
        "--mesh-secret-file", default=t.secret_file, help="shared secret every mesh message proves (HMAC)"
    )
    p.add_argument("--mesh-tls-cert", default=t.tls_cert, help="PEM certificate of this node on the mesh")
    p.add_argument("--mesh-tls-key", default=t.tls_key, help="its PEM private key")
    p.add_argument("--mesh-tls-ca", default=t.tls_ca, help="PEM CA that signed every member's certificate")
    p.add_argument(
        "--mesh-tls-server-name",
        default=t.tls_server_name,
        help="the name every member's mesh certificate carries, checked on the nodes it dials and on "
        "those that call it (default %(default)s)",
    )


def parse_policy_opts(items: list[str]) -> dict[str, dict[str, float]]:
    """``["precise.overlap_weight=2", ...]`` -> ``{"precise": {"overlap_weight": 2}}``
    (a value written without a dot is an int)."""
    out: dict[str, dict[str, float]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        policy, dot, opt = key.partition(".")
        if not sep or not dot or not opt:
            raise ValueError(f"--policy-opt {item!r}: want POLICY.KEY=VALUE")
        if policy not in POLICY_NAMES:
            raise ValueError(
                f"--policy-opt {item!r}: unknown policy {policy!r}; one of {', '.join(POLICY_NAMES)}"
            )
        try:
            v = float(value)
        except ValueError:
            raise ValueError(f"--policy-opt {item!r}: value must be a number") from None
        out.setdefault(policy, {})[opt] = int(v) if v.is_integer() and "." not in value else v
    check_policy_opts(out)
    return out


def parse_tokenizers(
    items: list[str], flag: str = "--tokenizer", want: str = "MODEL=PATH or MODEL=builtin"
) -> dict[str, str]:
    """``["m=/path/tokenizer.json", ...]`` -> ``{"m": "/path/tokenizer.json"}``
    (also the ``MODEL=FILE`` pairs of ``flag``)."""
    out: dict[str, str] = {}
    for item in items:
        model, sep, spec = item.partition("=")
        if not sep:
            raise EngineSpecError(f"{flag} {item!r}: want {want}")
        out[model] = spec
    return out


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    """The node's config from parsed flags; ValueError (EngineSpecError, a
    bad policy option, a bad interval) names the flag or value at fault."""
    engines = [EngineSpec.parse(e) for e in args.engine]
    tokenizers = parse_tokenizers(args.tokenizer)
    chat_templates = parse_tokenizers(args.chat_template, "--chat-template", "MODEL=FILE")
    policy_opts = parse_policy_opts(args.policy_opt)
    membership = MembershipConfig(
        probe_interval=args.probe_interval,
        # A probe must time out within its interval: at most half of it.
        probe_timeout=min(MembershipConfig().probe_timeout, args.probe_interval / 2),
        gossip_interval=args.gossip_interval,
    )
    return RouterConfig(
        listen=args.listen,
        advertise=args.advertise,
        node_id=args.node_id,
        join=list(args.join),
        seed_refresh_interval=args.seed_refresh_interval,
        policy=args.policy,
        policy_opts=policy_opts,
        engines=engines,
        discovery=DiscoveryConfig(
            names=list(args.engines_from_dns),
            template=args.engine_template,
            interval=args.discovery_interval,
            grace=args.discovery_grace,
        ),
        tokenizers=tokenizers,
        chat_templates=chat_templates,
        http_listen=args.http_listen,
        seed=args.seed,
        max_index_blocks=args.max_index_blocks,
        loop_lag=LoopLagConfig(stall=args.loop_stall, log_every=args.loop_stall_log_every),
        retry=RetryPolicy(max_attempts=args.max_attempts),
        admission=AdmissionConfig(
            max_in_flight=args.max_in_flight,
            max_queue=args.max_queue,
            max_queue_wait=args.max_queue_wait,
        ),
        engine_client=EngineClientConfig(stream_idle_timeout=args.stream_idle_timeout),
        drain_timeout=args.drain_timeout,
        max_request_bytes=args.max_request_bytes,
        insecure=args.insecure,
        mesh_listen=args.mesh_listen,
        mesh_advertise=args.mesh_advertise,
        api_auth=ApiAuthConfig(
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            token_file=args.auth_token_file,
        ),
        transport=TransportConfig(
            secret_file=args.mesh_secret_file,
            tls_cert=args.mesh_tls_cert,
            tls_key=args.mesh_tls_key,
            tls_ca=args.mesh_tls_ca,
            tls_server_name=args.mesh_tls_server_name,
        ),
        health_interval=args.health_interval,
        metrics_listen=args.metrics_listen,
        log_level=args.log_level,
        log_format=args.log_format,
        mesh=MeshConfig(membership=membership),
        event_adapter=EventAdapterConfig(replay_probe_after=args.replay_probe_after),
        tracing=TracingConfig(otlp_endpoint=args.otlp_endpoint),
    )


def check_files(cfg: RouterConfig, now: float | None = None) -> None:
    """Read the files the flags name (certificates, keys, the token file,
    the mesh secret) before anything starts, so that a missing or unusable
    one stops the node with one line naming its flag and path (ValueError),
    not with whatever the library reading it later would say. A certificate
    outside its validity at ``now`` (default: the clock) is unusable too:
    gRPC would serve it, and every client's handshake would fail."""
    a, t = cfg.api_auth, cfg.transport
    files = (
        ("--tls-cert", a.tls_cert),
        ("--tls-key", a.tls_key),
        ("--tls-client-ca", a.tls_client_ca),
        ("--auth-token-file", a.token_file),
        ("--mesh-secret-file", t.secret_file),
        ("--mesh-tls-cert", t.tls_cert),
        ("--mesh-tls-key", t.tls_key),
        ("--mesh-tls-ca", t.tls_ca),
    )
    for flag, path in files:
        if path:
            try:
                with open(path, "rb"):
                    pass
            except OSError as e:
                raise ValueError(f"{flag} {path!r}: {e.strerror or e}") from None
    _check_tls(("--tls-cert", a.tls_cert), ("--tls-key", a.tls_key), ("--tls-client-ca", a.tls_client_ca))
    _check_tls(("--mesh-tls-cert", t.tls_cert), ("--mesh-tls-key", t.tls_key), ("--mesh-tls-ca", t.tls_ca))
    _check_dates(cfg, time.time() if now is None else now)
    try:
        if a.token_file:
            TokenTable.from_file(a.token_file)
    except AuthError as e:
        raise AuthError(f"--auth-token-file {a.token_file!r}: {e}") from None
    try:
        if t.secret_file:
            MeshSecret.from_file(t.secret_file)
    except MeshAuthError as e:
        raise MeshAuthError(f"--mesh-secret-file {t.secret_file!r}: {e}") from None


def _no_passphrase() -> bytes:
    # gRPC takes no passphrase: an encrypted key would fail there, and
    # OpenSSL would otherwise ask for one on the terminal.
    raise ValueError("the key is encrypted; give it unencrypted (gRPC takes no passphrase)")


def _check_tls(cert: tuple[str, str], key: tuple[str, str], ca: tuple[str, str]) -> None:
    """The certificate and key as a pair, and the CA, parsed as gRPC will
    use them: a file that exists but holds no usable PEM is said here, by
    flag, not later as OpenSSL's "PEM lib" with no name."""
    (cert_flag, cert_path), (key_flag, key_path), (ca_flag, ca_path) = cert, key, ca
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if cert_path and key_path:
        try:
            ctx.load_cert_chain(cert_path, key_path, password=_no_passphrase)
        except (ssl.SSLError, ValueError) as e:
            raise ValueError(
                f"{cert_flag} {cert_path!r} with {key_flag} {key_path!r}: not a usable PEM certificate "
                f"and private key that match ({e})"
            ) from None
    if ca_path:
        try:
            ctx.load_verify_locations(cafile=ca_path)
        except ssl.SSLError as e:
            raise ValueError(f"{ca_flag} {ca_path!r}: not a usable PEM CA certificate ({e})") from None


def _check_dates(cfg: RouterConfig, now: float) -> None:
    """Each certificate file valid at ``now``; one close to its end is logged."""
    for f in cfg.certificates():
        try:
            certs = cert_validity.read_dates(f.path)
        except ValueError as e:
            if not f.ca:
                raise ValueError(f"{f.flag} {f.path!r}: {e}") from None
            # OpenSSL took the bundle (_check_tls); a stricter parser's verdict on
            # one legacy authority in it is no reason to stop.
            log.warning(
                "router.tls_ca_dates_unread", node=cfg.node_id, flag=f.flag, path=f.path, error=str(e)
            )
            continue
        problem = cert_validity.file_problem(certs, now, f.ca)
        if problem:
            raise ValueError(f"{f.flag} {f.path!r}: {problem}")
        if not f.ca:
            for c in cert_validity.expired_in_chain(certs, now):
                log.warning(
                    "router.tls_chain_cert_expired",
                    node=cfg.node_id,
                    flag=f.flag,
                    path=f.path,
                    subject=c.subject,
                    not_after=c.not_after,
                    hint="clients that build the chain through it will refuse the node: renew the chain",
                )
        soon = cert_validity.expiring_soon(certs, now, ca=f.ca)
        if soon is not None:
            log.warning(
                "router.tls_cert_expiring",
                node=cfg.node_id,
                flag=f.flag,
                path=f.path,
                subject=soon.subject,
                days_left=round((soon.not_after - now) / 86400, 1),
            )


def _refuse(why: object) -> int:
    """A start-up mistake, said in one line (the exit status of a bad flag)."""
    print(f"{_PROG}: {why}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level, args.log_format)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        return _refuse(e)
    open_ports = cfg.unauthenticated_ports()
    if open_ports and not cfg.insecure:
        return _refuse(
            f"refusing to serve {' and '.join(p.port for p in open_ports)} without authentication; "
            f"configure {', and '.join(p.fix for p in open_ports)}, or pass --insecure"
        )
    try:
        cfg = _concrete_addresses(cfg)
        check_files(cfg)
    except ValueError as e:  # AddressError, AuthError, MeshAuthError among them
        return _refuse(e)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency
        pass
    if open_ports:
        log.warning("router.insecure", unauthenticated=[p.port for p in open_ports], node=cfg.node_id)
    if cfg.mesh_shares_tls_port:
        log.warning(
            "router.mesh_on_tls_port",
            node=cfg.node_id,
            hint="no node can join this one: give the mesh a port of its own (--mesh-listen)",
        )
    try:
        asyncio.run(_serve(cfg))
    except TokenizerError as e:  # serve loads the tokenizers before it binds a port
        return _refuse(f"--tokenizer: {e}")
    except ChatTemplateError as e:  # the HTTP front loads the chat templates; the error names the file
        return _refuse(e)
    except OSError as e:  # a port it cannot listen on: the operator's to fix, said in one line
        raise SystemExit(f"{_PROG}: {e}") from None
    return 0


def _concrete_addresses(cfg: RouterConfig) -> RouterConfig:
    """Listen addresses with their ports chosen, advertised addresses filled in."""
    listen = resolve_listen(cfg.listen)
    advertise = cfg.advertise or advertised_address(listen)
    mesh_listen, mesh_advertise = cfg.mesh_listen, cfg.mesh_advertise
    if mesh_listen:
        mesh_listen = resolve_listen(mesh_listen, "--mesh-listen")
        mesh_advertise = mesh_advertise or advertised_address(mesh_listen)
    return dataclasses.replace(
        cfg,
        listen=listen,
        advertise=advertise,
        node_id=cfg.node_id or advertise,
        mesh_listen=mesh_listen,
        mesh_advertise=mesh_advertise,
    )


class StopSignals:
    """SIGTERM and SIGINT: the first drains (requests in flight get
    --drain-timeout), the second cuts the drain's wait short (the streams
    still running are ended; the node still hands its engines over and
    leaves the mesh). Counted apart from ``stop``, which Admin.Drain sets
    too: a drain an admin call started is cut short by a second signal
    only, as one started by a signal is."""

    def __init__(self, node: RouterNode, stop: asyncio.Event) -> None:
        self.node = node
        self.stop = stop
        self.seen = 0

    def __call__(self, sig: signal.Signals) -> None:
        self.seen += 1
        self.stop.set()
        node = self.node
        if self.seen >= 2 and not node.drain_cut_short:
            node.drain_cut_short = True
            node.log.warning("router.drain_cut_short", signal=sig.name, in_flight=node.in_flight())


def _toggle_debug(node: RouterNode) -> None:
    level = toggle_debug()
    node.log.warning("router.log_level_changed", log_level=level, by="SIGHUP")


async def _serve(cfg: RouterConfig) -> None:
    try:
        seeds = await resolve_seeds(cfg.join, cfg.mesh_addr, cfg.seed_resolve_timeout, cfg.seed_resolve_retry)
    except AddressError as e:
        raise SystemExit(f"{_PROG}: {e}") from None
    node = RouterNode(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    on_signal = StopSignals(node, stop)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, _toggle_debug, node)
    _freeze_startup_heap()
    await serve(node, stop, join=seeds)
    if node.stopped_for:
        raise SystemExit(f"{_PROG}: {node.stopped_for}")


def _freeze_startup_heap() -> None:
    """Take what startup built out of the cyclic garbage collector's sight.

    A full collection walks every tracked object, with the event loop
    stopped: every call waiting then, a request about to be shed too, waits
    as long. Most of a router's tracked objects are its imported modules'
    functions, classes and tables, alive until the process exits; frozen
    (``gc.freeze``), they are never walked again, and a full collection
    walks only what the node allocates while serving. Collected first, so
    that startup garbage is freed, not frozen. Nothing is in flight yet."""
    gc.collect()
    gc.freeze()
