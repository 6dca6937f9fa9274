"""xDS protocol semantics over real gRPC streams: nonces, ACK/NACK, ordering, wildcards, Delta.

The server runs in-process on ephemeral ports; the client is the generated
gRPC stub driven request by request, so each test states exactly what a
proxy sends and what it must (and must not) receive.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.cluster.v3 import cds_pb2_grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2

from compiler.xds import sample
from compiler.xds.server import Options, ServerThread
from compiler.xds.snapshot import TYPE_URLS

ENV = "demo"
CDS, EDS, LDS, RDS = (TYPE_URLS[k] for k in ("clusters", "endpoints", "listeners", "routes"))
V1, V2, V3 = (sample.cluster_name(v) for v in ("v1", "v2", "v3"))
QUIET = 0.3     # how long "no response" is waited for


def resources(weights=None, extra_backends=()):
    backends = {"v1": ("127.0.0.1", 8001), "v2": ("127.0.0.1", 8002)}
    backends.update({v: ("127.0.0.1", 8100 + i) for i, v in enumerate(extra_backends)})
    return sample.sample_resources(("127.0.0.1", 10000), backends,
                                   weights or {"v1": 90, "v2": 10})


class Client:
    """One stream: `send` a request, `recv` the next response (None after `timeout`)."""

    request_class = discovery_pb2.DiscoveryRequest

    def __init__(self, channel: grpc.Channel, method: str = "sotw", service: str = "ads") -> None:
        self._requests: queue.Queue = queue.Queue()
        self._responses: queue.Queue = queue.Queue()
        if service == "cds":
            stub = cds_pb2_grpc.ClusterDiscoveryServiceStub(channel)
            call = stub.StreamClusters if method == "sotw" else stub.DeltaClusters
        else:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            call = (stub.StreamAggregatedResources if method == "sotw"
                    else stub.DeltaAggregatedResources)
        self.call = call(iter(self._requests.get, None))
        self.error: grpc.RpcError | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for response in self.call:
                self._responses.put(response)
        except grpc.RpcError as exc:
            self.error = exc
        self._responses.put(None)

    def send(self, **fields) -> None:
        self._requests.put(self.request_class(**fields))

    def recv(self, timeout: float = 5):
        try:
            return self._responses.get(timeout=timeout)
        except queue.Empty:
            return None

    def quiet(self) -> bool:
        """True if nothing arrives for a while."""
        return self.recv(QUIET) is None

    def close(self) -> None:
        self._requests.put(None)
        self.call.cancel()


class DeltaClient(Client):
    request_class = discovery_pb2.DeltaDiscoveryRequest

    def __init__(self, channel, service="ads"):
        super().__init__(channel, "delta", service)


NODE = {"id": "p1", "cluster": ENV}


@pytest.fixture
def rendered(tmp_path) -> Path:
    sample.write_snapshot(tmp_path, ENV, resources())
    return tmp_path


@pytest.fixture
def server(rendered):
    with ServerThread(Options(rendered=rendered, grpc_port=0, http_port=0, debounce=0.01)) as s:
        yield s


@pytest.fixture
def channel(server):
    with grpc.insecure_channel(server.grpc_address) as ch:
        yield ch


def publish(server: ServerThread, rendered: Path, res: dict, **kwargs) -> None:
    """Write files and wait until the server has published them."""
    sample.write_snapshot(rendered, ENV, res, **kwargs)
    want = {k: sample.response_document(k, v)["version_info"] for k, v in res.items()}
    deadline = time.monotonic() + 5
    while server.call(lambda: server.server.hub.cache.get(ENV).snapshot.versions()) != want:
        assert time.monotonic() < deadline, "snapshot not published"
        time.sleep(0.01)


def names_of(response) -> list[str]:
    out = []
    for packed in response.resources:
        if packed.type_url == CDS:
            msg = cluster_pb2.Cluster()
            packed.Unpack(msg)
            out.append(msg.name)
        else:
            from envoy.config.endpoint.v3 import endpoint_pb2
            msg = endpoint_pb2.ClusterLoadAssignment()
            packed.Unpack(msg)
            out.append(msg.cluster_name)
    return out


# --- state of the world -------------------------------------------------------

def test_ack_gets_no_response_and_nonces_count_per_stream(channel):
    c = Client(channel)
    c.send(node=NODE, type_url=CDS)
    r1 = c.recv()
    assert names_of(r1) == [V1, V2] and r1.nonce == "1" and len(r1.version_info) == 64
    c.send(type_url=CDS, version_info=r1.version_info, response_nonce=r1.nonce)
    assert c.quiet()
    c.send(type_url=EDS, resource_names=[V1])
    r2 = c.recv()
    assert r2.type_url == EDS and r2.nonce == "2" and names_of(r2) == [V1]
    c.close()


def test_wildcard_forms_for_cds(channel):
    for names in ([], ["*"]):
        c = Client(channel)
        c.send(node=NODE, type_url=CDS, resource_names=names)
        assert names_of(c.recv()) == [V1, V2]
        c.close()


def test_named_subscription_change_is_answered_and_missing_name_sent_when_it_appears(
        channel, server, rendered):
    c = Client(channel)
    c.send(node=NODE, type_url=EDS, resource_names=[V1])
    r = c.recv()
    assert names_of(r) == [V1]
    # ACK with a changed name set: answered with the new set (V3 does not exist yet).
    c.send(type_url=EDS, resource_names=[V1, V3], version_info=r.version_info,
           response_nonce=r.nonce)
    r = c.recv()
    assert names_of(r) == [V1]
    c.send(type_url=EDS, resource_names=[V1, V3], version_info=r.version_info,
           response_nonce=r.nonce)
    assert c.quiet()
    publish(server, rendered, resources(extra_backends=["v3"]))
    r = c.recv()
    assert names_of(r) == [V1, V3]
    c.close()


def test_stale_nonce_is_ignored(channel, server, rendered):
    c = Client(channel)
    c.send(node=NODE, type_url=CDS)
    first = c.recv()
    publish(server, rendered, resources(extra_backends=["v3"]))
    second = c.recv()
    assert names_of(second) == [V1, V2, V3]
    # An ACK of the superseded response (stale nonce), even with other names: ignored.
    c.send(type_url=CDS, version_info=first.version_info, response_nonce=first.nonce,
           resource_names=["x"])
    assert c.quiet()
    c.close()


def test_nack_is_recorded_not_answered_and_not_resent(channel, server, rendered):
    c = Client(channel)
    c.send(node=NODE, type_url=CDS)
    good = c.recv()
    c.send(type_url=CDS, version_info=good.version_info, response_nonce=good.nonce)
    publish(server, rendered, resources(extra_backends=["v3"]))
    bad = c.recv()
    c.send(type_url=CDS, version_info=good.version_info, response_nonce=bad.nonce,
           error_detail=status_pb2.Status(code=3, message="cluster v3: rejected"))
    assert c.quiet()
    status = server.call(lambda: [p.as_json() for p in server.server.hub.proxies.all()])[0]
    assert status["acked"]["clusters"] == good.version_info
    assert status["last_nack"]["clusters"]["version"] == bad.version_info
    assert status["last_nack"]["clusters"]["error"] == "cluster v3: rejected"
    assert server.server.hub.metrics.value("meshc_xds_nacks_total", env=ENV, type="clusters") == 1
    # The next change is pushed.
    publish(server, rendered, resources())
    assert names_of(c.recv()) == [V1, V2]
    c.close()


def test_push_sends_only_changed_types_in_make_before_break_order(channel, server, rendered):
    c = Client(channel)
    c.send(node=NODE, type_url=CDS)
    acks = {}
    for type_url, names in ((CDS, []), (EDS, [V1, V2]), (LDS, []), (RDS, ["9080"])):
        if type_url != CDS:
            c.send(type_url=type_url, resource_names=names)
        r = c.recv()
        assert r.type_url == type_url
        acks[type_url] = r
        c.send(type_url=type_url, resource_names=names, version_info=r.version_info,
               response_nonce=r.nonce)
    assert c.quiet()

    # Only the routes change: only RDS is pushed.
    publish(server, rendered, resources({"v1": 50, "v2": 50}))
    r = c.recv()
    assert r.type_url == RDS and c.quiet()

    # Everything changes (v3 added; listener moves): pushes arrive CDS, EDS, LDS, RDS.
    changed = resources({"v1": 40, "v2": 30, "v3": 30}, extra_backends=["v3"])
    changed["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["stat_prefix"] = "x"
    publish(server, rendered, changed)
    order = [c.recv().type_url for _ in range(4)]
    assert order == [CDS, EDS, LDS, RDS]
    c.close()


def test_unknown_environment_ends_stream_with_not_found(channel):
    c = Client(channel)
    c.send(node={"id": "p9", "cluster": "nowhere"}, type_url=CDS)
    assert c.recv() is None
    assert c.error.code() == grpc.StatusCode.NOT_FOUND
    assert "nowhere" in c.error.details()


def test_missing_node_cluster_is_invalid_argument(channel):
    c = Client(channel)
    c.send(node={"id": "p9"}, type_url=CDS)
    assert c.recv() is None
    assert c.error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_per_type_cds_service(channel):
    c = Client(channel, service="cds")
    c.send(node=NODE)
    assert names_of(c.recv()) == [V1, V2]
    c.close()


def test_unserved_type_is_ignored_not_fatal(channel):
    c = Client(channel)
    c.send(node=NODE, type_url="type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
           resource_names=["default"])
    assert c.quiet()
    c.send(type_url=CDS)
    assert names_of(c.recv()) == [V1, V2]
    c.close()


# --- delta --------------------------------------------------------------------

def delta_names(response) -> list[str]:
    return [r.name for r in response.resources]


def test_delta_sends_only_changes_and_removals(channel, server, rendered):
    c = DeltaClient(channel)
    c.send(node=NODE, type_url=CDS)
    r = c.recv()
    assert delta_names(r) == [V1, V2] and not r.removed_resources
    versions = {x.name: x.version for x in r.resources}
    c.send(type_url=CDS, response_nonce=r.nonce)
    assert c.quiet()

    # Add v3 (v1, v2 unchanged): only v3 is sent.
    publish(server, rendered, resources({"v1": 50, "v2": 25, "v3": 25}, extra_backends=["v3"]))
    r = c.recv()
    assert delta_names(r) == [V3] and not r.removed_resources
    c.send(type_url=CDS, response_nonce=r.nonce)

    # Remove v3 again: only a removal.
    publish(server, rendered, resources())
    r = c.recv()
    assert delta_names(r) == [] and list(r.removed_resources) == [V3]
    assert server.server.hub.metrics.value("meshc_xds_acks_total", env=ENV, type="clusters") >= 2

    # A reconnect that already has v1 at its current version gets only v2.
    c2 = DeltaClient(channel)
    c2.send(node=NODE, type_url=CDS, initial_resource_versions={V1: versions[V1], V3: "old"})
    r = c2.recv()
    assert delta_names(r) == [V2] and list(r.removed_resources) == [V3]
    c.close()
    c2.close()


def test_delta_subscription_change_applies_on_stale_nonce(channel, server, rendered):
    c = DeltaClient(channel)
    c.send(node=NODE, type_url=EDS, resource_names_subscribe=[V1])
    first = c.recv()
    assert delta_names(first) == [V1]
    c.send(type_url=EDS, response_nonce="999", resource_names_subscribe=[V2])  # stale nonce
    r = c.recv()
    assert delta_names(r) == [V2]
    c.send(type_url=EDS, response_nonce=r.nonce, resource_names_unsubscribe=[V1])
    assert c.quiet()
    # An unsubscribed resource's change is not sent; a subscribed one's is.
    res = resources()
    res["endpoints"][0]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"]["port_value"] = 9001          # V1 changes
    publish(server, rendered, res)
    assert c.quiet()
    res["endpoints"][1]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"]["port_value"] = 9002          # V2 changes
    publish(server, rendered, res)
    assert delta_names(c.recv()) == [V2]
    c.close()


def test_delta_nack_is_not_resent(channel, server, rendered):
    c = DeltaClient(channel)
    c.send(node=NODE, type_url=CDS)
    r = c.recv()
    c.send(type_url=CDS, response_nonce=r.nonce)
    publish(server, rendered, resources(extra_backends=["v3"]))
    r = c.recv()
    c.send(type_url=CDS, response_nonce=r.nonce,
           error_detail=status_pb2.Status(code=3, message="no"))
    assert c.quiet()
    status = server.call(lambda: [p.as_json() for p in server.server.hub.proxies.all()])[0]
    assert status["last_nack"]["clusters"]["error"] == "no"
    c.close()


def test_a_proxy_waits_for_the_first_valid_snapshot(tmp_path):
    res = resources()
    broken = {**res, "clusters": [dict(res["clusters"][0], lb_policy=99), res["clusters"][1]]}
    sample.write_snapshot(tmp_path, ENV, broken)
    options = Options(rendered=tmp_path, grpc_port=0, http_port=0, debounce=0.01)
    with ServerThread(options) as server, grpc.insecure_channel(server.grpc_address) as channel:
        c = Client(channel)
        c.send(node=NODE, type_url=CDS)
        assert c.quiet()                    # known environment, nothing valid to send yet
        sample.write_snapshot(tmp_path, ENV, res)
        assert names_of(c.recv()) == [V1, V2]
        c.close()


def test_delta_wildcard_subscribed_later_is_answered(channel):
    c = DeltaClient(channel)
    c.send(node=NODE, type_url=CDS, resource_names_subscribe=[V1])
    r = c.recv()
    assert delta_names(r) == [V1]
    c.send(type_url=CDS, response_nonce=r.nonce, resource_names_subscribe=["*"])
    r = c.recv()
    assert r is not None and r.type_url == CDS, "no answer to the wildcard subscription"
    assert delta_names(r) == [V2] and not r.removed_resources
    c.send(type_url=CDS, response_nonce=r.nonce)
    assert c.quiet()
    # A client that already holds everything is still answered (with nothing new).
    c.send(type_url=EDS, resource_names_subscribe=[V1, V2])
    r = c.recv()
    assert delta_names(r) == [V1, V2]
    c.send(type_url=EDS, response_nonce=r.nonce, resource_names_subscribe=["*"])
    r = c.recv()
    assert r is not None and r.type_url == EDS and delta_names(r) == []
    c.close()


def test_delta_clusters_push_resends_assignments_of_modified_clusters(channel, server, rendered):
    """A modified EDS cluster warms until it hears its assignment again (as SotW re-sends it)."""
    c = DeltaClient(channel)
    c.send(node=NODE, type_url=CDS)
    r = c.recv()
    c.send(type_url=CDS, response_nonce=r.nonce)
    c.send(type_url=EDS, resource_names_subscribe=[V1, V2])
    r = c.recv()
    assert delta_names(r) == [V1, V2]
    c.send(type_url=EDS, response_nonce=r.nonce)
    assert c.quiet()

    res = resources()
    res["clusters"][0]["lb_policy"] = "LEAST_REQUEST"          # V1 changes; no assignment does
    publish(server, rendered, res)
    r = c.recv()
    assert r.type_url == CDS and delta_names(r) == [V1]
    r = c.recv()
    assert r is not None and r.type_url == EDS, "the assignment of the modified cluster is not re-sent"
    assert delta_names(r) == [V1] and not r.removed_resources
    c.send(type_url=EDS, response_nonce=r.nonce)
    assert c.quiet()

    # A push that modifies no cluster re-sends no assignment: only V2's, which changed.
    res["endpoints"][1]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"]["port_value"] = 9002
    publish(server, rendered, res)
    r = c.recv()
    assert r.type_url == EDS and delta_names(r) == [V2]
    assert c.quiet()
    c.close()


def test_delta_push_between_a_publication_and_its_wake_up_sends_a_new_subscription_whole(tmp_path):
    """A Delta push uses the publication's changes only for a client current just before
    it; a name subscribed in between (before the wake-up) is still sent, though unchanged."""
    from compiler.xds.cache import Cache
    from compiler.xds.metrics import Metrics
    from compiler.xds.proxies import Proxies
    from compiler.xds.snapshot import load_snapshot, read_files
    from compiler.xds.stream import DeltaStream, Hub

    sample.write_snapshot(tmp_path, ENV, resources())
    hub = Hub(Cache(), Proxies(), Metrics())
    hub.cache.publish(load_snapshot(ENV, read_files(tmp_path / ENV / "envoy")), 0.0)
    stream = DeltaStream(hub, "ads", lambda: None)
    stream.on_request(discovery_pb2.DeltaDiscoveryRequest(node={"id": "n", "cluster": ENV}, type_url=CDS))
    all_clusters = sorted(hub.cache.get(ENV).snapshot.kinds["clusters"].resources)
    first = all_clusters[0]
    stream.on_request(discovery_pb2.DeltaDiscoveryRequest(type_url=CDS, resource_names_unsubscribe=["*"],
                                                          response_nonce="1"))
    sample.write_snapshot(tmp_path, ENV, resources(extra_backends=("v3",)))  # a cluster added; `first` unchanged
    hub.cache.publish(load_snapshot(ENV, read_files(tmp_path / ENV / "envoy")), 0.0)
    assert hub.cache.get(ENV).changes["clusters"][1] == {V3}
    [answer] = stream.on_request(discovery_pb2.DeltaDiscoveryRequest(type_url=CDS, resource_names_subscribe=[first]))
    response = discovery_pb2.DeltaDiscoveryResponse.FromString(answer)
    assert [r.name for r in response.resources] == [first]


def test_streams_asking_for_the_same_names_share_one_copy(tmp_path):
    from compiler.xds.cache import Cache
    from compiler.xds.metrics import Metrics
    from compiler.xds.proxies import Proxies
    from compiler.xds.snapshot import load_snapshot, read_files
    from compiler.xds.stream import DeltaStream, Hub, SotwStream

    sample.write_snapshot(tmp_path, ENV, resources())
    hub = Hub(Cache(), Proxies(), Metrics())
    hub.cache.publish(load_snapshot(ENV, read_files(tmp_path / ENV / "envoy")), 0.0)
    sotw = [SotwStream(hub, "ads", lambda: None) for _ in range(2)]
    for i, s in enumerate(sotw):
        s.on_request(discovery_pb2.DiscoveryRequest(node={"id": f"s{i}", "cluster": ENV}, type_url=EDS,
                                                    resource_names=[V2, V1]))
    delta = DeltaStream(hub, "ads", lambda: None)
    delta.on_request(discovery_pb2.DeltaDiscoveryRequest(node={"id": "d", "cluster": ENV}, type_url=EDS,
                                                         resource_names_subscribe=[V1, V2]))
    a, b, c = (s._watches["endpoints"].names for s in (*sotw, delta))
    assert a == {V1, V2} and a is b is c


def _assignments(version: int, names) -> object:
    """A snapshot of ClusterLoadAssignments only (enough for a Delta EDS stream), each
    named one at a port that `version` and its name choose."""
    from envoy.config.endpoint.v3 import endpoint_pb2

    from compiler.xds.snapshot import Snapshot, resource, type_snapshot

    made = {}
    for name in names:
        msg = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
        msg.endpoints.add().lb_endpoints.add().endpoint.address.socket_address.port_value = (
            1000 + (version * 7 + int(name[1:]) * 3) % 5)   # a name keeps its version some rounds, not all
        made[name] = resource(name, msg)
    typed = type_snapshot("endpoints", EDS, f"v{version}", made)
    return Snapshot(env=ENV, digest=f"d{version}", kinds={"endpoints": typed})


def test_delta_what_a_stream_holds_follows_every_response():
    """Driven Delta streams, through publications and subscription changes in a seeded
    random order: after each answer, what a client has been sent (applied as Envoy
    applies it) of what it subscribes to is exactly the current snapshot's versions of
    those names, and streams holding exactly one snapshot's resources share that
    snapshot's mapping."""
    import random

    from compiler.xds.cache import Cache
    from compiler.xds.metrics import Metrics
    from compiler.xds.proxies import Proxies
    from compiler.xds.stream import DeltaStream, Hub

    rng = random.Random(13)
    universe = [f"n{i}" for i in range(12)]
    hub = Hub(Cache(), Proxies(), Metrics())
    current = _assignments(0, universe[:8])
    hub.cache.publish(current, 0.0)
    streams, held, wanted = [], [], []
    for i in range(4):
        stream = DeltaStream(hub, "ads", lambda: None)
        first = ["*"] if i == 0 else rng.sample(universe, 6)
        answers = stream.on_request(discovery_pb2.DeltaDiscoveryRequest(
            node={"id": f"p{i}", "cluster": ENV}, type_url=EDS, resource_names_subscribe=first))
        streams.append(stream)
        held.append({})
        wanted.append(set(first))
        _apply(held[i], answers)

    def check() -> None:
        typed = current.kinds["endpoints"].resources
        for i, stream in enumerate(streams):
            names = set(universe) if "*" in wanted[i] else wanted[i]
            got = {n: held[i][n] for n in names if n in held[i]}
            assert got == {n: typed[n].version for n in names if n in typed}, f"stream {i} after step {step}"

    for step in range(200):
        i = rng.randrange(len(streams))
        choice = rng.random()
        if choice < 0.4:
            current = _assignments(step + 1, sorted(rng.sample(universe, rng.randint(5, 10))))
            hub.cache.publish(current, 0.0)
            for j, stream in enumerate(streams):
                _apply(held[j], stream.on_snapshot())
        elif choice < 0.7:
            names = rng.sample(universe, 2) + (["*"] if rng.random() < 0.1 else [])
            wanted[i] |= set(names)
            _apply(held[i], streams[i].on_request(discovery_pb2.DeltaDiscoveryRequest(
                type_url=EDS, resource_names_subscribe=names)))
        else:
            names = rng.sample(sorted(wanted[i] - {"*"}) or universe, 1) + (["*"] if rng.random() < 0.1 else [])
            wanted[i] -= set(names)
            for name in names:
                if "*" not in wanted[i]:
                    held[i].pop(name, None)     # Envoy drops what it no longer subscribes to
            _apply(held[i], streams[i].on_request(discovery_pb2.DeltaDiscoveryRequest(
                type_url=EDS, resource_names_unsubscribe=names)))
        check()

    # Streams that subscribe alike and are current hold the snapshot's own mapping, not a
    # copy each, and hold the next one's after a push.
    alike = []
    for i in range(3):
        stream = DeltaStream(hub, "ads", lambda: None)
        stream.on_request(discovery_pb2.DeltaDiscoveryRequest(
            node={"id": f"q{i}", "cluster": ENV}, type_url=EDS, resource_names_subscribe=universe))
        alike.append(stream)
    for version in (1000, 1001):
        current = _assignments(version, universe[version % 3:])
        hub.cache.publish(current, 0.0)
        for stream in alike:
            stream.on_snapshot()
        mapping = current.kinds["endpoints"].resources
        assert all(s._watches["endpoints"].known._base is mapping and not s._watches["endpoints"].known._own
                   for s in alike)


