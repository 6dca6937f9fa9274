"""What the server knows about each connected proxy, for /debug/proxies and /metrics.

Owns `ProxyStatus` (one per gRPC stream or REST client) and the `Proxies`
registry. Statuses are mutated by the protocol code on the event-loop thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

__all__ = ["Nack", "ProxyStatus", "Proxies"]

_REST_IDLE_SECONDS = 300.0


@dataclass(frozen=True)
class Nack:
    """A rejected response: the version the proxy refused and Envoy's message."""

    version: str
    nonce: str
    message: str
    at_unix: float


@dataclass(eq=False)   # identity equality: one status per stream
class ProxyStatus:
    node_id: str
    env: str
    protocol: str                      # "ads", "delta-ads", "cds", ..., "rest"
    peer: str = ""
    service: str = ""                  # node metadata `service` ("ns/name"): what scopes what it receives
    connected_unix: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    sent: dict[str, str] = field(default_factory=dict)      # kind → version last sent
    acked: dict[str, str] = field(default_factory=dict)     # kind → version last ACKed
    nacks: dict[str, Nack] = field(default_factory=dict)    # kind → last NACK
    # REST only: per polled subscription (kind, names), the version last sent and
    # the version it did not apply (REST requests carry neither nonce nor error).
    rest_sent: dict[tuple, str] = field(default_factory=dict)
    rest_rejected: dict[tuple, str] = field(default_factory=dict)

    def as_json(self) -> dict:
        return {
            "node_id": self.node_id, "environment": self.env, "protocol": self.protocol,
            "peer": self.peer, "service": self.service, "connected_unix": round(self.connected_unix, 3),
            "sent": dict(sorted(self.sent.items())),
            "acked": dict(sorted(self.acked.items())),
            "last_nack": {kind: {"version": n.version, "nonce": n.nonce, "error": n.message,
                                 "at_unix": round(n.at_unix, 3)}
                          for kind, n in sorted(self.nacks.items())},
        }


class Proxies:
    """Connected streams, plus REST clients seen in the last few minutes."""

    def __init__(self) -> None:
        self._streams: set[ProxyStatus] = set()   # identity hashing: one entry per stream
        self._rest: dict[tuple[str, str, str], ProxyStatus] = {}

    def add(self, status: ProxyStatus) -> None:
        self._streams.add(status)

    def remove(self, status: ProxyStatus) -> None:
        self._streams.discard(status)

    def rest_client(self, node_id: str, env: str, peer: str = "") -> ProxyStatus:
        """The status of a polling client, created on its first request.

        Keyed by node id, environment and client IP: REST carries no stream, and
        NACKs are inferred from the version a client keeps reporting, so two
        proxies must not share a status. (Node ids should be unique anyway; the IP
        tells apart proxies on different hosts that share one.)
        """
        key = (node_id, env, peer)
        status = self._rest.pop(key, None)
        self._prune()
        if status is None:
            status = ProxyStatus(node_id, env, "rest", peer=peer)
        status.last_seen = time.monotonic()
        self._rest[key] = status        # re-inserted: the dict stays in last_seen order
        return status

    def all(self) -> list[ProxyStatus]:
        self._prune()
        return sorted([*self._streams, *self._rest.values()],
                      key=lambda s: (s.env, s.node_id, s.protocol, s.connected_unix))

    def _prune(self) -> None:
        """Forget REST clients idle for `_REST_IDLE_SECONDS`: the oldest are first in `_rest`,
        so each poll costs O(1) plus the clients it drops, and memory stays bounded by
        the clients of the last few minutes whether or not anyone scrapes /metrics."""
        cutoff = time.monotonic() - _REST_IDLE_SECONDS
        while self._rest:
            key, status = next(iter(self._rest.items()))
            if status.last_seen >= cutoff:
                return
            del self._rest[key]
