"""Two `meshc serve` replicas on the same files: a proxy carries on when its replica dies.

A real Envoy's ADS cluster lists both replicas. The one it is connected to is
stopped; Envoy reconnects to the other, which agrees on every version (versions
are content hashes of the same files) and so sends it nothing it already holds:
no resource at all, SotW (its `version_info` is the current one) or Delta
(`initial_resource_versions`). Requests through Envoy meanwhile all succeed, and
a change made afterwards reaches it from the surviving replica.
"""

from __future__ import annotations

import copy
import threading
from collections import Counter

import pytest

from compiler.xds import sample
from compiler.xds.server import Options, ServerThread
from compiler.xds.snapshot import KINDS
from support.backends import Backend, free_port, unique_loopback
from support.envoy import Envoy, count_responses

ENV = "replicas"


def _bootstrap(servers: list[ServerThread], delta: bool) -> dict:
    bootstrap = sample.ads_bootstrap("web-1", ENV, ("127.0.0.1", servers[0].server.grpc_port), delta=delta)
    [cluster] = bootstrap["static_resources"]["clusters"]
    [locality] = cluster["load_assignment"]["endpoints"]
    [endpoint] = locality["lb_endpoints"]
    locality["lb_endpoints"] = [endpoint] + [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": s.server.grpc_port}}}}
        for s in servers[1:]]
    return bootstrap


def _connected(server: ServerThread) -> bool:
    return any(p.node_id == "web-1" for p in server.call(server.server.hub.proxies.all))


def _resources_sent(server: ServerThread) -> float:
    metrics = server.server.hub.metrics
    return sum(server.call(lambda kind=kind: metrics.value("meshc_xds_resources_sent_total", env=ENV, type=kind))
               for kind in KINDS)


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_a_proxy_carries_on_from_the_other_replica_with_nothing_sent_again(delta, tmp_path):
    v1, v2 = Backend("v1").start(), Backend("v2").start()
    listen = (unique_loopback(), free_port())
    backends = {"v1": ("127.0.0.1", v1.port), "v2": ("127.0.0.1", v2.port)}
    resources = sample.sample_resources(listen, backends, {"v1": 100, "v2": 0})
    sample.write_snapshot(tmp_path / "rendered", ENV, resources)
    replicas = [ServerThread(Options(rendered=tmp_path / "rendered", grpc_port=0, http_port=0)).start() for _ in range(2)]
    try:
        with Envoy(_bootstrap(replicas, delta), tmp_path / "envoy") as proxy:
            url = f"http://{listen[0]}:{listen[1]}/"
            proxy.wait_until(lambda: count_responses(url, 1) == {"v1": 1}, message="routed by the first snapshot")
            [serving] = [s for s in replicas if _connected(s)]
            [other] = [s for s in replicas if s is not serving]
            assert _resources_sent(other) == 0
            seen, done = Counter(), threading.Event()

            def load() -> None:  # requests all through the failover
                while not done.is_set():
                    seen.update(count_responses(url, 5))

            loader = threading.Thread(target=load)
            loader.start()
            try:
                serving.stop()
                replicas.remove(serving)
                proxy.wait_until(lambda: _connected(other), timeout=15, message="reconnected to the other replica")
                seen.update(count_responses(url, 50))
            finally:
                done.set()
                loader.join()
            assert set(seen) == {"v1"} and sum(seen.values()) >= 50, seen  # not one failed
            assert _resources_sent(other) == 0, "the other replica sent again what the proxy held"
            changed = copy.deepcopy(sample.sample_resources(listen, backends, {"v1": 0, "v2": 100}))
            sample.write_snapshot(tmp_path / "rendered", ENV, changed, only=("routes",))
            proxy.wait_until(lambda: count_responses(url, 1) == {"v2": 1}, message="the change, from the other replica")
            assert _resources_sent(other) >= 1
    finally:
        for server in replicas:
            server.stop()
        v1.stop()
        v2.stop()
