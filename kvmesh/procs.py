"""Start kvmesh processes (sim engines, router nodes) on this machine.

Used by the demo, the benchmarks and the multi-process tests. Every process
prints one ``READY key=value ...`` line on stdout once it serves; we wait for
that line (bounded) instead of sleeping.
"""

from __future__ import annotations

import atexit
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from blocks.hashing import DEFAULT_BLOCK_SIZE
from engine_adapters.sim_engine.config import DEFAULTS as SIM_DEFAULTS

# The model name ``kvmesh sim-engine`` serves unless given ``--model``: what a
# router must be told (engine_flag) and what its block hashes are seeded with.
SIM_MODEL = SIM_DEFAULTS.model


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Ports are handed out below the kernel's ephemeral range: a port bind(0)
# returns is in that range, and any outgoing connection on the machine may
# take it as its source port between our probe and the child's own bind.
# Below the range only an explicit bind can collide, and the probe rules out
# a port in use; ``_given`` keeps this process from handing one out twice.
_PORT_SPAN = 12000
_given: set[int] = set()
_port_rng = random.Random(os.getpid() ^ time.monotonic_ns())
_port_lock = threading.Lock()


def _bindable(host: str, port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now (TCP and UDP), below the ephemeral range;
    where there is no room below it, or none free, the kernel's choice (an
    ephemeral TCP port, free now)."""
    high = _ephemeral_low()
    low = max(1024, high - _PORT_SPAN)
    with _port_lock:  # the benchmarks start processes from several threads
        for _ in range(200 if high - low >= 1000 else 0):
            port = _port_rng.randrange(low, high)
            if port not in _given and _bindable(host, port):
                _given.add(port)
                return port
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class PortClash(RuntimeError):
    """The process exited because a port it was given was taken meanwhile."""


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[str]
    info: dict[str, str] = field(default_factory=dict)
    output: deque[str] = field(default_factory=lambda: deque(maxlen=400))

    def stop(self, timeout: float = 5.0) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        return self.popen.returncode

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5.0)

    def tail(self, n: int = 40) -> str:
        return "\n".join(list(self.output)[-n:])


_live: list[Proc] = []


@atexit.register
def _kill_leftovers() -> None:
    # Children run in their own session (so a Ctrl-C reaches us, not them):
    # never leave one behind when this process exits, whatever the reason.
    for p in _live:
        p.kill()


def start(
    name: str,
    args: list[str],
    ready_timeout: float = 30.0,
    env: dict[str, str] | None = None,
    module: str = "kvmesh.cli",
    python: str = "",
    cwd: str | None = None,
) -> Proc:
    """Run ``python -m MODULE ARGS`` (``kvmesh ARGS`` by default) and wait for
    its READY line. ``python`` is another interpreter (this one by default),
    for example an older checkout's virtualenv; run it from a ``cwd`` outside
    this checkout so ``-m`` does not import this one."""
    cmd = [python or sys.executable, "-m", module, *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    popen = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=full_env,
        cwd=cwd,
        start_new_session=True,
    )
    proc = Proc(name, popen)
    _live.append(proc)
    ready = threading.Event()

    def pump() -> None:
        assert popen.stdout is not None
        for line in popen.stdout:
            line = line.rstrip("\n")
            proc.output.append(line)
            if not ready.is_set() and line.startswith("READY"):
                for part in line.split()[1:]:
                    k, _, v = part.partition("=")
                    proc.info[k] = v
                ready.set()

    pumper = threading.Thread(target=pump, name=f"pump-{name}", daemon=True)
    pumper.start()
    deadline = time.monotonic() + ready_timeout
    while not ready.wait(0.05):
        if popen.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pumper.join(2.0)  # the last lines say why it exited
            error = PortClash if "address already in use" in proc.tail().lower() else RuntimeError
            raise error(f"{name} did not become ready (rc={popen.poll()}):\n{proc.tail()}")
    return proc


def _on_free_ports(launch: Callable[[], Proc], attempts: int = 3) -> Proc:
    """``launch()`` again with fresh ports when another process took one first."""
    for attempt in range(attempts):
        try:
            return launch()
        except PortClash:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def start_sim_engine(name: str, extra: list[str] | None = None, host: str = "127.0.0.1") -> Proc:
    """A simulated engine on free loopback ports; info has http, kv, replay."""
    return _on_free_ports(lambda: _start_sim_engine(name, extra, host))


def _start_sim_engine(name: str, extra: list[str] | None, host: str) -> Proc:
    http, kv, replay = free_port(host), free_port(host), free_port(host)
    args = [
        "sim-engine",
        "--host",
        host,
        "--port",
        str(http),
        "--kv-events-endpoint",
        f"tcp://{host}:{kv}",
        "--kv-replay-endpoint",
        f"tcp://{host}:{replay}",
        *(extra or []),
    ]
    p = start(name, args)
    p.info.setdefault("http", f"http://{host}:{http}")
    p.info["url"] = f"http://{host}:{http}"
    p.info["kv_endpoint"] = f"tcp://{host}:{kv}"
    p.info["replay_endpoint"] = f"tcp://{host}:{replay}"
    return p


def engine_flag(engine_id: str, p: Proc, model: str = SIM_MODEL, block_size: int = DEFAULT_BLOCK_SIZE) -> str:
    """The router's ``--engine`` value for the simulated engine ``p``."""
    return (
        f"id={engine_id},url={p.info['url']},kv={p.info['kv_endpoint']},"
        f"replay={p.info['replay_endpoint']},model={model},block_size={block_size}"
    )


def start_all(starts: Sequence[Callable[[], Proc]]) -> list[Proc]:
    """Run process starters at once (each waits for its READY line), in
    their order; all or none. Starting is mostly the interpreter's imports,
    which the processes then do side by side."""
    if not starts:
        return []
    with ThreadPoolExecutor(max_workers=len(starts)) as pool:
        futures = [pool.submit(f) for f in starts]
        done: list[Proc] = []
        errors: list[Exception] = []
        for fut in futures:
            try:
                done.append(fut.result())
            except Exception as e:  # every starter is waited for before giving up
                errors.append(e)
    if errors:
        for p in done:
            p.stop()
        raise errors[0]
    return done


def start_router(
    name: str,
    engines: list[str],
    extra: list[str] | None = None,
    host: str = "127.0.0.1",
    insecure: bool = True,
) -> Proc:
    """A router node on a free loopback port; info has grpc (and mesh, node).

    ``insecure``: without authentication, as on a developer's machine (the
    demo, the benchmarks, most tests); tests of authentication pass their
    credentials in ``extra`` instead. A router that finds its port taken
    starts again on a fresh one (ports in ``extra`` are kept as given)."""

    def launch() -> Proc:
        args = ["router", "--listen", f"{host}:{free_port(host)}", "--node-id", name]
        if insecure:
            args.append("--insecure")
        for e in engines:
            args += ["--engine", e]
        return start(name, args + (extra or []))

    return _on_free_ports(launch)
