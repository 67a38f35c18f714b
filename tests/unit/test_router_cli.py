"""`kvmesh router` flags -> RouterConfig (kvmesh/cli/router.py), the
address helpers it uses (router/addresses.py), and what it refuses at start.
tests/integration/test_router_startup.py runs the command itself."""

from __future__ import annotations

import argparse
import asyncio
import re
import socket
import subprocess
from pathlib import Path

import pytest

from kvmesh.cli import router as router_cli
from kvmesh.cli.router import check_files, config_from_args, configure_parser
from mesh.auth import MeshAuthError
from mesh.membership import MembershipConfig
from router.addresses import (
    AddressError,
    advertised_address,
    resolve_listen,
    resolve_seeds,
    resolve_seeds_now,
)
from router.auth import AuthError
from router.config import RouterConfig
from router.engine_registry import SPEC_KEYS, EngineSpec, EngineSpecError
from router.service import _wait_ready


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    configure_parser(p)
    return p.parse_args(list(argv))


def test_no_flags_give_the_config_defaults():
    cfg, d, m = config_from_args(_args()), RouterConfig(), MembershipConfig()
    assert cfg == d
    assert cfg.mesh.membership.probe_interval == m.probe_interval
    assert cfg.mesh.membership.gossip_interval == m.gossip_interval
    assert cfg.mesh.membership.probe_timeout == min(m.probe_timeout, m.probe_interval / 2)


def test_flags_set_their_fields():
    cfg = config_from_args(
        _args(
            "--listen=0.0.0.0:7000",
            "--node-id=n1",
            "--join=seed:7000",
            "--gossip-interval=0.05",
            "--probe-interval=0.4",
            "--policy=least_load",
            "--policy-opt=precise.delay_weight=0.5",
            "--engine=id=e1,url=http://h:1,block_size=32",
            "--tokenizer=m=builtin",
            "--max-attempts=5",
            "--health-interval=0.5",
            "--seed=7",
            "--max-index-blocks=5000",
            "--loop-stall=0.25",
            "--loop-stall-log-every=60",
        )
    )
    assert (cfg.listen, cfg.node_id, cfg.join, cfg.policy) == (
        "0.0.0.0:7000",
        "n1",
        ["seed:7000"],
        "least_load",
    )
    # One gossip interval for membership and state gossip.
    assert cfg.mesh.membership.gossip_interval == 0.05
    assert (cfg.mesh.membership.probe_interval, cfg.mesh.membership.probe_timeout) == (0.4, 0.2)
    assert cfg.policy_opts == {"precise": {"delay_weight": 0.5}}
    assert [(e.engine_id, e.block_size) for e in cfg.engines] == [("e1", 32)]
    assert cfg.tokenizers == {"m": "builtin"}
    assert (cfg.retry.max_attempts, cfg.health_interval, cfg.seed) == (5, 0.5, 7)
    assert cfg.max_index_blocks == 5000
    assert (cfg.loop_lag.stall, cfg.loop_lag.log_every) == (0.25, 60.0)


@pytest.mark.parametrize(
    "flag, words",
    [
        ("--engine=id=e1", "needs at least id= and url="),
        ("--tokenizer=nope", "want MODEL=PATH"),
        ("--policy-opt=precise.bogus=1", "bogus"),
        ("--gossip-interval=0", "gossip_interval must be > 0"),
        ("--max-index-blocks=-1", "max-index-blocks must be >= 0"),
    ],
)
def test_bad_flags_are_value_errors_naming_the_fault(flag, words):
    # run() prints these as "kvmesh router: <error>" and exits 2.
    with pytest.raises(ValueError, match=words):
        config_from_args(_args(flag))


def test_public_tls_without_a_mesh_port_is_refused():
    # The mesh client dials plaintext: on a shared TLS port nodes would never join.
    tls = ["--tls-cert=node.pem", "--tls-key=node.key"]
    with pytest.raises(ValueError, match="needs the mesh on a port of its own"):
        config_from_args(_args(*tls, "--join=seed:7946"))
    assert config_from_args(_args(*tls, "--join=seed:7946", "--mesh-listen=127.0.0.1:0")).api_auth.tls
    # A lone node may serve TLS on one port (the CLI warns that no node can join it).
    assert config_from_args(_args(*tls)).mesh_shares_tls_port


