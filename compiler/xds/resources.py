"""What the files between the compiler and the server are: the xDS types by kind, and the
version rule. The Envoy target writes `envoy/<kind>.json` by these; `meshc serve` reads and
checks them by the same. A leaf: it imports only `compiler.emit`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from compiler.emit import json_bytes, json_text

__all__ = ["CLUSTER", "ENDPOINTS", "HCM", "LISTENER", "ROUTES", "SECRET", "TCP_PROXY", "TYPE_URLS", "content_version",
           "discovery_response", "file_version", "versioned_json"]

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINTS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTES = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
#: Served by `meshc serve --secrets` from disk, never written to a file.
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

#: Short kind (the file stem `envoy/<kind>.json`) → type URL.
TYPE_URLS: Mapping[str, str] = {"clusters": CLUSTER, "endpoints": ENDPOINTS, "listeners": LISTENER, "routes": ROUTES}

#: The filters whose references the consistency check follows.
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"


def content_version(type_url: str, resources: Sequence) -> str:
    """The `version_info` of one type's DiscoveryResponse file: SHA-256 of the file's own
    JSON without it, `json.dumps({"resources": resources, "type_url": type_url}, indent=2,
    sort_keys=True, ensure_ascii=False) + "\\n"`, as `compiler.emit.json_bytes` writes it
    (the same bytes for everything meshc emits; the two spell some floats differently, and
    meshc emits none). The compiler writes versions by this rule and the server checks them
    by it, so a hand edit is caught.
    """
    return file_version({"resources": list(resources), "type_url": type_url})


def file_version(rest: Mapping) -> str:
    """The `version_info` of any file meshc versions (a DiscoveryResponse, `envoy/scopes.json`):
    SHA-256 of the file's own JSON without it, as `compiler.emit.json_bytes` writes it."""
    return hashlib.sha256(json_bytes(dict(rest))).hexdigest()


def discovery_response(type_url: str, resources: list) -> bytes:
    """The file's bytes, `version_info` by `content_version`: the file's own text up to its
    last key (`version_info` sorts last) is the JSON that rule hashes, so it is hashed as
    written. `resources` may hold `emit.Piece`s. Megabytes long: put together with one copy."""
    return versioned_json({"resources": resources, "type_url": type_url})


def versioned_json(rest: dict) -> bytes:
    """`rest` as a file, with `version_info` (which sorts after every key of `rest`) by
    `file_version`: the file's own text up to its last key is the JSON that rule hashes."""
    assert all(key < "version_info" for key in rest)
    body = json_text(rest)  # ends "\n}"
    digest = hashlib.sha256(body)
    digest.update(b"\n")
    tail = b',\n  "version_info": "' + digest.hexdigest().encode() + b'"\n}\n'
    return b"".join((memoryview(body)[: -len(b"\n}")], tail))
