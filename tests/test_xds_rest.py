"""The HTTP port: REST-JSON discovery (304s, rewrites, NACKs), health, metrics, limits, CLI."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from compiler.xds import sample
from compiler.xds.proxies import Proxies
from compiler.xds.server import Options, ServerThread

ENV = "demo"
ROOT = Path(__file__).resolve().parents[1]
V1, V2 = sample.cluster_name("v1"), sample.cluster_name("v2")


def resources(weights=None):
    return sample.sample_resources(("127.0.0.1", 10000),
                                   {"v1": ("127.0.0.1", 8001), "v2": ("127.0.0.1", 8002)},
                                   weights or {"v1": 90, "v2": 10})


@pytest.fixture
def server(tmp_path):
    sample.write_snapshot(tmp_path, ENV, resources())
    with ServerThread(Options(rendered=tmp_path, grpc_port=0, http_port=0, debounce=0.01,
                              rest_xds_cluster="my_xds", rest_refresh_delay="0.5s")) as s:
        yield s


def discover(server, kind: str, node_id: str = "r1", **fields) -> requests.Response:
    body = {"node": {"id": node_id, "cluster": ENV}, **fields}
    return requests.post(f"{server.http_url}/v3/discovery:{kind}", data=json.dumps(body),
                         timeout=5)


def test_rest_response_then_304_when_current(server):
    first = discover(server, "clusters")
    assert first.status_code == 200
    doc = first.json()
    assert [r["name"] for r in doc["resources"]] == [V1, V2]
    again = discover(server, "clusters", version_info=doc["version_info"])
    assert again.status_code == 304 and again.content == b""
    # A client this server never answered (e.g. after a restart) gets a full answer.
    fresh = discover(server, "clusters", node_id="r9", version_info=doc["version_info"])
    assert fresh.status_code == 200


def test_the_first_poll_builds_the_rest_view_off_the_event_loop(tmp_path, monkeypatch):
    """Until a REST client polls, no REST view is built; the first poll builds it on a
    worker thread, so the event loop (every gRPC stream) does not wait for it."""
    from compiler.xds import server as server_module
    built_on = []
    build = server_module.RestView.build
    monkeypatch.setattr(server_module.RestView, "build", classmethod(
        lambda cls, *args: built_on.append(threading.get_ident()) or build(*args)))
    sample.write_snapshot(tmp_path, ENV, resources())
    with ServerThread(Options(rendered=tmp_path, grpc_port=0, http_port=0)) as server:
        assert built_on == []
        assert discover(server, "clusters").status_code == 200
        loop_thread = server.call(threading.get_ident)
        assert len(built_on) == 1 and built_on[0] != loop_thread


def test_rest_rewrites_ads_config_sources(server):
    rest_source = {"api_config_source": {"api_type": "REST", "transport_api_version": "V3",
                                         "cluster_names": ["my_xds"], "refresh_delay": "0.5s"},
                   "resource_api_version": "V3"}
    cluster = discover(server, "clusters").json()["resources"][0]
    assert cluster["eds_cluster_config"]["eds_config"] == rest_source
    listener = discover(server, "listeners").json()["resources"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["rds"]["config_source"] == rest_source


def test_rest_named_types_return_only_what_is_asked(server):
    doc = discover(server, "endpoints", resource_names=[V2, "not-there"]).json()
    assert [r["cluster_name"] for r in doc["resources"]] == [V2]
    assert discover(server, "routes", resource_names=["9080"]).json()["resources"][0]["name"] == "9080"


def test_rest_rejected_version_is_not_resent(server, tmp_path):
    """Envoy's REST client keeps its old version_info after rejecting a response."""
    good = discover(server, "clusters").json()["version_info"]
    sample.write_snapshot(tmp_path, ENV, resources({"v1": 50, "v2": 50}) | {
        "clusters": [dict(c, connect_timeout="2s") for c in resources()["clusters"]]})
    deadline = time.monotonic() + 5
    while (r := discover(server, "clusters", version_info=good)).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    bad = r.json()["version_info"]
    # The proxy polls again still on `good`: it did not apply `bad`. 304, and a NACK recorded.
    for _ in range(3):
        assert discover(server, "clusters", version_info=good).status_code == 304
    proxy = requests.get(server.http_url + "/debug/proxies", timeout=5).json()[0]
    assert proxy["last_nack"]["clusters"]["version"] == bad
    assert proxy["acked"]["clusters"] == good
    assert server.server.hub.metrics.value("meshc_xds_nacks_total", env=ENV, type="clusters") == 1
    # Another proxy (or a fresh subscription) still gets it.
    assert discover(server, "clusters", node_id="r2").status_code == 200


@pytest.mark.parametrize("body, status", [
    (b"{not json", 400),
    (b"[]", 400),
    (json.dumps({"node": {"id": "x"}}).encode(), 400),
    (json.dumps({"node": {"id": "x", "cluster": "nowhere"}}).encode(), 404),
    (json.dumps({"node": {"id": "x", "cluster": ENV},
                 "type_url": sample.TYPE_URLS["routes"]}).encode(), 400),
])
def test_rest_bad_requests(server, body, status):
    response = requests.post(server.http_url + "/v3/discovery:clusters", data=body, timeout=5)
    assert response.status_code == status, response.text


