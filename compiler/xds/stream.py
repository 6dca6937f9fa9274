"""The xDS protocol state of one gRPC stream, state-of-the-world and incremental.

Owns what to answer and when: `on_request` takes a decoded request,
`on_snapshot` is called after the proxy's environment published a new
snapshot; both return the serialised responses to write, in order. No I/O
and no gRPC here, so the semantics are unit-testable; `ads.py` does the wiring.

Rules (https://www.envoyproxy.io/docs/envoy/latest/api-docs/xds_protocol, and
istiod's `ShouldRespond`):
- one nonce counter per stream; versions are the snapshot's per-kind content hashes;
- SotW: a request whose nonce is not the latest sent for its kind is stale and
  ignored; an ACK gets no answer unless the subscribed names changed; a NACK
  (`error_detail`) is recorded and gets no answer, so the rejected version is
  not resent: the proxy hears again only when the snapshot changes;
- a new subscription (no nonce) is answered once a snapshot exists, unless
  (SotW) its `version_info` is the snapshot's already: a proxy that reconnects,
  to this replica or another (versions are content hashes, the same on every
  replica), is not sent again what it holds (Delta: `initial_resource_versions`);
- pushes go secrets → clusters → endpoints → listeners → routes, only kinds
  whose version changed (endpoints also after any clusters push: a modified
  EDS cluster warms only once it hears its assignment again);
- a secret asked for that the server lacks is logged, once per stream. Delta
  reports it as not existing, and what needs it starts without it; SotW cannot
  say so for SDS (no response while none of the names asked exists: Envoy
  would refuse an empty answer), and the snapshot's `initial_fetch_timeout`
  (1 s) lets the proxy go on without it. Either way it is applied when it comes;
- Delta: only changed resources plus `removed_resources` (and, after a
  clusters push, the assignments of the EDS clusters it modified); subscription
  changes apply even on a stale nonce, and turning on the wildcard is answered;
  `initial_resource_versions` seeds what the client already has.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from compiler.xds.cache import Cache, EnvState
from compiler.xds.metrics import Metrics
from compiler.xds.proxies import Nack, Proxies, ProxyStatus
from compiler.xds.snapshot import SERVED_ORDER, TYPE_URLS, WILDCARD_KINDS, Resource, TypeSnapshot, kind_of

__all__ = ["DeltaStream", "Hub", "SotwStream", "StreamError", "node_service"]

log = logging.getLogger("meshc.xds")


def node_service(node) -> str:
    """The service a proxy says it runs (node metadata `service`, "ns/name"), or ""."""
    value = node.metadata.fields.get("service") if node.HasField("metadata") else None
    return value.string_value if value is not None and value.HasField("string_value") else ""


class StreamError(Exception):
    """End the stream with this gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Hub:
    """What every stream shares: the snapshots, the proxy registry, the metrics, and one
    copy of each distinct set of subscribed names (a thousand proxies of one service ask for
    the same few thousand names: one set and its strings, not a thousand)."""

    cache: Cache
    proxies: Proxies
    metrics: Metrics
    _names: dict = field(default_factory=dict, repr=False)

    SHARED_SETS = 4096  # distinct subscriptions remembered; past it the oldest is forgotten (still correct)

    def share(self, names: frozenset[str]) -> frozenset[str]:
        """The one copy of `names` every stream that subscribes to them holds."""
        shared = self._names.get(names)
        if shared is None:
            if len(self._names) >= self.SHARED_SETS:
                del self._names[next(iter(self._names))]
            shared = self._names[names] = names
        return shared