def test_listen_and_advertised_addresses():
    host, _, port = resolve_listen("127.0.0.1:0").rpartition(":")
    assert host == "127.0.0.1" and int(port) > 0
    assert resolve_listen("127.0.0.1:7000") == "127.0.0.1:7000"
    assert advertised_address("10.1.2.3:7000") == "10.1.2.3:7000"
    assert advertised_address("0.0.0.0:7000").endswith(":7000")
    assert not advertised_address("0.0.0.0:7000").startswith("0.0.0.0")
    with pytest.raises(AddressError, match="--listen 'nope': want HOST:PORT"):
        resolve_listen("nope")


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback")
def test_an_ipv6_listen_address_gets_a_free_port_in_brackets():
    host, _, port = resolve_listen("[::1]:0").rpartition(":")
    assert host == "[::1]" and 0 < int(port) <= 65535
    with pytest.raises(AddressError, match="cannot listen there"):
        resolve_listen("[::ffff:203.0.113.9]:0")  # not one of this machine's addresses


async def test_seeds_expand_and_leave_this_node_out():
    assert await resolve_seeds(["127.0.0.1:7000", "127.0.0.1:7001"], "127.0.0.1:7001", 1.0, 0.1) == [
        "127.0.0.1:7000"
    ]
    with pytest.raises(AddressError, match="want HOST:PORT"):
        await resolve_seeds(["seed"], "me:1", 1.0, 0.1)
    with pytest.raises(AddressError, match="cannot resolve seed"):
        await asyncio.wait_for(resolve_seeds(["no-such-host.invalid:1"], "me:1", 0.0, 0.01), 10)


# --- start-up mistakes: each one line naming its flag, before anything starts -----------------


@pytest.mark.parametrize(
    "flag, words",
    [
        # The socket layer would take 99999 modulo 65536 and listen on 34463.
        ("--listen=127.0.0.1:99999", "--listen '127.0.0.1:99999': port 99999 out of range"),
        ("--listen=127.0.0.1:65536", "port 65536 out of range"),
        ("--mesh-listen=127.0.0.1:70000", "--mesh-listen '127.0.0.1:70000': port 70000 out of range"),
        ("--http-listen=127.0.0.1:65536", "--http-listen '127.0.0.1:65536': port 65536 out of range"),
        # Addresses others dial have no "any free port".
        ("--advertise=10.0.0.1:0", "--advertise '10.0.0.1:0': port 0 out of range"),
        ("--mesh-advertise=10.0.0.1:99999", "--mesh-advertise '10.0.0.1:99999': port 99999"),
        ("--join=127.0.0.1:0", "--join '127.0.0.1:0': port 0 out of range"),
        ("--join=seed:65536", "--join 'seed:65536': port 65536 out of range"),
        ("--join=seed", "--join 'seed': want HOST:PORT"),
    ],
)
def test_addresses_with_a_port_out_of_range_are_refused(flag, words):
    with pytest.raises(AddressError, match=re.escape(words)):
        config_from_args(_args(flag))


def test_listen_addresses_keep_port_0_and_the_edges_of_the_range():
    cfg = config_from_args(
        _args(
            "--listen=127.0.0.1:0",
            "--mesh-listen=127.0.0.1:0",
            "--http-listen=127.0.0.1:0",
            "--advertise=10.0.0.1:65535",
            "--join=seed:1",
        )
    )
    assert (cfg.listen, cfg.advertise, cfg.join) == ("127.0.0.1:0", "10.0.0.1:65535", ["seed:1"])
    with pytest.raises(AddressError, match=re.escape("--listen '127.0.0.1:99999': port 99999 out of range")):
        resolve_listen("127.0.0.1:99999")
    with pytest.raises(AddressError, match="--mesh-listen 'x:70000'"):
        resolve_listen("x:70000", "--mesh-listen")


