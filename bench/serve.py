"""Benchmark `meshc serve`: push convergence at scale, memory and CPU per proxy, REST throughput.

Not a timed test. Run:  .venv/bin/python bench/serve.py [--clients 1000] [--envoys 10]
                        [--sovereign 127.0.0.1:18080]   (a Sovereign started by
                        ../shared/peers/sovereign/run.sh up, measured with the same load)
                        [--services 1000] [--proxies 1000] [--only sample|scale]
                        [--protocols "delta,sotw;delta-scoped,sotw-scoped"] [--calls 10]

Two parts, in one run: the built-in 41-cluster sample (below), then bench/compile.py's
repository at scale (`--services` × 3 environments, every service's egress listing
`--calls` others, its generator imported), compiled by
`meshc compile --repo R --out R/rendered` in a subprocess:
A. Time to ready: `python -m compiler.xds` started `--ready-repeat` times; from the
   process's start to /readyz 200 (polled every 10 ms), every environment valid.
B. For each group of `--protocols` (`;` between groups), against a server started for it:
   `--proxies` simulated proxies of each protocol in the group (a load process each, one
   HTTP/2 connection per proxy unless `--connections`), all in `dev`, subscribed as Envoy
   does (wildcard CDS and LDS, every assignment and route configuration the first
   responses name; SotW ACKs repeat the names). Unscoped proxies (`delta`, `sotw`) name no
   service and hold the whole environment; scoped ones (`delta-scoped`, `sotw-scoped`)
   say they run service i (node metadata `service`) and hold what its egress calls. At
   most `--connecting` wait for their first responses at once. Memory per proxy =
   (server RSS after a protocol's proxies connected − RSS before) / proxies; the Python
   part alone by tracemalloc over an in-process server.
C. Each of `--scale-rounds` rounds makes each of `--changes`: one policy's canary weight
   (routes, every environment), one endpoint in `dev` (endpoints), a request header
   `dev`'s defaults set (defaults: every virtual host); recompiles, and times from the swap
   of the new `rendered/dev` output (inotify on the rename) to the receipt of the changed
   type's new version by each proxy that holds what changed (scoped: the callers of the
   changed service; for defaults, all), and counts the others that were sent it (none
   should be); server CPU from /proc/<pid> from before the compile to a second after the
   last receipt; reload time per environment from /debug/snapshots.
D. The floor (`--floor-rounds`): a bare grpc.aio ADS server that only sends meshc's own
   bytes (each type's whole response on first request; on a push, what meshc sends for a
   one-route change), with the first group's unscoped proxies: what gRPC and the load
   generator cost on this machine with no reload, no protocol state, no debounce.

Method of the sample part (all on this machine; the load generator shares the CPUs with the server):
1. `meshc serve` runs as its own process (`python -m compiler.xds`) so its CPU
   time and RSS come from /proc/<pid>.
2. A load process opens `--clients` ADS streams (grpc.aio, 10 channels) that
   subscribe CDS, EDS, LDS, RDS and ACK every response, like Envoy; `--envoys`
   real Envoys connect over ADS as well.
3. Each round rewrites the snapshot files (a canary weight change: routes
   only; every 3rd round adds a cluster and the next removes it: all four
   types), timestamps the
   rename, and records when each simulated client ACKs the new routes version
   and when each real Envoy's config_dump shows it (polled every 10 ms).
4. Memory per proxy = (RSS with all connected − RSS before) / proxies.
5. REST: a real Envoy's CDS request body is captured, then replayed over
   keep-alive connections from 2 processes for `--rest-seconds`, as a stale
   client (200 with body) and a current one (304).
6. The floor: Envoy's own filesystem subscription fed the same resources
   (ADS references pointed at files, watched directory, rename to trigger),
   time from rename to the new route version in its config_dump.
"""

from __future__ import annotations

import argparse
import asyncio
import http.server
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import compile as compile_bench  # noqa: E402  bench/compile.py: the repository generator
from compiler.xds import sample  # noqa: E402
from compiler.xds.snapshot import TYPE_URLS  # noqa: E402

ENV = "bench"
EXTRA = [f"x{i:02d}" for i in range(40)]       # 42 clusters: a mid-size sidecar


def _resources(listen, canary: int, extra: int = 0) -> dict:
    backends = {"v1": ("127.0.0.1", 9001), "v2": ("127.0.0.1", 9002)}
    backends.update({v: ("127.0.0.1", 9100 + i) for i, v in enumerate(EXTRA[:len(EXTRA) - 1 + extra])})
    return sample.sample_resources(listen, backends, {"v1": 100 - canary, "v2": canary})


def _version(res: dict, kind: str) -> str:
    return sample.response_document(kind, res[kind])["version_info"]


