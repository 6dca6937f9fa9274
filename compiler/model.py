"""The mesh model: what every target lowers, and nothing target-shaped.

Values are frozen dataclasses holding tuples, built once per environment by
`compiler.build` from the effective (overlaid, validated) policies. Durations
are whole milliseconds. Each `Service` keeps the source spans of its fields
(`spans`, excluded from equality) so that semantic checks can point at the
line that set a value.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum

from compiler.diagnostics import SpanMap
from compiler.values import is_ip


class Protocol(StrEnum):
    HTTP = "HTTP"
    HTTP2 = "HTTP2"
    GRPC = "GRPC"
    TCP = "TCP"
    TLS = "TLS"  # TCP carrying TLS (proxied as TCP; an external service's TLS is originated by `tls`)


class SimpleLb(StrEnum):
    ROUND_ROBIN = "ROUND_ROBIN"
    LEAST_REQUEST = "LEAST_REQUEST"
    RANDOM = "RANDOM"
    PASSTHROUGH = "PASSTHROUGH"


class HashOn(StrEnum):
    HEADER = "header"
    COOKIE = "cookie"
    SOURCE_IP = "sourceIp"


class H2UpgradePolicy(StrEnum):
    DEFAULT = "DEFAULT"  # the mesh's choice: Istio's default mesh config does not upgrade
    DO_NOT_UPGRADE = "DO_NOT_UPGRADE"
    UPGRADE = "UPGRADE"


class TlsMode(StrEnum):
    DISABLE = "DISABLE"
    SIMPLE = "SIMPLE"
    MUTUAL = "MUTUAL"
    ISTIO_MUTUAL = "ISTIO_MUTUAL"


class MatchKind(StrEnum):
    EXACT = "exact"
    PREFIX = "prefix"
    REGEX = "regex"
    PRESENT = "present"  # headers only: the header is there, whatever its value


class TrafficShape(StrEnum):
    NONE = "none"  # no `traffic`: every request goes to the service as a whole
    STABLE = "stable"  # stable only
    CANARY = "canary"  # stable plus a weighted (and optionally matched) canary
    SPLIT = "split"  # explicit weights per version


@dataclass(frozen=True)
class Port:
    name: str
    number: int
    target_port: int
    protocol: Protocol
    policy: TrafficPolicy | None = None  # the port's own (Istio's portLevelSettings); see Service.policy_for

    @property
    def is_http(self) -> bool:
        return self.protocol not in (Protocol.TCP, Protocol.TLS)


@dataclass(frozen=True)
class Version:
    name: str
    labels: tuple[tuple[str, str], ...]
    policy: TrafficPolicy | None = None  # the subset's own trafficPolicy; see Service.policy_for


@dataclass(frozen=True)
class HeaderMatch:
    header: str
    kind: MatchKind
    value: str


@dataclass(frozen=True)
class WeightedVersion:
    version: str
    weight: int


@dataclass(frozen=True)
class Traffic:
    """Where requests go. `weights` is the one list every target lowers.

    Order of `weights`: stable then canary for a canary; version name order
    for a split. Zero weights are kept here (a 0% canary is a real state a
    reviewer wants to see); targets drop them where their format forbids.
    """

    shape: TrafficShape = TrafficShape.NONE
    weights: tuple[WeightedVersion, ...] = ()
    match: tuple[HeaderMatch, ...] = ()  # requests matching all of these go to `match_version`
    match_version: str | None = None
    plan: "CanaryPlan | None" = None  # the canary's schedule and analysis, for `meshc canary`

    @property
    def stable(self) -> str | None:
        return self.weights[0].version if self.shape in (TrafficShape.STABLE, TrafficShape.CANARY) else None

    @property
    def canary(self) -> WeightedVersion | None:
        return self.weights[1] if self.shape is TrafficShape.CANARY else None


@dataclass(frozen=True)
class CanaryPlan:
    """Delivery through git: the weights a canary moves through, one per `meshc canary` run,
    and what it must show before each (none set: it steps on schedule alone)."""

    steps: tuple[int, ...]
    success_min: float | None = None  # percent of non-5xx responses over the interval
    latency_p99_max_ms: int | None = None
    interval_ms: int | None = None
    min_requests: int = 0  # fewer over the interval: hold
    halted: str | None = None  # a rollback's reason: later runs leave the canary alone


@dataclass(frozen=True)
class StringMatch:
    kind: MatchKind
    value: str = ""  # empty for PRESENT


@dataclass(frozen=True)
class QueryMatch:
    name: str
    kind: MatchKind  # EXACT | REGEX
    value: str


@dataclass(frozen=True)
class RouteMatch:
    """What a request must carry for a route to take it: every condition set here (no path: any)."""

    path: StringMatch | None = None
    methods: tuple[str, ...] = ()
    headers: tuple[HeaderMatch, ...] = ()
    query: tuple[QueryMatch, ...] = ()

    @property
    def is_everything(self) -> bool:
        every_path = self.path in (None, StringMatch(MatchKind.PREFIX, "/"), StringMatch(MatchKind.REGEX, ".*"))
        return every_path and not (self.methods or self.headers or self.query)

    def under(self, prefix: str) -> "RouteMatch | None":
        """This match, taking only paths that start with `prefix` (a shared ingress host's
        path): None when it takes none of them. A regex path has no such form (RE2 has no
        look-ahead): `check` refuses one on a service with ingress paths."""
        path = self.path
        if path is None or (path.kind is MatchKind.PREFIX and prefix.startswith(path.value)):
            return replace(self, path=StringMatch(MatchKind.PREFIX, prefix))  # it takes all of `prefix`
        assert path.kind is not MatchKind.REGEX, "a regex path under ingress paths passed check"
        return self if path.value.startswith(prefix) else None  # an exact path or a longer prefix


@dataclass(frozen=True)
class Rewrite:
    prefix: str | None = None
    regex: str | None = None  # with `substitute`
    substitute: str | None = None
    authority: str | None = None


@dataclass(frozen=True)
class Redirect:
    path: str | None = None
    scheme: str | None = None
    host: str | None = None
    port: int | None = None
    code: int = 301  # Istio's default redirectCode


@dataclass(frozen=True)
class DirectResponse:
    status: int
    body: str | None = None


@dataclass(frozen=True)
class Fault:
    delay_ms: int | None = None
    delay_percent: float = 100
    abort_status: int | None = None  # an HTTP status, or
    abort_grpc_status: str | None = None  # a gRPC status name (UNAVAILABLE)
    abort_percent: float = 100


@dataclass(frozen=True)
class Mirror:
    """A copy of each request (of `percent` of them) to a version of this or another service."""

    service: str  # namespace/name
    fqdn: str
    version: str | None = None
    percent: float = 100


@dataclass(frozen=True)
class HeaderOps:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True)
class Headers:
    request: HeaderOps = HeaderOps()
    response: HeaderOps = HeaderOps()


@dataclass(frozen=True)
class Cors:
    allow_origins: tuple[StringMatch, ...] = ()
    allow_methods: tuple[str, ...] = ()
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    max_age_ms: int | None = None
    allow_credentials: bool | None = None


@dataclass(frozen=True)
class Route:
    """One HTTP route, in the order routes are tried; what it leaves out it took from the service.

    Exactly one action: `traffic` (where the request goes), `redirect` or
    `direct_response`. `source` is where the route was written, spec-relative:
    `("routes", NAME)` for a named route, `()` for the service's default routes.
    """

    name: str
    match: RouteMatch = RouteMatch()
    traffic: "Traffic | None" = None
    redirect: Redirect | None = None
    direct_response: DirectResponse | None = None
    rewrite: Rewrite | None = None
    timeout_ms: int | None = None
    retries: "Retries | None" = None
    headers: Headers | None = None
    cors: Cors | None = None
    fault: Fault | None = None
    mirror: Mirror | None = None
    source: tuple = ()


@dataclass(frozen=True)
class Retries:
    attempts: int
    per_try_timeout_ms: int | None = None
    retry_on: tuple[str, ...] = ()


@dataclass(frozen=True)
class ConsistentHash:
    on: HashOn
    header: str | None = None
    cookie: str | None = None
    cookie_ttl_ms: int | None = None
    cookie_path: str | None = None


@dataclass(frozen=True)
class LoadBalancer:
    """`simple` or `consistent_hash` or neither (the default balancer); `warmup_ms` only without a hash."""

    simple: SimpleLb | None = None
    consistent_hash: ConsistentHash | None = None
    warmup_ms: int | None = None  # slow start of new endpoints (ROUND_ROBIN, LEAST_REQUEST)


@dataclass(frozen=True)
class TcpKeepalive:
    """SO_KEEPALIVE on upstream connections; what is unset is the OS default. Whole seconds, in ms."""

    time_ms: int | None = None
    interval_ms: int | None = None
    probes: int | None = None


@dataclass(frozen=True)
class ConnectionPool:
    max_connections: int | None = None
    connect_timeout_ms: int | None = None
    http1_max_pending_requests: int | None = None
    http2_max_requests: int | None = None
    max_requests_per_connection: int | None = None
    max_retries: int | None = None
    tcp_keepalive: TcpKeepalive | None = None
    idle_timeout_ms: int | None = None  # HTTP: an upstream connection idle this long is closed
    h2_upgrade_policy: H2UpgradePolicy | None = None

    @property
    def http_settings(self) -> tuple:
        """The settings that mean something for HTTP only, each None when unset."""
        return (self.http1_max_pending_requests, self.http2_max_requests, self.max_requests_per_connection,
                self.max_retries, self.idle_timeout_ms, self.h2_upgrade_policy)


@dataclass(frozen=True)
class OutlierDetection:
    consecutive_5xx_errors: int | None = None
    interval_ms: int | None = None
    base_ejection_time_ms: int | None = None
    max_ejection_percent: int | None = None


@dataclass(frozen=True)
class Tls:
    mode: TlsMode
    credential_name: str | None = None  # Kubernetes secret with the client cert (SIMPLE/MUTUAL)
    sni: str | None = None
    subject_alt_names: tuple[str, ...] = ()

    @property
    def sidecar_credential(self) -> str | None:
        """The Secret a caller's sidecar presents (MUTUAL) or verifies the server with (SIMPLE)."""
        return self.credential_name if self.mode in (TlsMode.SIMPLE, TlsMode.MUTUAL) else None


