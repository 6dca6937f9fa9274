"""`meshc serve` assembled: load, watch, publish; gRPC and HTTP on one event loop.

Owns the `Options`, the reload cycle (files read and parsed on a worker
thread, published on the loop) and the `Server` lifecycle. `ServerThread`
runs a server on a background thread for tests, the demo and the benchmark.

Reload rule: an environment's new files are published only when all four
parse strictly and pass `consistency_errors`; otherwise the last good
snapshot keeps serving and the problems go to the log, /metrics and
/debug/snapshots.

Secrets (`--secrets DIR`, see `secrets`) are one set beside every
environment: each published snapshot carries the current set, and DIR is
polled (every `poll_interval`) so a rotated certificate is pushed like any
other change. A secret a snapshot names that DIR lacks is logged when it
starts to be missing and shown by `meshc_xds_secret_missing`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path

import grpc

from compiler.xds import ads, scope, secrets
from compiler.xds.cache import Cache
from compiler.xds.metrics import Metrics
from compiler.xds.proxies import Proxies
from compiler.xds.rest import HttpServer, RestView, rest_config_source
from compiler.xds.snapshot import (PUSH_ORDER, SnapshotError, environment_dirs, files_digest,
                                   load_snapshot, read_files)
from compiler.xds.stream import Hub
from compiler.xds.watch import Watcher

__all__ = ["Options", "Server", "ServerThread"]

log = logging.getLogger("meshc.xds")


@dataclass(frozen=True)
class Options:
    rendered: Path = Path("rendered")
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 18000
    http_host: str = "127.0.0.1"
    http_port: int = 18001
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None
    rest_xds_cluster: str = "xds_cluster"
    rest_refresh_delay: str = "1s"
    debounce: float = 0.05
    watch: str = "auto"                  # auto | inotify | poll
    poll_interval: float = 1.0
    max_message_bytes: int = 4 * 1024 * 1024
    secrets: Path | None = None          # --secrets DIR: TLS secrets served over SDS


@dataclass(frozen=True)
class _Loaded:
    env: str
    digest: str
    snapshot: object = None
    rest: "_LazyRest | None" = None
    seconds: float = 0.0
    errors: tuple[str, ...] = ()
    restored: bool = False      # the served snapshot's files again, after a refused load


@dataclass(frozen=True)
class _Seen:
    """What a reload compares an environment's files against (digests of file bytes)."""

    served: str             # the published snapshot's ("" before the first)
    rejected: str           # the last refused load's ("" when none since)
    errors: bool            # the last load was refused
    snapshot: object = None  # the published snapshot, whose unchanged parts a load reuses