def _proc_stats(pid: int) -> tuple[float, int]:
    """(CPU seconds user+system, RSS bytes) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    rss = next(int(line.split()[1]) * 1024 for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    return cpu, rss


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# --- simulated ADS clients (run in a child process) ------------------------------

def _load_worker(address: str, clients: int, conn, names: list[str]) -> None:
    asyncio.run(_load_main(address, clients, conn, names))


async def _load_main(address: str, clients: int, conn, eds_names: list[str]) -> None:
    import grpc
    from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

    channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(10)]
    acked: dict[str, list[float]] = {}       # routes version -> ACK times
    ready = asyncio.Event()
    connected = 0

    async def client(i: int) -> None:
        nonlocal connected
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channels[i % len(channels)])
        queue: asyncio.Queue = asyncio.Queue()
        node = {"id": f"sim-{i}", "cluster": ENV}
        queue.put_nowait(discovery_pb2.DiscoveryRequest(node=node, type_url=TYPE_URLS["clusters"]))
        subs = {TYPE_URLS["endpoints"]: eds_names, TYPE_URLS["listeners"]: [],
                TYPE_URLS["routes"]: ["9080"], TYPE_URLS["clusters"]: []}
        for url in (TYPE_URLS["endpoints"], TYPE_URLS["listeners"], TYPE_URLS["routes"]):
            queue.put_nowait(discovery_pb2.DiscoveryRequest(type_url=url, resource_names=subs[url]))

        async def requests():
            while True:
                yield await queue.get()

        first_routes = True
        async for response in stub.StreamAggregatedResources(requests()):
            queue.put_nowait(discovery_pb2.DiscoveryRequest(
                type_url=response.type_url, version_info=response.version_info,
                response_nonce=response.nonce, resource_names=subs[response.type_url]))
            if response.type_url == TYPE_URLS["routes"]:
                acked.setdefault(response.version_info, []).append(time.time())
                if first_routes:
                    first_routes = False
                    connected += 1
                    if connected == clients:
                        ready.set()

    tasks = [asyncio.create_task(client(i)) for i in range(clients)]
    await ready.wait()
    loop = asyncio.get_running_loop()
    conn.send(("connected", clients))
    while True:
        command = await loop.run_in_executor(None, conn.recv)
        if command[0] == "stop":
            break
        _, version, timeout = command
        deadline = time.monotonic() + timeout
        while len(acked.get(version, ())) < clients and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        conn.send(("acked", acked.get(version, [])))
    for task in tasks:
        task.cancel()
    for channel in channels:
        await channel.close()


# --- REST load (child processes) ---------------------------------------------------

def _rest_worker(host: str, port: int, path: str, body: bytes, seconds: float, conns: int, out) -> None:
    async def one(stats: list) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        head = (f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\n\r\n").encode()
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            writer.write(head + body)
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            if length:
                await reader.readexactly(length)
            stats.append((time.perf_counter() - t0, int(status_line.split()[1])))
        writer.close()

    async def main() -> list:
        stats: list = []
        await asyncio.gather(*(one(stats) for _ in range(conns)))
        return stats

    out.send(asyncio.run(main()))


def _rest_load(host: str, port: int, path: str, body: bytes, seconds: float,
               procs: int = 2, conns: int = 4) -> dict:
    pipes, workers = [], []
    for _ in range(procs):
        parent, child = multiprocessing.Pipe()
        p = multiprocessing.Process(target=_rest_worker,
                                    args=(host, port, path, body, seconds, conns, child))
        p.start()
        pipes.append(parent)
        workers.append(p)
    stats = [s for pipe in pipes for s in pipe.recv()]
    for p in workers:
        p.join()
    latencies = [s[0] for s in stats]
    codes: dict[int, int] = {}
    for _, code in stats:
        codes[code] = codes.get(code, 0) + 1
    return {"rps": round(len(stats) / seconds, 1), "codes": codes,
            "p50_ms": round(_pct(latencies, 0.5) * 1000, 2),
            "p99_ms": round(_pct(latencies, 0.99) * 1000, 2)}


def _capture_envoy_body(workdir: Path) -> bytes:
    """One real Envoy CDS request over REST (its node lists every extension: ~77 KB)."""
    from support.envoy import Envoy

    captured: list[bytes] = []

    class Capture(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            if self.path.endswith(":clusters"):
                captured.append(body)
            self.send_response(503)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Capture)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    bootstrap = sample.rest_bootstrap("bench-rest", ENV, ("127.0.0.1", server.server_address[1]),
                                      refresh_delay="0.2s")
    # Not the support Envoy context manager: this Envoy never becomes ready.
    envoy = Envoy(bootstrap, workdir / "capture")
    envoy.workdir.mkdir(parents=True, exist_ok=True)
    envoy.config_path.write_text(json.dumps(envoy.bootstrap))
    proc = subprocess.Popen(envoy.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while not captured and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(10)
        server.shutdown()
    return captured[0]


# --- Envoy's filesystem subscription: the floor ------------------------------------

def _to_files(node: object, directory: Path, parent: str = "") -> object:
    if isinstance(node, dict):
        if "ads" in node:
            kind = "routes" if parent == "config_source" else "endpoints"
            return {"path_config_source": {"path": str(directory / f"{kind}.json"),
                                           "watched_directory": {"path": str(directory)}},
                    "resource_api_version": "V3"}
        return {k: _to_files(v, directory, k) for k, v in node.items()}
    if isinstance(node, list):
        return [_to_files(v, directory, parent) for v in node]
    return node


def _write_fs(directory: Path, res: dict) -> None:
    for kind, items in res.items():
        doc = sample.response_document(kind, [_to_files(r, directory) for r in items])
        tmp = directory / f".{kind}.tmp"
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, directory / f"{kind}.json")


def _route_version(envoy) -> str:
    dump = envoy.config_dump(resource="dynamic_route_configs")
    return dump["configs"][0].get("version_info", "") if dump.get("configs") else ""


def _fs_floor(workdir: Path, listen, rounds: int) -> list[float]:
    from support.envoy import Envoy

    directory = workdir / "fs"
    directory.mkdir()
    _write_fs(directory, _resources(listen, 10))
    files = {kind: {"path_config_source": {"path": str(directory / f"{kind}.json"),
                                           "watched_directory": {"path": str(directory)}},
                    "resource_api_version": "V3"} for kind in ("clusters", "listeners")}
    bootstrap = {"node": {"id": "fs", "cluster": ENV},
                 "dynamic_resources": {"cds_config": files["clusters"], "lds_config": files["listeners"]}}
    out = []
    with Envoy(bootstrap, workdir / "fs-envoy") as envoy:
        envoy.wait_until(lambda: _route_version(envoy), timeout=10)
        for i in range(rounds):
            res = _resources(listen, 20 + i)
            want = _version(res, "routes")
            t0 = time.time()
            _write_fs(directory, res)
            envoy.wait_until(lambda: _route_version(envoy) == want, timeout=10, interval=0.002)
            out.append(time.time() - t0)
    return out


# --- at scale: bench/compile.py's repository, Delta and SotW proxies side by side -----

SCALE_ENV = "dev"       # every simulated proxy's environment; the server loads all three
_ORDER = ("clusters", "endpoints", "listeners", "routes")


def _scale_subscriptions(envoy_dir: Path) -> dict[str, list[str]]:
    """What a proxy subscribes to, as Envoy does: CDS and LDS wildcard, every assignment
    and route configuration the clusters and listeners name (here: all of them)."""
    def names(kind: str, key: str) -> list[str]:
        return sorted(r[key] for r in json.loads((envoy_dir / f"{kind}.json").read_bytes())["resources"])
    return {"clusters": [], "endpoints": names("endpoints", "cluster_name"), "listeners": [],
            "routes": names("routes", "name")}


def _scoped_subscriptions(envoy_dir: Path, n: int) -> list[dict]:
    """What proxy i, running service i (of as many as there are: i modulo their number),
    subscribes to: CDS and LDS wildcard, the assignments and route configurations its egress
    needs (envoy/scopes.json: what the server sends it); and under "service", its service."""
    scopes = json.loads((envoy_dir / "scopes.json").read_bytes())
    services = sorted(scopes["egress"], key=lambda key: key.rsplit("-", 1)[1])    # by i
    out: dict[str, dict] = {}
    for key in services[:n]:
        callees = [scopes["services"][callee] for callee in scopes["egress"][key]]
        out[key] = {"service": key, "clusters": [], "listeners": [],
                    "endpoints": sorted({name for c in callees for name in c["endpoints"]}),
                    "routes": sorted({port for c in callees for port in c["routes"]})}
    return [out[services[i % len(services)]] for i in range(n)]


def _scale_load_worker(address: str, delta: bool, scoped: bool, connecting: int,
                       subs: list[dict], conn, connections: int = 0) -> None:
    asyncio.run(_scale_load_main(address, delta, scoped, connecting, subs, conn, connections))


async def _scale_load_main(address: str, delta: bool, scoped: bool, connecting: int,
                           subs: list[dict], conn, connections: int = 0) -> None:
    """One proxy per entry of `subs` (its subscriptions), all of one protocol, each on its
    own HTTP/2 connection as Envoys are (or sharing `connections` of them); a scoped proxy
    says which service it runs (node metadata `service`: its subscriptions' "service"). At most `connecting` at once wait
    for their first four responses. Each ACKs every response (a SotW ACK repeats its
    names, as Envoy's do) and notes when it first receives each version of each type."""
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import discovery_pb2 as d
    from google.protobuf import struct_pb2

    clients = len(subs)
    method = "/envoy.service.discovery.v3.AggregatedDiscoveryService/" + (
        "DeltaAggregatedResources" if delta else "StreamAggregatedResources")
    parse = (d.DeltaDiscoveryResponse if delta else d.DiscoveryResponse).FromString
    urls = {kind: TYPE_URLS[kind] for kind in _ORDER}
    heads: dict[int, dict[str, bytes]] = {}     # id(subscriptions) → the names an ACK repeats, serialised once

    def ack_head(i: int) -> dict[str, bytes]:
        if id(subs[i]) not in heads:
            heads[id(subs[i])] = {
                urls[k]: (d.DeltaDiscoveryRequest(type_url=urls[k]) if delta else
                          d.DiscoveryRequest(type_url=urls[k], resource_names=subs[i][k])).SerializeToString()
                for k in _ORDER}
        return heads[id(subs[i])]

    def first(i: int) -> list[bytes]:
        node = base_pb2.Node(id=f"{'delta' if delta else 'sotw'}-{i}", cluster=SCALE_ENV)
        if scoped:
            node.metadata.CopyFrom(struct_pb2.Struct(
                fields={"service": struct_pb2.Value(string_value=subs[i]["service"])}))
        out = []
        for k in _ORDER:
            if delta:
                out.append(d.DeltaDiscoveryRequest(node=node, type_url=urls[k],
                                                   resource_names_subscribe=subs[i][k]).SerializeToString())
            else:
                out.append(d.DiscoveryRequest(node=node, type_url=urls[k],
                                              resource_names=subs[i][k]).SerializeToString())
        return out

    def ack(i: int, response) -> bytes:     # concatenated messages merge
        if delta:
            return ack_head(i)[response.type_url] + d.DeltaDiscoveryRequest(
                response_nonce=response.nonce).SerializeToString()
        return ack_head(i)[response.type_url] + d.DiscoveryRequest(
            version_info=response.version_info, response_nonce=response.nonce).SerializeToString()

    seen: list[dict[tuple, float]] = [{} for _ in range(clients)]   # (type URL, version) → first receipt
    gate = asyncio.Semaphore(connecting)
    done = asyncio.Event()
    count = 0
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 256 << 20)]
    channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(connections)]

    async def client(i: int) -> None:
        nonlocal count
        await gate.acquire()
        if connections:
            channel = channels[i % connections]
        else:
            channel = grpc.aio.insecure_channel(address, options=options)
            channels.append(channel)
        call = channel.stream_stream(method, request_serializer=None, response_deserializer=None)
        queue: asyncio.Queue = asyncio.Queue()
        for request in first(i):
            queue.put_nowait(request)

        async def requests():
            while True:
                yield await queue.get()

        kinds: set[str] = set()
        async for data in call(requests()):
            response = parse(data)
            queue.put_nowait(ack(i, response))
            version = response.system_version_info if delta else response.version_info
            seen[i].setdefault((response.type_url, version), time.time())
            if len(kinds) < 4:
                kinds.add(response.type_url)
                if len(kinds) == 4:
                    gate.release()
                    count += 1
                    if count == clients:
                        done.set()

    def since(i: int, url: str, t0: float) -> list[tuple[float, str]]:
        return sorted((t, version) for (u, version), t in seen[i].items() if u == url and t >= t0)

    started = time.monotonic()
    tasks = [asyncio.create_task(client(i)) for i in range(clients)]
    await done.wait()
    conn.send(("connected", time.monotonic() - started))
    loop = asyncio.get_running_loop()
    while True:
        command = await loop.run_in_executor(None, conn.recv)
        if command[0] == "stop":
            break
        # ("wait", type URL, t0, the proxies that should receive it, timeout): for each, its
        # first receipt of that type at or after t0 (time, version); and how many of the
        # others received one too
        _, url, t0, expected, timeout = command
        deadline = time.monotonic() + timeout
        while not all(since(i, url, t0) for i in expected) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        others = set(range(clients)) - set(expected)
        conn.send(("seen", [since(i, url, t0)[0] for i in expected if since(i, url, t0)],
                   sum(bool(since(i, url, t0)) for i in others)))
    for task in tasks:
        task.cancel()
    for channel in channels:
        await channel.close()