@dataclass(frozen=True)
class TrafficPolicy:
    """A DestinationRule trafficPolicy: four fields, each None when unset."""

    load_balancer: LoadBalancer | None = None
    connection_pool: ConnectionPool | None = None
    outlier_detection: OutlierDetection | None = None
    tls: Tls | None = None

    def over(self, base: "TrafficPolicy") -> "TrafficPolicy":
        """This policy, with each field it leaves unset taken whole from `base`."""
        return TrafficPolicy(*(mine if mine is not None else theirs for mine, theirs in zip(self.fields, base.fields)))

    @property
    def fields(self) -> tuple:
        """The four fields in declaration order: load balancer, connection pool, outlier detection, TLS."""
        return self.load_balancer, self.connection_pool, self.outlier_detection, self.tls


@dataclass(frozen=True)
class Ingress:
    hosts: tuple[str, ...]
    port: int
    paths: tuple[str, ...] = ()  # path prefixes taken on the hosts; none: what no other service takes
    tls: "IngressTls | None" = None  # the gateway terminates TLS on `port`
    https_redirect: bool = False  # port 80 answers 301 to https for the hosts


@dataclass(frozen=True)
class IngressTls:
    mode: str  # SIMPLE | MUTUAL (the client presents a certificate too)
    credential_name: str  # the gateway's certificate: SDS `kubernetes://<name>`, its CA `<name>-cacert`

    def __str__(self) -> str:
        return f"TLS {self.mode} ({self.credential_name})"