def test_rest_limits_and_methods(server):
    host, port = server.server.options.http_host, server.server.http_port
    with socket.create_connection((host, port)) as sock:
        sock.sendall(b"POST /v3/discovery:clusters HTTP/1.1\r\nhost: x\r\n"
                     b"content-length: 999999999\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 413")
    assert requests.get(server.http_url + "/v3/discovery:clusters", timeout=5).status_code == 405
    assert requests.post(server.http_url + "/v3/discovery:secrets", data=b"{}",
                         timeout=5).status_code == 404
    assert requests.get(server.http_url + "/../../etc/passwd", timeout=5).status_code == 404


@pytest.mark.parametrize("declared", [b"\xb2", b"-1", b"1_0", b"0x10"],
                         ids=["superscript-two", "negative", "underscore", "hex"])
def test_rest_malformed_content_length_is_400(server, declared):
    """"²" passes str.isdigit() but not int(): it must be refused, not crash the connection."""
    host, port = server.server.options.http_host, server.server.http_port
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(b"POST /v3/discovery:clusters HTTP/1.1\r\nhost: x\r\n"
                     b"content-length: " + declared + b"\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400")
    assert discover(server, "clusters").status_code == 200


def test_rest_slow_body_times_out(server, monkeypatch):
    monkeypatch.setattr("compiler.xds.rest._BODY_SECONDS", 0.3, raising=False)
    host, port = server.server.options.http_host, server.server.http_port
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(b"POST /v3/discovery:clusters HTTP/1.1\r\nhost: x\r\n"
                     b"content-length: 100\r\n\r\n{\"node\":")     # 9 of 100 bytes, then silence
        started = time.monotonic()
        assert sock.recv(100).startswith(b"HTTP/1.1 408")
        assert time.monotonic() - started < 3
        while sock.recv(4096):      # and the connection is closed
            pass


def test_idle_rest_clients_are_forgotten_on_the_next_poll(monkeypatch):
    """Not only when /metrics or /debug/proxies is read: memory stays bounded."""
    monkeypatch.setattr("compiler.xds.proxies._REST_IDLE_SECONDS", 0.2)
    proxies = Proxies()
    for i in range(100):
        proxies.rest_client(f"old-{i}", ENV, "127.0.0.1")
    kept = proxies.rest_client("busy", ENV, "127.0.0.1")
    time.sleep(0.15)
    assert proxies.rest_client("busy", ENV, "127.0.0.1") is kept     # touched: stays
    time.sleep(0.1)
    proxies.rest_client("new", ENV, "127.0.0.1")
    assert sorted(key[0] for key in proxies._rest) == ["busy", "new"]   # no scrape needed
    assert [p.node_id for p in proxies.all()] == ["busy", "new"]


def test_health_ready_metrics(server):
    assert requests.get(server.http_url + "/healthz", timeout=5).text == "ok\n"
    assert requests.get(server.http_url + "/readyz", timeout=5).status_code == 200
    discover(server, "clusters")
    text = requests.get(server.http_url + "/metrics", timeout=5).text
    for line in text.splitlines():
        assert line.startswith("#") or re.fullmatch(r'[a-z_]+(\{[^}]*\})? [0-9.e+-]+', line), line
    assert 'meshc_xds_connected_proxies{env="demo",protocol="rest"} 1' in text
    assert 'meshc_xds_snapshot_info{env="demo",type="clusters",version="' in text


# --- the command line -------------------------------------------------------------

def _meshc_serve(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "compiler.xds", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.parametrize("args, message", [
    (["--rendered", "/nonexistent/dir"], "--rendered /nonexistent/dir: not a directory"),
    (["--grpc", "nonsense"], "expected HOST:PORT"),
    (["--tls-cert", "cert.pem"], "--tls-cert and --tls-key go together"),
])
def test_cli_usage_errors_exit_2_without_traceback(tmp_path, args, message):
    proc = _meshc_serve("--rendered", str(tmp_path), *args)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 2
    assert message in err and "Traceback" not in err
    assert "error:" in err.strip().splitlines()[-1]


def test_cli_serves_and_stops_on_sigterm(tmp_path):
    sample.write_snapshot(tmp_path, ENV, resources())
    proc = _meshc_serve("--rendered", str(tmp_path), "--grpc", "127.0.0.1:0",
                        "--http", "127.0.0.1:0")
    try:
        line = ""
        while "serving" not in line:
            line = proc.stderr.readline()
            assert line, "server exited before serving"
        http_port = int(re.search(r"HTTP on 127\.0\.0\.1:(\d+)", line).group(1))
        assert requests.get(f"http://127.0.0.1:{http_port}/readyz", timeout=5).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert proc.returncode == 0


def test_cli_port_in_use_is_a_usage_error(tmp_path):
    sample.write_snapshot(tmp_path, ENV, resources())
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _meshc_serve("--rendered", str(tmp_path), "--grpc", "127.0.0.1:0",
                            "--http", f"127.0.0.1:{port}")
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 2 and "error:" in err and "Traceback" not in err