class _RenameClock:
    """When `meshc compile` swaps the new output in: the first IN_MOVED_TO (a rename or
    exchange) of `rendered/<env>` or of `rendered/<env>/envoy` (a compile swaps only the
    directories that changed), taken as the start of a push."""

    IN_MOVED_TO = 0x80

    def __init__(self, rendered: Path, env: str) -> None:
        import ctypes
        import select
        self._select = select
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        self._wanted = {}
        for directory, name in ((rendered, env), (rendered / env, "envoy")):
            wd = libc.inotify_add_watch(self._fd, os.fsencode(directory), self.IN_MOVED_TO)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify on {directory}")
            self._wanted[wd] = name
        self.at: float | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import struct
        while not self._stop:
            if not self._select.select([self._fd], [], [], 0.1)[0]:
                continue
            now = time.time()
            data, at = os.read(self._fd, 65536), 0
            while at < len(data):
                wd, mask, _, length = struct.unpack_from("iIII", data, at)
                name = data[at + 16:at + 16 + length].rstrip(b"\0").decode()
                at += 16 + length
                if mask & self.IN_MOVED_TO and self._wanted.get(wd) == name and self.at is None:
                    self.at = now

    def close(self) -> None:
        self._stop = True
        self._thread.join(1)
        os.close(self._fd)


