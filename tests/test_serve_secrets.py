"""`meshc serve --secrets DIR`: a real Envoy speaks mutual TLS with the certificates served.

A root CA and certificates are made in the test (`support.pki`). The
workload certificate (`DIR/default/`, SPIFFE ID `.../sa/web`) is served over
SDS on the same ADS stream as the snapshot, SotW and Delta. Behind Envoy a
real HTTPS backend demands a client certificate signed by the root; it
records the SNI and the client's SPIFFE ID of every connection and closes
each after one response, so every request is a new TLS handshake.
"""

from __future__ import annotations

import http.client
import logging
import os
import shutil
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
import yaml

from compiler.cli import main
from compiler.load import Source
from compiler.pipeline import compile_source
from compiler.xds import sample, secrets
from compiler.xds.server import Options, ServerThread
from support.backends import Backend, unique_loopback
from support.envoy import Envoy
from support.pki import CA, peer_uris, server_context, write_secret

WEB = "spiffe://cluster.local/ns/shop/sa/web"
API = "spiffe://cluster.local/ns/shop/sa/api"
ENV, MISSING_ENV = "mtls", "missing"
SHOP, HTTPS_PORT, BANK_PORT = "shop.example.com", 8443, 9443


class TlsBackend:
    """An HTTPS server (asking for a client certificate where `context` says); `seen` is (SNI,
    client URIs) per connection, `alpn` the protocol each negotiated."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.seen: list[tuple[str | None, list[str]]] = []
        self.alpn: list[str | None] = []
        backend = self
        context.set_alpn_protocols(["istio-peer-exchange", "istio", "http/1.1"])

        def on_sni(sock, name, _context):
            sock.sni = name

        context.sni_callback = on_sni

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                peer = self.connection.getpeercert(binary_form=True)
                backend.seen.append((getattr(self.connection, "sni", None), peer_uris(peer) if peer else []))
                backend.alpn.append(self.connection.selected_alpn_protocol())
                body = b"api"
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.send_header("connection", "close")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self):
                sock, address = self.socket.accept()
                return context.wrap_socket(sock, server_side=True), address

            def handle_error(self, request, client_address):
                pass  # a handshake Envoy gives up on is part of the test, not noise

        self.server = Server(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _policy(name: str, tls: dict | None = None, **spec) -> bytes:
    return yaml.safe_dump({"apiVersion": "meshc.dev/v1", "kind": "TrafficPolicy",
                           "metadata": {"name": name, "namespace": "shop"},
                           "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 8080, "protocol": "HTTP"}],
                                    **({"tls": tls} if tls else {}), **spec}}).encode()


def _environment(name: str, address: str, endpoints: dict) -> bytes:
    return yaml.safe_dump({"apiVersion": "meshc.dev/v1", "kind": "Environment", "metadata": {"name": name},
                           "spec": {"envoy": {"listenerAddress": address}, "endpoints": endpoints}}).encode()


def _external(name: str, host: str, resolution: str, port: dict, tls: dict | None = None) -> bytes:
    return yaml.safe_dump({"apiVersion": "meshc.dev/v1", "kind": "TrafficPolicy",
                           "metadata": {"name": name, "namespace": "shop"},
                           "spec": {"external": {"hosts": [host], "resolution": resolution}, "ports": [port],
                                    **({"tls": tls} if tls else {})}}).encode()


def _render(tmp, address: str, missing_address: str, backend: str, web: str, bank: str):
    """Two environments: `mtls` (api verifies the backend's SPIFFE ID; other expects another one;
    web is reached at the gateway over HTTPS, with a redirect from port 80; two services outside
    the mesh: weather by DNS, bank at a static address with TLS originated to it), and `missing`
    (a MUTUAL credential the secrets directory does not hold)."""
    files = {
        "policies/shop/weather.yaml": _external("weather", "localhost", "DNS",
                                                {"name": "http", "port": int(web.rsplit(":", 1)[1]), "protocol": "HTTP"}),
        "policies/shop/bank.yaml": _external("bank", "bank.example", "STATIC", {"name": "tls", "port": BANK_PORT, "protocol": "TLS"},
                                             {"mode": "SIMPLE", "credentialName": "bank", "sni": "bank.example"}),
        "policies/shop/web.yaml": _policy("web", ingress={
            "hosts": [SHOP], "port": HTTPS_PORT, "httpsRedirect": True,
            "tls": {"mode": "SIMPLE", "credentialName": "shop-example-com"}},
            egress=["shop/*"]),  # the caller whose sidecar uses bank's (and payments') credential
        "policies/shop/api.yaml": _policy("api", {"mode": "ISTIO_MUTUAL", "subjectAltNames": [API]}),
        "policies/shop/other.yaml": _policy("other", {"mode": "ISTIO_MUTUAL",
                                                      "subjectAltNames": ["spiffe://cluster.local/ns/shop/sa/nobody"]}),
        f"environments/{ENV}.yaml": _environment(ENV, address, {"shop/api": [backend], "shop/other": [backend],
                                                               "shop/web": [web], "shop/bank": [bank]}),
        # its own address: Envoy binds with SO_REUSEPORT, so two proxies on one would share the connections
        f"environments/{MISSING_ENV}.yaml": _environment(MISSING_ENV, missing_address, {"shop/api": [backend], "shop/other": [backend],
                                                                               "shop/web": [web], "shop/bank": [bank]}),
    }
    mutual = {"mode": "MUTUAL", "credentialName": "payments", "subjectAltNames": [API]}
    result = compile_source(Source(files), envs=[ENV])
    assert result.ok, [d.render() for d in result.diagnostics]
    missing = compile_source(Source({**files, "policies/shop/api.yaml": _policy("api", mutual)}), envs=[MISSING_ENV])
    assert missing.ok, [d.render() for d in missing.diagnostics]
    rendered = tmp / "rendered"
    for env, outputs in ((ENV, result.outputs[ENV]), (MISSING_ENV, missing.outputs[MISSING_ENV])):
        for path, data in outputs.items():
            (rendered / env / path).parent.mkdir(parents=True, exist_ok=True)
            (rendered / env / path).write_bytes(data)
    return rendered


class Mesh:
    def __init__(self, ca, directory, backend, server, proxy, address, log):
        self.ca, self.directory, self.backend, self.server, self.proxy = ca, directory, backend, server, proxy
        self.listener = proxy.listener_address(f"{address}_8080")
        self.address = address
        self.log = log  # the server's log records, from its start


    def get(self, host: str, session=None) -> requests.Response:
        return (session or requests).get(f"http://{self.listener}/", headers={"host": host}, timeout=10)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module", params=["sotw", "delta"])
def mesh(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mtls")
    ca = CA()
    backend = TlsBackend(server_context(*ca.issue("api", uris=(API,)), ca.pem, tmp / "backend"))
    web = Backend("web").start()
    bank = TlsBackend(server_context(*ca.issue("bank", dns=("bank.example",)), ca.pem, tmp / "bank", require_client=False))
    directory = tmp / "secrets"
    directory.mkdir(mode=0o700)
    write_secret(directory / "default", *ca.issue("web", uris=(WEB,)), ca.pem)
    write_secret(directory / "shop-example-com", *ca.issue(SHOP, dns=(SHOP,)))
    write_secret(directory / "bank", ca=ca.pem)  # only the CA to verify bank.example with
    address = unique_loopback()
    records, logger = _Records(), logging.getLogger("meshc.xds")
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    try:
        missing_address = unique_loopback()
        rendered = _render(tmp, address, missing_address, backend.address, web.address, bank.address)
        options = Options(rendered=rendered, grpc_port=0, http_port=0, secrets=directory, poll_interval=0.2)
        with ServerThread(options) as server:
            bootstrap = sample.ads_bootstrap("web", ENV, ("127.0.0.1", server.server.grpc_port),
                                             delta=request.param == "delta")
            with Envoy(bootstrap, tmp / "envoy") as proxy:
                proxy.wait_until(lambda: f"{address}_8080" in str(proxy.listeners()), timeout=10,
                                 message="the listener is up (no secret wait)")
                mesh = Mesh(ca, directory, backend, server, proxy, address, records.lines)
                mesh.web, mesh.bank, mesh.delta = web, bank, request.param == "delta"
                mesh.missing_address = missing_address
                yield mesh
    finally:
        logger.removeHandler(records)
        backend.stop()
        web.stop()
        bank.stop()


def test_envoy_presents_the_served_workload_certificate(mesh):
    response = mesh.get("api.shop")
    assert (response.status_code, response.text) == (200, "api")
    sni, uris = mesh.backend.seen[-1]
    assert uris == [WEB]
    assert sni == "outbound_.8080_._.api.shop.svc.cluster.local"  # istiod's SNI
    assert mesh.backend.alpn[-1] == "istio-peer-exchange"  # Envoy offers istiod's mesh ALPN


def test_envoy_verifies_the_backend_against_the_served_root_and_its_spiffe_id(mesh):
    before = len(mesh.backend.seen)
    assert mesh.get("other.shop").status_code == 503  # the backend is .../sa/api, not .../sa/nobody
    assert len(mesh.backend.seen) == before  # no request reached it
    assert mesh.proxy.stat("cluster.outbound|8080||other.shop.svc.cluster.local.ssl.fail_verify_san") >= 1


def test_a_rotated_certificate_is_served_within_seconds_and_no_connection_drops(mesh):
    rotated = f"{WEB}-rotated-{os.getpid()}-{time.monotonic_ns()}"
    session = requests.Session()  # one client connection to Envoy all along
    assert mesh.get("api.shop", session).status_code == 200
    write_secret(mesh.directory / "default", *mesh.ca.issue("web", uris=(rotated,)))
    deadline = time.monotonic() + 10
    statuses = []
    while time.monotonic() < deadline:
        statuses.append(mesh.get("api.shop", session).status_code)
        if mesh.backend.seen[-1][1] == [rotated]:
            break
        time.sleep(0.1)
    assert mesh.backend.seen[-1][1] == [rotated], "the rotated certificate was never presented"
    assert set(statuses) == {200}
    write_secret(mesh.directory / "default", *mesh.ca.issue("web", uris=(WEB,)))  # as the other tests expect
    mesh.proxy.wait_until(lambda: mesh.get("api.shop").ok and mesh.backend.seen[-1][1] == [WEB], timeout=10,
                          message="the workload certificate is back")


def test_a_missing_secret_is_a_metric_and_a_log_line(mesh):
    assert any(f"environment '{MISSING_ENV}' names secrets the --secrets directory lacks: kubernetes://payments" in line
               for line in mesh.log), mesh.log
    metrics = requests.get(f"{mesh.server.http_url}/metrics", timeout=5).text
    assert f'meshc_xds_secret_missing{{env="{MISSING_ENV}",secret="kubernetes://payments"}} 1' in metrics
    assert f'env="{ENV}"' not in "".join(line for line in metrics.splitlines() if line.startswith("meshc_xds_secret_missing"))


def test_a_missing_secret_holds_back_only_what_needs_it(mesh, tmp_path):
    """A proxy of the environment whose api names kubernetes://payments, which DIR lacks: its
    listeners come up at once (Delta: the secret is reported as not existing; SotW, which cannot
    say so for SDS: after the snapshot's 1 s fetch timeout, not Envoy's 15 s), web answers, api
    fails until the secret is written, and then answers without a restart."""
    bootstrap = sample.ads_bootstrap("late", MISSING_ENV, ("127.0.0.1", mesh.server.server.grpc_port),
                                     delta=mesh.delta)
    with Envoy(bootstrap, tmp_path / "envoy") as proxy:
        # Envoy() returns once the proxy is initialised: it did not sit out a 15 s timeout
        timeouts = proxy.stat("sds.kubernetes_payments.init_fetch_timeout")
        assert timeouts == (1 if not mesh.delta else 0)
        listener = proxy.listener_address(f"{mesh.missing_address}_8080")
        get = lambda host: requests.get(f"http://{listener}/", headers={"host": host}, timeout=10)
        assert get("web.shop").status_code == 200
        assert get("api.shop").status_code == 503
        assert proxy.stat("cluster.outbound|8080||api.shop.svc.cluster.local.client_ssl_socket_factory."
                          "upstream_context_secrets_not_ready") >= 1
        write_secret(mesh.directory / "payments", *mesh.ca.issue("web", uris=(WEB,)), mesh.ca.pem)
        try:
            proxy.wait_until(lambda: get("api.shop").status_code == 200, timeout=10,
                             message="api answers once the secret is served")
            assert mesh.backend.seen[-1][1] == [WEB]
        finally:
            shutil.rmtree(mesh.directory / "payments")
            metric = f'meshc_xds_secret_missing{{env="{MISSING_ENV}",secret="kubernetes://payments"}} 1'
            proxy.wait_until(lambda: metric in requests.get(f"{mesh.server.http_url}/metrics", timeout=5).text,
                             timeout=10, message="the server reports the secret missing again")


def test_private_keys_never_leave_the_server(mesh):
    for page in ("/metrics", "/debug/snapshots", "/debug/proxies"):
        assert "PRIVATE KEY" not in requests.get(f"{mesh.server.http_url}{page}", timeout=5).text, page
    assert not [line for line in mesh.log if "PRIVATE KEY" in line]


# --- HTTPS at the gateway ------------------------------------------------------------------


def _https_get(address: str, server_name: str, ca: bytes, path: str = "/") -> tuple[int, str, dict]:
    """GET over TLS to `address`, sending SNI `server_name` and verifying the certificate for it."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cadata=ca.decode())
    connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=5)
    connection.sock = context.wrap_socket(socket.create_connection((host, int(port)), timeout=5),
                                          server_hostname=server_name)
    try:
        connection.request("GET", path, headers={"host": server_name})
        response = connection.getresponse()
        return response.status, response.read().decode(), {k.lower(): v for k, v in response.getheaders()}
    finally:
        connection.close()


