"""The client container of the multi-container tests: steady Generate load
through one ``kvmesh.client.AsyncClient``, reported line by line.

``LOAD`` runs in the container (``python -c LOAD`` with :func:`load_args`):
``workers`` loops of Generate until ``/tmp/stop`` exists, one
``REQ {json}`` line per request as it ends (:func:`records` reads them), a
``DIAL n t`` line whenever the client dialed the name again (printed within
50 ms), ``READY client ...`` once it runs and ``DONE dials=n`` at the end.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["LOAD", "load_args", "records"]

LOAD = r"""
import asyncio, json, os, random, sys, time
from kvmesh.client import AsyncClient, Chunk, ClientConfig, KvmeshError, Result

target, workers, max_tokens, model = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
reresolve, pause = sys.argv[5], float(sys.argv[6])
config = ClientConfig(reresolve_interval=float(reresolve)) if reresolve else None  # else the defaults
STOP = "/tmp/stop"

async def worker(k, client):
    rng = random.Random(k)
    n = 0
    while not os.path.exists(STOP):
        rid = f"w{k}-{n}"
        n += 1
        rec = {"id": rid, "t0": time.time(), "chunks": 0, "ok": False}
        try:
            prompt = [rng.randrange(256, 32000) for _ in range(64)]
            async for ev in client.generate(prompt, model=model, max_tokens=max_tokens, ignore_eos=True,
                                            request_id=rid):
                if isinstance(ev, Chunk):
                    rec["chunks"] += 1
                elif isinstance(ev, Result):
                    rec["ok"] = ev.completion_tokens == max_tokens
        except KvmeshError as e:
            rec.update(status=e.status, reason=e.reason, started=e.started, message=e.message[:200])
        rec["t1"] = time.time()
        print("REQ " + json.dumps(rec), flush=True)
        if pause:
            await asyncio.sleep(pause)

async def dials(client):
    seen = 0
    while not os.path.exists(STOP):
        if client.dials != seen:  # a fresh resolution of the name
            seen = client.dials
            print(f"DIAL {seen} {time.time()}", flush=True)
        await asyncio.sleep(0.05)

async def main():
    client = AsyncClient(target, tls=False, config=config)
    print(f"READY client target={client.target} reresolve_interval={client.config.reresolve_interval}",
          flush=True)
    await asyncio.gather(dials(client), *(worker(k, client) for k in range(workers)))
    print(f"DONE dials={client.dials}", flush=True)
    await client.close()

asyncio.run(main())
"""


def load_args(
    target: str, workers: int, max_tokens: int, model: str, reresolve: float | None = None, pause: float = 0.0
) -> list[str]:
    """The container's arguments: ``reresolve`` is the client's
    ``reresolve_interval`` (None: its default), ``pause`` the seconds a loop
    waits between requests."""
    return [
        target,
        str(workers),
        str(max_tokens),
        model,
        "" if reresolve is None else str(reresolve),
        str(pause),
    ]


def records(container: Any) -> list[dict[str, Any]]:
    """Every ``REQ`` record the container printed so far."""
    out = container.logs(stdout=True, stderr=False).decode(errors="replace")
    return [json.loads(line[4:]) for line in out.splitlines() if line.startswith("REQ ")]