def _meshc_compile(repo: Path, rendered: Path) -> None:
    subprocess.run([sys.executable, "-m", "compiler", "compile", "--repo", str(repo), "--out", str(rendered),
                    "--no-cache"], check=True, capture_output=True, cwd=ROOT)


def _set_weight(repo: Path, weight: int) -> None:
    """The touched policy's canary weight (bench/compile.py's `touch`, to a chosen value)."""
    import re
    path = repo / "policies" / compile_bench.TOUCHED[0] / f"{compile_bench.TOUCHED[1]}.yaml"
    path.write_text(re.sub(r"weight: \d+", f"weight: {weight}", path.read_text()))


def _start_scale_server(rendered: Path) -> tuple[subprocess.Popen, str, str, float]:
    """`python -m compiler.xds` on `rendered`: (process, gRPC address, HTTP URL, seconds from
    the process's start to /readyz 200, polled every 10 ms)."""
    from support.backends import free_port
    import requests

    grpc_port, http_port = free_port(), free_port()
    started = time.monotonic()
    server = subprocess.Popen(
        [sys.executable, "-m", "compiler.xds", "--rendered", str(rendered),
         "--grpc", f"127.0.0.1:{grpc_port}", "--http", f"127.0.0.1:{http_port}", "--log-level", "error"],
        cwd=ROOT)
    url = f"http://127.0.0.1:{http_port}"
    _wait(lambda: requests.get(url + "/readyz", timeout=1).status_code == 200, timeout=60, interval=0.01)
    return server, f"127.0.0.1:{grpc_port}", url, time.monotonic() - started


def _snapshots(url: str) -> dict:
    import requests
    return requests.get(url + "/debug/snapshots", timeout=10).json()


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    server.wait(20)


def _scale_run(args) -> dict:
    """bench/compile.py's repository (every service calling `--calls` others) compiled by
    `meshc compile`; time to ready, memory per proxy, and pushes of one policy change, for
    each group of `--protocols` against a server of its own (RSS per proxy would otherwise
    be flattered by what the group before freed)."""
    groups = [group.split(",") for group in args.protocols.split(";")]
    out: dict = {"services": args.services, "calls": args.calls, "proxies_per_protocol": args.proxies,
                 "groups": []}
    with tempfile.TemporaryDirectory(prefix="meshc-bench-scale-") as tmp:
        repo = Path(tmp) / "repo"
        rendered = repo / "rendered"
        compile_bench.generate(repo, args.services, args.calls)
        _meshc_compile(repo, rendered)
        envoy_dir = rendered / SCALE_ENV / "envoy"
        out["snapshot"] = {"resources": {k: len(json.loads((envoy_dir / f"{k}.json").read_bytes())["resources"])
                                         for k in _ORDER},
                           "json_bytes_per_env": sum((envoy_dir / f"{k}.json").stat().st_size for k in _ORDER),
                           "environments": sorted(p.name for p in rendered.iterdir() if not p.name.startswith("."))}
        proxies = _Proxies(envoy_dir, args.proxies, args.calls)
        ready = []
        for attempt in range(args.ready_repeat):
            server, address, url, seconds = _start_scale_server(rendered)
            status = _snapshots(url)
            assert all(s["valid"] for s in status.values()) and len(status) == len(compile_bench.ENVS), status
            ready.append({"seconds": round(seconds, 3), "rss_mb": round(_proc_stats(server.pid)[1] / 2**20, 1),
                          "cpu_s": round(_proc_stats(server.pid)[0], 2),
                          "load_ms": {env: round(s["load_seconds"] * 1000, 1) for env, s in status.items()}})
            print("ready", ready[-1], flush=True)
            if attempt < args.ready_repeat - 1:
                _stop(server)
        out["ready"] = ready
        for n, labels in enumerate(groups):
            if n:
                server, address, url, _ = _start_scale_server(rendered)
            try:
                group = {"protocols": labels}
                group.update(_scale_proxies(args, server, address, url, repo, rendered, proxies, labels,
                                            first_round=n * args.scale_rounds))
            finally:
                _stop(server)
            group["python_state_kb_per_stream"] = {label: _stream_state_kb(args, rendered, proxies, label)
                                                   for label in labels}
            print("python state", group["python_state_kb_per_stream"], flush=True)
            out["groups"].append(group)
        if args.floor_rounds:
            out["grpc_floor"] = _grpc_floor(args, envoy_dir, proxies)
    return out


