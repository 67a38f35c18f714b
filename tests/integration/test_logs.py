"""Logs of a running node: one JSON object per line with the node's id, and a
level that changes while it runs (Admin.SetLogLevel, SIGHUP)."""

from __future__ import annotations

import json
import signal
import time

import grpc
import pytest

from kvmesh import procs
from kvmesh.client import ONE_NODE, channel
from kvmesh_pb.v1 import router_pb2 as pb
from kvmesh_pb.v1 import router_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow


def _events(proc: procs.Proc) -> list[dict]:
    out = []
    for line in list(proc.output):
        if line.startswith("{"):
            out.append(json.loads(line))  # every log line is one JSON object
    return out


def _wait_for(proc: procs.Proc, pred, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in _events(proc):
            if pred(e):
                return e
        time.sleep(0.05)
    raise AssertionError(f"no such log event; last lines:\n{proc.tail()}")


def _add_and_remove(admin: pb_grpc.AdminStub, engine_id: str) -> None:
    spec = pb.EngineSpec(engine_id=engine_id, endpoint=f"http://127.0.0.1:{procs.free_port()}", model="m")
    admin.RegisterEngine(pb.RegisterEngineRequest(spec=spec), timeout=10)
    admin.DeregisterEngine(pb.DeregisterEngineRequest(engine_id=engine_id), timeout=10)


def test_json_lines_and_a_level_changed_at_run_time() -> None:
    node = procs.start_router("logs", [], ["--log-level", "warning", "--log-format", "json"])
    try:
        with channel(node.info["grpc"], tls=False, config=ONE_NODE) as ch:
            admin = pb_grpc.AdminStub(ch)
            _add_and_remove(admin, "quiet")  # its router.engine_removed is info: not logged at warning
            assert admin.SetLogLevel(pb.SetLogLevelRequest(level="info")).previous == "warning"
            _add_and_remove(admin, "loud")
            removed = _wait_for(node, lambda e: e.get("event") == "router.engine_removed")
            assert removed["engine"] == "loud" and removed["node"] == "logs" and removed["level"] == "info"
            assert "timestamp" in removed
            # At warning, only quiet's warnings were logged (it has no kv endpoint; it was
            # deregistered), none of its info.
            quiet = [(e["event"], e["level"]) for e in _events(node) if e.get("engine") == "quiet"]
            assert quiet == [
                ("router.engine_without_kv_events", "warning"),
                ("router.engine_deregister_requested", "warning"),
            ]
            # Every line about an engine says which node wrote it (the registry's, the node's).
            about = [e for e in _events(node) if e.get("engine") == "loud"]
            assert {e["event"] for e in about} >= {"mesh.engine_registered", "mesh.engine_deregistered"}
            assert all(e.get("node") == "logs" for e in about), about
            with pytest.raises(grpc.RpcError) as bad:
                admin.SetLogLevel(pb.SetLogLevelRequest(level="loud"))
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            node.popen.send_signal(signal.SIGHUP)
            changed = _wait_for(node, lambda e: e.get("by") == "SIGHUP")
            assert changed["event"] == "router.log_level_changed" and changed["log_level"] == "debug"
            node.popen.send_signal(signal.SIGHUP)  # back to the configured level
            _wait_for(node, lambda e: e.get("by") == "SIGHUP" and e.get("log_level") == "warning")
    finally:
        node.stop()


def test_an_engines_event_adapter_says_which_node_it_runs_on() -> None:
    """Aggregated, the logs of several nodes must say which one lost an
    engine's events or reset its blocks: the adapter's lines carry the node."""
    engine = procs.start_sim_engine("logs-e", ["--seed", "1"])
    node = procs.start_router("logs-a", [procs.engine_flag("e", engine)], ["--log-format", "json"])
    try:
        started = _wait_for(node, lambda e: e.get("event") == "adapter.started")
        assert started["engine"] == "e" and started["node"] == "logs-a"
        installed = _wait_for(node, lambda e: e.get("event") == "engine_log.epoch_installed")
        assert installed["node"] == "logs-a"
    finally:
        node.stop()
        engine.stop()