def test_the_gateway_terminates_https_with_the_served_certificate(mesh):
    gateway = mesh.proxy.listener_address(f"{mesh.address}_{HTTPS_PORT}")
    assert _https_get(gateway, SHOP, mesh.ca.pem)[:2] == (200, "web")
    with pytest.raises(ssl.SSLCertVerificationError):  # the certificate is for its host, checked by name
        _https_get(gateway, SHOP, CA("another root").pem)


def test_port_80_answers_with_a_redirect_to_https(mesh):
    redirect = mesh.proxy.listener_address(f"{mesh.address}_80")
    response = requests.get(f"http://{redirect}/cart?item=1", headers={"host": SHOP}, allow_redirects=False, timeout=5)
    assert response.status_code == 301 and response.headers["location"] == f"https://{SHOP}/cart?item=1"


# --- services outside the mesh -------------------------------------------------------------


def test_an_external_host_resolved_by_dns_is_routed_by_its_name(mesh):
    port = mesh.web.port
    listener = mesh.proxy.listener_address(f"{mesh.address}_{port}")
    response = requests.get(f"http://{listener}/forecast", headers={"host": f"localhost:{port}"}, timeout=5)
    assert (response.status_code, response.text) == (200, "web")  # localhost, resolved by Envoy, is the web backend