class _Proxies:
    """The simulated proxies of one protocol: proxy i's subscriptions, unscoped (the whole
    environment, one shared list) or scoped (proxy i runs service i, modulo the services),
    and which of them a change must reach."""

    def __init__(self, envoy_dir: Path, n: int, calls: int) -> None:
        self.n = n
        self.whole = [_scale_subscriptions(envoy_dir)] * n
        self.scoped = _scoped_subscriptions(envoy_dir, n) if calls else None
        self.egress = json.loads((envoy_dir / "scopes.json").read_bytes())["egress"] if calls else {}

    def subscriptions(self, label: str) -> list[dict]:
        return self.scoped if label.endswith("-scoped") else self.whole

    def expected(self, label: str, change: str) -> list[int]:
        """The proxies that hold what `change` changes: all of them unscoped or for a
        default of the environment's; scoped, those whose service calls the touched one."""
        if not label.endswith("-scoped") or change == "defaults":
            return list(range(self.n))
        touched = "/".join(compile_bench.TOUCHED)
        return [i for i, subs in enumerate(self.scoped) if touched in self.egress[subs["service"]]]


CHANGES = {"routes": "routes", "endpoints": "endpoints", "defaults": "routes"}    # change → the type it changes


def _change(repo: Path, change: str, i: int) -> None:
    """One policy's canary weight (routes: every environment's route configuration of its
    port), one endpoint's port in `dev` (endpoints: one assignment, in one environment),
    or a request header `dev`'s defaults set (defaults: every virtual host in `dev`)."""
    if change == "routes":
        _set_weight(repo, 60 + i)       # a weight the generator never chose (it picks 0-50)
        return
    import re
    path = repo / "environments" / f"{SCALE_ENV}.yaml"
    if change == "defaults":
        path.write_text(re.sub(r"^  defaults: \{timeout: (\d+s).*$",
                               rf"  defaults: {{timeout: \g<1>, headers: {{request: {{set: {{x-mesh-round: '{i}'}}}}}}}}",
                               path.read_text(), flags=re.M))
        return
    path.write_text(re.sub(r'(team-07/svc-0007: \{v1: \["[0-9.]+):\d+', rf"\g<1>:{9000 + i}", path.read_text()))


def _scale_round(args, server, url: str, repo: Path, rendered: Path, loads: dict, proxies: _Proxies,
                 change: str, i: int) -> dict:
    """Change the repository, compile it, and time from the swap of `rendered/dev`'s new
    output to the receipt of the changed type's new version by each proxy that holds it."""
    _change(repo, change, i)
    kind = CHANGES[change]
    clock = _RenameClock(rendered, SCALE_ENV)
    cpu_before, _ = _proc_stats(server.pid)
    load_cpu = {label: _proc_stats(process.pid)[0] for label, (process, _) in loads.items()}
    try:
        _meshc_compile(repo, rendered)
    finally:
        clock.close()
    t0 = clock.at
    version = json.loads((rendered / SCALE_ENV / "envoy" / f"{kind}.json").read_bytes())["version_info"]
    expected = {label: proxies.expected(label, change) for label in loads}
    for label, (_, parent) in loads.items():
        parent.send(("wait", TYPE_URLS[kind], t0, expected[label], 120))
    seen = {label: parent.recv()[1:] for label, (_, parent) in loads.items()}
    time.sleep(1)   # the ACKs
    cpu_after, rss = _proc_stats(server.pid)
    status = _snapshots(url)
    row = {"change": change,
           "reload_ms": {env: round(s["load_seconds"] * 1000, 1) for env, s in status.items()
                         if s["loaded_unix"] >= t0 - 0.5},
           "server_cpu_s": round(cpu_after - cpu_before, 2),
           "server_rss_mb": round(rss / 2**20, 1)}
    for label, (receipts, others) in seen.items():
        if not label.endswith("-scoped"):   # the whole environment: the file's own version
            assert all(v == version for _, v in receipts), (label, change)
        lat = [t - t0 for t, _ in receipts]
        row[label] = {"expected": len(expected[label]), "received": len(lat), "others_sent_it": others,
                      "p50_s": round(_pct(lat, 0.5), 3),
                      "p99_s": round(_pct(lat, 0.99), 3), "max_s": round(max(lat), 3) if lat else None,
                      # the simulated proxies' own process: receiving and parsing is work too
                      "load_generator_cpu_s": round(_proc_stats(loads[label][0].pid)[0] - load_cpu[label], 2)}
    return row


def _stream_state_kb(args, rendered: Path, proxies: _Proxies, label: str) -> float:
    """The Python memory the server holds per connected stream: tracemalloc over a server in
    this process (a ServerThread) while a load worker connects `--trace-proxies` proxies,
    without the snapshot's memoised responses (shared by all; snapshot.py's allocations)."""
    import gc
    import tracemalloc
    from compiler.xds.server import Options, ServerThread

    subs = proxies.subscriptions(label)[:args.trace_proxies]
    with ServerThread(Options(rendered=rendered, grpc_port=0, http_port=0)) as server:
        server.call(gc.collect)
        tracemalloc.start(16)
        before = tracemalloc.take_snapshot()
        spawn = multiprocessing.get_context("spawn")    # not a fork of a process running gRPC
        parent, child = spawn.Pipe()
        process = spawn.Process(target=_scale_load_worker, args=(
            server.grpc_address, label.startswith("delta"), label.endswith("-scoped"), args.connecting, subs,
            child, args.connections))
        process.start()
        assert parent.recv()[0] == "connected"
        time.sleep(2)
        server.call(gc.collect)
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        parent.send(("stop",))
        process.join(30)
    shared = [tracemalloc.Filter(False, "*/compiler/xds/snapshot.py", all_frames=True)]
    grown = sum(d.size_diff for d in after.filter_traces(shared).compare_to(before.filter_traces(shared), "filename"))
    return round(grown / len(subs) / 1024, 1)