class _Known:
    """What a Delta client holds of one kind: name → version, as a small mapping.

    A client mostly holds exactly what one snapshot's kind has of the names it subscribes
    to. That part is the `TypeSnapshot`'s own `resources` (`rebase`), read through the
    subscription it was taken with, and is shared by every client that holds it (a
    thousand proxies hold one); only where a client differs from it is a dict of its own
    (None: a name it does not hold). `get`, `in`, iteration and item assignment read as
    on a dict.
    """

    __slots__ = ("_base", "_names", "_own", "at")

    def __init__(self, initial: Mapping[str, str] | None = None) -> None:
        self._base: Mapping[str, Resource] = {}
        self._names: frozenset[str] | None = None      # the base's names held; None: all of them
        self._own: dict[str, str | None] = dict(initial or {})
        self.at = ""                                   # the version of the kind it is based on

    def _from_base(self, name: str) -> str | None:
        resource = self._base.get(name)
        if resource is None or (self._names is not None and name not in self._names):
            return None
        return resource.version

    def get(self, name: str) -> str | None:
        own = self._own
        return own[name] if name in own else self._from_base(name)

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

    def __setitem__(self, name: str, version: str) -> None:
        if self._from_base(name) == version:
            self._own.pop(name, None)
        else:
            self._own[name] = version

    def discard(self, name: str) -> None:
        if self._from_base(name) is not None:
            self._own[name] = None
        else:
            self._own.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        own, names, base = self._own, self._names, self._base
        held = base if names is None or len(base) <= len(names) else (n for n in names if n in base)
        for name in held:
            if name not in own and (names is None or name in names):
                yield name
        for name, version in own.items():
            if version is not None:
                yield name

    def among(self, names: Iterable[str]) -> set[str]:
        return {n for n in names if n in self}

    def exactly(self, version: str, names: frozenset[str] | None) -> bool:
        """It holds exactly the resources of `names` (None: all) of the kind at `version`."""
        return not self._own and self.at == version and self._names is names

    def rebase(self, typed: TypeSnapshot, names: frozenset[str] | None) -> None:
        """It holds exactly `typed`'s resources of `names` (None: all) now."""
        self._base, self._names, self._own, self.at = typed.resources, names, {}, typed.version


@dataclass
class _Watch:
    wildcard: bool                      # every resource of the kind
    names: frozenset[str]               # explicitly named resources (besides the wildcard)
    nonce: str = ""                     # latest nonce sent for this kind
    version: str = ""                   # latest version sent for this kind
    known: _Known = field(default_factory=_Known)   # Delta: name → version client has
    pushed_for: float = 0.0             # published_at of the snapshot last pushed, until ACKed