def _apply(held: dict, answers: list[bytes]) -> None:
    for data in answers:
        response = discovery_pb2.DeltaDiscoveryResponse.FromString(data)
        for name in response.removed_resources:
            held.pop(name, None)
        for r in response.resources:
            held[r.name] = r.version


def test_streams_in_step_share_one_response_and_each_gets_its_own_nonce():
    """Proxies that subscribed alike count their nonces alike: a push to them is one response
    object. One out of step (a request more) gets the same resources under its own nonce."""
    from compiler.xds.cache import Cache
    from compiler.xds.metrics import Metrics
    from compiler.xds.proxies import Proxies
    from compiler.xds.stream import DeltaStream, Hub, SotwStream

    names = [f"n{i}" for i in range(4)]
    hub = Hub(Cache(), Proxies(), Metrics())
    hub.cache.publish(_assignments(0, names), 0.0)
    streams = {}
    for cls in (SotwStream, DeltaStream):
        for i in range(3):
            s = streams[(cls, i)] = cls(hub, "ads", lambda: None)
            node = {"id": f"{cls.__name__}{i}", "cluster": ENV}
            s.on_request(discovery_pb2.DiscoveryRequest(node=node, type_url=EDS, resource_names=names)
                         if cls is SotwStream else
                         discovery_pb2.DeltaDiscoveryRequest(node=node, type_url=EDS, resource_names_subscribe=names))
        if cls is DeltaStream:   # one Delta stream asks for a name more: a response more, its nonces one ahead
            streams[(cls, 2)].on_request(discovery_pb2.DeltaDiscoveryRequest(
                type_url=EDS, resource_names_subscribe=["missing"]))
    hub.cache.publish(_assignments(1, names), 0.0)
    pushed = {key: s.on_snapshot() for key, s in streams.items()}
    assert pushed[(SotwStream, 0)][0] is pushed[(SotwStream, 1)][0] is pushed[(SotwStream, 2)][0]
    assert pushed[(DeltaStream, 0)][0] is pushed[(DeltaStream, 1)][0]
    a, c = (discovery_pb2.DeltaDiscoveryResponse.FromString(pushed[(DeltaStream, i)][0]) for i in (0, 2))
    assert (a.nonce, c.nonce) == ("2", "3")
    assert [r.name for r in a.resources] == [r.name for r in c.resources] and a.resources
    assert discovery_pb2.DiscoveryResponse.FromString(pushed[(SotwStream, 0)][0]).nonce == "2"