def _connect(address: str, label: str, subs: list[dict], args) -> tuple:
    """A load process of `label` proxies, connected: (process, pipe, seconds to connect all)."""
    spawn = multiprocessing.get_context("spawn")    # the parent may have run gRPC in-process
    parent, child = spawn.Pipe()
    process = spawn.Process(target=_scale_load_worker, args=(
        address, label.startswith("delta"), label.endswith("-scoped"), args.connecting, subs, child,
        args.connections))
    process.start()
    message, seconds = parent.recv()
    assert message == "connected"
    return process, parent, seconds


def _scale_proxies(args, server, address: str, url: str, repo: Path, rendered: Path, proxies: _Proxies,
                   labels: list[str], first_round: int = 0) -> dict:
    """`labels`' proxies connected side by side: memory and CPU per proxy; then rounds of
    changes (numbered from `first_round`, so that every round changes something)."""
    out: dict = {}
    time.sleep(1)
    cpu0, rss0 = _proc_stats(server.pid)
    out["server_rss_idle_mb"] = round(rss0 / 2**20, 1)
    loads = {}
    memory, before = {}, rss0
    for label in labels:
        cpu_before, _ = _proc_stats(server.pid)
        process, parent, seconds = _connect(address, label, proxies.subscriptions(label), args)
        time.sleep(2)           # ACKs processed, buffers drained
        cpu_after, rss = _proc_stats(server.pid)
        memory[label] = {"seconds_to_connect_all": round(seconds, 2),
                         "server_cpu_ms_per_proxy": round((cpu_after - cpu_before) * 1000 / args.proxies, 2),
                         "server_rss_after_mb": round(rss / 2**20, 1),
                         "memory_kb_per_proxy": round((rss - before) / 1024 / args.proxies, 1)}
        print("connected", label, memory[label], flush=True)
        before = rss
        loads[label] = (process, parent)
    out["connect"] = memory
    rounds = []
    try:
        for i in range(first_round, first_round + args.scale_rounds):
            for change in args.changes.split(","):
                row = _scale_round(args, server, url, repo, rendered, loads, proxies, change, i)
                rounds.append(row)
                print("scale round", i, row, flush=True)
    finally:
        for process, parent in loads.values():
            parent.send(("stop",))
            process.join(30)
    out["push_rounds"] = rounds
    return out


# --- the floor: the same bytes sent by a bare grpc.aio server ---------------------

def _floor_worker(envoy_dir: str, port: int, conn) -> None:
    asyncio.run(_floor_main(Path(envoy_dir), port, conn))


async def _floor_main(envoy_dir: Path, port: int, conn) -> None:
    """An ADS server that does nothing but send: every stream gets each type's whole
    response on its first request for that type (ACKs are read and dropped), and on
    ("push", kind) from `conn` every stream gets what meshc sends for a one-route change
    (Delta: the changed route configuration alone; SotW: all of them), under a new
    version. The bytes are meshc's own, loaded once; what this costs is gRPC's."""
    import grpc
    from envoy.service.discovery.v3 import discovery_pb2 as d
    from compiler.xds.snapshot import load_snapshot, read_files

    snapshot = load_snapshot(SCALE_ENV, read_files(envoy_dir))
    kinds = {TYPE_URLS[k]: snapshot.kinds[k] for k in _ORDER}
    pushed = {"routes": "8080"}     # bench/compile.py's services all listen on 8080
    writers: dict[str, set[asyncio.Queue]] = {"sotw": set(), "delta": set()}
    count = 0

    def sotw(typed, version: str) -> bytes:
        head = d.DiscoveryResponse(version_info=version, type_url=typed.type_url, nonce=version)
        return head.SerializeToString() + b"".join(r.sotw_field for r in typed.resources.values())

    def delta(typed, version: str, names) -> bytes:
        head = d.DeltaDiscoveryResponse(system_version_info=version, type_url=typed.type_url, nonce=version)
        return head.SerializeToString() + b"".join(typed.resources[n].delta_field for n in names)

    first = {"sotw": {url: sotw(t, t.version) for url, t in kinds.items()},
             "delta": {url: delta(t, t.version, t.resources) for url, t in kinds.items()}}
    parse = {"sotw": d.DiscoveryRequest.FromString, "delta": d.DeltaDiscoveryRequest.FromString}

    def handler(way: str):
        async def stream(request_iterator, context) -> None:
            nonlocal count
            queue: asyncio.Queue = asyncio.Queue()
            writers[way].add(queue)
            count += 1

            async def read() -> None:
                answered: set[str] = set()
                async for data in request_iterator:
                    url = parse[way](data).type_url
                    if url not in answered:
                        answered.add(url)
                        queue.put_nowait(first[way][url])
            reader = asyncio.create_task(read())
            try:
                while True:
                    await context.write(await queue.get())
            finally:
                reader.cancel()
                writers[way].discard(queue)
        return grpc.stream_stream_rpc_method_handler(stream)

    server = grpc.aio.server(options=[("grpc.max_send_message_length", 256 << 20)])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "envoy.service.discovery.v3.AggregatedDiscoveryService",
        {"StreamAggregatedResources": handler("sotw"), "DeltaAggregatedResources": handler("delta")})])
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    conn.send(("ready", os.getpid()))
    loop = asyncio.get_running_loop()
    n = 0
    while True:
        command = await loop.run_in_executor(None, conn.recv)
        if command[0] == "stop":
            break
        n += 1
        kind = command[1]
        typed, version = snapshot.kinds[kind], f"floor-{n}"
        bodies = {"sotw": sotw(typed, version), "delta": delta(typed, version, [pushed[kind]])}
        t0 = time.time()
        for way, queues in writers.items():
            for queue in queues:
                queue.put_nowait(bodies[way])
        conn.send(("pushed", t0))
    await server.stop(0)