@dataclass(frozen=True)
class External:
    """A service outside the mesh (a ServiceEntry, MESH_EXTERNAL): its host, and how its
    addresses are found: DNS (the host itself) or STATIC (the environment's endpoints)."""

    host: str
    resolution: str  # DNS | STATIC


@dataclass(frozen=True)
class Address:
    """An endpoint: an IP address or a DNS name, and a port."""

    host: str
    port: int

    @property
    def is_ip(self) -> bool:
        return is_ip(self.host)


def calls(egress: tuple[str, ...] | list[str], key: str) -> bool:
    """Whether an `egress` list names the service `key` ("ns/name"), or its namespace ("ns/*")."""
    return key in egress or f"{key.split('/')[0]}/*" in egress


def port_address(address: "Address", port: Port, ports: tuple[Port, ...]) -> "Address":
    """Where `port` of a service is reached at one of its endpoints. With one port, at the
    address as written. With several, the address is its endpoint's, and its port that of the
    service port whose targetPort it is (else of the first port); each other port is reached
    at the endpoint's host on its own targetPort, as a pod serves each of its ports."""
    if len(ports) < 2:
        return address
    owner = next((p for p in ports if p.target_port == address.port), ports[0])
    return address if port is owner else Address(address.host, port.target_port)


@dataclass(frozen=True)
class Endpoints:
    """Addresses behind a service in one environment.

    `by_version` maps a version name to its addresses (sorted by version);
    `unversioned` holds the addresses of a service without versions.
    """

    by_version: tuple[tuple[str, tuple[Address, ...]], ...] = ()
    unversioned: tuple[Address, ...] = ()

    def all(self) -> tuple[Address, ...]:
        return self.unversioned + tuple(a for _, addrs in self.by_version for a in addrs)

    def of(self, version: str) -> tuple[Address, ...]:
        return dict(self.by_version).get(version, ())


