"""The gRPC services: aggregated (ADS) and per-type CDS/EDS/LDS/RDS, SotW and Delta.

Owns the wiring from grpc.aio streams to `stream.SotwStream` / `DeltaStream`.
Responses are written as bytes the snapshot pre-serialised (the method
handlers' response serializer is the identity), so a push to a thousand
proxies serialises nothing a thousand times.
"""

from __future__ import annotations

import asyncio
import collections
import logging

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from compiler.xds.stream import DeltaStream, Hub, SotwStream, StreamError

__all__ = ["add_services"]

log = logging.getLogger("meshc.xds")

_SERVICES = {
    # service name: (kind served, or None for all; protocol label prefix)
    "envoy.service.discovery.v3.AggregatedDiscoveryService": (None, "ads", "AggregatedResources"),
    "envoy.service.cluster.v3.ClusterDiscoveryService": ("clusters", "cds", "Clusters"),
    "envoy.service.endpoint.v3.EndpointDiscoveryService": ("endpoints", "eds", "Endpoints"),
    "envoy.service.listener.v3.ListenerDiscoveryService": ("listeners", "lds", "Listeners"),
    "envoy.service.route.v3.RouteDiscoveryService": ("routes", "rds", "Routes"),
}

_WAKE = object()


class _Inbox:
    """A stream's events in arrival order, for its one reader: a deque and a future, not an
    asyncio.Queue (four deques and an Event: 2.9 KB a stream, a thousand streams held)."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: collections.deque = collections.deque()
        self._waiter: asyncio.Future | None = None

    def put_nowait(self, item) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self):
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


def _identity(data: bytes) -> bytes:
    return data


async def _serve(hub: Hub, stream_cls, protocol: str, kind: str | None,
                 requests, context: grpc.aio.ServicerContext) -> None:
    """Run one stream: requests and snapshot wake-ups, handled in arrival order.

    Nothing waits holding the last request or response: a suspended stream keeps its
    protocol state only (a route configuration pushed to a thousand proxies is 770 KB
    each, which a loop variable would keep alive until the stream's next event)."""
    queue = _Inbox()
    woken = False

    def wake() -> None:
        nonlocal woken
        if not woken:           # coalesce: one pending wake-up sees the latest snapshot
            woken = True
            queue.put_nowait(_WAKE)

    async def read() -> None:
        try:
            async for request in requests:
                queue.put_nowait(request)
                del request
        finally:
            queue.put_nowait(None)

    stream = stream_cls(hub, protocol, wake, kind=kind, peer=context.peer())
    reader = asyncio.create_task(read())
    try:
        while (item := await queue.get()) is not None:
            if item is _WAKE:
                woken = False
                responses = stream.on_snapshot()
            else:
                responses = stream.on_request(item)
            item = None
            responses.reverse()
            while responses:
                await context.write(responses.pop())
    except StreamError as exc:
        await context.abort(exc.code, exc.message)
    finally:
        reader.cancel()
        stream.close()


def add_services(server: grpc.aio.Server, hub: Hub) -> None:
    """Register ADS and the four per-type services, each with SotW and Delta streams."""
    for service, (kind, label, suffix) in _SERVICES.items():

        # A coroutine that writes through the context, not an async generator: grpc.aio's
        # loop over a generator's responses keeps the last one alive until the next.
        async def sotw(requests, context, kind=kind, label=label):
            await _serve(hub, SotwStream, label, kind, requests, context)

        async def delta(requests, context, kind=kind, label=label):
            await _serve(hub, DeltaStream, f"delta-{label}", kind, requests, context)

        handlers = {
            f"Stream{suffix}": grpc.stream_stream_rpc_method_handler(
                sotw, request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                response_serializer=_identity),
            f"Delta{suffix}": grpc.stream_stream_rpc_method_handler(
                delta, request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                response_serializer=_identity),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