def _grpc_floor(args, envoy_dir: Path, proxies: _Proxies) -> dict:
    """The first group's unscoped proxies against the floor server: memory per proxy, and
    `--floor-rounds` one-route pushes timed from the server's first write to each receipt."""
    from support.backends import free_port

    labels = [label for label in args.protocols.split(";")[0].split(",") if not label.endswith("-scoped")]
    spawn = multiprocessing.get_context("spawn")
    parent, child = spawn.Pipe()
    port = free_port()
    server = spawn.Process(target=_floor_worker, args=(str(envoy_dir), port, child))
    server.start()
    assert parent.recv()[0] == "ready"
    time.sleep(1)
    _, before = _proc_stats(server.pid)
    out: dict = {"server_rss_idle_mb": round(before / 2**20, 1), "connect": {}, "push_rounds": []}
    loads = {}
    try:
        for label in labels:
            process, pipe, seconds = _connect(f"127.0.0.1:{port}", label, proxies.subscriptions(label), args)
            time.sleep(2)
            _, rss = _proc_stats(server.pid)
            out["connect"][label] = {"seconds_to_connect_all": round(seconds, 2),
                                     "memory_kb_per_proxy": round((rss - before) / 1024 / args.proxies, 1)}
            print("floor connected", label, out["connect"][label], flush=True)
            before = rss
            loads[label] = (process, pipe)
        for _ in range(args.floor_rounds):
            cpu_before, _ = _proc_stats(server.pid)
            parent.send(("push", "routes"))
            _, t0 = parent.recv()
            row = {}
            for label, (_, pipe) in loads.items():
                pipe.send(("wait", TYPE_URLS["routes"], t0, list(range(args.proxies)), 120))
            for label, (_, pipe) in loads.items():
                receipts, _ = pipe.recv()[1:]
                lat = [t - t0 for t, _ in receipts]
                row[label] = {"received": len(lat), "p50_s": round(_pct(lat, 0.5), 3),
                              "p99_s": round(_pct(lat, 0.99), 3), "max_s": round(max(lat), 3)}
            time.sleep(1)
            row["server_cpu_s"] = round(_proc_stats(server.pid)[0] - cpu_before, 2)
            out["push_rounds"].append(row)
            print("floor round", row, flush=True)
    finally:
        for process, pipe in loads.values():
            pipe.send(("stop",))
            process.join(30)
        parent.send(("stop",))
        server.join(30)
    return out


