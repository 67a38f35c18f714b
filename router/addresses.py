"""A node's addresses: the one it listens on, the one it advertises to the
mesh, and the seeds it joins through (a DNS name in front of several nodes,
as a Kubernetes headless service gives, stands for all of them).
"""

from __future__ import annotations

import asyncio
import socket
import time

import structlog

__all__ = ["AddressError", "advertised_address", "resolve_listen", "resolve_seeds"]

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


async def resolve_seeds(seeds: list[str], me: str, timeout: float, retry: float) -> list[str]:
    """Expand each seed HOST:PORT into every address its name resolves to,
    retrying every ``retry`` seconds for up to ``timeout`` while DNS is not
    ready (a seed started at the same time may not be registered yet).
    ``me`` (this node's advertised address) is left out."""
    loop = asyncio.get_running_loop()
    out: list[str] = []
    for seed in seeds:
        host, port = _split(seed, "--join")
        deadline = time.monotonic() + timeout
        while True:
            try:
                infos = await loop.getaddrinfo(
                    host, int(port), family=socket.AF_INET, type=socket.SOCK_STREAM
                )
                break
            except socket.gaierror as e:
                if time.monotonic() > deadline:
                    raise AddressError(f"cannot resolve seed {seed!r}: {e}") from None
                log.warning("router.seed_unresolved", seed=seed, error=str(e))
                await asyncio.sleep(retry)
        for info in infos:
            addr = f"{info[4][0]}:{port}"
            if addr != me and addr not in out:
                out.append(addr)
    return out