async def test_seeds_with_a_port_out_of_range_are_refused():
    with pytest.raises(AddressError, match="port 70000 out of range"):
        await resolve_seeds(["127.0.0.1:70000"], "me:1", 1.0, 0.1)
    with pytest.raises(AddressError, match="port 0 out of range"):
        await resolve_seeds_now(["127.0.0.1:0"], "me:1")


@pytest.mark.parametrize(
    "flag, words",
    [
        ("--max-attempts=0", "--max-attempts must be >= 1"),  # the first attempt counts
        ("--max-attempts=-1", "--max-attempts must be >= 1"),
        ("--drain-timeout=-1", "--drain-timeout must be >= 0"),
        ("--health-interval=0", "--health-interval must be > 0"),
        ("--max-request-bytes=0", "--max-request-bytes must be > 0"),
        ("--stream-idle-timeout=0", "--stream-idle-timeout must be > 0"),
        ("--loop-stall=0", "--loop-stall must be > 0"),
        ("--loop-stall-log-every=-1", "--loop-stall-log-every must be > 0"),
    ],
)
def test_out_of_range_numbers_are_refused(flag, words):
    with pytest.raises(ValueError, match=words):
        config_from_args(_args(flag))


def test_the_edges_of_the_number_ranges_are_taken():
    cfg = config_from_args(_args("--max-attempts=1", "--drain-timeout=0"))
    assert (cfg.retry.max_attempts, cfg.drain_timeout) == (1, 0)


