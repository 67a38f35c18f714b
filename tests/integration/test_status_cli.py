"""``kvmesh status`` against a live mesh of two nodes and two engines: the
screen, the JSON, --watch, and what it says when it cannot ask."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmesh import procs
from kvmesh.cli import main
from kvmesh.cli.status import render, snapshot
from kvmesh.client import ONE_NODE, channel
from kvmesh_pb.v1 import router_pb2 as pb
from kvmesh_pb.v1 import router_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

REQUESTS = 8
CLIENT_TOKEN = "status-client-token-0123456789"
ADMIN_TOKEN = "status-admin-token-0123456789"


@pytest.fixture(scope="module")
def fleet():
    engines = [procs.start_sim_engine(f"status-e{i}", ["--seed", str(i)]) for i in range(2)]
    flags = [procs.engine_flag(f"e{i}", p) for i, p in enumerate(engines)]
    fast = ["--probe-interval", "0.3", "--gossip-interval", "0.05"]
    r1 = procs.start_router("status-r1", flags, fast)
    r2 = procs.start_router("status-r2", [], [*fast, "--join", r1.info["mesh"]])
    _wait_ownership(r1, r2)  # then the owners see the traffic's KV events
    rng = random.Random(3)
    prefix = [rng.randrange(256, 30000) for _ in range(48)]
    with channel(r1.info["grpc"], tls=False, config=ONE_NODE) as ch:
        router = pb_grpc.RouterStub(ch)
        for _ in range(REQUESTS):
            ids = prefix + [rng.randrange(256, 30000) for _ in range(8)]
            req = pb.GenerateRequest(
                prompt=pb.Prompt(token_ids=pb.TokenIds(ids=ids)), sampling=pb.SamplingParams(max_tokens=2)
            )
            for _ in router.Generate(req, timeout=30):
                pass
            time.sleep(0.1)
    yield r1, r2
    for p in (r2, r1, *engines):
        p.stop()


def _wait_ownership(*nodes: procs.Proc) -> None:
    """Until every node sees every node and gives every engine the same owner
    (each node takes what rendezvous hashing gives it as soon as it sees that)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        views = []
        for n in nodes:
            with channel(n.info["grpc"], tls=False, config=ONE_NODE) as ch:
                members = pb_grpc.AdminStub(ch).ListMembers(pb.ListMembersRequest()).members
            views.append(sorted((m.node_id, m.state, tuple(m.owned_engines)) for m in members))
        owned = sorted(e for _, _, engines in views[0] for e in engines)
        if all(v == views[0] for v in views) and len(views[0]) == len(nodes) and owned == ["e0", "e1"]:
            return
        time.sleep(0.1)
    raise AssertionError("ownership did not settle")


