"""Fetching from and pushing to a remote, with credentials and compare-and-swap.

`push_ref` updates one remote branch only if it still points where we last
saw it, and answers False when it moved meanwhile, so the caller can fetch,
rebuild on top and try again. Over HTTPS and SSH the server's receive-pack
makes that check atomically. libgit2's local transport does not (it checks
fast-forward against the refs it listed when connecting, then overwrites
the ref), so for a remote on this machine the objects are copied and the
ref is moved with libgit2's compare-and-swap reference update instead.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import pygit2
from pygit2.enums import CredentialType, ObjectType, SortMode

from compiler.gitops.errors import PublishError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_SSH_SCHEMES = {"ssh", "git+ssh", "ssh+git"}
_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")  # C:\repo or C:/repo: a Windows path, not host "C"
# scp form: [user@]host:path, [user@][host:port]:path, [user@host:port]:path (libgit2 and git accept these)
_SCP = re.compile(r"^(?:\[(?:(?P<buser>[^@\]]*)@)?(?P<bhost>[^\]]+)\]|(?:(?P<user>[^@:/\[]+)@)?"
                  r"(?:\[(?P<b2host>[^\]]+)\]|(?P<host>[^:/\[\]]+))):(?P<path>.*)$", re.S)
DEFAULT_SSH_USER = "git"
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"


def transport_of(url: str) -> str:
    """'local', 'ssh' or 'url' (any other scheme: https, http, git), as git decides it."""
    scheme = _SCHEME.match(url)
    if scheme:
        name = scheme.group(1).lower()
        return "local" if name == "file" else "ssh" if name in _SSH_SCHEMES else "url"
    if _DRIVE.match(url):
        return "local"
    colon, slash = url.find(":"), url.find("/")
    if colon < 0 or 0 <= slash < colon:  # ./a:b, /srv/a:b, repo.git: paths
        return "local"
    return "ssh"


@dataclass(frozen=True)
class SshTarget:
    user: str | None
    host: str
    port: int | None  # None: the default, 22
    path: str

    @property
    def known_hosts_name(self) -> str:
        """How known_hosts names this server: `host`, or `[host]:port` off port 22."""
        return self.host if self.port in (None, 22) else f"[{self.host}]:{self.port}"


def ssh_target(url: str) -> SshTarget | None:
    """Who and where an SSH remote URL (either form) points at; None if it is not SSH."""
    if transport_of(url) != "ssh":
        return None
    if _SCHEME.match(url):
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = None
        return SshTarget(parts.username, parts.hostname or "", port, parts.path)
    found = _SCP.match(url)
    if not found:
        return None
    user = found.group("user") or found.group("buser") or None
    host = found.group("bhost") or found.group("b2host") or found.group("host")
    port = None
    if host.count(":") == 1:  # [host:port]; an IPv6 address has more colons
        host, _, number = host.partition(":")
        port = int(number) if number.isdigit() else None
    return SshTarget(user, host, port, found.group("path"))


@dataclass(frozen=True)
class Credentials:
    """How to authenticate a push or fetch (read from the environment by the CLI).

    HTTPS uses `token` as the password of `username` (GitHub accepts any
    user name with a token; `x-access-token` is what its apps use). SSH logs
    in as the URL's user, else `ssh_user`, else `git`, with `ssh_key` (and
    `ssh_pubkey`, default `<key>.pub`) or else the ssh-agent, and trusts only
    the host keys in `known_hosts` (None: `~/.ssh/known_hosts`).
    """

    token: str | None = None
    username: str = "x-access-token"
    ssh_key: Path | None = None
    ssh_pubkey: Path | None = None
    ssh_passphrase: str = ""
    ssh_user: str | None = None
    known_hosts: Path | None = None


class _Callbacks(pygit2.RemoteCallbacks):
    """Answers credential requests once each (libgit2 asks again on failure) and
    records what the server said about each pushed reference."""

    def __init__(self, creds: Credentials, url: str = ""):
        super().__init__()
        self._creds = creds
        self._ssh = ssh_target(url)
        self._asked: set[int] = set()
        self.rejected: dict[str, str] = {}

    def credentials(self, url, username_from_url, allowed_types):
        creds = self._creds
        if CredentialType.USERNAME & allowed_types:
            # libgit2 asks for the user name alone first when the URL has none
            # (ssh://host/path, host:path); the key is asked for next, for that user.
            return pygit2.Username(username_from_url or creds.ssh_user or DEFAULT_SSH_USER)
        if CredentialType.SSH_KEY & allowed_types and CredentialType.SSH_KEY not in self._asked:
            self._asked.add(CredentialType.SSH_KEY)
            user = username_from_url or creds.ssh_user or DEFAULT_SSH_USER
            if creds.ssh_key:
                pub = creds.ssh_pubkey or Path(f"{creds.ssh_key}.pub")
                return pygit2.Keypair(user, str(pub), str(creds.ssh_key), creds.ssh_passphrase)
            return pygit2.KeypairFromAgent(user)
        if (CredentialType.USERPASS_PLAINTEXT & allowed_types and creds.token
                and CredentialType.USERPASS_PLAINTEXT not in self._asked):
            self._asked.add(CredentialType.USERPASS_PLAINTEXT)
            return pygit2.UserPass(username_from_url or creds.username, creds.token)
        raise PublishError(f"{_redact(url)}: authentication failed or no credentials: "
                           "set MESHC_GIT_TOKEN (or GITHUB_TOKEN) for HTTPS, MESHC_SSH_KEY or an ssh-agent for SSH")

    def certificate_check(self, certificate, valid, host):
        """TLS: libgit2's verdict stands (pygit2 passes it through). SSH: `valid` says
        whether the host key matched the known_hosts file; refuse it otherwise."""
        if self._ssh is None:
            raise pygit2.Passthrough
        if valid:
            return True
        raise PublishError(host_key_refusal(self._ssh, self._creds.known_hosts))

    def push_update_reference(self, refname, message):
        if message:
            self.rejected[refname] = message


def fetch_branch(repo: pygit2.Repository, remote_name: str, branch: str,
                 creds: Credentials) -> pygit2.Oid | None:
    """Fetch `branch` into refs/remotes/<remote>/<branch>; its tip, or None if it does not exist."""
    remote = _remote(repo, remote_name)
    tracking = f"refs/remotes/{remote_name}/{branch}"
    tip = _heads(remote, creds).get(f"refs/heads/{branch}")
    if tip is None:
        return None
    try:
        with _trusting(remote.url, creds):
            remote.fetch([f"+refs/heads/{branch}:{tracking}"], callbacks=_Callbacks(creds, remote.url))
    except pygit2.GitError as err:
        raise PublishError(f"cannot fetch {branch} from {remote_name}: {err}") from None
    return repo.references[tracking].target


def push_ref(repo: pygit2.Repository, remote_name: str, branch: str, new: pygit2.Oid,
             expected: pygit2.Oid | None, creds: Credentials) -> bool:
    """Point the remote's `branch` at `new` if it is still at `expected` (None: absent).

    True when pushed; False when the remote branch moved meanwhile. Any other
    failure raises PublishError. Never forces.
    """
    remote = _remote(repo, remote_name)
    url = remote.push_url or remote.url
    path = _local_path(repo, url)
    if path is not None:
        return _push_local(repo, path, f"refs/heads/{branch}", new, expected)
    callbacks = _Callbacks(creds, url)
    local_ref = f"refs/meshc/push/{branch}"
    repo.references.create(local_ref, new, force=True)
    try:
        with _trusting(url, creds):
            remote.push([f"{local_ref}:refs/heads/{branch}"], callbacks=callbacks)
        failure = callbacks.rejected.get(f"refs/heads/{branch}")
    except pygit2.GitError as err:
        failure = str(err)
    finally:
        repo.references.delete(local_ref)
    if failure is None:
        return True
    # Classify by state, not by message: did the branch move away from what we built on?
    current = _heads(remote, creds).get(f"refs/heads/{branch}")
    if current != expected:
        return False
    raise PublishError(f"push to {remote_name} refused: {failure}")


def _heads(remote: pygit2.Remote, creds: Credentials) -> dict[str, pygit2.Oid]:
    try:
        with _trusting(remote.url, creds):
            return {h.name: h.oid for h in remote.list_heads(callbacks=_Callbacks(creds, remote.url))}
    except pygit2.GitError as err:
        raise PublishError(f"cannot reach remote {remote.name} ({_redact(remote.url)}): {err}") from None


def _remote(repo: pygit2.Repository, name: str) -> pygit2.Remote:
    try:
        return repo.remotes[name]
    except KeyError:
        raise PublishError(f"no remote named {name!r}") from None


@contextlib.contextmanager
def _trusting(url: str, creds: Credentials) -> Iterator[None]:
    """libgit2 reads known_hosts only from `<home>/.ssh/known_hosts`: for the length of one
    SSH connection, point its home directory at a private one whose known_hosts is the
    configured file. Nothing changes for other transports or without MESHC_SSH_KNOWN_HOSTS."""
    if creds.known_hosts is None or transport_of(url) != "ssh":
        yield
        return
    old = pygit2.settings.homedir
    with tempfile.TemporaryDirectory(prefix="meshc-ssh-") as home:
        (Path(home) / ".ssh").mkdir()
        (Path(home) / ".ssh" / "known_hosts").symlink_to(Path(creds.known_hosts).expanduser().resolve())
        pygit2.settings.homedir = home
        try:
            yield
        finally:
            pygit2.settings.homedir = old


def host_key_refusal(target: SshTarget, known_hosts: Path | None) -> str:
    """Why the server's host key is refused, in one line, with what to do about it."""
    shown = str(known_hosts) if known_hosts else DEFAULT_KNOWN_HOSTS
    path = Path(known_hosts or DEFAULT_KNOWN_HOSTS).expanduser()
    name = target.known_hosts_name
    scan = f"ssh-keyscan{f' -p {target.port}' if target.port not in (None, 22) else ''} {target.host}"
    hint = f"check the key's fingerprint out of band, then add it ({scan} >> {shown})"
    if not path.is_file():
        return (f"cannot verify the SSH host key of {name}: no known_hosts file {shown} "
                f"(set MESHC_SSH_KNOWN_HOSTS, or {hint})")
    if _names_host(path, name):
        return (f"the SSH host key of {name} does not match the one in {shown}: refusing to connect "
                "(the server may be impersonated, or its key changed; if it did, replace its line there)")
    return f"the SSH host key of {name} is unknown: it is not in {shown}; {hint}"


