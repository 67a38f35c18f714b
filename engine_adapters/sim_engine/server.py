"""The simulated engine as a process: HTTP site, step loop, READY line, signals.

:func:`serve` runs one :class:`SimEngine` until SIGTERM/SIGINT (exit 0) or
until the step loop crashes (exit 1). Once listening it prints one line on
stdout, which process launchers (kvmesh/procs.py, the tests) wait for::

    READY http=http://HOST:PORT kv=<PUB endpoint or -> replay=<ROUTER endpoint or ->

with the addresses actually bound (port 0 picks free ports). Logs go to
stderr. The command line is ``kvmesh sim-engine`` (kvmesh/cli/sim_engine.py).
"""

from __future__ import annotations

import asyncio
import signal

import structlog
from aiohttp import web

from engine_adapters.sim_engine.admin_api import AdminApi
from engine_adapters.sim_engine.config import SimEngineConfig
from engine_adapters.sim_engine.engine import SimEngine
from engine_adapters.sim_engine.openai_api import OpenAIApi
from engine_adapters.sim_engine.sglang_api import SGLangApi

log = structlog.get_logger(__name__)

# Long token-id prompts are large JSON bodies; aiohttp's default is 1 MiB.
_MAX_BODY_BYTES = 64 * 1024 * 1024
# On a signal the step loop stops first, so an open stream can never finish:
# its connection is cut after this grace (as an engine process that exits
# cuts it), and the router retries or fails the call at once rather than
# after its stream-idle timeout.
_STOP_GRACE_S = 0.5


def build_app(engine: SimEngine) -> web.Application:
    """Every route of the engine: OpenAI, SGLang, admin."""
    app = web.Application(client_max_size=_MAX_BODY_BYTES)
    OpenAIApi(engine).add_routes(app)
    AdminApi(engine).add_routes(app)
    SGLangApi(engine).add_routes(app)
    return app


async def serve(config: SimEngineConfig) -> int:
    """Run the engine until a signal (0) or a step-loop crash (1)."""
    engine = SimEngine(config)
    runner = web.AppRunner(
        build_app(engine), handler_cancellation=True, access_log=None, shutdown_timeout=_STOP_GRACE_S
    )
    steps: asyncio.Task[None] | None = None
    try:
        await runner.setup()
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        port = runner.addresses[0][1]  # the bound port: config.port may be 0
        steps = asyncio.create_task(engine.steps.run(), name="sim-steps")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        pub = engine.publisher
        print(
            f"READY http=http://{config.host}:{port} "
            f"kv={pub.endpoint if pub else '-'} replay={(pub.replay_endpoint if pub else None) or '-'}",
            flush=True,
        )
        log.info("sim.engine_ready", port=port, model=config.model, blocks=config.num_gpu_blocks)
        waiter = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({waiter, steps}, return_when=asyncio.FIRST_COMPLETED)
        if steps in done and steps.exception() is not None:
            log.error("sim.step_loop_crashed", error=repr(steps.exception()))
            return 1
        waiter.cancel()
        log.info("sim.engine_stopping")
        return 0
    finally:
        if steps is not None:
            steps.cancel()
        await runner.cleanup()
        engine.close()