class Server:
    """The xDS server. `await start()` binds both ports; `await stop()` closes them."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.hub = Hub(Cache(), Proxies(), Metrics())
        self.grpc_port = 0
        self.http_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._http: HttpServer | None = None
        self._watcher: Watcher | None = None
        self._reloading = False
        self._reload_again = False
        self._rest_source = rest_config_source(options.rest_xds_cluster, options.rest_refresh_delay)
        self._rest_used = threading.Event()     # a REST view was asked for: build later ones ahead of polls
        self._secrets, _ = secrets.load(None)
        self._secrets_seen = b""
        self._secrets_task: asyncio.Task | None = None
        self._missing: dict[str, frozenset[str]] = {}   # env → secrets its snapshot names that DIR lacks
        self._named: dict[bytes, frozenset[str]] = {}   # a resource's source hash → the secrets it names
        _describe(self.hub.metrics)
        self._gauges()

    # --- lifecycle ---------------------------------------------------------
    async def start(self) -> None:
        """Load the files, bind both ports, start watching. On failure nothing stays open."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        opts = self.options
        # Watch before the first load, so a change made during it is not missed.
        self._watcher = Watcher(asyncio.get_running_loop(), opts.rendered, self._schedule_reload,
                                debounce=opts.debounce, mode=opts.watch,
                                poll_interval=opts.poll_interval)
        self._watcher.start()
        if opts.secrets is not None:
            problem = secrets.check_dir(opts.secrets)
            if problem:
                raise PermissionError(f"--secrets {problem}")
            await self.reload_secrets()
            self._secrets_task = asyncio.get_running_loop().create_task(self._poll_secrets())
        await self.reload()
        self._grpc = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", opts.max_message_bytes),
            ("grpc.so_reuseport", 0),           # a second server on the port must fail, not share
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ])
        ads.add_services(self._grpc, self.hub)
        address = f"{opts.grpc_host}:{opts.grpc_port}"
        if opts.tls_cert:
            self.grpc_port = self._grpc.add_secure_port(address, self._grpc_credentials())
        else:
            self.grpc_port = self._grpc.add_insecure_port(address)
        await self._grpc.start()
        self._http = HttpServer(self.hub, opts.max_message_bytes, self.status_page)
        self.http_port = await self._http.start(opts.http_host, opts.http_port,
                                                ssl=self._http_ssl())
        log.info("serving %s: gRPC on %s:%d, HTTP on %s:%d (%s, watching by %s)",
                 opts.rendered, opts.grpc_host, self.grpc_port, opts.http_host, self.http_port,
                 "TLS" if opts.tls_cert else "plaintext", self._watcher.using)

    async def stop(self) -> None:
        if self._secrets_task is not None:
            self._secrets_task.cancel()
        if self._watcher is not None:
            self._watcher.stop()
        if self._http is not None:
            await self._http.stop()
        if self._grpc is not None:
            await self._grpc.stop(grace=0.5)

    def _grpc_credentials(self) -> grpc.ServerCredentials:
        opts = self.options
        ca = opts.client_ca.read_bytes() if opts.client_ca else None
        return grpc.ssl_server_credentials([(opts.tls_key.read_bytes(), opts.tls_cert.read_bytes())],
                                           root_certificates=ca, require_client_auth=ca is not None)

    def _http_ssl(self) -> ssl.SSLContext | None:
        opts = self.options
        if not opts.tls_cert:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(opts.tls_cert, opts.tls_key)
        if opts.client_ca:
            context.load_verify_locations(opts.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    # --- secrets -------------------------------------------------------------
    async def _poll_secrets(self) -> None:
        while True:
            await asyncio.sleep(self.options.poll_interval)
            try:
                await self.reload_secrets()
            except Exception:       # a bug, not a bad file: keep serving what we have
                log.exception("reading --secrets failed; still serving the last secrets")

    async def reload_secrets(self) -> None:
        """Read DIR when its files changed; publish every environment with the new set."""
        root = self.options.secrets
        seen = await asyncio.to_thread(secrets.fingerprint, root)
        if seen == self._secrets_seen:
            return
        loaded, problems = await asyncio.to_thread(secrets.load, root, self._secrets)
        self._secrets_seen = seen
        for problem in problems:
            log.warning("--secrets %s: %s", root, problem)
        if loaded.version == self._secrets.version:
            return
        self._secrets = loaded
        log.info("secrets: serving %d (%s) from %s", len(loaded.resources), ", ".join(loaded.resources) or "none", root)
        self.hub.metrics.inc("meshc_xds_secrets_published_total")
        for state in self.hub.cache.envs():
            if state.snapshot is not None:
                self._publish(state.snapshot, state.load_seconds, state.extras)

    def _publish(self, snapshot, load_seconds: float, extras: dict) -> None:
        """Publish an environment's snapshot with the current secrets; say which of those it names are missing."""
        snapshot = replace(snapshot, kinds={**snapshot.kinds, secrets.KIND: self._secrets})
        self.hub.cache.publish(snapshot, load_seconds, **extras)
        missing = frozenset(self._secrets_named(snapshot) - set(self._secrets.resources))
        if missing - self._missing.get(snapshot.env, frozenset()):
            log.warning("environment %r names secrets the --secrets directory lacks: %s; what uses them "
                        "starts without them, its TLS failing until they are served", snapshot.env, ", ".join(sorted(missing)))
        self._missing[snapshot.env] = missing

    def _secrets_named(self, snapshot) -> set[str]:
        """The secrets the snapshot's clusters and listeners name; each resource read once while it lasts."""
        named, out = {}, set()
        for state in [s for s in self.hub.cache.envs() if s.snapshot is not None]:
            for kind in ("clusters", "listeners"):
                for r in state.snapshot.kinds[kind].resources.values():
                    found = self._named.get(r.source)
                    if found is None:
                        found = frozenset(secrets.referenced([r.json]))
                    named[r.source] = found
                    if state.env == snapshot.env:
                        out |= found
        self._named = named  # what no served snapshot holds any more is forgotten
        return out

    # --- reload --------------------------------------------------------------
    def _schedule_reload(self) -> None:
        task = asyncio.get_running_loop().create_task(self.reload())
        task.add_done_callback(_log_failure)

    async def reload(self) -> None:
        """Load every changed environment; publish the good ones. Never runs twice at once."""
        if self._reloading:
            self._reload_again = True
            return
        self._reloading = True
        try:
            while True:
                self._reload_again = False
                seen = {s.env: _Seen(s.snapshot.digest if s.snapshot else "", s.rejected_digest,
                                     bool(s.errors), s.snapshot)
                        for s in self.hub.cache.envs()}
                # Each environment is published as soon as it is loaded, not after the others.
                loop = asyncio.get_running_loop()
                await asyncio.to_thread(self._load_changed, seen,
                                        lambda loaded: loop.call_soon_threadsafe(self._apply, loaded))
                if not self._reload_again:
                    return
        finally:
            self._reloading = False

    def _load_changed(self, seen: dict[str, _Seen], deliver: Callable[[_Loaded], None]) -> None:
        """Worker thread: read every environment, parse those whose bytes changed, and hand each
        result to `deliver` (which puts it on the event loop) as soon as it is there.

        Files whose digest is the served snapshot's are not parsed again; if the
        environment's last load was refused they come back as `restored` (the bad
        files were reverted), so the error state clears without a publication.
        A load reuses what the environment's served snapshot and the other
        environments' snapshots hold (`load_snapshot`'s `others`). REST views are
        built after every environment is delivered, and only once REST is in use.
        """
        # What other environments hold is reused: the ones just loaded first, then those served.
        others = [s.snapshot for s in seen.values() if s.snapshot is not None]
        views: list[_LazyRest] = []
        for envoy_dir in environment_dirs(self.options.rendered):
            env = envoy_dir.parent.name
            started = time.perf_counter()
            try:
                files = _read_settled(envoy_dir)
            except OSError as exc:
                if not envoy_dir.is_dir():
                    continue    # swapped away mid-read; the rename back triggers a reload
                deliver(_Loaded(env, f"unreadable:{exc}", errors=(f"cannot read: {exc}",)))
                continue
            digest = files_digest(files)
            known = seen.get(env)
            if known is not None and digest == known.served:
                if known.errors:
                    deliver(_Loaded(env, digest, restored=True))
                continue
            if known is not None and digest == known.rejected:
                continue
            try:
                previous = known.snapshot if known is not None else None
                snapshot = scope.attach(load_snapshot(env, files, previous, others), files.get(scope.FILE), previous,
                                        others)
            except SnapshotError as exc:
                deliver(_Loaded(env, digest, errors=exc.problems))
                continue
            others.insert(0, snapshot)
            rest = _LazyRest(snapshot, self._rest_source, self._rest_used)
            deliver(_Loaded(env, digest, snapshot, rest, time.perf_counter() - started))
            views.append(rest)
        if self._rest_used.is_set():    # REST clients poll this server: build their next answers now
            for rest in views:
                rest.view()

    def _apply(self, loaded: _Loaded) -> None:
        cache = self.hub.cache
        if loaded.restored:
            cache.restore(loaded.env)
            log.info("environment %r: files restored to the served version set %s; "
                     "the earlier refusal is cleared", loaded.env, loaded.digest[:12])
            return
        if loaded.snapshot is None:
            cache.reject(loaded.env, loaded.digest, loaded.errors)
            self.hub.metrics.inc("meshc_xds_snapshot_rejected_total", env=loaded.env)
            state = cache.get(loaded.env)
            keeping = (f"keeping version set {state.snapshot.digest[:12]}"
                       if state.snapshot else "no valid snapshot yet")
            log.error("environment %r: new files refused (%s):\n  %s", loaded.env, keeping,
                      "\n  ".join(loaded.errors))
            return
        self._publish(loaded.snapshot, loaded.seconds, {"rest": loaded.rest})
        self.hub.metrics.inc("meshc_xds_snapshots_published_total", env=loaded.env)
        log.info("environment %r: published %s (loaded in %.1f ms)", loaded.env,
                 " ".join(f"{k}={v[:12]}" for k, v in loaded.snapshot.versions().items()),
                 loaded.seconds * 1000)

    # --- introspection -----------------------------------------------------
    def status_page(self) -> dict:
        out = {}
        for state in self.hub.cache.envs():
            snap = state.snapshot
            out[state.env] = {
                "valid": not state.errors,
                "versions": snap.versions() if snap else {},
                "resources": {k: list(snap.kinds[k].resources) for k in PUSH_ORDER} if snap else {},
                "loaded_unix": round(state.loaded_at_unix, 3),
                "load_seconds": round(state.load_seconds, 6),
                "errors": list(state.errors),
                "rejected_loads": state.failures,
            }
        return out

    def _gauges(self) -> None:
        hub = self.hub

        def connected():
            counts: dict[tuple[str, str], int] = {}
            for p in hub.proxies.all():
                counts[(p.env, p.protocol)] = counts.get((p.env, p.protocol), 0) + 1
            return [("meshc_xds_connected_proxies", {"env": e, "protocol": p}, n)
                    for (e, p), n in sorted(counts.items())]

        def versions():
            return [("meshc_xds_snapshot_info", {"env": s.env, "type": k, "version": v}, 1)
                    for s in hub.cache.envs() if s.snapshot
                    for k, v in s.snapshot.versions().items()]

        def per_env(name: str, value: Callable) -> Callable:
            return lambda: [(name, {"env": s.env}, value(s)) for s in hub.cache.envs()]

        def missing_secrets():
            return [("meshc_xds_secret_missing", {"env": env, "secret": name}, 1)
                    for env, names in sorted(self._missing.items()) for name in sorted(names)]

        hub.metrics.gauge("meshc_xds_secret_missing", missing_secrets)
        hub.metrics.gauge("meshc_xds_connected_proxies", connected)
        hub.metrics.gauge("meshc_xds_snapshot_info", versions)
        hub.metrics.gauge("meshc_xds_snapshot_valid", per_env(
            "meshc_xds_snapshot_valid", lambda s: 0 if s.errors else 1))
        hub.metrics.gauge("meshc_xds_snapshot_load_timestamp_seconds", per_env(
            "meshc_xds_snapshot_load_timestamp_seconds", lambda s: round(s.loaded_at_unix, 3)))
        hub.metrics.gauge("meshc_xds_snapshot_load_duration_seconds", per_env(
            "meshc_xds_snapshot_load_duration_seconds", lambda s: s.load_seconds))


class _LazyRest:
    """An environment's `RestView`, built on first use rather than at every load: a server
    whose proxies are all on gRPC never needs one, and building it costs a third of what
    parsing the snapshot does. Built once, under a lock (a poll's worker thread, the loader
    thread and, for a view published while a poll waited, the event loop may all ask); the
    first build marks REST as in use (`used`), so the loader builds the views of later loads
    before a poll waits for them."""

    def __init__(self, snapshot, source: dict, used: threading.Event) -> None:
        self._snapshot, self._source, self._used = snapshot, source, used
        self._view: RestView | None = None
        self._lock = threading.Lock()

    @property
    def built(self) -> bool:
        return self._view is not None

    def view(self) -> RestView:
        with self._lock:
            if self._view is None:
                self._view = RestView.build(self._snapshot, self._source)
                self._used.set()
            return self._view

    def kind_for(self, service: str, kind: str):
        return self.view().kind_for(service, kind)

    @property
    def kinds(self):
        return self.view().kinds


def _read_settled(envoy_dir: Path, attempts: int = 3) -> dict[str, bytes]:
    """read_files, retried briefly: a compile's swap can delete the old tree under us."""
    for attempt in range(attempts):
        try:
            return read_files(envoy_dir)
        except OSError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.02)
    raise AssertionError("unreachable")