def _names_host(known_hosts: Path, name: str) -> bool:
    """Whether a line of `known_hosts` is about `name`, plain or hashed (`|1|salt|hash`)."""
    try:
        lines = known_hosts.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if fields and fields[0].startswith("@"):  # @cert-authority / @revoked
            fields = fields[1:]
        if not fields or fields[0].startswith("#"):
            continue
        for pattern in fields[0].split(","):
            if pattern.startswith("|1|"):
                try:
                    salt, digest = (base64.b64decode(p) for p in pattern[3:].split("|", 1))
                except (ValueError, TypeError):
                    continue
                if hmac.compare_digest(hmac.new(salt, name.encode(), hashlib.sha1).digest(), digest):
                    return True
            elif pattern.lower() == name.lower():
                return True
    return False


def _local_path(repo: pygit2.Repository, url: str) -> Path | None:
    kind = transport_of(url)
    if kind != "local":
        return None
    if url.startswith("file://"):
        return Path(url[len("file://"):])
    path = Path(url)
    return path if path.is_absolute() else Path(repo.workdir or repo.path) / path


def _push_local(repo: pygit2.Repository, path: Path, refname: str, new: pygit2.Oid,
                expected: pygit2.Oid | None) -> bool:
    try:
        dst = pygit2.Repository(str(path))
    except pygit2.GitError as err:
        raise PublishError(f"cannot open remote repository {path}: {err}") from None
    _refuse_checked_out(dst, path, refname)
    current = dst.references.get(refname)
    if (current.target if current else None) != expected:
        return False
    _copy_objects(repo, dst, new, expected)
    try:
        if current is None:
            dst.references.create(refname, new)  # fails if someone created it meanwhile
        else:
            current.set_target(new, "meshc publish")  # compare-and-swap against `expected`
    except (pygit2.AlreadyExistsError, pygit2.GitError, OSError) as err:  # OSError: libgit2's GIT_ELOCKED
        # Classify by state: another pusher holds the ref's lock, or already moved it.
        locked = (Path(dst.path) / f"{refname}.lock").exists()  # first: once released, the ref has moved
        now = dst.references.get(refname)
        if locked or (now.target if now else None) != expected:
            return False
        raise PublishError(f"cannot update {refname} in {path}: {err}") from None
    return True


