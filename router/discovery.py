"""Engine discovery from DNS: which engines a name stands for, and when to
register and remove them. The pure core (no I/O, time passed in); the shell
that resolves and registers is :mod:`router.discovery_shell`.

What an operator gives (``kvmesh router``)::

    --engines-from-dns NAME[:PORT][=TEMPLATE]   (repeatable)
    --engine-template  SPEC                     (for names without one)
    --discovery-interval SECONDS  --discovery-grace SECONDS

``NAME`` is typically a Kubernetes headless Service (or a Docker network
alias): it resolves to one IPv4 address per engine. Every address becomes an
engine whose spec is the template, the ``--engine`` SPEC syntax, with
``{host}`` replaced by the address and ``{port}`` by ``PORT`` (default
:attr:`DiscoveryConfig.port`), e.g.
``url=http://{host}:{port},kv=tcp://{host}:5557,replay=tcp://{host}:5558,model=M``.
A per-name ``=TEMPLATE`` serves fleets with several models (one name each).
Only IPv4 is asked for: a dual-stack name would otherwise give each engine
twice.

Identity. An engine's id is a function of the address only, so every node
derives the same id for the same engine: the template's ``id=`` (which must
then contain ``{host}``), else ``<first label of NAME>-<address, dots as
dashes>`` (``engines-10-0-0-5``). Registration is therefore idempotent
across nodes: the mesh registry is a CRDT map keyed by engine id, and two
nodes that register the same address write the same key with the same spec
(one engine; concurrent writes converge on one value, see
:mod:`mesh.registry`). A node registers only what the registry lacks, so
steady state writes nothing.

Ownership of a spec. Discovered specs carry ``source = "dns:NAME"``;
discovery only ever changes or removes registry entries of its own source.
Engines registered by hand (``--engine``, ``Admin.RegisterEngine``: source
``""``) are never touched, and an id already held by another source is left
alone (reported as a conflict).

Registration (any node). Each successful answer is compared with the
registry: an address whose engine is not registered is registered by the
node that saw it, at once. One exception keeps removals from flapping: a
node that is not the engine's owner does not register again an engine that
it saw registered and that was then removed while its address stayed in
every answer of this node since. The owner decided that removal on its own
answers; undoing it at once would put the engine back and forth. Such a node
registers it again only after the address has left its answers and come
back (a new engine at that address). The owner itself always registers what
its answers hold: its view decides both ways, so an engine removed by a
previous owner comes back as soon as the new owner sees it, and a discovered
engine deregistered by hand (``Admin.DeregisterEngine``) comes back at its
owner's next round (take a discovered engine out of DNS to remove it).

Removal (one node per engine). An address missing from the answers starts a
timer on each node (at the first successful answer without it); only the
engine's owner (rendezvous hashing over live members, the node that runs its
event adapter, see :mod:`mesh.ownership`) removes it, once the address has
been absent from every successful answer of that node for ``grace`` seconds.
A node whose own resolver briefly loses an address therefore removes
nothing unless it is the owner and the loss outlasts the grace; a handover
of ownership needs no transfer of timers, since every node keeps its own.
The owner is also the one node that rewrites a registered spec that differs
from its template (a changed ``--engine-template``), so nodes given
different templates during a rolling change do not overwrite each other
back and forth. Every node of the mesh must run the same discovery flags:
an engine owned by a node without them is never removed.

A failed resolution (timeout, server failure) changes nothing: no timer
starts or ends, nothing is removed; the shell counts and logs it. A name
that does not exist, or has no addresses (NXDOMAIN, NODATA: what a headless
Service with no ready pod answers), is a successful, empty answer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from router.engine_registry import EngineSpec, EngineSpecError

__all__ = [
    "DiscoveryConfig",
    "DiscoveryCore",
    "DiscoveryError",
    "DnsSource",
    "Gone",
    "Plan",
    "Register",
]

SOURCE_PREFIX = "dns:"
# A DNS name (or an address literal): labels of letters, digits, '-' and '_'.
_NAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?\.?$")
_PLACEHOLDERS = ("{host}", "{port}")
_SAMPLE_HOST = "192.0.2.1"  # TEST-NET-1 (RFC 5737): renders a template to check it


class DiscoveryError(ValueError):
    """A discovery setting that cannot be used."""


@dataclass(frozen=True, slots=True)
class DnsSource:
    """One ``--engines-from-dns`` name and the engine every address of it becomes."""

    name: str
    port: int
    template: str

    @property
    def source(self) -> str:
        """The ``source`` field of the specs this name registers."""
        return SOURCE_PREFIX + self.name

    @property
    def label(self) -> str:
        return self.name.split(".", 1)[0]

    def engine_id(self, host: str) -> str:
        """The engine id of address ``host`` (the same on every node)."""
        for part in self.template.split(","):
            key, sep, value = part.strip().partition("=")
            if sep and key == "id":
                return self._fill(value, host)
        return f"{self.label}-{host.replace('.', '-').replace(':', '-')}"

    def spec_for(self, host: str) -> EngineSpec:
        """The engine at ``host``; EngineSpecError if the template makes no valid spec of it."""
        text = self._fill(self.template, host)
        if not any(p.strip().startswith("id=") for p in text.split(",")):
            text = f"id={self.engine_id(host)},{text}"
        spec = EngineSpec.parse(text)
        spec.source = self.source
        return spec.validate()

    def _fill(self, text: str, host: str) -> str:
        return text.replace("{host}", host).replace("{port}", str(self.port))

    @classmethod
    def parse(cls, text: str, template: str, port: int) -> DnsSource:
        """``NAME[:PORT][=TEMPLATE]``; ``template`` and ``port`` where it gives none."""
        where = f"--engines-from-dns {text!r}"
        head, sep, own = text.partition("=")
        if sep:
            template = own
        name, colon, port_text = head.rpartition(":")
        if not colon:
            name = head
        elif port_text.isdigit() and 0 < int(port_text) < 65536:
            port = int(port_text)
        else:
            raise DiscoveryError(f"{where}: port {port_text!r} must be in 1..65535")
        if not _NAME.match(name) or ".." in name:
            raise DiscoveryError(f"{where}: {name!r} is not a DNS name")
        src = cls(name=name, port=port, template=template)
        src.check()
        return src

    def check(self) -> None:
        """Reject a template that cannot make one engine per address."""
        where = f"--engines-from-dns {self.name}"
        stripped = self.template
        for p in _PLACEHOLDERS:
            stripped = stripped.replace(p, "")
        if "{" in stripped or "}" in stripped:
            raise DiscoveryError(f"{where}: template {self.template!r}: placeholders are {_PLACEHOLDERS}")
        eid = self.engine_id("{host}")
        if "{host}" not in eid:
            raise DiscoveryError(f"{where}: the template's id= must contain {{host}}: one engine per address")
        try:
            self.spec_for(_SAMPLE_HOST)
        except EngineSpecError as e:
            raise DiscoveryError(f"{where}: template {self.template!r}: {e}") from None


@dataclass(slots=True)
class DiscoveryConfig:
    # NAME[:PORT][=TEMPLATE] per name; none: no discovery.
    names: list[str] = field(default_factory=list)
    # The engine of each address, for names without a template of their own.
    template: str = "url=http://{host}:{port}"
    port: int = 8000  # {port} where NAME gives no :PORT (vLLM's default HTTP port)
    interval: float = 5.0  # seconds between resolutions of each name (and one resolution's timeout)
    grace: float = 30.0  # seconds an address must be missing before its engine is removed

    def check(self) -> None:
        if not self.interval > 0:
            raise DiscoveryError(f"--discovery-interval must be > 0, got {self.interval}")
        if not self.grace >= 0:
            raise DiscoveryError(f"--discovery-grace must be >= 0, got {self.grace}")
        if not 0 < self.port < 65536:
            raise DiscoveryError(f"discovery port must be in 1..65535, got {self.port}")
        self.sources()

    def sources(self) -> list[DnsSource]:
        """The names, parsed; DiscoveryError on a bad one, a repeated one, or
        two whose default engine ids could collide."""
        out = [DnsSource.parse(n, self.template, self.port) for n in self.names]
        seen: dict[str, str] = {}
        for s in out:
            if s.name in seen.values():
                raise DiscoveryError(f"--engines-from-dns {s.name}: given twice")
            pattern = s.engine_id("{host}")
            if pattern in seen:
                raise DiscoveryError(
                    f"--engines-from-dns {s.name} and {seen[pattern]} would give their engines the same "
                    f"ids ({pattern}): give one an id= in its template"
                )
            seen[pattern] = s.name
        return out


@dataclass(frozen=True, slots=True)
class Register:
    """Register ``spec`` (new here, or ``update``: a changed template's spec, by the owner)."""

    spec: EngineSpec
    addr: str
    update: bool = False


@dataclass(frozen=True, slots=True)
class Gone:
    """Remove ``engine_id``: its address has been missing for ``absent_for`` seconds."""

    engine_id: str
    addr: str
    absent_for: float


@dataclass(slots=True)
class Plan:
    register: list[Register] = field(default_factory=list)
    remove: list[Gone] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)  # ids held by another source: left alone
    refused: list[str] = field(default_factory=list)  # addresses the template makes no valid spec of

    def is_empty(self) -> bool:
        return not (self.register or self.remove or self.conflicts or self.refused)


