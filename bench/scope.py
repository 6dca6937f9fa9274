"""Scoped proxies: what one push costs the server when every proxy receives only what it calls.

Run:  .venv/bin/python bench/scope.py [--services 1000] [--proxies 1000] [--calls 10]

Compiles bench/compile.py's repository (`dev` only) with an `egress` added to
every policy: `--calls` other services, drawn with a fixed seed. Loads its
snapshot with its scopes, and opens `--proxies` streams of each protocol in
this process (no gRPC: the protocol state alone), proxy i running service i
(`node.metadata.service`), subscribing as Envoy does (wildcard CDS and LDS,
then every EDS and RDS name the first responses carry). Beside them the same
number of unscoped SotW streams, as every proxy was before scopes.

Then one policy's canary weight changes; the new snapshot is published (its
scoped views built from the previous ones on first use, as the server does)
and every stream's `on_snapshot` is called. Reported per way: wall time of
the whole fan-out, the proxies that were sent anything, and the bytes sent.
Also: what building every service's first views costs, and the memory a
scoped stream and a service's views hold (tracemalloc).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import compile as compile_bench  # noqa: E402

from compiler.xds import scope  # noqa: E402
from compiler.xds import stream as stream_module  # noqa: E402
from compiler.xds.cache import Cache  # noqa: E402
from compiler.xds.metrics import Metrics  # noqa: E402
from compiler.xds.proxies import Proxies  # noqa: E402
from compiler.xds.snapshot import TYPE_URLS, load_snapshot, read_files  # noqa: E402
from envoy.service.discovery.v3 import discovery_pb2  # noqa: E402
from google.protobuf import struct_pb2  # noqa: E402

ENV = "dev"


key = compile_bench.service


def load(repo: Path, previous=None):
    files = read_files(repo / "rendered" / ENV / "envoy")
    return scope.attach(load_snapshot(ENV, files, previous), files.get(scope.FILE), previous)


def node(i: int, scoped: bool) -> dict:
    out = {"id": f"p{i}", "cluster": ENV}
    if scoped:
        out["metadata"] = struct_pb2.Struct(fields={"service": struct_pb2.Value(string_value=key(i))})
    return out


def subscribed(hub, n: int, delta: bool, scoped: bool) -> list:
    """`n` streams subscribed as Envoy does: wildcard CDS and LDS, then the EDS and RDS names
    of what they were sent."""
    out = []
    snapshot = hub.cache.get(ENV).snapshot
    for i in range(n):
        s = (stream_module.DeltaStream if delta else stream_module.SotwStream)(hub, "ads", lambda: None)
        service = key(i) if scoped else ""
        names = {"clusters": [], "listeners": [],
                 "endpoints": sorted(snapshot.kind_for(service, "endpoints").resources),
                 "routes": sorted(snapshot.kind_for(service, "routes").resources)}
        for kind, subscribe in names.items():
            request = (discovery_pb2.DeltaDiscoveryRequest(node=node(i, scoped), type_url=TYPE_URLS[kind],
                                                           resource_names_subscribe=subscribe) if delta else
                       discovery_pb2.DiscoveryRequest(node=node(i, scoped), type_url=TYPE_URLS[kind], resource_names=subscribe))
            responses = s.on_request(request)
            if not delta and responses:  # ACK, as Envoy does, so the stream is current
                sent = discovery_pb2.DiscoveryResponse.FromString(responses[0])
                s.on_request(discovery_pb2.DiscoveryRequest(type_url=TYPE_URLS[kind], resource_names=subscribe,
                                                            version_info=sent.version_info, response_nonce=sent.nonce))
        out.append(s)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--proxies", type=int, default=1000)
    ap.add_argument("--calls", type=int, default=10)
    args = ap.parse_args()
    assert args.proxies <= args.services, "one proxy per service"
    with tempfile.TemporaryDirectory(prefix="meshc-scope-") as tmp:
        repo = Path(tmp) / "repo"
        compile_bench.generate(repo, args.services, args.calls)
        compile_bench.recompile(repo, ENV)
        first = load(repo)
        started = time.perf_counter()
        for i in range(args.services):
            for kind in ("clusters", "endpoints", "listeners", "routes"):
                first.kind_for(key(i), kind)
        first_views = time.perf_counter() - started
        compile_bench.touch(repo)
        compile_bench.recompile(repo, ENV)
        probe = load(repo, first)  # its views timed here; the fan-outs below build their own
        started = time.perf_counter()
        rebuilt = sum(probe.kind_for(key(i), kind) is not first.kind_for(key(i), kind)
                      for i in range(args.services) for kind in ("clusters", "endpoints", "listeners", "routes"))
        second_views = time.perf_counter() - started
        del probe
        touched = "/".join(compile_bench.TOUCHED)
        callers = sum(touched in first.scopes.egress[key(i)] for i in range(args.proxies))
        print(f"{args.services} services, each calling {args.calls}; {args.proxies} proxies of each kind, proxy i "
              f"running service i; one policy's canary weight changed ({callers} of the proxies' services call it)")
        print(f"  first views of every service (4 kinds each): {first_views:.3f} s; after the change, "
              f"{second_views:.3f} s ({rebuilt} kinds differ)")
        for label, delta, scoped in (("SotW, scoped", False, True), ("Delta, scoped", True, True),
                                     ("SotW, whole environment", False, False)):
            hub = stream_module.Hub(Cache(), Proxies(), Metrics())
            hub.cache.publish(first, 0.0)
            streams = subscribed(hub, args.proxies, delta, scoped)
            second = load(repo, first)  # fresh: building its views is part of the push
            hub.cache.publish(second, 0.0)
            gc.collect()
            started = time.perf_counter()
            sent = [s.on_snapshot() for s in streams]
            elapsed = time.perf_counter() - started
            told = sum(1 for r in sent if r)
            size = sum(len(b) for r in sent for b in r)
            print(f"  {label:25} fan-out {elapsed:7.3f} s; {told:5d} proxies sent {size / 1e6:9.2f} MB")
            del sent, streams, hub
        hub = stream_module.Hub(Cache(), Proxies(), Metrics())
        hub.cache.publish(load(repo, first), 0.0)
        subscribed(hub, 1, False, True)
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        kept = subscribed(hub, min(200, args.proxies), False, True)
        held = (tracemalloc.get_traced_memory()[0] - before) / len(kept)
        tracemalloc.stop()
        print(f"  memory per scoped SotW stream, its service's views included: {held / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
