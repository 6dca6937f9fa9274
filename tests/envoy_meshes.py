"""Mesh values for the Envoy target's tests, built with the model's constructors."""

from __future__ import annotations

from dataclasses import replace

from compiler.build import default_routes
from compiler.model import (Address, ConnectionPool, ConsistentHash, Endpoints, EnvoyOptions, Environment,
                            HashOn, HeaderMatch, Ingress, LoadBalancer, MatchKind, Mesh, OutlierDetection,
                            Port, Protocol, Retries, Service, SimpleLb, Tls, TlsMode, Traffic, TrafficShape,
                            Version, WeightedVersion)

__all__ = ["canary", "http", "kitchen_sink", "mesh", "service", "split", "stable"]


def http(number: int = 9080, protocol: Protocol = Protocol.HTTP, name: str = "http") -> Port:
    return Port(name, number, number, protocol)


def service(name: str = "reviews", namespace: str = "bookinfo", *, ports=None, versions=(),
            endpoints: dict | list | None = None, **fields) -> Service:
    """A Service with an FQDN in cluster.local; `endpoints` as the environment file spells it,
    and the default routes of its traffic."""
    svc = Service(
        name=name, namespace=namespace, fqdn=f"{name}.{namespace}.svc.cluster.local",
        selector=(("app", name),), ports=tuple(ports or (http(),)),
        versions=tuple(Version(v, (("version", v),)) for v in versions),
        endpoints=_endpoints(endpoints), **fields)
    return replace(svc, routes=default_routes(svc))


def canary(stable: str, version: str, weight: int, headers: dict[str, tuple[MatchKind, str]] | None = None) -> Traffic:
    match = tuple(HeaderMatch(h, kind, value) for h, (kind, value) in sorted((headers or {}).items()))
    return Traffic(TrafficShape.CANARY, (WeightedVersion(stable, 100 - weight), WeightedVersion(version, weight)),
                   match, version if match else None)


def split(**weights: int) -> Traffic:
    return Traffic(TrafficShape.SPLIT, tuple(WeightedVersion(v, w) for v, w in sorted(weights.items())))


def stable(version: str) -> Traffic:
    return Traffic(TrafficShape.STABLE, (WeightedVersion(version, 100),))


def mesh(*services: Service, address: str = "0.0.0.0", env: str = "test") -> Mesh:
    ordered = tuple(sorted(services, key=lambda s: (s.namespace, s.name)))
    return Mesh(Environment(env, envoy=EnvoyOptions(address)), ordered)


def _endpoints(raw) -> Endpoints:
    if raw is None:
        return Endpoints()
    if isinstance(raw, list):
        return Endpoints(unversioned=tuple(_address(a) for a in raw))
    return Endpoints(by_version=tuple((v, tuple(_address(a) for a in addrs)) for v, addrs in sorted(raw.items())))


def _address(text: str) -> Address:
    host, _, port = text.rpartition(":")
    return Address(host, int(port))


def kitchen_sink(address: str = "0.0.0.0") -> Mesh:
    """Every feature the Envoy target maps, in one mesh (each resource type, each TLS mode)."""
    reviews = service(
        versions=("v1", "v2", "v3"), traffic=canary("v1", "v2", 10, {"x-canary": (MatchKind.EXACT, "on")}),
        endpoints={"v1": ["10.0.1.4:9080"], "v2": ["10.0.1.9:9080"], "v3": ["10.0.1.12:9080"]},
        timeout_ms=4000, retries=Retries(3, 250, ("5xx", "connect-failure", "503")),
        load_balancer=LoadBalancer(simple=SimpleLb.ROUND_ROBIN),
        connection_pool=ConnectionPool(100, 30, 64, 1000, 10, 3),
        outlier_detection=OutlierDetection(7, 300_000, 900_000, 50),
        tls=Tls(TlsMode.ISTIO_MUTUAL, subject_alt_names=("spiffe://cluster.local/ns/bookinfo/sa/reviews",)),
        ingress=Ingress(("reviews.example.com", "*.reviews.example.com"), 8080))
    ratings = service("ratings", ports=(http(9080), http(9090, Protocol.GRPC, "grpc")),
                      endpoints=["10.0.2.4:9080"], traffic=Traffic(),
                      load_balancer=LoadBalancer(consistent_hash=ConsistentHash(HashOn.COOKIE, cookie="user",
                                                                                cookie_ttl_ms=60_000)),
                      tls=Tls(TlsMode.MUTUAL, credential_name="ratings-client", sni="ratings.example.com"))
    details = service("details", versions=("v1", "v2"), traffic=split(v1=80, v2=20),
                      endpoints={"v1": ["localhost:9080"], "v2": ["10.0.3.4:9080"]},
                      load_balancer=LoadBalancer(consistent_hash=ConsistentHash(HashOn.HEADER, header="x-user")),
                      tls=Tls(TlsMode.SIMPLE, credential_name="details-ca"))
    mysql = service("mysql", "db", ports=(http(3306, Protocol.TCP, "tcp"),), versions=("v1", "v2"),
                    traffic=canary("v1", "v2", 25), endpoints={"v1": ["10.0.4.1:3306"], "v2": ["10.0.4.2:3306"]},
                    load_balancer=LoadBalancer(consistent_hash=ConsistentHash(HashOn.SOURCE_IP)),
                    tls=Tls(TlsMode.SIMPLE))
    web = service("web", "front", ports=(http(8000, Protocol.HTTP2),), versions=("v1",), traffic=stable("v1"),
                  endpoints={"v1": ["10.0.5.1:8000"]}, load_balancer=LoadBalancer(simple=SimpleLb.RANDOM),
                  tls=Tls(TlsMode.DISABLE), ingress=Ingress(("web.example.com",), 8080),
                  retries=Retries(0))
    return mesh(reviews, ratings, details, mysql, web, address=address)

