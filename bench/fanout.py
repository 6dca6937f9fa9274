"""The server's CPU for one Delta push to many proxies: what `DeltaStream.on_snapshot` costs.

Run:  .venv/bin/python bench/fanout.py [--services 1000] [--proxies 1000]

Compiles bench/compile.py's repository (`dev` only), loads its snapshot into a
`Cache`, and opens `--proxies` Delta streams in this process (no gRPC: the
protocol state alone) that subscribe as Envoy does (wildcard CDS and LDS, then
every EDS and RDS name the first responses carry). One policy's canary weight
then changes; the new snapshot is published and every stream's `on_snapshot` is
called, twice, each time on fresh streams: with the publication's changes
hidden, so each stream scans every name it subscribes to (what it did before),
then with them (what the server does). Both must send the same bytes. Wall
time of the whole fan-out, and per proxy.

It also reports the memory each stream's protocol state holds once subscribed
(tracemalloc, over 200 streams of each protocol; gRPC's own buffers excluded).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import compile as compile_bench  # noqa: E402

from compiler.xds import stream as stream_module  # noqa: E402
from compiler.xds.cache import Cache  # noqa: E402
from compiler.xds.metrics import Metrics  # noqa: E402
from compiler.xds.proxies import Proxies  # noqa: E402
from compiler.xds.snapshot import TYPE_URLS, load_snapshot, read_files  # noqa: E402
from envoy.service.discovery.v3 import discovery_pb2  # noqa: E402

ENV = "dev"


def _subscribed(hub, n: int, delta: bool = True) -> list:
    """`n` streams subscribed as Envoy does: wildcard CDS and LDS, every EDS and RDS name."""
    snapshot = hub.cache.get(ENV).snapshot
    names = {"clusters": [], "listeners": [], "endpoints": sorted(snapshot.kinds["endpoints"].resources),
             "routes": sorted(snapshot.kinds["routes"].resources)}
    out = []
    for i in range(n):
        s = (stream_module.DeltaStream if delta else stream_module.SotwStream)(hub, "ads", lambda: None)
        for kind, subscribe in names.items():
            node = {"id": f"p{i}", "cluster": ENV}
            s.on_request(discovery_pb2.DeltaDiscoveryRequest(node=node, type_url=TYPE_URLS[kind], resource_names_subscribe=subscribe)
                         if delta else discovery_pb2.DiscoveryRequest(node=node, type_url=TYPE_URLS[kind], resource_names=subscribe))
        out.append(s)
    return out


def _streams(hub, n: int) -> list:
    return _subscribed(hub, n, delta=True)


def _sotw_streams(hub, n: int) -> list:
    return _subscribed(hub, n, delta=False)


def _memory_per_stream(snapshot, make, n: int = 200) -> float:
    hub = stream_module.Hub(Cache(), Proxies(), Metrics())
    hub.cache.publish(snapshot, 0.0)
    make(hub, 1)  # the snapshot's memoised bodies are built by the first stream, not counted
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    streams = make(hub, n)
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del streams
    return held / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--proxies", type=int, default=1000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="meshc-fanout-") as tmp:
        repo = compile_bench.compiled(Path(tmp) / "repo", args.services, ENV)
        first = load_snapshot(ENV, read_files(repo / "rendered" / ENV / "envoy"))
        compile_bench.touch(repo)
        compile_bench.recompile(repo, ENV)
        second = load_snapshot(ENV, read_files(repo / "rendered" / ENV / "envoy"), first)
        figures = {}
        for label, hide in (("every subscribed name", True), ("publication's changes", False)):
            hub = stream_module.Hub(Cache(), Proxies(), Metrics())
            hub.cache.publish(first, 0.0)
            streams = _streams(hub, args.proxies)
            hub.cache.publish(second, 0.0)
            if hide:
                real = stream_module.DeltaStream._candidates
                stream_module.DeltaStream._candidates = lambda self, kind: None
            gc.collect()  # each way starts from the same heap, its collections its own
            started = time.perf_counter()
            sent = [b"".join(s.on_snapshot()) for s in streams]
            elapsed = time.perf_counter() - started
            if hide:
                stream_module.DeltaStream._candidates = real
            figures[label] = (elapsed, [hashlib.sha256(body).digest() for body in sent])
            del sent, streams, hub  # ~770 MB of responses: freed before the other way runs
        (a, sent_a), (b, sent_b) = figures.values()
        assert sent_a == sent_b, "both ways send each proxy the same bytes (their nonces count alike)"
        names = sum(len(t.resources) for t in first.kinds.values())
        print(f"{args.services} services ({names} resources in {ENV}), {args.proxies} Delta proxies subscribed to all; "
              "one policy's canary weight changed")
        for label, (elapsed, _) in figures.items():
            print(f"  fan-out scanning {label:24} {elapsed:7.3f} s  ({elapsed / args.proxies * 1e3:.2f} ms per proxy)")
        for label, make in (("Delta", _streams), ("SotW", _sotw_streams)):
            print(f"  memory of one subscribed {label} stream's state: {_memory_per_stream(second, make) / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