class _Stream:
    """What SotW and Delta share: binding to an environment, nonces, ACK/NACK records."""

    def __init__(self, hub: Hub, protocol: str, wake: Callable[[], None], *,
                 kind: str | None = None, peer: str = "") -> None:
        self.hub = hub
        self.protocol = protocol
        self.fixed_kind = kind
        self.status: ProxyStatus | None = None
        self._wake = wake
        self._unwatch: Callable[[], None] | None = None
        self._nonce = 0
        self._peer = peer
        self._watches: dict[str, _Watch] = {}
        self._ignored: set[str] = set()
        self._missing_logged: set[str] = set()

    # --- lifecycle -------------------------------------------------------
    def _bind(self, node) -> None:
        env = node.cluster
        if not env:
            raise StreamError(grpc.StatusCode.INVALID_ARGUMENT,
                              "the first request must carry node.cluster (the environment name)")
        if self.hub.cache.get(env) is None:
            known = ", ".join(s.env for s in self.hub.cache.envs()) or "none"
            log.warning("proxy %r (%s) asked for unknown environment %r; known: %s",
                        node.id, self._peer, env, known)
            raise StreamError(grpc.StatusCode.NOT_FOUND,
                              f"no environment {env!r} (node.cluster) in the rendered "
                              f"directory; known: {known}")
        self.status = ProxyStatus(node.id, env, self.protocol, peer=self._peer, service=node_service(node))
        self.hub.proxies.add(self.status)
        self._unwatch = self.hub.cache.watch(env, self._wake)
        log.info("proxy %r connected over %s for environment %r%s", node.id, self.protocol, env,
                 f" as {self.status.service}" if self.status.service else "")

    def close(self) -> None:
        if self.status is not None:
            self.hub.proxies.remove(self.status)
            log.info("proxy %r disconnected (%s)", self.status.node_id, self.protocol)
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None

    def _kind(self, type_url: str) -> str | None:
        if self.fixed_kind is not None:
            if type_url and type_url != TYPE_URLS[self.fixed_kind]:
                raise StreamError(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"type_url {type_url!r} on the {self.protocol} service")
            return self.fixed_kind
        if not type_url:
            raise StreamError(grpc.StatusCode.INVALID_ARGUMENT,
                              "an aggregated request must carry type_url")
        kind = kind_of(type_url)
        if kind is None and type_url not in self._ignored:
            self._ignored.add(type_url)
            log.warning("proxy %r asked for %s, which this server does not serve; ignored",
                        self.status.node_id, type_url)
        return kind

    def _state(self) -> EnvState:
        return self.hub.cache.get(self.status.env)

    def _typed(self, kind: str) -> TypeSnapshot | None:
        """The current snapshot's resources of `kind`; None before one loads, or for the
        secrets of a snapshot published without them."""
        snapshot = self._state().snapshot
        return snapshot.kind_for(self.status.service, kind) if snapshot is not None else None

    def _note_missing(self, kind: str, names: Iterable[str], typed: TypeSnapshot) -> None:
        if kind != "secrets":
            return
        for name in sorted(set(names) - set(typed.resources) - self._missing_logged):
            self._missing_logged.add(name)
            log.warning("proxy %r asks for secret %r, which is not in the --secrets directory: what uses "
                        "it starts without it (its TLS fails until the secret is served)",
                        self.status.node_id, name)

    def _next_nonce(self) -> str:
        self._nonce += 1
        return str(self._nonce)

    def _labels(self, kind: str) -> dict[str, str]:
        return {"env": self.status.env, "type": kind}

    def _record_ack(self, kind: str, watch: _Watch, version: str) -> None:
        self.status.acked[kind] = version
        self.hub.metrics.inc("meshc_xds_acks_total", **self._labels(kind))
        if watch.pushed_for:
            self.hub.metrics.observe("meshc_xds_push_to_ack_seconds",
                                     time.monotonic() - watch.pushed_for, type=kind)
            watch.pushed_for = 0.0

    def _record_nack(self, kind: str, watch: _Watch, nonce: str, error) -> None:
        nack = Nack(version=watch.version, nonce=nonce, message=error.message, at_unix=time.time())
        self.status.nacks[kind] = nack
        watch.pushed_for = 0.0
        self.hub.metrics.inc("meshc_xds_nacks_total", **self._labels(kind))
        log.warning("proxy %r rejected %s version %s: %s (not resending it)",
                    self.status.node_id, kind, nack.version[:12], error.message)

    def _sent(self, kind: str, watch: _Watch, nonce: str, version: str, push: bool, resources: int) -> None:
        watch.nonce, watch.version = nonce, version
        self.status.sent[kind] = version
        if push:
            watch.pushed_for = self._state().published_at
        self.hub.metrics.inc("meshc_xds_responses_total", **self._labels(kind),
                             reason="push" if push else "request")
        if resources:
            self.hub.metrics.inc("meshc_xds_resources_sent_total", resources, **self._labels(kind))


class SotwStream(_Stream):
    """State of the world: every response carries every subscribed resource of its kind."""

    def on_request(self, req: discovery_pb2.DiscoveryRequest) -> list[bytes]:
        if self.status is None:
            self._bind(req.node)
        kind = self._kind(req.type_url)
        if kind is None:
            return []
        wildcard, names = _sotw_names(kind, req.resource_names)
        names = self.hub.share(names)
        watch = self._watches.get(kind)
        if watch is None or not req.response_nonce:
            watch = self._watches[kind] = _Watch(wildcard, names)
            typed = self._typed(kind)
            if typed is not None and req.version_info and req.version_info == typed.version:
                watch.version = typed.version  # it holds this version already: nothing to send until it changes
                self.status.acked[kind] = typed.version
                return []
            return self._respond(kind, push=False)
        if req.response_nonce != watch.nonce:
            return []           # stale: about a response superseded since
        if req.HasField("error_detail"):
            self._record_nack(kind, watch, req.response_nonce, req.error_detail)
            watch.wildcard, watch.names = wildcard, names
            return []
        self._record_ack(kind, watch, req.version_info)
        if (wildcard, names) != (watch.wildcard, watch.names):
            watch.wildcard, watch.names = wildcard, names
            return self._respond(kind, push=False) if wildcard or names else []
        return []

    def on_snapshot(self) -> list[bytes]:
        out: list[bytes] = []
        clusters_pushed = False
        for kind in SERVED_ORDER:
            watch, typed = self._watches.get(kind), self._typed(kind)
            if watch is None or typed is None or not (watch.wildcard or watch.names):
                continue
            changed = watch.version != typed.version
            if changed or (kind == "endpoints" and clusters_pushed):
                out += self._respond(kind, push=True)
                clusters_pushed = clusters_pushed or kind == "clusters"
        return out

    def _respond(self, kind: str, push: bool) -> list[bytes]:
        typed = self._typed(kind)
        if typed is None:
            return []           # answered by on_snapshot once one loads
        watch = self._watches[kind]
        if kind == "secrets" and not watch.wildcard:
            self._note_missing(kind, watch.names, typed)
            if not watch.names & typed.resources.keys():
                return []       # none of them: Envoy would refuse an answer without its secret
        nonce = self._next_nonce()
        names = None if watch.wildcard else watch.names
        body = typed.shared.get((typed.version, nonce, names), lambda: typed.sotw_body(names)
                                + discovery_pb2.DiscoveryResponse(nonce=nonce).SerializeToString())
        count = len(typed.resources) if watch.wildcard else len(watch.names & typed.resources.keys())
        self._sent(kind, watch, nonce, typed.version, push, count)
        return [body]


