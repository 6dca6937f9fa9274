"""Pushes due: what a reload waits for before it parses the next environment.

A publication wakes the streams of its environment; each counts among the pushes
due until it has written what the wake-up produced (or ends). The loader waits,
for at most `server.PUSH_WAIT` seconds, until none is due before it parses the
next environment, so the parse does not take the CPU from pushes already due.
"""

from __future__ import annotations

import asyncio
import time

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from compiler.xds import ads, sample
from compiler.xds import server as server_module
from compiler.xds.cache import Cache
from compiler.xds.metrics import Metrics
from compiler.xds.proxies import Proxies
from compiler.xds.server import Options, ServerThread
from compiler.xds.snapshot import load_snapshot, read_files
from compiler.xds.stream import Hub, SotwStream
from test_xds_protocol import CDS, Client, DeltaClient, resources

ENVS = ("a-env", "b-env")


def _write(rendered, weights: dict) -> None:
    for env in ENVS:
        sample.write_snapshot(rendered, env, resources(weights))


def _wait(predicate, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.01)


def _published(server, env: str):
    return server.call(lambda: server.server.hub.cache.get(env))


def test_every_push_is_counted_until_written_and_none_is_owed_after_streams_end(tmp_path):
    _write(tmp_path, {"v1": 90, "v2": 10})
    with ServerThread(Options(rendered=tmp_path, grpc_port=0, http_port=0, debounce=0.01)) as server:
        pushes = server.server.hub.pushes
        with grpc.insecure_channel(server.grpc_address) as channel:
            clients = []
            for i in range(20):
                client = (Client if i % 2 else DeltaClient)(channel)
                extra = {} if i % 2 else {"resource_names_subscribe": ["*"]}
                client.send(node={"id": f"p{i}", "cluster": ENVS[0]}, type_url=CDS, **extra)
                assert client.recv() is not None
                clients.append(client)
            assert server.call(lambda: len(pushes)) == 0
            # A change with a cluster more: every stream is pushed it, and then owes nothing.
            sample.write_snapshot(tmp_path, ENVS[0], resources({"v1": 90, "v2": 10}, extra_backends=["v3"]))
            assert all(c.recv() is not None for c in clients)
            _wait(lambda: server.call(lambda: len(pushes)) == 0)
            assert pushes.idle.is_set()
            # Streams that end with a push queued or half-written are not owed it.
            sample.write_snapshot(tmp_path, ENVS[0], resources({"v1": 90, "v2": 10}))
            for client in clients:
                client.close()
            _wait(lambda: server.call(lambda: len(pushes)) == 0)
            assert pushes.idle.is_set()


def test_a_reload_holds_the_next_environment_while_pushes_are_due_and_no_longer_than_its_bound(
        tmp_path, monkeypatch):
    monkeypatch.setattr(server_module, "PUSH_WAIT", 0.5)
    _write(tmp_path, {"v1": 90, "v2": 10})
    with ServerThread(Options(rendered=tmp_path, grpc_port=0, http_port=0, debounce=0.01)) as server:
        pushes = server.server.hub.pushes
        server.call(pushes.woken)       # a push that is never written: a proxy that does not read
        before = _published(server, ENVS[1]).published_at
        _write(tmp_path, {"v1": 50, "v2": 50})
        _wait(lambda: _published(server, ENVS[1]).published_at != before)
        first, second = _published(server, ENVS[0]), _published(server, ENVS[1])
        # b-env's parse began only once a-env's publication had waited its bound out ...
        assert second.published_at - second.load_seconds >= first.published_at + 0.5 - 0.02
        server.call(pushes.done)
        # ... and with nothing due, the next reload does not wait for it.
        monkeypatch.setattr(server_module, "PUSH_WAIT", 5.0)
        _write(tmp_path, {"v1": 40, "v2": 60})
        _wait(lambda: _published(server, ENVS[1]).published_at != second.published_at)
        third, fourth = _published(server, ENVS[0]), _published(server, ENVS[1])
        assert fourth.published_at - fourth.load_seconds < third.published_at + 5.0


class _StuckContext:
    """A gRPC context whose writes after the first never complete: a proxy that stopped reading."""

    def __init__(self) -> None:
        self.writes = 0

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    async def write(self, data: bytes) -> None:
        self.writes += 1
        if self.writes > 1:
            await asyncio.Event().wait()


def test_a_stream_that_ends_mid_push_and_with_one_queued_owes_nothing(tmp_path):
    def snapshot(*extra):
        sample.write_snapshot(tmp_path, ENVS[0], resources({"v1": 90, "v2": 10}, extra_backends=extra))
        return load_snapshot(ENVS[0], read_files(tmp_path / ENVS[0] / "envoy"))

    async def run() -> None:
        hub = Hub(Cache(), Proxies(), Metrics())
        hub.cache.publish(snapshot(), 0.0)

        async def requests():
            yield discovery_pb2.DiscoveryRequest(node={"id": "p1", "cluster": ENVS[0]}, type_url=CDS)
            await asyncio.Event().wait()

        context = _StuckContext()
        task = asyncio.create_task(ads._serve(hub, SotwStream, "ads", None, requests(), context))
        while context.writes < 1:                   # the first answer, written
            await asyncio.sleep(0.01)
        hub.cache.publish(snapshot("v3"), 0.0)       # a cluster more: a CDS push
        for _ in range(500):
            if context.writes == 2:                 # the push, stuck in its write
                break
            await asyncio.sleep(0.01)
            await asyncio.sleep(0.01)
        assert len(hub.pushes) == 1
        hub.cache.publish(snapshot(), 0.0)
        assert len(hub.pushes) == 2                 # and the next one queued behind it
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert len(hub.pushes) == 0 and hub.pushes.idle.is_set()

    asyncio.run(run())