# --- the run --------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--envoys", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--rest-seconds", type=float, default=8)
    parser.add_argument("--sovereign", metavar="HOST:PORT",
                        help="also measure this Sovereign's REST throughput with the same load")
    parser.add_argument("--only", choices=("sample", "scale"),
                        help="run one part: the 41-cluster sample, or the compiled repository at scale")
    parser.add_argument("--services", type=int, default=1000,
                        help="at scale: bench/compile.py's repository of this many services × 3 environments")
    parser.add_argument("--proxies", type=int, default=1000,
                        help="at scale: simulated proxies of each protocol (Delta and SotW)")
    parser.add_argument("--scale-rounds", type=int, default=3,
                        help="at scale: rounds, each a canary weight change and an endpoint change")
    parser.add_argument("--trace-proxies", type=int, default=300,
                        help="at scale: proxies of each protocol for the tracemalloc figure (in-process server)")
    parser.add_argument("--connections", type=int, default=0,
                        help="at scale: HTTP/2 connections each protocol's proxies share (0: one per proxy)")
    parser.add_argument("--protocols", default="delta,sotw;delta-scoped,sotw-scoped",
                        help="at scale: groups (;) of simulated proxies, each --proxies strong, connected side by "
                             "side; each group against a server of its own. `-scoped`: proxy i runs service i, modulo the "
                             "services")
    parser.add_argument("--calls", type=int, default=10,
                        help="at scale: the services each service's egress lists (0: none, no scoped proxies)")
    parser.add_argument("--changes", default="routes,endpoints,defaults",
                        help="at scale: the changes of a round (routes: a canary weight; endpoints: one "
                             "endpoint in dev; defaults: a request header dev's defaults set, every virtual host)")
    parser.add_argument("--floor-rounds", type=int, default=3,
                        help="at scale: pushes of the bare gRPC floor (0: not run)")
    parser.add_argument("--ready-repeat", type=int, default=3, help="at scale: server starts timed")
    parser.add_argument("--connecting", type=int, default=50,
                        help="at scale: proxies at once waiting for their first responses")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "serve.json")
    args = parser.parse_args()
    if not args.calls and "-scoped" in args.protocols:
        parser.error("scoped proxies need --calls: with none, no service has an egress to scope them by")
    results: dict = {"cpus": os.cpu_count(), "load_average_start": os.getloadavg()}
    if args.only != "scale":
        results.update(_sample_run(args))
    if args.only != "sample":
        results["scale"] = _scale_run(args)
    results["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


def _sample_run(args) -> dict:
    """The 41-cluster sample: push rounds with simulated proxies and real Envoys, REST, the floor."""
    from support.backends import free_port
    from support.envoy import Envoy
    import requests

    results: dict = {"clients": args.clients, "envoys": args.envoys}
    with tempfile.TemporaryDirectory(prefix="meshc-bench-") as tmp:
        workdir = Path(tmp)
        rendered = workdir / "rendered"
        listen = ("127.0.0.1", free_port())
        res = _resources(listen, 10)
        sample.write_snapshot(rendered, ENV, res)
        eds_names = [c["name"] for c in res["clusters"]]
        grpc_port, http_port = free_port(), free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "compiler.xds", "--rendered", str(rendered),
             "--grpc", f"127.0.0.1:{grpc_port}", "--http", f"127.0.0.1:{http_port}",
             "--log-level", "warning"], cwd=ROOT)
        http_url = f"http://127.0.0.1:{http_port}"
        try:
            _wait(lambda: requests.get(http_url + "/readyz", timeout=1).status_code == 200)
            cpu0, rss0 = _proc_stats(server.pid)
            snapshot_bytes = sum(len((rendered / ENV / "envoy" / f"{k}.json").read_bytes())
                                 for k in TYPE_URLS)
            results["snapshot"] = {"resources": {k: len(v) for k, v in res.items()},
                                   "json_bytes": snapshot_bytes, "server_rss_idle_mb": round(rss0 / 2**20, 1)}

            parent, child = multiprocessing.Pipe()
            load = multiprocessing.Process(target=_load_worker,
                                           args=(f"127.0.0.1:{grpc_port}", args.clients, child, eds_names))
            t_connect = time.monotonic()
            load.start()
            assert parent.recv()[0] == "connected"
            connect_seconds = time.monotonic() - t_connect
            envoys = []
            for i in range(args.envoys):
                e = Envoy(sample.ads_bootstrap(f"envoy-{i}", ENV, ("127.0.0.1", grpc_port)),
                          workdir / f"envoy-{i}")
                envoys.append(e.start())
            for e in envoys:
                e.wait_until(lambda e=e: _route_version(e) == _version(res, "routes"), timeout=20)
            time.sleep(1)
            cpu1, rss1 = _proc_stats(server.pid)
            proxies = args.clients + args.envoys
            results["connect"] = {
                "seconds_for_all_clients": round(connect_seconds, 2),
                "server_cpu_ms_per_proxy": round((cpu1 - cpu0) * 1000 / proxies, 3),
                "server_rss_connected_mb": round(rss1 / 2**20, 1),
                "memory_kb_per_proxy": round((rss1 - rss0) / 1024 / proxies, 1)}

            rounds = []
            for i in range(args.rounds):
                extra = 1 if i % 3 == 2 else 0
                previous, res = res, _resources(listen, 20 + i, extra)
                changed = [k for k in TYPE_URLS if _version(previous, k) != _version(res, k)]
                want = _version(res, "routes")
                cpu_before, _ = _proc_stats(server.pid)
                t0 = time.time()
                sample.write_snapshot(rendered, ENV, res)
                envoy_seen = _watch_envoys(envoys, want, t0)
                parent.send(("wait", want, 20))
                _, acks = parent.recv()
                time.sleep(0.2)
                cpu_after, _ = _proc_stats(server.pid)
                lat = [a - t0 for a in acks]
                rounds.append({
                    "types_changed": ",".join(changed),
                    "acked": len(acks), "p50_s": round(_pct(lat, 0.5), 3),
                    "p99_s": round(_pct(lat, 0.99), 3), "max_s": round(max(lat), 3) if lat else None,
                    "envoys_p50_s": round(_pct(envoy_seen, 0.5), 3),
                    "envoys_max_s": round(max(envoy_seen), 3) if envoy_seen else None,
                    "server_cpu_ms_per_proxy": round((cpu_after - cpu_before) * 1000 / proxies, 3)})
                print("round", i, rounds[-1], flush=True)
                time.sleep(0.5)
            results["push_rounds"] = rounds
            all_p99 = [r["p99_s"] for r in rounds]
            results["push_summary"] = {"p99_of_rounds_median_s": statistics.median(all_p99),
                                       "p99_worst_s": max(all_p99)}
            parent.send(("stop",))
            load.join(10)
            for e in envoys:
                e.stop()

            body = _capture_envoy_body(workdir)
            request = json.loads(body)
            request["node"]["cluster"] = ENV
            rest = {"envoy_body_bytes": len(body)}
            for label, version in (("stale_200", ""), ("current_304", _version(res, "clusters"))):
                request["version_info"] = version
                rest[label] = _rest_load("127.0.0.1", http_port, "/v3/discovery:clusters",
                                         json.dumps(request).encode(), args.rest_seconds)
                print("rest", label, rest[label], flush=True)
            results["rest_meshc"] = rest
            if args.sovereign:
                host, port = args.sovereign.rsplit(":", 1)
                sov_request = json.loads(body)
                sov_request["node"]["cluster"] = "peer-cluster"
                sov = {}
                for label, version in (("stale_200", "0"),):
                    sov_request["version_info"] = version
                    sov[label] = _rest_load(host, int(port), "/v3/discovery:clusters",
                                            json.dumps(sov_request).encode(), args.rest_seconds)
                    print("sovereign", label, sov[label], flush=True)
                results["rest_sovereign"] = sov
            cpu2, rss2 = _proc_stats(server.pid)
            results["server_rss_end_mb"] = round(rss2 / 2**20, 1)
        finally:
            server.terminate()
            server.wait(10)
        floor = _fs_floor(workdir, ("127.0.0.1", free_port()), args.rounds)
        results["envoy_filesystem_floor_s"] = {"p50": round(_pct(floor, 0.5), 3),
                                               "max": round(max(floor), 3)}
    return results


def _watch_envoys(envoys, want: str, t0: float) -> list[float]:
    seen: dict[int, float] = {}
    deadline = time.monotonic() + 20
    while len(seen) < len(envoys) and time.monotonic() < deadline:
        for i, e in enumerate(envoys):
            if i not in seen:
                try:
                    if _route_version(e) == want:
                        seen[i] = time.time() - t0
                except Exception:       # noqa: BLE001 - admin busy: retry
                    pass
        time.sleep(0.01)
    return list(seen.values())


def _wait(predicate, timeout: float = 20, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except Exception:       # noqa: BLE001 - not up yet
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("server not ready")
        time.sleep(interval)


if __name__ == "__main__":
    sys.exit(main())