class DeltaStream(_Stream):
    """Incremental: only resources the client lacks, and the names it should drop."""

    def on_request(self, req: discovery_pb2.DeltaDiscoveryRequest) -> list[bytes]:
        if self.status is None:
            self._bind(req.node)
        kind = self._kind(req.type_url)
        if kind is None:
            return []
        watch = self._watches.get(kind)
        subscribe = set(req.resource_names_subscribe)
        if watch is None:
            wildcard = "*" in subscribe or (kind in WILDCARD_KINDS and not subscribe)
            watch = self._watches[kind] = _Watch(wildcard, self.hub.share(frozenset(subscribe - {"*"})),
                                                 known=_Known(req.initial_resource_versions))
            return self._respond(kind, push=False, always=True, asked=subscribe)
        wildcard_before = watch.wildcard
        new = self._apply_subscriptions(watch, subscribe, set(req.resource_names_unsubscribe))
        if req.response_nonce and req.response_nonce == watch.nonce:
            if req.HasField("error_detail"):
                self._record_nack(kind, watch, req.response_nonce, req.error_detail)
            else:
                self._record_ack(kind, watch, watch.version)
        if watch.wildcard and not wildcard_before:
            # A wildcard subscription is answered even when the client already has
            # everything, as a first wildcard request is: it may be waiting for it.
            return self._respond(kind, push=False, always=True, asked=new)
        return self._respond(kind, push=False, asked=new) if new else []

    def _apply_subscriptions(self, watch: _Watch, subscribe: set[str],
                             unsubscribe: set[str]) -> set[str]:
        """Update the watch; return the names newly subscribed (to answer now)."""
        if "*" in unsubscribe:
            watch.wildcard = False
        if "*" in subscribe:
            watch.wildcard = True
        new = (subscribe - {"*"}) - watch.names
        if new or unsubscribe & watch.names:
            watch.names = self.hub.share((watch.names | new) - unsubscribe)
        # A re-subscribed name is sent afresh. One unsubscribed that the wildcard still covers
        # is still the client's (Envoy keeps it as a wildcard resource): its removal is owed.
        for name in new | (set() if watch.wildcard else unsubscribe):
            watch.known.discard(name)
        return new

    def on_snapshot(self) -> list[bytes]:
        """Push each kind's changes in SERVED_ORDER; after a clusters push, also the
        assignments of the EDS clusters it modified (as SotW re-sends endpoints),
        because a modified cluster warms until it hears its assignment again."""
        out: list[bytes] = []
        modified: frozenset[str] = frozenset()
        for kind in SERVED_ORDER:
            watch = self._watches.get(kind)
            if watch is None or self._typed(kind) is None:
                continue
            if kind == "clusters":
                modified = frozenset(n for n in self._changed(kind, (), self._candidates(kind)) if n in watch.known)
            out += self._respond(kind, push=True, resend=modified if kind == "endpoints" else ())
        return out

    def _candidates(self, kind: str) -> frozenset[str] | None:
        """The names that can differ for this client: the publication's changes when the
        client was current just before it (computed once for every proxy), else None (all)."""
        watch = self._watches[kind]
        if watch.version == self._typed(kind).version:
            return frozenset()  # current already: only what is asked or resent
        change = self._state().changes.get(kind)
        return change[1] if change is not None and watch.version == change[0] else None

    def _changed(self, kind: str, resend: Iterable[str] = (), pool: frozenset[str] | None = None) -> list[str]:
        """Names (sorted) the client wants and lacks at the current version, plus those
        of `resend` it wants and the snapshot holds; among `pool` only, when given."""
        watch = self._watches[kind]
        resources = self._typed(kind).resources
        resend = set(resend)
        pool = _wanted(watch, resources) if pool is None else {n for n in pool | resend if watch.wildcard or n in watch.names}
        return [n for n in sorted(pool) if n in resources
                and (n in resend or watch.known.get(n) != resources[n].version)]

    def _respond(self, kind: str, push: bool, always: bool = False,
                 asked: Iterable[str] = (), resend: Iterable[str] = ()) -> list[bytes]:
        typed = self._typed(kind)
        if typed is None:
            return []
        watch = self._watches[kind]
        # A push looks at the publication's changes only; an answer to a request, at everything
        # the client subscribes to (its subscription may just have changed).
        pool = self._candidates(kind) if push else None
        # A client holding exactly the snapshot before this publication holds exactly this one
        # once it has the publication's changes (shared again, not its own copy).
        follows = (pool is not None and watch.version != typed.version
                   and watch.known.exactly(watch.version, None if watch.wildcard else watch.names))
        changed = [typed.resources[n] for n in self._changed(kind, resend, pool)]
        removed = {n for n in (watch.known if pool is None else watch.known.among(pool)) if n not in typed.resources
                   and (watch.wildcard or n in watch.names)}
        if kind == "secrets":
            # A secret gone from the directory stays what the proxy had (Envoy would take its
            # removal as no certificate at all); one asked for that it lacks is logged.
            removed = set()
            self._note_missing(kind, asked, typed)
        # A name asked for that does not exist is reported as removed, so the client stops
        # waiting for it (xds_protocol: "resource does not exist"); for a secret, what needs it
        # starts without it, and takes it when it comes.
        removed |= {n for n in asked if n != "*" and n not in typed.resources}
        if not (changed or removed or always):
            self._settle(kind, watch, typed, follows, pool)
            return []
        nonce = self._next_nonce()
        removed_names = tuple(sorted(removed))
        key = (typed.version, nonce, removed_names, tuple(r.name for r in changed))
        body = typed.shared.get(key, lambda: b"".join([
            discovery_pb2.DeltaDiscoveryResponse(system_version_info=typed.version, type_url=typed.type_url,
                                                 nonce=nonce, removed_resources=removed_names).SerializeToString(),
            *(r.delta_field for r in changed)]))
        for resource in changed:
            watch.known[resource.name] = resource.version
        for name in removed:
            watch.known.discard(name)
        self._settle(kind, watch, typed, follows, pool)
        self._sent(kind, watch, nonce, typed.version, push, len(changed))
        return [body]

    def _settle(self, kind: str, watch: _Watch, typed: TypeSnapshot, follows: bool,
                pool: frozenset[str] | None) -> None:
        """After an answer: when the client now holds exactly `typed`'s resources of what it
        subscribes to, that is what it knows (the snapshot's mapping, not a copy). Known
        without looking when it followed a publication; after a full comparison, when it
        holds nothing outside its subscription. Secrets are never removed from a client, so
        what it holds of them stays its own."""
        if kind == "secrets":
            return
        names = None if watch.wildcard else watch.names
        if follows or (pool is None and (watch.wildcard or all(n in names for n in watch.known))):
            watch.known.rebase(typed, names)


def _wanted(watch: _Watch, resources: Mapping[str, object]) -> set[str]:
    """The names a Delta watch subscribes to: its named ones, and all for a wildcard."""
    return set(watch.names) | (set(resources) if watch.wildcard else set())


def _sotw_names(kind: str, names: Iterable[str]) -> tuple[bool, frozenset[str]]:
    """(wildcard, names): wildcard for `*`, or for an empty list on CDS/LDS (the legacy form)."""
    names = frozenset(names)
    wildcard = "*" in names or (kind in WILDCARD_KINDS and not names)
    return wildcard, names - {"*"} if "*" in names else names