def _refuse_checked_out(dst: pygit2.Repository, path: Path, refname: str) -> None:
    """What git's receive-pack does (receive.denyCurrentBranch, default refuse): never move
    a branch checked out in a working tree of the remote, which would leave that tree and
    index describing the old commit. `warn` and `ignore` (or false) let it through."""
    setting = _config(dst, "receive.denyCurrentBranch")
    if setting is not None and setting.lower() in ("ignore", "warn", "false", "no", "off", "0"):
        return
    for where, checkout in _checkouts(dst, path):
        head = checkout.references.get("HEAD")
        if head is not None and head.type == pygit2.enums.ReferenceType.SYMBOLIC and head.target == refname:
            also = (" (meshc does not do updateInstead)"
                    if setting is not None and setting.lower() == "updateinstead" else "")
            raise PublishError(
                f"refusing to update checked out branch {refname} in {where}: updating the current branch "
                f"of a non-bare repository is denied (receive.denyCurrentBranch{also}), because it would "
                "make its index and work tree inconsistent; push to a bare repository instead")


def _checkouts(dst: pygit2.Repository, path: Path):
    """(working tree, repository) for the remote's own working tree and each linked worktree."""
    if not dst.is_bare:
        yield (dst.workdir or str(path)).rstrip("/"), dst
    for name in dst.list_worktrees():
        try:
            tree = dst.lookup_worktree(name)
            yield tree.path.rstrip("/"), pygit2.Repository(tree.path)
        except (pygit2.GitError, KeyError, OSError):
            continue  # a pruned or broken worktree holds nothing checked out