@dataclass(frozen=True)
class Service:
    name: str
    namespace: str
    fqdn: str
    selector: tuple[tuple[str, str], ...]
    ports: tuple[Port, ...]
    versions: tuple[Version, ...] = ()
    traffic: Traffic = Traffic()
    timeout_ms: int | None = None
    retries: Retries | None = None
    load_balancer: LoadBalancer | None = None
    connection_pool: ConnectionPool | None = None
    outlier_detection: OutlierDetection | None = None
    tls: Tls | None = None
    ingress: Ingress | None = None
    endpoints: Endpoints = Endpoints()
    headers: Headers | None = None
    cors: Cors | None = None
    fault: Fault | None = None
    mirror: Mirror | None = None
    routes: tuple[Route, ...] = ()  # every HTTP route in order: named ones, then the default ones
    external: External | None = None  # outside the mesh: `fqdn` is its host, `selector` empty
    egress: tuple[str, ...] | None = None  # the services it calls (`ns/name`, `ns/*`); None: every one
    spans: SpanMap = field(default_factory=SpanMap, compare=False, repr=False)

    @property
    def key(self) -> str:
        """`namespace/name`, the key environments use for overrides and endpoints."""
        return f"{self.namespace}/{self.name}"

    @property
    def http_ports(self) -> tuple[Port, ...]:
        return tuple(p for p in self.ports if p.is_http)

    def version(self, name: str) -> Version | None:
        return next((v for v in self.versions if v.name == name), None)

    @property
    def policy(self) -> TrafficPolicy:
        """The service's own traffic policy (the DestinationRule's top-level trafficPolicy)."""
        return TrafficPolicy(self.load_balancer, self.connection_pool, self.outlier_detection, self.tls)

    def tls_settings(self) -> list[tuple[tuple, Tls]]:
        """Every `tls` its DestinationRule carries, with where the policy says it: the
        service's own, each port's, each version's."""
        holders = [(("tls",), self.tls)]
        holders += [(("ports", i, "policy", "tls"), p.policy.tls) for i, p in enumerate(self.ports) if p.policy]
        holders += [(("versions", v.name, "policy", "tls"), v.policy.tls) for v in self.versions if v.policy]
        return [(path, tls) for path, tls in holders if tls is not None]

    def policy_for(self, port: Port, version: str = "") -> TrafficPolicy:
        """The traffic policy of the clusters of one port and version ("" for the whole service), as istiod merges it.

        A port's policy replaces the service's on that port entirely: what it leaves
        unset is the default, not the service's (`GetPortLevelTrafficPolicy`). A
        version's policy then replaces each field it sets, whole (a `connectionPool`
        of its own replaces the inherited one, `tcp` and `http` alike), and takes the
        rest from there (`MergeSubsetTrafficPolicy`):
        https://github.com/istio/istio/blob/master/pilot/pkg/networking/util/util.go
        """
        base = port.policy if port.policy is not None else self.policy
        own = self.version(version).policy if version else None
        return base if own is None else own.over(base)


#: The kinds a patch may target in the Envoy snapshot (the rest are the Istio output's).
ENVOY_PATCH_KINDS = ("Cluster", "ClusterLoadAssignment", "Listener", "RouteConfiguration")


@dataclass(frozen=True)
class PatchTarget:
    kind: str
    namespace: str | None
    name: str


@dataclass(frozen=True)
class Patch:
    """An RFC 6902 patch on a generated object: an Istio one (applied by the Istio target) or,
    for `ENVOY_PATCH_KINDS`, an Envoy resource (applied by the Envoy target)."""

    index: int  # position in the environment's `patches` list, for messages
    target: PatchTarget
    ops: tuple  # the JSON-Patch operations, as loaded (dicts of plain values)
    spans: SpanMap = field(default_factory=SpanMap, compare=False, repr=False)


@dataclass(frozen=True)
class EnvoyOptions:
    listener_address: str = "0.0.0.0"  # where the sidecar/edge listeners bind


@dataclass(frozen=True)
class Environment:
    name: str
    cluster_domain: str = "cluster.local"
    gateway_selector: tuple[tuple[str, str], ...] = (("istio", "ingressgateway"),)
    patches: tuple[Patch, ...] = ()
    envoy: EnvoyOptions = EnvoyOptions()
    spans: SpanMap = field(default_factory=SpanMap, compare=False, repr=False)


@dataclass(frozen=True)
class Mesh:
    """One environment's services, sorted by (namespace, name)."""

    environment: Environment
    services: tuple[Service, ...]

    def service(self, key: str) -> Service | None:
        return next((s for s in self.services if s.key == key), None)

