"""`kvmesh generate` and `kvmesh route` as a user runs them: subprocesses
against a real router node and a simulated engine; their output checked."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest

from kvmesh import procs

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
KVMESH = str(REPO / ".venv" / "bin" / "kvmesh")
TOKEN = "cli-client-token-0123456789"


def _tokens(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [str(rng.randrange(256, 32000)) for _ in range(n)]


def kvmesh(
    *args: str, env: dict[str, str] | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KVMESH_")}
    return subprocess.run(
        [KVMESH, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**full_env, **(env or {})},
        input=stdin,
    )


@pytest.fixture(scope="module")
def fleet():
    engines = [procs.start_sim_engine(f"cli-e{i}", ["--seed", str(i)]) for i in range(2)]
    node = procs.start_router("cli-a", [procs.engine_flag(f"e{i}", p) for i, p in enumerate(engines)])
    yield node
    for p in [node, *engines]:
        p.stop()


def test_generate_streams_the_answer_to_stdout_and_the_story_to_stderr(fleet) -> None:
    out = kvmesh(
        "generate", "Hello there, kvmesh", "--max-tokens", "5", "--insecure", "--target", fleet.info["grpc"]
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()  # the text
    assert "prompt blocks predicted cached]" in out.stderr
    assert "[length: 5 tokens from e" in out.stderr and "attempt(s)]" in out.stderr
    quiet = kvmesh("generate", "Hi", "-q", "--max-tokens", "2", "--insecure", "--target", fleet.info["grpc"])
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout.strip()


def test_generate_json_prints_every_event_and_the_prompt_can_come_from_stdin(fleet) -> None:
    out = kvmesh(
        "generate", "-", "--json", "--max-tokens", "4", "--ignore-eos", "--request-id", "cli-7",
        "--insecure", "--target", fleet.info["grpc"], stdin="Once upon a time",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    kinds = [next(iter(e)) for e in events]
    assert kinds[0] == "routed" and kinds[-1] == "result" and set(kinds[1:-1]) == {"chunk"}
    result = events[-1]["result"]
    assert (result["request_id"], result["completion_tokens"], result["finish_reason"]) == (
        "cli-7",
        4,
        "length",
    )
    assert sum(len(e["chunk"]["token_ids"]) for e in events[1:-1]) == 4


def test_route_only_and_route_show_the_decision(fleet) -> None:
    ids = _tokens(1, 64)  # 4 blocks
    first = kvmesh(
        "generate", "--tokens", *ids, "--max-tokens", "1", "--insecure", "--target", fleet.info["grpc"]
    )
    assert first.returncode == 0, first.stderr
    engine = first.stderr.split(" -> ")[1].split(",")[0]
    shown = kvmesh("generate", "--tokens", *ids, "--route-only", "--insecure", "--target", fleet.info["grpc"])
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[1].split()[:2] == ["engine", engine]
    assert "of 4 prompt blocks (predicted)" in lines[2]
    assert lines[4].split() == ["candidates", "2"]
    chosen = [line for line in lines[6:] if line.lstrip().startswith("*")]
    assert len(chosen) == 1 and chosen[0].split()[1] == engine
    decision = kvmesh("route", "--tokens", *ids, "--json", "--insecure", "--target", fleet.info["grpc"])
    assert decision.returncode == 0, decision.stderr
    d = json.loads(decision.stdout)
    assert d["engine_id"] == engine and d["prompt_blocks"] == 4 and d["predicted_cached_blocks"] >= 3
    assert {c["engine_id"] for c in d["decision"]["candidates"]} == {"e0", "e1"}


def test_errors_say_what_went_wrong_and_exit_nonzero(fleet) -> None:
    target = ["--insecure", "--target", fleet.info["grpc"]]
    wrong_model = kvmesh("generate", "hi", "--model", "nope", *target)
    assert wrong_model.returncode == 1
    assert wrong_model.stderr.startswith("kvmesh generate: INVALID_ARGUMENT (invalid_request): ")
    no_prompt = kvmesh("route", *target)
    assert no_prompt.returncode == 2 and "TEXT or as --tokens" in no_prompt.stderr
    both = kvmesh("route", "hi", "--tokens", "1", *target)
    assert both.returncode == 2
    no_port = kvmesh("generate", "hi", "--insecure", "--target", "localhost")
    assert no_port.returncode == 2 and "HOST:PORT" in no_port.stderr
    mixed = kvmesh("route", "hi", "--tls-ca", "ca.pem", *target)
    assert mixed.returncode == 2 and "--insecure" in mixed.stderr
    # TLS is the default: a plaintext node does not answer it.
    tls = kvmesh("route", "hi", "--timeout", "5", "--target", fleet.info["grpc"])
    assert tls.returncode == 1 and "UNAVAILABLE" in tls.stderr and "add --insecure" in tls.stderr
    assert tls.stderr.startswith("kvmesh route: "), tls.stderr  # no line of gRPC's own before it


def test_a_value_out_of_range_is_one_line_and_no_traceback() -> None:
    nowhere = ["--insecure", "--target", f"127.0.0.1:{procs.free_port()}"]  # refused before any call
    for args in (
        ("generate", "hi there", "--max-tokens", "-3"),
        ("generate", "--tokens", "-5", "7"),
        ("route", "--tokens", "4294967296"),
    ):
        out = kvmesh(*args, *nowhere)
        assert out.returncode == 1 and out.stdout == "", out.stderr
        assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
        assert "INVALID_ARGUMENT (invalid_request): " in out.stderr


def test_the_target_and_token_come_from_the_environment_or_a_file(tmp_path: Path) -> None:
    (tmp_path / "tokens").write_text(f"# the node's token file\n{TOKEN} client\n")
    (tmp_path / "secret").write_text("a-shared-mesh-secret-of-32-bytes!\n")
    (tmp_path / "empty").write_text("# nothing here\n")
    engine = procs.start_sim_engine("cli-tok-e")
    flags = ["--auth-token-file", str(tmp_path / "tokens"), "--mesh-secret-file", str(tmp_path / "secret")]
    node = procs.start_router("cli-tok", [procs.engine_flag("e0", engine)], flags, insecure=False)
    env = {"KVMESH_TARGET": node.info["grpc"]}
    try:
        refused = kvmesh("generate", "hi", "--insecure", env=env)
        assert refused.returncode == 1
        assert "UNAUTHENTICATED (no_token): this call needs a valid token" in refused.stderr  # reason once
        by_env = kvmesh(
            "generate", "hi", "--insecure", "--max-tokens", "2", env={**env, "KVMESH_TOKEN": TOKEN}
        )
        assert by_env.returncode == 0, by_env.stderr
        by_file = kvmesh("route", "hi", "--insecure", "--token-file", str(tmp_path / "tokens"), env=env)
        assert by_file.returncode == 0 and "engine      e0" in by_file.stdout, by_file.stderr
        missing = kvmesh("route", "hi", "--insecure", "--token-file", str(tmp_path / "nope"), env=env)
        assert missing.returncode == 2 and "cannot read the token file" in missing.stderr
        empty = kvmesh("route", "hi", "--insecure", "--token-file", str(tmp_path / "empty"), env=env)
        assert empty.returncode == 2 and "holds no token" in empty.stderr
    finally:
        node.stop()
        engine.stop()