def _config(repo: pygit2.Repository, key: str) -> str | None:
    try:
        return repo.config[key]
    except (KeyError, pygit2.GitError):
        return None


def _copy_objects(src: pygit2.Repository, dst: pygit2.Repository, tip: pygit2.Oid,
                  known: pygit2.Oid | None) -> None:
    """Copy what `dst` lacks of the history from `known` (already there) to `tip`.

    Order does not matter: nothing refers to these objects until the ref moves.
    """
    walker = src.walk(tip, SortMode.TOPOLOGICAL)
    if known is not None and known in src:
        walker.hide(known)
    for commit in walker:
        if commit.id not in dst:
            _copy_tree(src, dst, commit.tree_id)
            dst.odb.write(ObjectType.COMMIT, src.odb.read(commit.id)[1])


def _copy_tree(src: pygit2.Repository, dst: pygit2.Repository, tree_id: pygit2.Oid) -> None:
    if tree_id in dst:
        return
    for entry in src[tree_id]:
        if entry.type == ObjectType.TREE:
            _copy_tree(src, dst, entry.id)
        elif entry.type == ObjectType.BLOB and entry.id not in dst:
            dst.odb.write(ObjectType.BLOB, src.odb.read(entry.id)[1])
    dst.odb.write(ObjectType.TREE, src.odb.read(tree_id)[1])


def _redact(url: str) -> str:
    return re.sub(r"//[^@/]+@", "//***@", url)


def credentials_from_env(env: os._Environ | dict) -> Credentials:
    """MESHC_GIT_TOKEN (else GITHUB_TOKEN), MESHC_GIT_USERNAME, MESHC_SSH_KEY,
    MESHC_SSH_PUBKEY, MESHC_SSH_PASSPHRASE, MESHC_SSH_USER, MESHC_SSH_KNOWN_HOSTS."""
    key = env.get("MESHC_SSH_KEY")
    pub = env.get("MESHC_SSH_PUBKEY")
    known = env.get("MESHC_SSH_KNOWN_HOSTS")
    return Credentials(
        token=env.get("MESHC_GIT_TOKEN") or env.get("GITHUB_TOKEN") or None,
        username=env.get("MESHC_GIT_USERNAME") or "x-access-token",
        ssh_key=Path(key) if key else None,
        ssh_pubkey=Path(pub) if pub else None,
        ssh_passphrase=env.get("MESHC_SSH_PASSPHRASE", ""),
        ssh_user=env.get("MESHC_SSH_USER") or None,
        known_hosts=Path(known) if known else None,
    )
