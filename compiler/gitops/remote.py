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

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pygit2
from pygit2.enums import CredentialType, ObjectType, SortMode

from compiler.gitops.errors import PublishError

_SCP_LIKE = re.compile(r"^[\w.-]+@[\w.-]+:")  # git@github.com:owner/repo.git


@dataclass(frozen=True)
class Credentials:
    """How to authenticate a push or fetch (read from the environment by the CLI).

    HTTPS uses `token` as the password of `username` (GitHub accepts any
    user name with a token; `x-access-token` is what its apps use). SSH uses
    `ssh_key` (with `ssh_pubkey`, default `<key>.pub`) or else the ssh-agent.
    """

    token: str | None = None
    username: str = "x-access-token"
    ssh_key: Path | None = None
    ssh_pubkey: Path | None = None
    ssh_passphrase: str = ""


class _Callbacks(pygit2.RemoteCallbacks):
    """Answers credential requests once each (libgit2 asks again on failure) and
    records what the server said about each pushed reference."""

    def __init__(self, creds: Credentials):
        super().__init__()
        self._creds = creds
        self._asked: set[int] = set()
        self.rejected: dict[str, str] = {}

    def credentials(self, url, username_from_url, allowed_types):
        creds = self._creds
        if CredentialType.SSH_KEY & allowed_types and CredentialType.SSH_KEY not in self._asked:
            self._asked.add(CredentialType.SSH_KEY)
            user = username_from_url or "git"
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
        remote.fetch([f"+refs/heads/{branch}:{tracking}"], callbacks=_Callbacks(creds))
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
    path = _local_path(repo, remote.push_url or remote.url)
    if path is not None:
        return _push_local(repo, path, f"refs/heads/{branch}", new, expected)
    callbacks = _Callbacks(creds)
    local_ref = f"refs/meshc/push/{branch}"
    repo.references.create(local_ref, new, force=True)
    try:
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
        return {h.name: h.oid for h in remote.list_heads(callbacks=_Callbacks(creds))}
    except pygit2.GitError as err:
        raise PublishError(f"cannot reach remote {remote.name} ({_redact(remote.url)}): {err}") from None


def _remote(repo: pygit2.Repository, name: str) -> pygit2.Remote:
    try:
        return repo.remotes[name]
    except KeyError:
        raise PublishError(f"no remote named {name!r}") from None


def _local_path(repo: pygit2.Repository, url: str) -> Path | None:
    if url.startswith("file://"):
        return Path(url[len("file://"):])
    if "://" in url or _SCP_LIKE.match(url):
        return None
    path = Path(url)
    return path if path.is_absolute() else Path(repo.workdir or repo.path) / path


def _push_local(repo: pygit2.Repository, path: Path, refname: str, new: pygit2.Oid,
                expected: pygit2.Oid | None) -> bool:
    try:
        dst = pygit2.Repository(str(path))
    except pygit2.GitError as err:
        raise PublishError(f"cannot open remote repository {path}: {err}") from None
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
    MESHC_SSH_PUBKEY, MESHC_SSH_PASSPHRASE."""
    key = env.get("MESHC_SSH_KEY")
    pub = env.get("MESHC_SSH_PUBKEY")
    return Credentials(
        token=env.get("MESHC_GIT_TOKEN") or env.get("GITHUB_TOKEN") or None,
        username=env.get("MESHC_GIT_USERNAME") or "x-access-token",
        ssh_key=Path(key) if key else None,
        ssh_pubkey=Path(pub) if pub else None,
        ssh_passphrase=env.get("MESHC_SSH_PASSPHRASE", ""),
    )