@dataclass(slots=True)
class _Seen:
    """One engine id as this node's answers showed it."""

    addr: str
    present: bool = True  # in the last successful answer
    absent_since: float | None = None  # first successful answer without it (None while present)
    # Seen registered since the address last appeared here (a return starts a
    # new entry): if it is then removed, a node that does not own it does not
    # register it again until the address leaves its answers and returns.
    saw_registered: bool = False


class DiscoveryCore:
    """The reconciliation of one name (see the module docstring)."""

    def __init__(self, source: DnsSource, grace: float) -> None:
        self.source = source
        self.grace = grace
        self._seen: dict[str, _Seen] = {}
        self.addresses: list[str] = []  # the last successful answer

    def observe(
        self,
        answer: Collection[str],
        registered: Mapping[str, EngineSpec],
        decides: Callable[[str], bool],
        now: float,
    ) -> Plan:
        """What to do after a successful answer. ``registered``: the mesh
        registry (every source); ``decides(engine_id)``: whether this node
        decides removals and spec updates of that engine (its owner)."""
        plan = Plan()
        present = {self.source.engine_id(a): a for a in sorted(set(answer))}
        self.addresses = sorted(set(present.values()))
        for eid, addr in present.items():
            self._on_present(eid, addr, registered.get(eid), decides, plan)
        for eid, st in self._seen.items():
            if eid not in present and st.present:
                st.present, st.absent_since = False, now
        ours = {e for e, s in registered.items() if s.source == self.source.source}
        for eid in sorted(ours - present.keys()):
            gone = self._seen.get(eid)
            if gone is None:  # never in an answer here: absent from this one on
                host = urlsplit(registered[eid].endpoint).hostname or ""
                gone = self._seen[eid] = _Seen(host, present=False, absent_since=now)
            since = now if gone.absent_since is None else gone.absent_since
            if decides(eid) and now - since >= self.grace:
                plan.remove.append(Gone(eid, gone.addr, now - since))
        # Forget what is neither in the answer nor registered: memory stays bounded.
        for eid in [e for e, st in self._seen.items() if not st.present and e not in ours]:
            del self._seen[eid]
        return plan

    def _on_present(
        self,
        eid: str,
        addr: str,
        reg: EngineSpec | None,
        decides: Callable[[str], bool],
        plan: Plan,
    ) -> None:
        st = self._seen.get(eid)
        if st is None or not st.present:
            st = self._seen[eid] = _Seen(addr)
        if reg is not None and reg.source != self.source.source:
            plan.conflicts.append(eid)
            return
        if reg is None and st.saw_registered and not decides(eid):
            return  # removed (by its owner) while present here: held until the address leaves and returns
        try:
            want = self.source.spec_for(addr)
        except EngineSpecError:
            plan.refused.append(addr)
            return
        if reg is None:
            plan.register.append(Register(want, addr))
            return
        st.saw_registered = True
        if reg != want and decides(eid):
            plan.register.append(Register(want, addr, update=True))
