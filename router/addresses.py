"""A node's addresses: the one it listens on, the one it advertises to the
mesh, and the seeds it joins through (a DNS name in front of several nodes,
as a Kubernetes headless service gives, stands for all of them).

Seeds are resolved twice over: once before the node starts
(:func:`resolve_seeds`, waiting for names that do not resolve yet), then again
and again while it runs (:func:`resolve_seeds_now`, one attempt, names that
fail are skipped), because a name's answer grows as nodes register: nodes
started together may each have found only themselves the first time.
"""

from __future__ import annotations

import asyncio
import socket
import time

import structlog

__all__ = [
    "AddressError",
    "advertised_address",
    "check_address",
    "resolve_listen",
    "resolve_seeds",
    "resolve_seeds_now",
]

log = structlog.get_logger(__name__)

_WILDCARDS = ("0.0.0.0", "[::]", "")
MAX_PORT = 65535


class AddressError(ValueError):
    """An address that cannot be used (bad syntax, or a name that never resolved)."""


def check_address(addr: str, flag: str, *, any_port: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port), the port in 1..65535, or 0 when
    ``any_port`` (an address to listen on: any free port). A bigger port
    is refused, not left to the socket layer, which takes it modulo 65536
    and would listen on another port than the one advertised."""
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise AddressError(f"{flag} {addr!r}: want HOST:PORT")
    low = 0 if any_port else 1
    if not low <= int(port) <= MAX_PORT:
        allowed = f"{low}..{MAX_PORT}" + (", 0: any free port" if any_port else "")
        raise AddressError(f"{flag} {addr!r}: port {int(port)} out of range ({allowed})")
    return host, int(port)


def resolve_listen(listen: str, flag: str = "--listen") -> str:
    """HOST:PORT with a concrete port (0 -> a free one), so the node can
    advertise its address before the server starts."""
    host, port = check_address(listen, flag, any_port=True)
    if port == 0:
        bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # [::1] -> ::1
        family = socket.AF_INET6 if ":" in bare else socket.AF_INET
        try:
            with socket.socket(family) as s:
                s.bind((bare if host not in _WILDCARDS else "", 0))
                port = s.getsockname()[1]
        except OSError as e:  # not one of this machine's addresses, or a name that does not resolve
            raise AddressError(f"{flag} {listen!r}: cannot listen there: {e.strerror or e}") from None
    return f"{host}:{port}"


def advertised_address(listen: str) -> str:
    """The listen address, with a wildcard host replaced by this host's address."""
    host, _, port = listen.rpartition(":")
    if host in _WILDCARDS:
        host = socket.gethostbyname(socket.gethostname())
    return f"{host}:{port}"


async def _lookup(host: str, port: int | str) -> list[str]:
    """Every IPv4 address ``host`` resolves to, as HOST:PORT; ``socket.gaierror`` if none."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, int(port), family=socket.AF_INET, type=socket.SOCK_STREAM
    )
    return [f"{info[4][0]}:{port}" for info in infos]


async def _own_addresses(me: str) -> set[str]:
    """``me`` and, when it names a host, the addresses it resolves to: a node
    advertised by DNS name finds itself among the seeds by address."""
    own = {me}
    host, _, port = me.rpartition(":")
    if host and port.isdigit():
        try:
            own.update(await _lookup(host, port))
        except socket.gaierror:
            pass  # not resolvable here: only the literal address is ours
    return own


def _add(out: list[str], addrs: list[str], own: set[str]) -> None:
    for addr in addrs:
        if addr not in own and addr not in out:
            out.append(addr)


async def resolve_seeds(seeds: list[str], me: str, timeout: float, retry: float) -> list[str]:
    """Expand each seed HOST:PORT into every address its name resolves to,
    retrying every ``retry`` seconds for up to ``timeout`` while DNS is not
    ready (a seed started at the same time may not be registered yet).
    ``me`` (this node's advertised address) is left out."""
    own = await _own_addresses(me)
    out: list[str] = []
    for seed in seeds:
        host, port = check_address(seed, "--join")
        deadline = time.monotonic() + timeout
        while True:
            try:
                addrs = await _lookup(host, port)
                break
            except socket.gaierror as e:
                if time.monotonic() > deadline:
                    raise AddressError(f"cannot resolve seed {seed!r}: {e}") from None
                log.warning("router.seed_unresolved", seed=seed, error=str(e))
                await asyncio.sleep(retry)
        _add(out, addrs, own)
    return out


async def resolve_seeds_now(seeds: list[str], me: str) -> list[str]:
    """What the seeds resolve to at this moment (one attempt each; a name
    that does not resolve is skipped), ``me`` left out."""
    own = await _own_addresses(me)
    out: list[str] = []
    for seed in seeds:
        host, port = check_address(seed, "--join")
        try:
            addrs = await _lookup(host, port)
        except socket.gaierror as e:
            log.debug("router.seed_unresolved", seed=seed, error=str(e))
            continue
        _add(out, addrs, own)
    return out
