"""What a client dials: a gRPC target URI from what a user writes.

``HOST:PORT`` becomes ``dns:///HOST:PORT``: gRPC's DNS resolver returns
*every* address behind the name, which the balancing policy spreads calls
over. (A bare ``HOST:PORT`` means the same to gRPC, but spelling the scheme
out keeps the target unambiguous and is what other languages need too.)
A target that already names a gRPC scheme is used as it is. A list of node
addresses, for a fleet without a DNS name, becomes gRPC's static
``ipv4:``/``ipv6:`` list target. Pure.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

__all__ = ["TargetError", "channel_target", "static_target"]

# The resolvers gRPC's core ships; anything else before a colon is a host name.
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:", "google-c2p:")


class TargetError(ValueError):
    """A target that cannot be dialed."""


def _split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise TargetError(f"{address!r}: want HOST:PORT (a port is required)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise TargetError(f"{address!r}: an IPv6 address goes in brackets, [ADDR]:PORT")
    return host, int(port)


def channel_target(target: str) -> str:
    """The gRPC target URI for ``target`` (``HOST:PORT`` or a gRPC URI)."""
    target = target.strip()
    if not target:
        raise TargetError("empty target: want HOST:PORT")
    if target.startswith(_SCHEMES):
        return target
    _split_host_port(target)
    return f"dns:///{target}"


def static_target(addresses: Sequence[str]) -> str:
    """One target for a fixed list of ``IP:PORT`` addresses (all IPv4 or all IPv6)."""
    if not addresses:
        raise TargetError("no address given")
    ips = []
    for a in addresses:
        host, port = _split_host_port(a.strip())
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise TargetError(
                f"{a!r}: a list of addresses takes IP literals; put host names behind one DNS name"
            ) from None
        ips.append((ip, port))
    versions = {ip.version for ip, _ in ips}
    if len(versions) > 1:
        raise TargetError("a list of addresses must be all IPv4 or all IPv6")
    if versions == {4}:
        return "ipv4:" + ",".join(f"{ip}:{port}" for ip, port in ips)
    return "ipv6:" + ",".join(f"[{ip}]:{port}" for ip, port in ips)
