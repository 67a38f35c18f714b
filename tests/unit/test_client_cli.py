"""The client commands in-process (kvmesh/cli/generate.py, route.py,
status.py, client_flags.py): what they print for a bad argument, how the
answer ends, the flags' words, and the status screen's routing counts.
Nothing listens at the target: every check here happens before any call."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from kvmesh import procs
from kvmesh.cli import client_flags, generate, route
from kvmesh.cli.status import render, snapshot
from kvmesh.client import Chunk, KvmeshError, Result, Routed
from kvmesh.client.messages import Decision
from kvmesh_pb.v1 import router_pb2 as pb


def _args(command: Any, *argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    command.configure_parser(p)
    return p.parse_args(list(argv))


def _nowhere() -> list[str]:
    return ["--insecure", "--target", f"127.0.0.1:{procs.free_port()}", "--timeout", "5"]


# --- a bad argument: one line, a non-zero exit, no traceback -----------------------------------


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["hi there", "--max-tokens", "-3"], "max_tokens must be >= 1, got -3"),
        (["--tokens", "-5", "7"], "token id -5 is out of range"),
        (["--tokens", "1", "4294967296"], "token id 4294967296 is out of range"),
        (["hi", "--seed", "-1"], "seed must be in 0.."),
        (["hi", "--temperature", "nan"], "temperature must be a number >= 0, got nan"),
        (["hi", "--temperature", "-1"], "temperature must be a number >= 0, got -1.0"),
        (["hi", "--top-p", "2"], "top_p must be in (0, 1], got 2.0"),
    ],
)
def test_generate_refuses_a_value_out_of_range_in_one_line(
    argv: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = generate.run(_args(generate, *argv, *_nowhere()))
    out, err = capsys.readouterr()
    assert rc == 1 and out == ""
    assert err.startswith(f"kvmesh generate: INVALID_ARGUMENT (invalid_request): {words}"), err
    assert err.count("\n") == 1 and err.endswith("\n")


def test_route_refuses_a_token_id_out_of_range_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    rc = route.run(_args(route, "--tokens", "3", "-1", *_nowhere()))
    out, err = capsys.readouterr()
    assert rc == 1 and out == ""
    assert err.startswith("kvmesh route: INVALID_ARGUMENT (invalid_request): token id -1 is out of range")
    assert err.count("\n") == 1


@pytest.mark.parametrize("timeout", ["nan", "0", "-2"])
def test_a_timeout_that_cannot_work_is_a_usage_error(
    timeout: str, capsys: pytest.CaptureFixture[str]
) -> None:
    target = ["--insecure", "--target", f"127.0.0.1:{procs.free_port()}"]
    rc = generate.run(_args(generate, "hi", *target, "--timeout", timeout))
    _, err = capsys.readouterr()
    assert rc == 2 and err.startswith("kvmesh generate: timeout must be positive") and err.count("\n") == 1


# --- the answer ends its line ------------------------------------------------------------------


_ROUTED = Routed("r1", "e1", "http://e1", 2, 1, Decision("precise", "why", ()))


def _result(text: str) -> Result:
    return Result("r1", "e1", "length", 8, 4, 2, 1.5, 1, "", (1, 2), text, _ROUTED)


class _FakeClient:
    """Streams ``events`` (a KvmeshError among them is raised there)."""

    def __init__(self, events: list[Any]) -> None:
        self.events = events

    def __enter__(self) -> _FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def generate(self, prompt: Any, **options: Any) -> Iterator[Any]:
        for e in self.events:
            if isinstance(e, KvmeshError):
                raise e
            yield e


def _generate(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], events: list[Any], *flags: str
) -> tuple[int, str, str]:
    monkeypatch.setattr(generate, "client_from_args", lambda args: _FakeClient(events))
    rc = generate.run(_args(generate, "hi", "--insecure", *flags))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("flags", [(), ("-q",)])
def test_the_answer_on_stdout_ends_with_a_newline(
    flags: tuple[str, ...], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    events = [_ROUTED, Chunk((1,), "Hel"), Chunk((2,), "lo"), _result("Hello")]
    rc, out, err = _generate(monkeypatch, capsys, events, *flags)
    assert rc == 0 and out == "Hello\n"
    assert (err == "") == ("-q" in flags)


def test_an_answer_that_ends_its_line_gets_no_blank_one_and_an_empty_one_stays_empty(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, _ = _generate(monkeypatch, capsys, [_ROUTED, Chunk((1,), "line\n"), _result("line\n")], "-q")
    assert rc == 0 and out == "line\n"
    rc, out, _ = _generate(monkeypatch, capsys, [_ROUTED, _result("")])
    assert rc == 0 and out == ""


def test_json_lines_get_no_extra_newline(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, _ = _generate(monkeypatch, capsys, [_ROUTED, Chunk((1,), "Hi"), _result("Hi")], "--json")
    assert rc == 0 and out.endswith("}\n")
    assert [next(iter(json.loads(line))) for line in out.splitlines()] == ["routed", "chunk", "result"]


def test_a_stream_that_fails_midway_ends_the_answer_line_then_says_why(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cut = KvmeshError(grpc.StatusCode.UNAVAILABLE, "engine e1 failed", "engine_failed", started=True)
    rc, out, err = _generate(monkeypatch, capsys, [_ROUTED, Chunk((1,), "Hal"), cut], "-q")
    assert rc == 1 and out == "Hal\n"
    assert err == "kvmesh generate: UNAVAILABLE (engine_failed): engine e1 failed\n"


# --- plaintext: what the flags and the TLS hint say ---------------------------------------------


def test_insecure_is_for_every_node_that_serves_without_tls() -> None:
    p = argparse.ArgumentParser()
    client_flags.add_connection_flags(p)
    words = " ".join(next(a.help for a in p._actions if a.dest == "insecure").split())
    assert "--auth-token-file" in words and "--insecure" in words
    args = argparse.Namespace(insecure=False)
    handshake = KvmeshError(grpc.StatusCode.UNAVAILABLE, "ipv4:127.0.0.1:1: Tls handshake failed")
    hint = client_flags.explain(handshake, args)
    assert "serves without TLS" in hint and "--auth-token-file" in hint and "add --insecure" in hint
    assert "a node run --insecure speaks plaintext" not in hint


_HOST = "ipv4:127.0.0.1:1: Peer name localhost is not in peer certificate: Hostname Verification Check failed"
_SSL = "ipv4:127.0.0.1:1: Ssl handshake failed: SSL_ERROR_SSL: CERTIFICATE_VERIFY_FAILED: "


@pytest.mark.parametrize(
    "words,insecure,want",
    [
        (_HOST, False, "--tls-server-name"),  # a certificate for another host, --tls-ca given
        (_SSL + "certificate has expired", False, "the node's (it needs a new one)"),
        (_SSL + "self signed certificate in certificate chain", False, "--tls-ca"),
        ("ipv4:127.0.0.1:1: Socket closed", True, "drop --insecure"),  # plaintext to a TLS port
    ],
)
def test_tls_failures_say_which_flag_to_change(words: str, insecure: bool, want: str) -> None:
    e = KvmeshError(grpc.StatusCode.UNAVAILABLE, words)
    hint = client_flags.explain(e, argparse.Namespace(insecure=insecure))
    assert hint.splitlines()[-1].startswith("(") and want in hint


def test_a_node_that_is_not_serving_is_said_so() -> None:
    args = argparse.Namespace(insecure=True)
    unhealthy = KvmeshError(
        grpc.StatusCode.UNAVAILABLE,
        "connections to all backends failing; last error: ipv4:127.0.0.1:50085: backend unhealthy",
    )
    hint = client_flags.explain(unhealthy, args)
    assert hint.startswith(str(unhealthy)) and "joining the mesh or draining" in hint
    assert "kvmesh status" in hint
    other = KvmeshError(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")
    assert client_flags.explain(other, args) == str(other)  # no guess where it does not fit
    named = KvmeshError(grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty", request_id="r-9")
    assert client_flags.explain(named, args) == f"{named} (request r-9)"


# --- the status screen: requests and calls counted apart ----------------------------------------


def test_the_routing_lines_say_what_each_count_counts() -> None:
    # One Generate and two Route calls: GetStats counts the Generate in
    # requests_total, all three in the outcomes.
    stats = pb.GetStatsResponse(node_id="n1", ready=True, requests_total=1, outcomes={"OK": 3})
    snap = snapshot("n1:50051", pb.ListMembersResponse(), pb.ListEnginesResponse(), stats, 0.0)
    routing = snap["routing"]
    assert (routing["requests"], routing["calls_ended"], routing["calls_ok"]) == (1, 3, 3)
    assert "requests_ok" not in routing
    lines = render(snap).splitlines()
    assert "  generate requests admitted 1  failed 0  retries 0" in lines
    assert "  calls ended 3 (Generate, Route, HTTP API, refused tokens): OK 3" in lines
    assert not any("ok 3" in line for line in lines)


# --- the token and the target: files and the environment -------------------------------------------


def test_a_node_s_token_file_gives_each_command_the_token_of_its_role(tmp_path) -> None:
    table = tmp_path / "tokens"
    table.write_text(
        "# the node's --auth-token-file\nclient-token-0123456789 client\nadmin-token-0123456789 admin\n"
    )
    assert client_flags.token_from_file(str(table), "client") == "client-token-0123456789"
    assert client_flags.token_from_file(str(table), "admin") == "admin-token-0123456789"
    table.write_text("admin-token-0123456789 admin\nno-role-token-0123456789\n")  # no role: a client's
    assert client_flags.token_from_file(str(table), "client") == "no-role-token-0123456789"
    one = tmp_path / "one"
    one.write_text("just-a-token-0123456789\n")  # one token: whatever the role
    assert client_flags.token_from_file(str(one), "admin") == "just-a-token-0123456789"
    only_admin = tmp_path / "admin-only"
    only_admin.write_text("admin-token-0123456789 admin\n")  # no token of the role: the first
    assert client_flags.token_from_file(str(only_admin), "client") == "admin-token-0123456789"
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="holds no token"):
        client_flags.token_from_file(str(empty), "client")
    with pytest.raises(ValueError, match="cannot read the token file"):
        client_flags.token_from_file(str(tmp_path / "missing"), "client")


def test_status_takes_the_target_and_token_from_the_environment(monkeypatch, tmp_path) -> None:
    from kvmesh.cli import status

    monkeypatch.setenv("KVMESH_TARGET", "10.1.2.3:7000")
    monkeypatch.setenv("KVMESH_TOKEN", "env-token-0123456789")
    args = _args(status, "--insecure")
    assert args.target == "10.1.2.3:7000"
    assert status.credentials_from_args(args).token == "env-token-0123456789"
    table = tmp_path / "tokens"
    table.write_text("client-token-0123456789 client\nadmin-token-0123456789 admin\n")
    args = _args(status, "--insecure", "--token-file", str(table), "--target", "h:1")
    assert args.target == "h:1"  # a flag over the environment
    assert status.credentials_from_args(args).token == "admin-token-0123456789"


@pytest.mark.parametrize(
    ("flag", "words"),
    [
        (["--watch", "-1"], "--watch must be >= 0 seconds"),
        (["--timeout", "0"], "--timeout must be > 0 seconds"),
    ],
)
def test_status_refuses_a_time_it_cannot_keep(flag: list[str], words: str, capsys) -> None:
    from kvmesh.cli import status

    assert status.run(_args(status, "--insecure", *flag)) == 2
    assert capsys.readouterr().err.startswith(f"kvmesh status: {words}")


def test_status_loads_no_router_modules() -> None:
    # The router's config pulls in aiohttp, the mesh and the engine adapters:
    # seconds of imports for every `kvmesh status` an operator types.
    heavy = "('router.config', 'mesh.', 'aiohttp')"
    code = f"import sys, kvmesh.cli.status; print(sorted(m for m in sys.modules if m.startswith({heavy})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


_PLAIN = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:50051: Tls handshake failed "
    "(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER"
)


@pytest.mark.parametrize(
    "words,want",
    [
        (_PLAIN, "tls=False"),  # TLS (the library's default) to a plaintext node
        (_HOST, "TlsConfig(server_name=...)"),
        (_SSL + "certificate has expired", "the node's (it needs a new one)"),  # not a CA to give
        (_SSL + "self signed certificate in certificate chain", "TlsConfig(ca_file=...)"),
    ],
)
def test_the_library_error_names_the_argument_and_the_cli_its_flag_once(words: str, want: str) -> None:
    e = KvmeshError(grpc.StatusCode.UNAVAILABLE, words)
    assert want in e.hint and str(e).endswith(f"({e.hint})")  # what a Python caller's traceback shows
    said = client_flags.explain(e, argparse.Namespace(insecure=False))
    assert e.hint not in said and said.startswith(e.without_hint())  # the CLI says it in its flags
    assert KvmeshError(grpc.StatusCode.INVALID_ARGUMENT, words).hint == ""  # only a connection's failure
