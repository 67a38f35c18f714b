"""Multi-container test fixtures: build the images, run containers, always clean up.

The images are built by the session fixture ``kvmesh_image`` (so ``make test``
builds them when missing): ``deploy/build-base-image.sh`` (a no-op when the
base for the current dependency hash exists) and then ``docker build`` of the
app image with no network. No registry is used anywhere.

No Docker daemon: every test here is skipped with a loud reason and a warning
in the terminal summary. A daemon but a failing build: the tests fail.
Everything a test creates carries the label ``kvmesh.test=<session id>`` and is
force-removed when the test ends, pass or fail; only networks the tests create
(and ports published on 127.0.0.1) are used.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Testcontainers' reaper image cannot be pulled here (no registry); cleanup is ours.
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")

REPO = Path(__file__).resolve().parents[2]
BASE_IMAGE = "kvmesh-base:local"
APP_IMAGE = "kvmesh:local"
DAEMON_MISSING = "DOCKER DAEMON NOT AVAILABLE: multi-container tests NOT RUN"
SESSION_ID = uuid.uuid4().hex[:8]
LABEL = "kvmesh.test"

# Filled by the fixtures, read by pytest_terminal_summary.
_report: dict[str, Any] = {"daemon_error": None, "builds": []}


def pytest_terminal_summary(terminalreporter: Any) -> None:
    tr = terminalreporter
    if _report["daemon_error"] is not None:
        tr.write_sep("!", DAEMON_MISSING, red=True, bold=True)
        tr.write_line(f"docker: {_report['daemon_error']}", red=True, bold=True)
        tr.write_line("start the Docker daemon (or set DOCKER_HOST) to run tests/containers", red=True)
    if _report["builds"]:
        tr.write_sep("-", "kvmesh images")
        for line in _report["builds"]:
            tr.write_line(line)


def _run_build(cmd: list[str], what: str, timeout_s: float) -> float:
    """Run one build step; fail (never skip) the requesting test if it fails."""
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            cmd,
            cwd=REPO,
            env={**os.environ, "PYTHON": sys.executable},
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"{what}: timed out after {timeout_s:.0f} s\n{err[-4000:]}")
    except OSError as e:  # e.g. no `docker` CLI: a broken setup, not a missing daemon
        pytest.fail(f"{what}: cannot run {cmd[0]}: {e}")
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr)[-6000:]
        pytest.fail(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{out}")
    return time.monotonic() - t0


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    import docker  # installed with testcontainers (dev dependency)
    import requests

    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as e:
        _report["daemon_error"] = f"{type(e).__name__}: {e}"
        pytest.skip(DAEMON_MISSING)
    yield client
    # Belt and braces: anything of this session that a test's finalizer missed.
    for c in client.containers.list(all=True, filters={"label": f"{LABEL}={SESSION_ID}"}):
        c.remove(force=True)
    for n in client.networks.list(filters={"label": f"{LABEL}={SESSION_ID}"}):
        n.remove()
    client.close()


@pytest.fixture(scope="session")
def kvmesh_image(docker_client: Any) -> str:
    """Build kvmesh-base:local (cached by dependency hash) and kvmesh:local; return the app tag."""
    t_base = _run_build(["bash", "deploy/build-base-image.sh"], "base image build", 1800)
    t_app = _run_build(
        [
            "docker", "build", "-q", "--force-rm", "--network", "none",
            "-f", "deploy/Dockerfile", "--build-arg", f"BASE={BASE_IMAGE}",
            "-t", APP_IMAGE, ".",
        ],
        "app image build",
        900,
    )  # fmt: skip
    # Superseded app builds are dangling now; drop them (only ours, by label).
    docker_client.images.prune(filters={"dangling": True, "label": "kvmesh.image=app"})
    sizes = {t: docker_client.images.get(t).attrs["Size"] / 1e6 for t in (BASE_IMAGE, APP_IMAGE)}
    _report["builds"].append(
        f"{BASE_IMAGE}: {sizes[BASE_IMAGE]:.0f} MB (script {t_base:.1f} s); "
        f"{APP_IMAGE}: {sizes[APP_IMAGE]:.0f} MB (docker build {t_app:.1f} s)"
    )
    return APP_IMAGE


class DockerScope:
    """Containers and networks of one test; ``close()`` removes them all."""

    def __init__(self, client: Any, test_name: str) -> None:
        self.client = client
        self.prefix = f"kvmesh-t-{SESSION_ID}-{uuid.uuid4().hex[:4]}"
        self.labels = {LABEL: SESSION_ID, "kvmesh.test.name": test_name[:200]}
        self.containers: list[Any] = []
        self.networks: list[Any] = []

    def network(self, *, static_ips: bool = False) -> Any:
        """A bridge network of this test. ``static_ips``: with an explicit subnet
        (one Docker picks from its own pools, so it clashes with nothing), so
        containers can be given fixed addresses that survive a reconnect."""
        name = f"{self.prefix}-net{len(self.networks)}"
        if not static_ips:
            net = self.client.networks.create(name, driver="bridge", labels=self.labels)
            self.networks.append(net)
            return net
        import docker

        last: Exception | None = None
        for _ in range(5):  # another network may take the probed subnet meanwhile
            probe = self.client.networks.create(name, driver="bridge", labels=self.labels)
            try:
                subnet = probe.attrs["IPAM"]["Config"][0]["Subnet"]
            finally:
                probe.remove()
            ipam = docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=subnet)])
            try:
                net = self.client.networks.create(name, driver="bridge", ipam=ipam, labels=self.labels)
            except docker.errors.APIError as e:
                last = e
                continue
            self.networks.append(net)
            return net
        pytest.fail(f"cannot create a network with a fixed subnet: {last}")

    @staticmethod
    def subnet_ip(network: Any, host: int) -> str:
        """Address number ``host`` of a ``static_ips`` network (Docker hands out low numbers first)."""
        import ipaddress

        network.reload()
        subnet = ipaddress.ip_network(network.attrs["IPAM"]["Config"][0]["Subnet"])
        return str(subnet[host])

    def run(
        self,
        image: str,
        command: list[str],
        *,
        name: str,
        network: Any | None = None,
        entrypoint: list[str] | None = None,
        ports: dict[str, tuple[str, None]] | None = None,
        aliases: list[str] | None = None,
        ip: str | None = None,
        start: bool = True,
        dns: list[str] | None = None,
        user: str | None = None,
    ) -> Any:
        """A detached container named ``<prefix>-<name>`` (its DNS name on ``network``),
        also known there as ``aliases`` and at address ``ip`` if given; created
        but not started when ``start`` is false (start it with ``.start()``).
        ``dns``: the servers Docker's resolver asks for names it does not know
        itself; ``user``: run as this user instead of the image's."""
        kwargs: dict[str, Any] = {}
        if dns:
            kwargs["dns"] = dns
        if user is not None:
            kwargs["user"] = user
        if network is not None and (aliases or ip):
            kwargs["networking_config"] = {
                network.name: self.client.api.create_endpoint_config(aliases=aliases, ipv4_address=ip)
            }
        c = (self.client.containers.run if start else self.client.containers.create)(
            image,
            command,
            name=f"{self.prefix}-{name}",
            entrypoint=entrypoint,
            network=network.name if network is not None else None,
            ports=ports or {},
            labels=self.labels,
            detach=True,
            mem_limit="1g",
            **kwargs,
        )
        self.containers.append(c)
        return c

    def wait_ready(self, container: Any, prefix: str = "READY", timeout_s: float = 60.0) -> str:
        return self.wait_ready_static(container, prefix, timeout_s)

    @staticmethod
    def wait_ready_static(container: Any, prefix: str = "READY", timeout_s: float = 60.0) -> str:
        """The first stdout line starting with ``prefix``; fails if the container exits first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            out = container.logs(stdout=True, stderr=False).decode(errors="replace")
            for line in out.splitlines():
                if line.startswith(prefix):
                    return line
            container.reload()
            if container.status in ("exited", "dead"):
                pytest.fail(f"{container.name} exited before {prefix!r}:\n{DockerScope.logs(container)}")
            time.sleep(0.2)
        pytest.fail(
            f"{container.name}: no {prefix!r} line within {timeout_s} s:\n{DockerScope.logs(container)}"
        )

    def wait_exit(self, container: Any, timeout_s: float = 60.0) -> tuple[int, str, str]:
        """Exit code, stdout and stderr of a container that runs to completion."""
        status = container.wait(timeout=timeout_s)
        out = container.logs(stdout=True, stderr=False).decode(errors="replace")
        err = container.logs(stdout=False, stderr=True).decode(errors="replace")
        return int(status["StatusCode"]), out, err

    @staticmethod
    def host_port(container: Any, port: str) -> int:
        container.reload()
        return int(container.ports[port][0]["HostPort"])

    @staticmethod
    def logs(container: Any, tail: int = 60) -> str:
        try:
            return container.logs(tail=tail).decode(errors="replace")
        except Exception as e:  # the container may already be gone
            return f"<no logs: {e}>"

    def close(self) -> None:
        for c in reversed(self.containers):
            print(f"--- {c.name} (last lines) ---\n{self.logs(c, 30)}")  # shown for failed tests
            try:
                c.remove(force=True)
            except Exception as e:  # keep going: the rest must still be removed
                print(f"could not remove container {c.name}: {e}")
        for n in self.networks:
            try:
                n.remove()
            except Exception as e:
                print(f"could not remove network {n.name}: {e}")


@pytest.fixture
def docker_scope(docker_client: Any, request: pytest.FixtureRequest) -> Iterator[DockerScope]:
    scope = DockerScope(docker_client, request.node.nodeid)
    try:
        yield scope
    finally:
        scope.close()
