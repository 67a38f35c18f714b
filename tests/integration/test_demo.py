"""`make demo` is the first thing a newcomer runs: it must end with every
request answered. The same run, without the mesh: policies one after another
through one node: the quiet tail of one run, then the burst of the next."""

from __future__ import annotations

import argparse

import pytest

from kvmesh import demo

pytestmark = pytest.mark.slow


def test_the_demo_answers_every_request(capsys: pytest.CaptureFixture[str]) -> None:
    p = argparse.ArgumentParser()
    demo.configure_parser(p)
    args = p.parse_args(["--nodes", "1", "--policies", "round_robin,precise"])
    rc = demo.run(args)
    out = capsys.readouterr().out
    results = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert len(results) == 2, out
    assert all(" failed=0" in line for line in results), out
    (said,) = [line for line in out.splitlines() if line.startswith("CONCLUSION ")]
    assert said.startswith("CONCLUSION precise vs round_robin through one node: hit rate "), out
    assert "imbalance: requests of the busiest engine" in " ".join(out.split())  # the table's legend
    assert rc == 0
