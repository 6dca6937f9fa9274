"""The HTTP port: REST-JSON xDS polling, health, metrics and debug pages.

Owns a small HTTP/1.1 server on asyncio streams (keep-alive, Content-Length
bodies only, bounded head and body sizes and read times) and the REST view of
a snapshot: the JSON bodies, prepared once per snapshot, with every ADS config source
rewritten into a REST one naming the proxy's xDS cluster, because Envoy has no
"same source as the parent" for REST.

    POST /v3/discovery:{clusters,endpoints,listeners,routes}   DiscoveryRequest JSON
    GET  /healthz  /readyz  /metrics  /debug/proxies  /debug/snapshots

A request body is read with `json.loads` only (a real Envoy's node
description is ~77 KB; json_format.Parse would cost 15× more), and nothing a
client sends ever names a file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from compiler.xds.proxies import Nack
from compiler.xds.snapshot import PUSH_ORDER, TYPE_URLS, WILDCARD_KINDS, NamedBodies, Snapshot
from compiler.xds.stream import Hub

__all__ = ["RestKind", "RestView", "HttpServer", "rest_config_source"]

log = logging.getLogger("meshc.xds")

_MAX_HEAD = 64 * 1024
_IDLE_SECONDS = 120.0           # for the next request head on a keep-alive connection
_BODY_SECONDS = 30.0            # for a request body, once its head has arrived
_REASONS = {200: "OK", 304: "Not Modified", 400: "Bad Request", 404: "Not Found",
            405: "Method Not Allowed", 408: "Request Timeout", 411: "Length Required",
            413: "Content Too Large", 431: "Request Header Fields Too Large",
            503: "Service Unavailable"}


def rest_config_source(cluster: str, refresh_delay: str) -> dict:
    """The REST ApiConfigSource that replaces `{"ads": {}}` in REST responses."""
    return {"api_type": "REST", "transport_api_version": "V3",
            "cluster_names": [cluster], "refresh_delay": refresh_delay}


def _rewrite(node: object, source: dict) -> object:
    """A copy of `node` with each ADS ConfigSource turned into `source` (other keys kept)."""
    if isinstance(node, dict):
        out = {k: _rewrite(v, source) for k, v in node.items() if k != "ads"}
        if "ads" in node:
            out["api_config_source"] = source
        return out
    if isinstance(node, list):
        return [_rewrite(v, source) for v in node]
    return node


@dataclass(frozen=True, slots=True)
class RestKind:
    version: str
    type_url: str
    resources: Mapping[str, bytes]      # name → JSON of the rewritten resource
    full_body: bytes
    named: NamedBodies = field(default_factory=NamedBodies, compare=False, repr=False)

    def body(self, names: frozenset[str] | None) -> bytes:
        """The response for `names` (all for None); each name set built once per snapshot."""
        if names is None:
            return self.full_body
        return self.named.get(names, self._named_body)

    def _named_body(self, names: frozenset[str]) -> bytes:
        return self._assemble([self.resources[n] for n in sorted(names) if n in self.resources])

    def _assemble(self, items: list[bytes]) -> bytes:
        head = json.dumps({"version_info": self.version, "type_url": self.type_url,
                           "nonce": self.version})[:-1].encode()
        return head + b', "resources": [' + b", ".join(items) + b"]}"


@dataclass(frozen=True, slots=True)
class RestView:
    """One snapshot's REST bodies; a scoped proxy's (see `scope`) are cut from them on first use."""

    kinds: Mapping[str, RestKind]
    snapshot: Snapshot
    source: dict
    _scoped: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, snapshot: Snapshot, source: dict) -> "RestView":
        return cls({kind: _rest_kind(snapshot.kinds[kind], source) for kind in PUSH_ORDER}, snapshot, source)

    def kind_for(self, service: str, kind: str) -> RestKind:
        """What a proxy of `service` ("" when it does not say) is sent of `kind`."""
        typed, full = self.snapshot.kind_for(service, kind), self.snapshot.kinds[kind]
        if typed is full:
            return self.kinds[kind]
        view = self._scoped.get((service, kind))
        if view is None:
            same = self.kinds[kind].resources
            view = self._scoped[(service, kind)] = _rest_kind(
                typed, self.source, {n: same[n] for n, r in typed.resources.items() if full.resources.get(n) is r})
        return view


def _rest_kind(typed, source: dict, known: Mapping[str, bytes] = {}) -> RestKind:
    """A kind's REST bodies; `known` holds resources' JSON already rewritten."""
    resources = {name: known.get(name) or json.dumps(_rewrite(r.json, source), separators=(",", ":")).encode()
                 for name, r in typed.resources.items()}
    partial = RestKind(typed.version, typed.type_url, resources, b"")
    return RestKind(typed.version, typed.type_url, resources, partial._assemble(list(resources.values())))


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class _Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"


class HttpServer:
    """The HTTP application; `start` binds it, `handle` answers one request."""

    def __init__(self, hub: Hub, max_body: int, status_page: Callable[[], dict]) -> None:
        self.hub = hub
        self.max_body = max_body
        self._status_page = status_page
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, host: str, port: int, ssl=None) -> int:
        self._server = await asyncio.start_server(self._connection, host, port, ssl=ssl,
                                                  limit=_MAX_HEAD)
        return self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):     # idle keep-alive connections
                writer.close()
            await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while await self._one_request(reader, writer):
                pass
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _one_request(self, reader, writer) -> bool:
        """Read, answer; True to keep the connection open."""
        try:
            async with asyncio.timeout(_IDLE_SECONDS):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            self._write(writer, _Response(431, b"request head too large\n"), keep=False)
            return False
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, version = lines[0].split(" ")
        except ValueError:
            self._write(writer, _Response(400, b"bad request line\n"), keep=False)
            return False
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        if "transfer-encoding" in headers:
            self._write(writer, _Response(411, b"send a Content-Length body\n"), keep=False)
            return False
        declared = headers.get("content-length", "0")
        if not re.fullmatch(r"\d+", declared, re.ASCII):     # str.isdigit() takes "²"
            self._write(writer, _Response(400, b"bad content-length\n"), keep=False)
            return False
        length = int(declared)
        if length > self.max_body:
            self._write(writer, _Response(413, b"request body too large\n"), keep=False)
            return False
        try:
            async with asyncio.timeout(_BODY_SECONDS):     # a slow client cannot hold a task
                body = await reader.readexactly(length) if length else b""
        except TimeoutError:
            self._write(writer, _Response(408, b"request body not received in time\n"),
                        keep=False)
            return False
        if method == "POST" and target.startswith("/v3/discovery:"):
            await self._build_views()
        try:
            peer = writer.get_extra_info("peername") or ("",)
            response = self.handle(method, target, body, peer=str(peer[0]))
        except _HttpError as exc:
            response = _Response(exc.status, (str(exc) + "\n").encode())
        self._write(writer, response, keep, head_only=method == "HEAD")
        await writer.drain()
        return keep

    async def _build_views(self) -> None:
        """The REST views not built yet (none before the first poll), built off the event
        loop: at 1,000 services one takes a third of what parsing the snapshot does, which
        every gRPC stream would otherwise wait out."""
        for state in self.hub.cache.envs():
            rest = state.extras.get("rest")
            if rest is not None and not rest.built:
                await asyncio.to_thread(rest.view)

    @staticmethod
    def _write(writer, response: _Response, keep: bool, head_only: bool = False) -> None:
        reason = _REASONS.get(response.status, "")
        head = (f"HTTP/1.1 {response.status} {reason}\r\n"
                f"content-type: {response.content_type}\r\n"
                f"content-length: {len(response.body)}\r\n"
                f"connection: {'keep-alive' if keep else 'close'}\r\n\r\n").encode()
        writer.write(head if head_only else head + response.body)

    # --- routes ------------------------------------------------------------
    def handle(self, method: str, target: str, body: bytes, peer: str = "") -> _Response:
        path = target.split("?", 1)[0]
        if path.startswith("/v3/discovery:"):
            kind = path[len("/v3/discovery:"):]
            if kind not in TYPE_URLS:
                raise _HttpError(404, f"no such xDS type {kind!r}")
            if method != "POST":
                raise _HttpError(405, "POST a DiscoveryRequest")
            return self._discovery(kind, body, peer)
        page = _PAGES.get(path)
        if page is None:
            raise _HttpError(404, "not found; try /healthz /readyz /metrics /debug/proxies")
        if method not in ("GET", "HEAD"):
            raise _HttpError(405, "GET only")
        return page(self)

    def _healthz(self) -> _Response:
        return _Response(200, b"ok\n")

    def _readyz(self) -> _Response:
        if self.hub.cache.ready():
            return _Response(200, b"ready\n")
        missing = [s.env for s in self.hub.cache.envs() if s.snapshot is None]
        reason = f"no valid snapshot yet for: {', '.join(missing)}" if missing else "no environments"
        return _Response(503, f"not ready: {reason}\n".encode())

    def _metrics(self) -> _Response:
        return _Response(200, self.hub.metrics.render().encode(),
                         "text/plain; version=0.0.4; charset=utf-8")

    def _debug_proxies(self) -> _Response:
        """Every proxy, and whether it is scoped: its service has an egress in the snapshot it
        is served (else it receives the whole environment)."""
        out = []
        for proxy in self.hub.proxies.all():
            state = self.hub.cache.get(proxy.env)
            scopes = state.snapshot.scopes if state is not None and state.snapshot is not None else None
            out.append({**proxy.as_json(), "scoped": bool(proxy.service and scopes and proxy.service in scopes.egress)})
        return _json(200, out)

    def _debug_snapshots(self) -> _Response:
        return _json(200, self._status_page())

    def _discovery(self, kind: str, body: bytes, peer: str) -> _Response:
        response = self._discovery_response(kind, body, peer)
        self.hub.metrics.inc("meshc_xds_rest_requests_total", type=kind, code=str(response.status))
        return response

    def _discovery_response(self, kind: str, body: bytes, peer: str) -> _Response:
        try:
            request = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _HttpError(400, f"body is not JSON: {exc}") from None
        if not isinstance(request, dict) or not isinstance(request.get("node") or {}, dict):
            raise _HttpError(400, "body is not a DiscoveryRequest")
        node = request.get("node") or {}
        env, node_id = node.get("cluster"), node.get("id") or ""
        if not isinstance(env, str) or not env:
            raise _HttpError(400, "node.cluster (the environment name) is required")
        state = self.hub.cache.get(env)
        if state is None:
            raise _HttpError(404, f"no environment {env!r} (node.cluster)")
        if state.snapshot is None:
            raise _HttpError(503, f"no valid snapshot for environment {env!r} yet")
        type_url = request.get("type_url")
        if type_url and type_url != TYPE_URLS[kind]:
            raise _HttpError(400, f"type_url {type_url!r} posted to /v3/discovery:{kind}")
        metadata = node.get("metadata")
        service = metadata.get("service") if isinstance(metadata, dict) else None
        service = service if isinstance(service, str) else ""
        view: RestKind = state.extras["rest"].kind_for(service, kind)
        names = request.get("resource_names") or []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise _HttpError(400, "resource_names must be a list of strings")
        status = self.hub.proxies.rest_client(str(node_id), env, peer)
        status.service = service
        subscription = (kind, frozenset(names))     # also the key of the memoised body
        version = request.get("version_info") or ""
        self._ack_or_nack(kind, subscription, status, version, request.get("error_detail"))
        current = version == view.version and subscription in status.rest_sent
        if current or status.rest_rejected.get(subscription) == view.version:
            return _Response(304)       # current, or the version it rejected: no resend loop
        # (A subscription this server has not answered yet gets a full answer even
        # if its version matches: its names may be new to it, e.g. after a restart.)
        wildcard = "*" in names or (kind in WILDCARD_KINDS and not names)
        status.rest_sent[subscription] = status.sent[kind] = view.version
        return _Response(200, view.body(None if wildcard else subscription[1]),
                         "application/json")

    def _ack_or_nack(self, kind: str, subscription: tuple, status, version: str,
                     error_detail: object) -> None:
        """Envoy's REST client sets version_info only after applying a response, and
        sends no nonce or error_detail: a poll still carrying an older (non-empty)
        version than the one last sent means that version was rejected."""
        sent = status.rest_sent.get(subscription)
        if sent is None or not version:
            return
        if version == sent:
            if status.acked.get(kind) != version:
                self.hub.metrics.inc("meshc_xds_acks_total", env=status.env, type=kind)
            status.acked[kind] = version
            return
        if status.rest_rejected.get(subscription) == sent:
            return      # the same rejection, seen again on the next poll
        status.rest_rejected[subscription] = sent
        message = (error_detail.get("message") if isinstance(error_detail, dict) else None) or (
            f"not applied: the proxy still reports version {version} "
            f"(REST carries no error detail; see the proxy's log)")
        status.nacks[kind] = Nack(version=sent, nonce="", message=str(message),
                                  at_unix=time.time())
        self.hub.metrics.inc("meshc_xds_nacks_total", env=status.env, type=kind)
        log.warning("proxy %r (rest) did not apply %s version %s: %s (not resending it)",
                    status.node_id, kind, sent[:12], message)


def _json(status: int, value: object) -> _Response:
    return _Response(status, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode(),
                     "application/json")


_PAGES: dict[str, Callable[[HttpServer], _Response]] = {
    "/healthz": HttpServer._healthz,
    "/readyz": HttpServer._readyz,
    "/metrics": HttpServer._metrics,
    "/debug/proxies": HttpServer._debug_proxies,
    "/debug/snapshots": HttpServer._debug_snapshots,
}
