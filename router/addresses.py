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

__all__ = ["AddressError", "advertised_address", "resolve_listen", "resolve_seeds", "resolve_seeds_now"]

log = structlog.get_logger(__name__)

_WILDCARDS = ("0.0.0.0", "[::]", "")


class AddressError(ValueError):
    """An address that cannot be used (bad syntax, or a name that never resolved)."""


def _split(addr: str, what: str) -> tuple[str, str]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise AddressError(f"{what} {addr!r}: want HOST:PORT")
    return host, port


def resolve_listen(listen: str) -> str:
    """HOST:PORT with a concrete port (0 -> a free one), so the node can
    advertise its address before the server starts."""
    host, port = _split(listen, "--listen")
    if port == "0":
        with socket.socket() as s:
            s.bind((host if host not in _WILDCARDS else "", 0))
            port = str(s.getsockname()[1])
    return f"{host}:{port}"


def advertised_address(listen: str) -> str:
    """The listen address, with a wildcard host replaced by this host's address."""
    host, _, port = listen.rpartition(":")
    if host in _WILDCARDS:
        host = socket.gethostbyname(socket.gethostname())
    return f"{host}:{port}"


async def _lookup(host: str, port: str) -> list[str]:
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
        host, port = _split(seed, "--join")
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
        host, port = _split(seed, "--join")
        try:
            addrs = await _lookup(host, port)
        except socket.gaierror as e:
            log.debug("router.seed_unresolved", seed=seed, error=str(e))
            continue
        _add(out, addrs, own)
    return out