def _status(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["status", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_the_screen(fleet, capsys: pytest.CaptureFixture[str]) -> None:
    r1, r2 = fleet
    rc, out, err = _status(capsys, "--target", r1.info["grpc"], "--insecure")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"kvmesh status  status-r1 at {r1.info['grpc']}  ready  policy precise")
    assert "MEMBERS (2 live)" in lines
    loop = next(line for line in lines if line.startswith("  event loop: "))
    assert re.fullmatch(r"  event loop: \d+ stalls, largest lag since start \d+\.\d{3}s", loop), loop
    me = next(line for line in lines if line.lstrip().startswith("*status-r1"))
    peer = next(line for line in lines if line.lstrip().startswith("status-r2"))
    # The incarnation: 0 unless the node had to refute a suspicion (a loaded host, fast probes).
    assert me.split()[1] == "alive" and me.split()[2].isdigit() and r1.info["mesh"] in me
    assert peer.split()[1] == "alive" and r2.info["mesh"] in peer
    assert "ENGINES (2)" in lines
    header = next(line for line in lines if line.lstrip().startswith("ENGINE "))
    assert header.split() == (
        [
            "ENGINE",
            "OWNER",
            "HEALTH",
            "BREAKER",
            "SEQ",
            "BLOCKS",
            "MESH",
            "IN-FLIGHT",
            "HIT",
            "RATE",
            "EVENT",
            "LAG",
        ]
    )
    rows = [line.split() for line in lines if line.lstrip().startswith(("e0 ", "e1 "))]
    assert len(rows) == 2
    for row in rows:
        assert row[1] in ("status-r1", "status-r2") and row[2:4] == ["up", "closed"]
        assert row[4] == "-" or int(row[4]) >= 0  # no KV event yet: no sequence
        assert int(row[5]) >= 0
    assert any(row[4] != "-" and int(row[5]) > 0 and row[7].endswith("%") for row in rows)  # the busy one
    assert f"  generate requests admitted {REQUESTS}  failed 0  retries 0" in lines
    assert f"  calls ended {REQUESTS} (Generate, Route, HTTP API, refused tokens): OK {REQUESTS}" in lines
    assert "mispredicted routes " in out


def test_the_json(fleet, capsys: pytest.CaptureFixture[str]) -> None:
    r1, r2 = fleet
    rc, out, err = _status(capsys, "--target", r1.info["grpc"], "--insecure", "--json")
    assert rc == 0, err
    snap = json.loads(out)
    members = {m["node_id"]: m for m in snap["members"]}
    assert set(members) == {"status-r1", "status-r2"}
    assert members["status-r1"]["is_self"] and not members["status-r2"]["is_self"]
    assert members["status-r2"]["address"] == r2.info["mesh"]
    assert all(m["state"] == "alive" and isinstance(m["incarnation"], int) for m in members.values())
    engines = {e["engine_id"]: e for e in snap["engines"]}
    assert set(engines) == {"e0", "e1"}
    for e in engines.values():
        assert e["owner"] in members and e["engine_id"] in members[e["owner"]]["owned_engines"]
        assert e["healthy"] is True and e["breaker"] == "closed"
        assert set(e["worker_seqs"]) <= {e["engine_id"]}  # empty until its first KV event
        if e["owner"] != "status-r1":  # the event lag is the owner's
            assert e["event_lag_seconds"] is None
    served = [e for e in engines.values() if e["prompt_tokens"]]
    assert served and all(0 < e["hit_rate"] <= 1 and e["worker_seqs"][e["engine_id"]] >= 0 for e in served)
    assert sum(e["prompt_tokens"] for e in engines.values()) == REQUESTS * 56
    routing = snap["routing"]
    assert routing["requests"] == routing["calls_ok"] == routing["calls_ended"] == REQUESTS
    assert routing["route_predictions"] >= REQUESTS // 2 and routing["misprediction_rate"] is not None
    assert routing["hit_rate"] == pytest.approx(routing["cached_prompt_tokens"] / routing["prompt_tokens"])
    assert snap["node"]["node_id"] == "status-r1" and snap["node"]["ready"] is True
    # A running node's lag probe has fired, never exactly on time.
    assert snap["node"]["event_loop_lag_max_seconds"] > 0
    # The other node: the same mesh, its own (empty) routing.
    rc, out, _ = _status(capsys, "--target", r2.info["grpc"], "--insecure", "--json")
    other = json.loads(out)
    assert rc == 0 and {m["node_id"] for m in other["members"]} == set(members)
    assert other["routing"]["requests"] == 0 and other["routing"]["hit_rate"] is None
    views = {"status-r1": engines, "status-r2": {e["engine_id"]: e for e in other["engines"]}}
    for e in served:  # its owner applied the traffic's KV events and knows their lag
        assert 0 <= views[e["owner"]][e["engine_id"]]["event_lag_seconds"] < 5


def test_watch_redraws_until_interrupted(fleet) -> None:
    r1, _ = fleet
    p = subprocess.Popen(
        [sys.executable, "-m", "kvmesh.cli", "status", "--target", r1.info["grpc"], "--insecure", "--json",
         "--watch", "0.2"],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert p.stdout is not None
    first, second = json.loads(p.stdout.readline()), json.loads(p.stdout.readline())
    assert first["node"]["node_id"] == second["node"]["node_id"] == "status-r1"
    p.send_signal(signal.SIGINT)
    assert p.wait(10) == 0


def test_a_reader_that_goes_away_ends_it_quietly(fleet) -> None:
    r1, _ = fleet
    p = subprocess.Popen(
        [sys.executable, "-m", "kvmesh.cli", "status", "--target", r1.info["grpc"], "--insecure", "--json",
         "--watch", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert p.stdout is not None and p.stderr is not None
    assert json.loads(p.stdout.readline())["node"]["node_id"] == "status-r1"
    p.stdout.close()  # as `| head -1` does
    assert p.wait(10) == 0
    assert p.stderr.read() == ""


@pytest.mark.parametrize("command", [["route", "--tokens", "5", "6", "7"], ["generate", "hello", "--json"]])
def test_a_client_command_whose_reader_went_away_ends_quietly(fleet, command: list[str]) -> None:
    r1, _ = fleet
    p = subprocess.Popen(
        [sys.executable, "-m", "kvmesh.cli", *command, "--target", r1.info["grpc"], "--insecure"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()  # before the answer: as `| head -0` does
    assert p.wait(30) == 0
    assert p.stderr.read() == ""


def test_what_it_says_when_it_cannot_ask(fleet, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    r1, _ = fleet
    rc, _, err = _status(capsys, "--target", f"127.0.0.1:{procs.free_port()}", "--insecure", "--timeout", "2")
    assert rc == 1 and "UNAVAILABLE" in err
    rc, _, err = _status(capsys, "--target", r1.info["grpc"], "--timeout", "2")  # TLS to a plaintext node
    assert rc == 1 and "--insecure" in err
    rc, _, err = _status(capsys, "--target", r1.info["grpc"], "--insecure", "--tls-ca", "x.pem")
    assert rc == 2 and "exclude" in err
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{CLIENT_TOKEN} client\n{ADMIN_TOKEN} admin\n")
    guarded = procs.start_router("status-guarded", [], ["--auth-token-file", str(tokens)])  # mesh: --insecure
    try:
        target = ["--target", guarded.info["grpc"], "--insecure"]
        rc, _, err = _status(capsys, *target)
        assert rc == 1 and "UNAUTHENTICATED (no_token): this call needs a valid token" in err
        assert "--token-file" in err
        (tmp_path / "client").write_text(f"# a client token\n{CLIENT_TOKEN}\n")
        rc, _, err = _status(capsys, *target, "--token-file", str(tmp_path / "client"))
        assert rc == 1 and "PERMISSION_DENIED" in err
        rc, out, err = _status(capsys, *target, "--token-file", str(tokens.parent / "admin"))
        assert rc == 2 and "cannot read the token file" in err
        (tmp_path / "admin").write_text(ADMIN_TOKEN)
        rc, out, err = _status(capsys, *target, "--token-file", str(tmp_path / "admin"))
        assert rc == 0 and "status-guarded" in out, err
    finally:
        guarded.stop()


def test_an_empty_node_renders_without_ratios() -> None:
    stats = pb.GetStatsResponse(node_id="n1", default_policy="precise", ready=True, live_members=1)
    members = pb.ListMembersResponse(
        members=[pb.Member(node_id="n1", addr="10.0.0.1:50051", state="alive", incarnation=3, is_self=True)]
    )
    snap = snapshot("10.0.0.1:50051", members, pb.ListEnginesResponse(), stats, 0.0)
    assert snap["routing"]["hit_rate"] is None and snap["routing"]["misprediction_rate"] is None
    assert snap["members"][0]["convergence_lag_seconds"] is None
    screen = render(snap)
    assert "ENGINES (0)" in screen and "(hit rate -)" in screen and "of 0 (-)" in screen
    row = next(line for line in screen.splitlines() if line.startswith("  *n1"))
    assert row.split() == ["*n1", "alive", "3", "10.0.0.1:50051", "-", "-"]
    assert json.loads(json.dumps(snap)) == snap  # plain data


def test_suspect_members_are_counted_apart_in_the_header() -> None:
    stats = pb.GetStatsResponse(node_id="n1", default_policy="precise", ready=True, live_members=3)
    members = pb.ListMembersResponse(
        members=[
            pb.Member(node_id="n1", addr="10.0.0.1:50051", state="alive", incarnation=3, is_self=True),
            pb.Member(node_id="n2", addr="10.0.0.2:50051", state="suspect", incarnation=1),
            pb.Member(node_id="n3", addr="10.0.0.3:50051", state="alive", incarnation=1),
            pb.Member(node_id="n4", addr="10.0.0.4:50051", state="dead", incarnation=2),
        ]
    )
    screen = render(snapshot("10.0.0.1:50051", members, pb.ListEnginesResponse(), stats, 0.0))
    assert "MEMBERS (3 live, 1 of them suspect)" in screen.splitlines()
    from kvmesh.cli import status
    from mesh.swim_messages import ALIVE, SUSPECT

    assert (status._ALIVE, status._SUSPECT) == (ALIVE, SUSPECT)  # the names the mesh sends
