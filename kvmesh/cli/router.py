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
import signal

from mesh.core import MeshConfig
from mesh.membership import MembershipConfig
from router.addresses import AddressError, advertised_address, resolve_listen, resolve_seeds
from router.config import LOG_FORMATS, LOG_LEVELS, RouterConfig, check_policy_opts
from router.engine_registry import EngineSpec, EngineSpecError
from router.logs import configure_logging
from router.node import RouterNode
from router.policies import POLICY_NAMES, policy_options
from router.service import serve

__all__ = ["config_from_args", "configure_parser", "parse_policy_opts", "parse_tokenizers", "run"]

_PROG = "kvmesh router"


def _default(cls: type, name: str) -> object:
    """The default of dataclass field ``name`` of ``cls``."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


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
        "--node-id", default=d.node_id, help="unique node name in the mesh (default: the advertised address)"
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
        help="engine to route to, repeatable: id=e1,url=http://HOST:PORT[,kv=tcp://HOST:5557]"
        f"[,replay=tcp://HOST:5558][,model=NAME][,block_size={_default(EngineSpec, 'block_size')}]"
        f"[,dp={_default(EngineSpec, 'data_parallel_size')}][,topic=T]",
    )
    p.add_argument(
        "--tokenizer",
        action="append",
        default=[],
        metavar="MODEL=SPEC",
        help="tokenizer for text prompts of MODEL: path to a local tokenizer.json, or 'builtin' "
        f"(the simulated engine's); default for every model: {d.default_tokenizer!r}",
    )
    p.add_argument(
        "--max-attempts",
        type=int,
        default=d.max_attempts,
        help="engines tried per request before failing (default %(default)s)",
    )
    p.add_argument(
        "--health-interval",
        type=float,
        default=d.health_interval,
        help="seconds between engine health probes (default %(default)s)",
    )
    p.add_argument(
        "--metrics-port", type=int, default=d.metrics_port, help="Prometheus /metrics port (0: off)"
    )
    p.add_argument("--log-level", default=d.log_level, choices=LOG_LEVELS)
    p.add_argument("--log-format", default=d.log_format, choices=LOG_FORMATS)
    p.add_argument("--seed", type=int, default=d.seed, help="seed for random policy choices")


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


def parse_tokenizers(items: list[str]) -> dict[str, str]:
    """``["m=/path/tokenizer.json", ...]`` -> ``{"m": "/path/tokenizer.json"}``."""
    out: dict[str, str] = {}
    for item in items:
        model, sep, spec = item.partition("=")
        if not sep:
            raise EngineSpecError(f"--tokenizer {item!r}: want MODEL=PATH or MODEL=builtin")
        out[model] = spec
    return out


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    """The node's config from parsed flags; ValueError (EngineSpecError, a
    bad policy option, a bad interval) names the flag or value at fault."""
    engines = [EngineSpec.parse(e) for e in args.engine]
    tokenizers = parse_tokenizers(args.tokenizer)
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
        policy=args.policy,
        policy_opts=policy_opts,
        engines=engines,
        tokenizers=tokenizers,
        seed=args.seed,
        max_attempts=args.max_attempts,
        health_interval=args.health_interval,
        metrics_port=args.metrics_port,
        log_level=args.log_level,
        log_format=args.log_format,
        mesh=MeshConfig(membership=membership),
    )


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level, args.log_format)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"{_PROG}: {e}")
        return 2
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency
        pass
    try:
        listen = resolve_listen(cfg.listen)
    except AddressError as e:
        raise SystemExit(f"{_PROG}: {e}") from None
    advertise = cfg.advertise or advertised_address(listen)
    cfg = dataclasses.replace(cfg, listen=listen, advertise=advertise, node_id=cfg.node_id or advertise)
    asyncio.run(_serve(cfg))
    return 0


async def _serve(cfg: RouterConfig) -> None:
    try:
        seeds = await resolve_seeds(cfg.join, cfg.advertise, cfg.seed_resolve_timeout, cfg.seed_resolve_retry)
    except AddressError as e:
        raise SystemExit(f"{_PROG}: {e}") from None
    node = RouterNode(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(node, stop, join=seeds)
