"""DNS servers whose answers a test controls, for the multi-container tests.

Docker's own DNS answers container names and network aliases the same way to
every container, and only changes when containers come and go. Two mesh
tests need more than that:

* nodes that start together and each find only *themselves* behind the seed
  name (DNS registration lags: each node's resolver has seen its own record
  only), which later resolves to all of them;
* one name meaning different addresses on two sides of a network partition
  (split-horizon DNS), so that the nodes of each side reach each other, and
  the engines, over a network the partition leaves alone.

Each :class:`DnsServer` is a container (the kvmesh image's Python, a few
dozen lines, below) on a test network at a fixed address, answering A
queries from a *view* (name -> IPv4 addresses) that the test replaces at any
time (:meth:`DnsServer.set_view`). Containers are pointed at it with
``DockerScope.run(..., dns=[server.ip])``: Docker's resolver answers the
names it knows (containers, aliases) and forwards the rest here. Answers have
TTL 0, so no resolver on the way caches them. Names the view does not hold
get NXDOMAIN; other query types for names it holds get an empty answer.
"""

from __future__ import annotations

import json
from typing import Any

from tests.containers.conftest import DockerScope

DOMAIN = "kvmesh.test"  # reserved for testing (RFC 2606): never a real name

# Runs inside the container: argv[1] is the first view (JSON), VIEW_PATH the live one.
_SERVER = r"""
import json, os, socket, struct, sys

VIEW_PATH = "/tmp/dns-view.json"

def write_view(text):
    tmp = VIEW_PATH + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, VIEW_PATH)

def answer(query):
    qid, flags = struct.unpack("!HH", query[:4])
    i, labels = 12, []
    while query[i]:
        n = query[i]
        labels.append(query[i + 1 : i + 1 + n].decode().lower())
        i += 1 + n
    i += 1
    qtype = struct.unpack("!H", query[i : i + 2])[0]
    question = query[12 : i + 4]
    with open(VIEW_PATH) as f:
        ips = json.load(f).get(".".join(labels))
    rcode, records = (3, []) if ips is None else (0, ips if qtype == 1 else [])
    header = struct.pack("!HHHHHH", qid, 0x8480 | (flags & 0x0100) | rcode, 1, len(records), 0, 0)
    body = b"".join(b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0, 4) + socket.inet_aton(ip) for ip in records)
    return header + question + body

write_view(sys.argv[1])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", 53))
print("READY dns", flush=True)
while True:
    data, peer = sock.recvfrom(4096)
    try:
        sock.sendto(answer(data), peer)
    except Exception as e:  # a query it cannot parse: no answer, as a lossy network
        print("bad query:", repr(e), flush=True)
"""

_SET_VIEW = r"""
import os, sys
tmp = "/tmp/dns-view.json.tmp"
with open(tmp, "w") as f:
    f.write(sys.argv[1])
os.replace(tmp, "/tmp/dns-view.json")
"""


def fqdn(name: str) -> str:
    """``name`` under the test domain."""
    return f"{name}.{DOMAIN}"


class DnsServer:
    """One DNS server container at ``ip`` on ``network``, answering from a view."""

    def __init__(
        self, scope: DockerScope, image: str, network: Any, ip: str, name: str, view: dict[str, list[str]]
    ) -> None:
        self.ip = ip
        self.view = dict(view)
        self.container = scope.run(
            image,
            [json.dumps(self.view)],
            name=name,
            network=network,
            ip=ip,
            entrypoint=["python", "-c", _SERVER],
            user="root",  # port 53
        )
        scope.wait_ready(self.container, "READY dns", timeout_s=30)

    def set_view(self, view: dict[str, list[str]]) -> None:
        """Answer from ``view`` from now on (replaced atomically)."""
        self.view = dict(view)
        code, out = self.container.exec_run(["python", "-c", _SET_VIEW, json.dumps(self.view)], user="root")
        assert code == 0, out