def _log_failure(task: asyncio.Task) -> None:
    """A reload that failed for a reason other than bad files (a bug): log it, keep serving."""
    if not task.cancelled() and task.exception() is not None:
        log.error("reload failed; still serving the last good snapshots",
                  exc_info=task.exception())


def _describe(metrics: Metrics) -> None:
    for name, kind, text in [
        ("meshc_xds_connected_proxies", "gauge", "Connected gRPC streams and recently polling REST clients."),
        ("meshc_xds_snapshot_info", "gauge", "Version (content hash) served per environment and type."),
        ("meshc_xds_snapshot_valid", "gauge", "1 if the environment's files on disk were accepted at the last load."),
        ("meshc_xds_snapshot_load_timestamp_seconds", "gauge", "Unix time the served snapshot was published."),
        ("meshc_xds_snapshot_load_duration_seconds", "gauge", "Seconds spent parsing and checking the served snapshot."),
        ("meshc_xds_snapshots_published_total", "counter", "Snapshots published."),
        ("meshc_xds_snapshot_rejected_total", "counter", "Loads refused (parse or consistency errors)."),
        ("meshc_xds_responses_total", "counter", "Responses sent on gRPC streams, by reason (request or push)."),
        ("meshc_xds_resources_sent_total", "counter", "Resources those responses carried, by type."),
        ("meshc_xds_acks_total", "counter", "ACKs received."),
        ("meshc_xds_nacks_total", "counter", "NACKs received (rejected versions are not resent)."),
        ("meshc_xds_rest_requests_total", "counter", "REST discovery requests, by HTTP status."),
        ("meshc_xds_push_to_ack_seconds", "histogram", "From a snapshot's publication to a proxy's ACK of the push."),
        ("meshc_xds_secret_missing", "gauge", "1 for each SDS secret an environment's snapshot names that --secrets lacks."),
        ("meshc_xds_secrets_published_total", "counter", "Sets of secrets published (a changed --secrets directory)."),
    ]:
        metrics.describe(name, kind, text)


