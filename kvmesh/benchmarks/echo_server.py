"""A bare grpcio (aio) server with the router's ``Generate`` streaming shape.

Per request it sends ``routed``, then ``max_tokens`` ``chunk`` messages of one
token each (ids taken from the prompt), then ``finished``: what the router
sends when it forwards every engine token as it arrives. No routing, no
engine, no HTTP: the ceiling a proxy on this machine can reach (the proxy
benchmark pins it to the same CPU as the router). ``python -m
kvmesh.benchmarks.echo_server --port 0`` prints ``READY grpc=HOST:PORT``."""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator

import grpc

from kvmesh_pb.v1 import router_pb2 as pb
from kvmesh_pb.v1 import router_pb2_grpc as pb_grpc


class Echo(pb_grpc.RouterServicer):
    async def Generate(  # noqa: N802  # servicer methods are named after the proto's RPCs
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        n = request.sampling.max_tokens or 16
        ids = request.prompt.token_ids.ids
        yield pb.GenerateResponse(routed=pb.RoutedTo(request_id=request.request_id, engine_id="echo"))
        for i in range(n):
            yield pb.GenerateResponse(chunk=pb.TokenChunk(token_ids=[ids[i % len(ids)] if ids else i]))
        yield pb.GenerateResponse(
            finished=pb.Finished(
                finish_reason="length",
                prompt_tokens=len(ids),
                completion_tokens=n,
                engine_id="echo",
                attempts=1,
            )
        )


async def serve(host: str, port: int) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    pb_grpc.add_RouterServicer_to_server(Echo(), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"READY grpc={host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    a = ap.parse_args()
    try:
        import uvloop

        uvloop.run(serve(a.host, a.port))
    except ImportError:
        asyncio.run(serve(a.host, a.port))


if __name__ == "__main__":
    main()
