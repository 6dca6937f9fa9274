"""The upstream TLS transport socket of a cluster, from the policy's `tls`.

Certificates are never inlined: they are named SDS secrets fetched over the
same ADS stream, with istiod's names. ISTIO_MUTUAL uses the workload
certificate `default` and the mesh root `ROOTCA`; SIMPLE and MUTUAL with a
`credentialName` use `kubernetes://<name>` (client certificate, MUTUAL only)
and `kubernetes://<name>-cacert` (the CA to verify the server with).
https://www.envoyproxy.io/docs/envoy/latest/api-v3/extensions/transport_sockets/tls/v3/tls.proto
"""

from __future__ import annotations

from compiler.model import Port, Protocol, Tls, TlsMode
from compiler.targets.envoy.common import UPSTREAM_TLS, sds_secret

#: Istio's "system" CA: the OS trust bundle, used for SIMPLE without a credentialName.
SYSTEM_CA = "/etc/ssl/certs/ca-certificates.crt"
_ALPN_MESH = ["istio-peer-exchange", "istio"]
_ALPN_MESH_H2 = ["istio-peer-exchange", "istio", "h2"]
_H2 = frozenset((Protocol.HTTP2, Protocol.GRPC))


def shared_socket(tls: Tls | None, h2: bool) -> dict | None:
    """The `transport_socket` that clusters with one TLS setting share, or None for plaintext (no tls, DISABLE).

    `h2`: the clusters speak HTTP/2 (`is_h2(port)`, or upgraded by the pool's
    h2UpgradePolicy), which their ALPN says. Under ISTIO_MUTUAL without an
    explicit SNI each cluster has its own SNI: `cluster_socket` adds it.
    """
    if tls is None or tls.mode is TlsMode.DISABLE:
        return None
    if tls.mode is TlsMode.ISTIO_MUTUAL:
        context = _istio_mutual(tls, h2)
    else:
        context = _simple_or_mutual(tls, h2)
    return {"name": "envoy.transport_sockets.tls", "typed_config": {"@type": UPSTREAM_TLS, **context}}


def cluster_socket(shared: dict | None, tls: Tls | None, fqdn: str, port: Port, version: str) -> dict | None:
    """The `transport_socket` of one cluster: `shared_socket(tls, ...)`, with istiod's in-mesh SNI if it needs one."""
    if shared is None or tls.mode is not TlsMode.ISTIO_MUTUAL or tls.sni:
        return shared
    sni = _istio_sni(port.number, version, fqdn)
    return {**shared, "typed_config": {**shared["typed_config"], "sni": sni}}


def is_h2(port: Port) -> bool:
    return port.protocol in _H2


def _istio_mutual(tls: Tls, h2: bool) -> dict:
    common = {
        "alpn_protocols": _ALPN_MESH_H2 if h2 else _ALPN_MESH,
        "tls_certificate_sds_secret_configs": [sds_secret("default")],
        "combined_validation_context": {
            "default_validation_context": _san_matchers(tls.subject_alt_names),
            "validation_context_sds_secret_config": sds_secret("ROOTCA"),
        },
    }
    return {"common_tls_context": common, "sni": tls.sni} if tls.sni else {"common_tls_context": common}


def _simple_or_mutual(tls: Tls, h2: bool) -> dict:
    common: dict = {}
    if h2:
        common["alpn_protocols"] = ["h2"]
    if tls.credential_name:
        if tls.mode is TlsMode.MUTUAL:
            common["tls_certificate_sds_secret_configs"] = [sds_secret(f"kubernetes://{tls.credential_name}")]
        common["combined_validation_context"] = {
            "default_validation_context": _san_matchers(tls.subject_alt_names),
            "validation_context_sds_secret_config": sds_secret(f"kubernetes://{tls.credential_name}-cacert"),
        }
    else:
        assert tls.mode is TlsMode.SIMPLE, "MUTUAL without credentialName is refused by the schema"
        common["validation_context"] = {"trusted_ca": {"filename": SYSTEM_CA},
                                        **_san_matchers(tls.subject_alt_names)}
    context: dict = {"common_tls_context": common}
    if tls.sni:
        context["sni"] = tls.sni
    return context


def _san_matchers(names: tuple[str, ...]) -> dict:
    """`match_typed_subject_alt_names` (the untyped field is deprecated): SPIFFE IDs are URIs."""
    if not names:
        return {}
    return {"match_typed_subject_alt_names": [
        {"san_type": "URI" if "://" in name else "DNS", "matcher": {"exact": name}} for name in names
    ]}


def _istio_sni(port: int, version: str, fqdn: str) -> str:
    """istiod's in-mesh SNI, `outbound_.9080_.v1_.reviews.bookinfo.svc.cluster.local`."""
    return f"outbound_.{port}_.{version}_.{fqdn}"
