"""TLS secrets for SDS: read from `meshc serve --secrets DIR`, never from git.

DIR holds one folder per certificate, as a Kubernetes TLS Secret (and
cert-manager) lays it out: `tls.crt`, `tls.key` and, where a peer is
verified, `ca.crt`. Secrets are named as istiod names them:

    DIR/default/tls.crt + tls.key    →  `default`            (the workload certificate)
    DIR/default/ca.crt               →  `ROOTCA`             (the mesh root)
    DIR/<name>/tls.crt + tls.key     →  `kubernetes://<name>`
    DIR/<name>/ca.crt                →  `kubernetes://<name>-cacert`

`check_dir` refuses a DIR whose folder or keys others may read. `load` reads
every folder into a `TypeSnapshot` of Secret resources; a folder whose files
are half written (a PEM block not closed, a key without its certificate)
keeps the secrets it had, with a problem saying why, so a rotation caught in
the middle never reaches a proxy. Private keys stay in the wire bytes: the
resources' `json` (what /debug and logs may show) holds names only.
`referenced` lists the secrets a snapshot's clusters and listeners name.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from compiler.xds.resources import SECRET
from compiler.xds.snapshot import Resource, TypeSnapshot, resource, type_snapshot

__all__ = ["check_dir", "fingerprint", "load", "referenced", "secret_names"]

KIND = "secrets"
WORKLOAD = "default"
_FILES = ("tls.crt", "tls.key", "ca.crt")
_MAX_BYTES = 1024 * 1024
#: The fields of a TLS context that name SDS secrets.
_SDS_FIELDS = ("tls_certificate_sds_secret_configs", "validation_context_sds_secret_config")


def secret_names(folder: str) -> tuple[str, str]:
    """(certificate, CA) secret names of `DIR/<folder>/`, as istiod names them."""
    if folder == WORKLOAD:
        return "default", "ROOTCA"
    return f"kubernetes://{folder}", f"kubernetes://{folder}-cacert"


def check_dir(root: Path) -> str | None:
    """Why `root` cannot hold secrets, or None: it must be a directory, and neither it nor a
    private key in it may be readable by group or others (mode 0700 and 0600 or tighter)."""
    try:
        mode = root.stat().st_mode
    except OSError as exc:
        return f"{root}: {exc.strerror.lower() if exc.strerror else exc}"
    if not stat.S_ISDIR(mode):
        return f"{root}: not a directory"
    if mode & 0o077:
        return f"{root}: mode {stat.S_IMODE(mode):04o} lets others in; private keys need 0700 (chmod 700 {root})"
    for folder in _folders(root):
        key = folder / "tls.key"
        try:
            key_mode = key.stat().st_mode
        except OSError:
            continue
        if key_mode & 0o077:
            return f"{key}: mode {stat.S_IMODE(key_mode):04o} lets others read a private key (chmod 600 {key})"
    return None


def fingerprint(root: Path | None) -> bytes:
    """What a change to DIR changes: every folder's files, by content (a rotation often keeps the size)."""
    h = hashlib.blake2b(digest_size=16)
    if root is not None:
        for folder in _folders(root):
            for name in _FILES:
                h.update(f"{folder.name}/{name}\0".encode())
                try:
                    h.update(hashlib.blake2b(_read(folder / name)).digest())
                except (OSError, _Unready):
                    h.update(b"-")
    return h.digest()


def load(root: Path | None, previous: TypeSnapshot | None = None) -> tuple[TypeSnapshot, list[str]]:
    """Every secret under `root` (none for None), and the problems found. A folder that does not
    read whole keeps `previous`'s secrets of its names."""
    old = previous.resources if previous is not None else {}
    found: dict[str, Resource] = {}
    problems: list[str] = []
    for folder in _folders(root) if root is not None else ():
        try:
            found.update(_folder(folder))
        except _Unready as exc:
            problems.append(f"{folder.name}: {exc}; serving what it held before")
            found.update({n: old[n] for n in secret_names(folder.name) if n in old})
    return snapshot_of(found), problems


def snapshot_of(resources: Mapping[str, Resource]) -> TypeSnapshot:
    """The secrets as one kind; its version hashes every secret's name and content."""
    h = hashlib.sha256()
    for name in sorted(resources):
        h.update(f"{name}\0{resources[name].version}\n".encode())
    return type_snapshot(KIND, SECRET, h.hexdigest(), resources)


def referenced(resources: Iterable[dict]) -> set[str]:
    """The SDS secret names anywhere in these resources (proto3 JSON, snake_case)."""
    out: set[str] = set()
    stack = list(resources)
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key in _SDS_FIELDS:
                    out.update(c["name"] for c in (value if isinstance(value, list) else [value])
                               if isinstance(c, dict) and c.get("name"))
                elif isinstance(value, (dict, list)):
                    stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)
    return out


class _Unready(Exception):
    """A folder's files do not make whole secrets (yet)."""


def _folders(root: Path) -> list[Path]:
    """DIR's certificate folders, sorted. Hidden names (a Kubernetes volume's `..data`) are not."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return []
    return [Path(e.path) for e in entries if not e.name.startswith(".") and e.is_dir()]


def _read(path: Path) -> bytes:
    with open(path, "rb") as handle:
        data = handle.read(_MAX_BYTES + 1)
    if len(data) > _MAX_BYTES:
        raise _Unready(f"{path.name} is larger than {_MAX_BYTES} bytes")
    return data


def _pem(folder: Path, name: str, label: str) -> bytes | None:
    """The file's bytes when it holds whole PEM blocks of `label` (CERTIFICATE, or any PRIVATE KEY)."""
    try:
        data = _read(folder / name)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _Unready(f"{name}: {exc.strerror or exc}") from None
    begins, ends = data.count(b"-----BEGIN "), data.count(b"-----END ")
    if not begins or begins != ends or label.encode() not in data or not data.rstrip().endswith(b"-----"):
        raise _Unready(f"{name} is not whole PEM ({label})")
    return data


def _folder(folder: Path) -> dict[str, Resource]:
    cert, key = _pem(folder, "tls.crt", "CERTIFICATE"), _pem(folder, "tls.key", "PRIVATE KEY")
    ca = _pem(folder, "ca.crt", "CERTIFICATE")
    if (cert is None) != (key is None):
        raise _Unready("tls.crt and tls.key go together")
    certificate_name, ca_name = secret_names(folder.name)
    out = {}
    if cert is not None:
        secret = secret_pb2.Secret(name=certificate_name)
        secret.tls_certificate.certificate_chain.inline_bytes = cert
        secret.tls_certificate.private_key.inline_bytes = key
        out[certificate_name] = resource(certificate_name, secret, {"name": certificate_name, "tls_certificate": "…"})
    if ca is not None:
        secret = secret_pb2.Secret(name=ca_name)
        secret.validation_context.trusted_ca.inline_bytes = ca
        out[ca_name] = resource(ca_name, secret, {"name": ca_name, "validation_context": "…"})
    if not out:
        raise _Unready("holds none of tls.crt, tls.key, ca.crt")
    return out
