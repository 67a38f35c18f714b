"""`kvmesh router` as an operator starts it: a mistake in the flags or in a
file they name stops it with one line on stderr and exit status 2, never a
traceback; a node whose seed never answers says so while it waits, and
prints no READY line when it is stopped before it ever served; a bad
tokenizer stops ``serve`` before it binds a port."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine_adapters.tokenizer import TokenizerError
from kvmesh import procs
from router.config import RouterConfig
from router.node import RouterNode
from router.service import serve

pytestmark = pytest.mark.slow

ROUTER = [sys.executable, "-m", "kvmesh.cli", "router"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("startup")
    (d / "tokens").write_text(f"{'t' * 20} admin\n")
    (d / "secret").write_text("s" * 32)
    (d / "empty").write_text("")
    (d / "superuser").write_text(f"{'t' * 20} superuser\n")
    (d / "short").write_text("short client\n")
    return d


def _tokens(name: str = "tokens") -> list[str]:
    return ["--auth-token-file", f"{{d}}/{name}"]


def _secret(name: str = "secret") -> list[str]:
    return ["--mesh-secret-file", f"{{d}}/{name}"]


# Authenticated, so that nothing but the error is said (--insecure logs a warning first).
AUTH = [*_tokens(), *_secret()]


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--insecure", "--listen", "127.0.0.1:99999"], "--listen '127.0.0.1:99999': port 99999 out of"),
        (["--insecure", "--join", "127.0.0.1:0"], "--join '127.0.0.1:0': port 0 out of range"),
        ([*AUTH, "--tokenizer", "sim-model=/nonexistent/tokenizer.json"], "tokenizer file not found"),
        (
            [*_tokens(), *_secret("empty")],
            "--mesh-secret-file '{d}/empty': the mesh secret must be at least 16 bytes, got 0",
        ),
        ([*_tokens(), *_secret("nope")], "--mesh-secret-file '{d}/nope': No such file"),
        ([*_tokens("nope"), *_secret()], "--auth-token-file '{d}/nope': No such file"),
        ([*_tokens("superuser"), *_secret()], "--auth-token-file '{d}/superuser': unknown role 'superuser'"),
        (
            [*_tokens("short"), *_secret()],
            "--auth-token-file '{d}/short': line 1: a token must be at least 16",
        ),
        (
            [*AUTH, "--tls-cert", "{d}/no.pem", "--tls-key", "{d}/secret"],
            "--tls-cert '{d}/no.pem': No such file",
        ),
        (["--insecure", "--max-attempts", "0"], "--max-attempts must be >= 1"),
        (["--insecure", "--drain-timeout", "-1"], "--drain-timeout must be >= 0"),
        (
            ["--insecure", "--engine", "id=e9,url=http://h:1", "--engine", "id=e9,url=http://h:2"],
            "--engine id 'e9' given more than once",
        ),
        (_tokens(), "configure --mesh-secret-file or --mesh-tls-*, or pass --insecure"),
    ],
)
def test_a_startup_mistake_is_one_line_and_exit_status_2(files: Path, flags: list[str], words: str) -> None:
    argv = [f.format(d=files) for f in flags]
    out = subprocess.run(
        [*ROUTER, "--listen", "127.0.0.1:0", *argv], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and not out.stdout
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvmesh router: "), out.stderr
    assert words.format(d=files) in lines[0]
    if "--auth-token-file" in argv and "--mesh-secret-file" not in argv:
        assert "--auth-token-file" not in lines[0]  # given: not asked for


def test_a_node_whose_seed_never_answers_warns_and_prints_no_ready_when_stopped(tmp_path: Path) -> None:
    dead_seed = f"127.0.0.1:{procs.free_port()}"  # nobody listens there
    err_path = tmp_path / "stderr"
    with err_path.open("w") as err:
        p = subprocess.Popen(
            [*ROUTER, "--insecure", "--listen", f"127.0.0.1:{procs.free_port()}", "--join", dead_seed],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        try:
            # The first warning comes once the first Join has gone unanswered (2 s by
            # default), after the interpreter's start: generous for a loaded machine.
            deadline = time.monotonic() + 45
            while "router.join_waiting" not in err_path.read_text() and time.monotonic() < deadline:
                assert p.poll() is None, err_path.read_text()
                time.sleep(0.1)
            p.send_signal(signal.SIGTERM)
            stdout, _ = p.communicate(timeout=30)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(5)
    log = err_path.read_text()
    waiting = [line for line in log.splitlines() if "router.join_waiting" in line]
    assert waiting and dead_seed in waiting[0] and "waited=" in waiting[0], log
    assert "READY" not in stdout, stdout  # it never served: no READY line on the way out
    assert p.returncode == 0 and "router.stopped" in log and "Traceback" not in log, log


def test_a_bad_tokenizer_stops_serve_before_any_port_is_bound(tmp_path: Path) -> None:
    """In process too (an embedding caller, a test): the error comes before
    the gRPC server binds, so nothing is left listening behind it."""
    port = procs.free_port()
    cfg = RouterConfig(
        listen=f"127.0.0.1:{port}",
        node_id="tok",
        insecure=True,
        tokenizers={"m": str(tmp_path / "missing" / "tokenizer.json")},
    )

    async def main() -> None:
        node = RouterNode(cfg)
        try:
            with pytest.raises(TokenizerError, match="tokenizer file not found") as raised:
                await asyncio.wait_for(serve(node, asyncio.Event()), 30)
            # Checked while the error (and so anything serve made) is alive.
            with socket.socket() as s:  # free: serve never bound it
                s.bind(("127.0.0.1", port))
            del raised
        finally:
            await node.stop()

    asyncio.run(main())