def test_tls_is_originated_to_an_external_service_with_its_sni_and_verified(mesh):
    listener = mesh.proxy.listener_address(f"{mesh.address}_{BANK_PORT}")
    response = requests.get(f"http://{listener}/balance", headers={"host": "bank.example"}, timeout=5)
    assert (response.status_code, response.text) == (200, "api")  # plain to Envoy, TLS from Envoy on
    assert mesh.bank.seen[-1] == ("bank.example", [])  # its SNI; no client certificate under SIMPLE
    assert mesh.bank.alpn[-1] is None  # SIMPLE over HTTP/1 offers no mesh ALPN
    assert mesh.proxy.stat(f"cluster.outbound|{BANK_PORT}||bank.example.ssl.handshake") >= 1


# --- the directory itself ------------------------------------------------------------------


def test_a_directory_others_can_read_is_refused(tmp_path, capsys):
    (tmp_path / "rendered").mkdir()
    directory = tmp_path / "secrets"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    assert main(["serve", "--rendered", str(tmp_path / "rendered"), "--secrets", str(directory)]) == 2
    assert f"--secrets {directory}: mode 0755 lets others in" in capsys.readouterr().err
    directory.chmod(0o700)
    write_secret(directory / "default", *CA().issue("web"))
    (directory / "default" / "tls.key").chmod(0o644)
    assert "lets others read a private key" in secrets.check_dir(directory)


def test_a_half_written_certificate_keeps_the_last_good_one(tmp_path):
    ca = CA()
    cert, key = ca.issue("web", uris=(WEB,))
    write_secret(tmp_path / "default", cert, key, ca.pem)
    good, problems = secrets.load(tmp_path)
    assert sorted(good.resources) == ["ROOTCA", "default"] and problems == []
    (tmp_path / "default" / "tls.crt").write_bytes(cert[: len(cert) // 2])  # a writer caught mid-file
    half, problems = secrets.load(tmp_path, good)
    assert half.resources["default"] == good.resources["default"] and half.version == good.version
    assert problems == ["default: tls.crt is not whole PEM (CERTIFICATE); serving what it held before"]
    write_secret(tmp_path / "shop-example-com", cert, key)
    names = sorted(secrets.load(tmp_path, good)[0].resources)
    assert names == ["ROOTCA", "default", "kubernetes://shop-example-com"]
