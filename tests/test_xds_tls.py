"""TLS and mutual TLS on both ports, with certificates made by the openssl CLI."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
import requests
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from compiler.xds import sample
from compiler.xds.server import Options, ServerThread

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
ENV = "demo"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
                      ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext",
                 "-out", f"{name}.pem", cwd=d)
    return d


@pytest.fixture
def server(tmp_path, pki):
    sample.write_snapshot(tmp_path, ENV, sample.sample_resources(
        ("127.0.0.1", 10000), {"v1": ("127.0.0.1", 8001)}, {"v1": 100}))
    options = Options(rendered=tmp_path, grpc_port=0, http_port=0, tls_cert=pki / "server.pem",
                      tls_key=pki / "server.key", client_ca=pki / "ca.pem")
    with ServerThread(options) as s:
        yield s


def test_https_requires_a_client_certificate(server, pki):
    ok = requests.get(server.http_url + "/healthz", verify=pki / "ca.pem",
                      cert=(pki / "client.pem", pki / "client.key"), timeout=5)
    assert ok.status_code == 200
    with pytest.raises(requests.exceptions.RequestException):
        requests.get(server.http_url + "/healthz", verify=pki / "ca.pem", timeout=5)


def _first_response(server, credentials):
    with grpc.secure_channel(server.grpc_address, credentials) as channel:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        request = discovery_pb2.DiscoveryRequest(node={"id": "p", "cluster": ENV},
                                                 type_url=sample.TYPE_URLS["clusters"])
        return next(stub.StreamAggregatedResources(iter([request]), timeout=5))


def test_grpc_mutual_tls(server, pki):
    root = (pki / "ca.pem").read_bytes()
    good = grpc.ssl_channel_credentials(root, (pki / "client.key").read_bytes(),
                                        (pki / "client.pem").read_bytes())
    assert len(_first_response(server, good).resources) == 1
    with pytest.raises(grpc.RpcError) as info:
        _first_response(server, grpc.ssl_channel_credentials(root))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_envoy_over_mutual_tls_ads(server, pki, tmp_path):
    """A real Envoy presents its client certificate to the ADS port and gets its config."""
    from support.envoy import Envoy

    bootstrap = sample.ads_bootstrap("tls-proxy", ENV, ("127.0.0.1", server.server.grpc_port))
    xds = bootstrap["static_resources"]["clusters"][0]
    xds["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "sni": "localhost",
        "common_tls_context": {
            "alpn_protocols": ["h2"],
            "tls_certificates": [{"certificate_chain": {"filename": str(pki / "client.pem")},
                                  "private_key": {"filename": str(pki / "client.key")}}],
            "validation_context": {"trusted_ca": {"filename": str(pki / "ca.pem")},
                                   "match_typed_subject_alt_names": [
                                       {"san_type": "DNS", "matcher": {"exact": "localhost"}}]}}}}
    with Envoy(bootstrap, tmp_path / "envoy") as envoy:
        envoy.wait_until(lambda: envoy.stat("cluster_manager.cds.update_success") >= 1,
                         timeout=10, message="CDS over mTLS")
        proxies = requests.get(server.http_url + "/debug/proxies", verify=pki / "ca.pem",
                               cert=(pki / "client.pem", pki / "client.key"), timeout=5).json()
        assert [p["node_id"] for p in proxies] == ["tls-proxy"]