def test_an_engine_id_given_twice_is_refused_naming_it():
    one = "--engine=id=e9,url=http://h:1"
    with pytest.raises(ValueError, match="--engine id 'e9' given more than once"):
        config_from_args(_args(one, "--engine=id=e9,url=http://h:2", "--engine=id=e1,url=http://h:3"))
    with pytest.raises(ValueError, match="'e9'"):  # the same spec twice too: one of them is a typo
        config_from_args(_args(one, one))


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "tokens").write_text(f"{'t' * 20} admin\n")
    (tmp_path / "secret").write_text("s" * 32)
    (tmp_path / "empty").write_text("")
    (tmp_path / "superuser").write_text(f"{'t' * 20} superuser\n")
    (tmp_path / "short").write_text("short client\n")
    (tmp_path / "latin").write_bytes(b"\xff" * 20 + b" client\n")
    (tmp_path / "junk.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    return tmp_path


def test_usable_files_pass(files):
    check_files(
        config_from_args(_args(f"--auth-token-file={files}/tokens", f"--mesh-secret-file={files}/secret"))
    )


_NO_FILE = "No such file or directory"


@pytest.mark.parametrize(
    "flags, error, words",
    [
        (["--auth-token-file={d}/nope"], ValueError, f"--auth-token-file '{{d}}/nope': {_NO_FILE}"),
        (["--auth-token-file={d}/superuser"], AuthError, "--auth-token-file '{d}/superuser': unknown role"),
        (["--auth-token-file={d}/short"], AuthError, "--auth-token-file '{d}/short': line 1: a token must"),
        (
            ["--auth-token-file={d}/latin"],
            AuthError,
            "--auth-token-file '{d}/latin': the token file '{d}/latin' is not UTF-8 text (byte 0)",
        ),
        (["--mesh-secret-file={d}/nope"], ValueError, f"--mesh-secret-file '{{d}}/nope': {_NO_FILE}"),
        (
            ["--tls-cert={d}/junk.pem", "--tls-key={d}/tokens"],
            ValueError,
            "--tls-cert '{d}/junk.pem' with --tls-key '{d}/tokens': not a usable PEM certificate",
        ),
        (
            ["--tls-cert={d}/junk.pem", "--tls-key={d}/junk.pem", "--tls-client-ca={d}/junk.pem"],
            ValueError,
            "--tls-cert '{d}/junk.pem' with --tls-key",  # the pair is checked before the CA
        ),
        (
            ["--mesh-secret-file={d}/empty"],
            MeshAuthError,
            "--mesh-secret-file '{d}/empty': the mesh secret must be at least 16 bytes, got 0",
        ),
        (
            ["--tls-cert={d}/no.pem", "--tls-key={d}/tokens"],
            ValueError,
            f"--tls-cert '{{d}}/no.pem': {_NO_FILE}",
        ),
        (
            ["--tls-cert={d}/tokens", "--tls-key={d}/no.key"],
            ValueError,
            f"--tls-key '{{d}}/no.key': {_NO_FILE}",
        ),
        (
            ["--tls-cert={d}/tokens", "--tls-key={d}/tokens", "--tls-client-ca={d}/ca"],
            ValueError,
            f"--tls-client-ca '{{d}}/ca': {_NO_FILE}",
        ),
        (
            [
                "--mesh-listen=127.0.0.1:0",
                "--mesh-tls-cert={d}/tokens",
                "--mesh-tls-key={d}/t",
                "--mesh-tls-ca={d}",
            ],
            ValueError,
            f"--mesh-tls-key '{{d}}/t': {_NO_FILE}",  # the first unusable one, by its own flag
        ),
    ],
)
def test_unusable_files_are_refused_naming_flag_and_path(files, flags, error, words):
    cfg = config_from_args(_args(*(f.format(d=files) for f in flags)))
    with pytest.raises(error, match=re.escape(words.format(d=files))):
        check_files(cfg)


@pytest.mark.parametrize(
    "flags, asks, not_asked",
    [
        # The token file authenticates the public API: only the mesh's flags are missing.
        (
            ["--auth-token-file=T"],
            ["--mesh-secret-file or --mesh-tls-*"],
            ["--auth-token-file", "--tls-cert"],
        ),
        (["--mesh-secret-file=S"], ["--tls-cert/--tls-key or --auth-token-file"], ["--mesh-secret-file"]),
        ([], ["--tls-cert/--tls-key or --auth-token-file, and --mesh-secret-file or --mesh-tls-*"], []),
    ],
)
def test_the_refusal_to_serve_unauthenticated_names_only_what_is_missing(
    monkeypatch, capsys, flags, asks, not_asked
):
    monkeypatch.setattr(router_cli, "configure_logging", lambda *a: None)
    assert router_cli.run(_args(*flags)) == 2
    out, err = capsys.readouterr()
    assert not out and err.count("\n") == 1 and err.startswith("kvmesh router: refusing to serve")
    assert all(a in err for a in asks) and not any(n in err for n in not_asked), err
    assert "or pass --insecure" in err


# --- the --engine help lists exactly the keys the parser takes ---------------------------------


def _engine_help() -> str:
    p = argparse.ArgumentParser()
    configure_parser(p)
    return next(a.help for a in p._actions if "--engine" in a.option_strings) or ""


def test_the_engine_help_lists_exactly_the_keys_the_parser_takes():
    listed = set(re.findall(r"\b([a-z_]+)=", _engine_help()))
    assert listed == set(SPEC_KEYS), listed ^ set(SPEC_KEYS)
    # Keys easy to leave out of a hand-written list: README's SGLang example uses kind=.
    assert {"kind", "capacity_blocks", "endpoint"} <= listed


def test_every_key_the_engine_help_lists_parses():
    spec = EngineSpec.parse(
        "id=e1,endpoint=http://h:1,kv=tcp://h:2,replay=tcp://h:3,model=m,block_size=32,dp=2,"
        "topic=t,capacity_blocks=100,kind=sglang"
    )
    assert (spec.endpoint, spec.kind, spec.capacity_blocks, spec.data_parallel_size) == (
        "http://h:1",
        "sglang",
        100,
        2,
    )
    with pytest.raises(EngineSpecError, match="keys: " + ", ".join(SPEC_KEYS)):
        EngineSpec.parse("id=e1,url=http://h:1,colour=red")


# --- a node no seed lets in says so, at a bounded interval -----------------------------------------


class _Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def warning(self, event: str, **kw) -> None:
        self.events.append((event, kw))


class _Joining:
    """What _wait_ready reads of a node that never joins; its clock moves
    one second a reading."""

    def __init__(self, ready_at: float) -> None:
        self.config = RouterConfig()
        self.log = _Log()
        self._t = -1.0
        self._ready_at = ready_at
        self.core = type("Core", (), {"has_peers": staticmethod(lambda: False)})()

    def clock(self) -> float:
        self._t += 1.0
        return self._t

    @property
    def ready(self) -> bool:
        return self._t >= self._ready_at


async def test_a_node_waiting_to_join_warns_first_after_one_join_retry_then_every_interval():
    node = _Joining(ready_at=25)
    cfg = node.config
    assert (cfg.mesh.membership.join_retry_interval, cfg.join_warn_interval) == (2.0, 10.0)
    await asyncio.wait_for(_wait_ready(node, asyncio.Event(), ["127.0.0.1:1"]), 10)  # type: ignore[arg-type]
    assert [e for e, _ in node.log.events] == ["router.join_waiting"] * 3
    assert [kw["waited"] for _, kw in node.log.events] == [2.0, 12.0, 22.0]
    assert node.log.events[0][1]["seeds"] == ["127.0.0.1:1"]
    assert "no seed has answered" in node.log.events[0][1]["hint"]


async def test_a_stopped_node_stops_waiting_and_warns_no_more():
    node, stop = _Joining(ready_at=float("inf")), asyncio.Event()
    stop.set()
    await asyncio.wait_for(_wait_ready(node, stop, ["127.0.0.1:1"]), 10)  # type: ignore[arg-type]
    assert node.log.events == []


def test_the_join_warning_interval_is_checked():
    with pytest.raises(ValueError, match="join_warn_interval must be > 0"):
        RouterConfig(join_warn_interval=0)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    repo = Path(__file__).resolve().parents[2]
    subprocess.run(["bash", str(repo / "deploy" / "make-certs.sh"), str(d)], check=True, capture_output=True)
    return d


def test_a_certificate_and_key_are_checked_as_the_pair_grpc_will_load(pki: Path) -> None:
    ok = _args(f"--tls-cert={pki}/server.pem", f"--tls-key={pki}/server.key", f"--tls-client-ca={pki}/ca.pem")
    check_files(config_from_args(ok))  # deploy/make-certs.sh's pair and CA pass
    mismatched = _args(f"--tls-cert={pki}/server.pem", f"--tls-key={pki}/mesh.key")
    with pytest.raises(ValueError, match="not a usable PEM certificate and private key that match"):
        check_files(config_from_args(mismatched))
    encrypted = pki / "encrypted.key"
    subprocess.run(
        [
            "openssl",
            "pkey",
            "-in",
            str(pki / "server.key"),
            "-aes256",
            "-passout",
            "pass:x",
            "-out",
            str(encrypted),
        ],
        check=True,
        capture_output=True,
    )
    # Refused without asking for a passphrase on the terminal (gRPC takes none).
    with pytest.raises(ValueError, match="the key is encrypted"):
        check_files(config_from_args(_args(f"--tls-cert={pki}/server.pem", f"--tls-key={encrypted}")))
    with pytest.raises(
        ValueError, match=re.escape(f"--tls-client-ca '{pki}/server.key': not a usable PEM CA")
    ):
        check_files(
            config_from_args(
                _args(
                    f"--tls-cert={pki}/server.pem",
                    f"--tls-key={pki}/server.key",
                    f"--tls-client-ca={pki}/server.key",
                )
            )
        )


def test_the_second_stop_signal_cuts_the_drain_short_even_after_an_admin_drain() -> None:
    import signal

    from router.node import RouterNode

    for admin_first in (False, True):
        node = RouterNode(RouterConfig(node_id="n1", insecure=True))
        stop = asyncio.Event()
        on_signal = router_cli.StopSignals(node, stop)
        if admin_first:
            stop.set()  # Admin.Drain (or a node-id clash) started the drain
        on_signal(signal.SIGTERM)  # kubectl delete / docker stop: one signal
        assert stop.is_set() and not node.drain_cut_short, admin_first  # drains, waits for the streams
        on_signal(signal.SIGINT)
        assert node.drain_cut_short, admin_first