class ServerThread:
    """A `Server` on its own event loop in a background thread (tests, demo, bench)."""

    def __init__(self, options: Options) -> None:
        self.server = Server(options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="meshc-serve",
                                        daemon=True)

    def start(self) -> "ServerThread":
        """Start the loop thread and the server; on failure both are gone again."""
        self._thread.start()
        try:
            self.call_async(self.server.start())
        except BaseException:
            self._close_loop()
            raise
        return self

    def stop(self) -> None:
        self.call_async(self.server.stop())
        self._close_loop()

    def _close_loop(self) -> None:
        self.call_async(_cancel_others())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> "ServerThread":
        return self if self._thread.is_alive() else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def grpc_address(self) -> str:
        return f"{self.server.options.grpc_host}:{self.server.grpc_port}"

    @property
    def http_url(self) -> str:
        scheme = "https" if self.server.options.tls_cert else "http"
        return f"{scheme}://{self.server.options.http_host}:{self.server.http_port}"

    def call_async(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def call(self, fn: Callable, *args, timeout: float = 10):
        """Run `fn(*args)` on the server's loop (its state is single-threaded) and return it."""
        future: Future = Future()

        def run() -> None:
            try:
                future.set_result(fn(*args))
            except BaseException as exc:    # handed to the caller's thread
                future.set_exception(exc)

        self._loop.call_soon_threadsafe(run)
        return future.result(timeout)


async def _cancel_others() -> None:
    """Cancel and await every task but this one, so the loop closes with nothing pending."""
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)
