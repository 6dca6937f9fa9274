"""Publishing over SSH: a real OpenSSH server (tests/support/sshd.py) on 127.0.0.1 in front
of a bare repository, reached with a throwaway client key and checked against a known_hosts
file, in both URL forms (ssh://… and scp-like host:path)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pygit2
import pytest

from compiler.cli import main
from compiler.gitops.errors import PublishError
from compiler.gitops.publish import Options, publish
from compiler.gitops.remote import Credentials, SshTarget, _local_path, ssh_target, transport_of
from support.backends import free_port
from support.sshd import MISSING, Sshd, find_sshd, keygen, port_is_free
from test_gitops_publish import assert_sources_rendered_once, race
from test_gitops_support import REVIEWS, SAMPLE, clone, commit_files, edit, git, make_remote

NO_SLEEP = lambda seconds: None  # noqa: E731


def _require_sshd() -> None:
    if find_sshd():
        return
    if os.environ.get("CI"):  # CI runs as root with apt, and `make test` installs it: never skip there
        pytest.fail(MISSING)
    pytest.skip(MISSING)


@pytest.fixture
def client_key(tmp_path):
    return keygen(tmp_path / "id_ed25519")


def _server(tmp_path, client_key, port):
    _require_sshd()
    return Sshd(tmp_path / "sshd", port, client_key.with_suffix(".pub"))


@pytest.fixture
def sshd(tmp_path, client_key):
    with _server(tmp_path, client_key, free_port()) as server:
        yield server


@pytest.fixture
def known_hosts(tmp_path, sshd):
    path = tmp_path / "known_hosts"
    path.write_text("# meshc test\n" + sshd.known_hosts_line)
    return path


def creds(client_key, known_hosts, user=None) -> Credentials:
    return Credentials(ssh_key=client_key, known_hosts=known_hosts, ssh_user=user)


def ssh_clone(remote, path, url) -> pygit2.Repository:
    """A clone whose origin is `url` (cloned from the path: the test is about the push)."""
    repo = clone(remote, path)
    repo.remotes.set_url("origin", url)
    return repo


def tip_of(bare) -> pygit2.Oid:
    return pygit2.Repository(str(bare)).references["refs/heads/main"].target


@pytest.mark.parametrize("with_user", [True, False], ids=["ssh://user@host", "ssh://host"])
def test_push_over_ssh_url(tmp_path, sshd, client_key, known_hosts, with_user):
    """Without a user in the URL libgit2 first asks for a user name alone (the configured one here)."""
    bare = make_remote(tmp_path)
    who = f"{sshd.user}@" if with_user else ""
    work = ssh_clone(bare, tmp_path / "work", f"ssh://{who}127.0.0.1:{sshd.port}{bare}")

    result = publish(work, Options(push="origin", credentials=creds(client_key, known_hosts,
                                                                      None if with_user else sshd.user)),
                     sleep=NO_SLEEP)

    assert result.pushed and str(tip_of(bare)) == result.commit == str(work.head.target)
    assert "Accepted publickey" in sshd.log.read_text()  # it went through sshd, with the key
    git(bare, "fsck", "--strict")
    assert publish(work, Options(push="origin", credentials=creds(client_key, known_hosts, sshd.user)),
                   sleep=NO_SLEEP).commit is None  # fetched back over SSH: nothing left to do


def test_push_over_scp_like_url_without_a_user(tmp_path, sshd, client_key, known_hosts):
    """`[host:port]:path` is git's and libgit2's scp form with a port; no `user@`, so it
    used to be taken for a local path."""
    bare = make_remote(tmp_path)
    work = ssh_clone(bare, tmp_path / "work", f"[127.0.0.1:{sshd.port}]:{bare}")

    result = publish(work, Options(push="origin", credentials=creds(client_key, known_hosts, sshd.user)),
                     sleep=NO_SLEEP)

    assert result.pushed and str(tip_of(bare)) == result.commit
    assert "Accepted publickey" in sshd.log.read_text()


def test_push_over_plain_scp_url_on_port_22(tmp_path, client_key):
    """`127.0.0.1:path` has no port, so this one needs sshd on 127.0.0.1:22."""
    if not port_is_free("127.0.0.1", 22):
        pytest.skip("127.0.0.1:22 is taken: the plain scp form (no port) cannot be served here")
    with _server(tmp_path, client_key, 22) as server:
        kh = tmp_path / "known_hosts"
        kh.write_text(server.known_hosts_line)
        assert server.known_hosts_line.startswith("127.0.0.1 ")
        bare = make_remote(tmp_path)
        work = ssh_clone(bare, tmp_path / "work", f"127.0.0.1:{bare}")

        result = publish(work, Options(push="origin", credentials=creds(client_key, kh, server.user)),
                         sleep=NO_SLEEP)

        assert result.pushed and str(tip_of(bare)) == result.commit
        assert "Accepted publickey" in server.log.read_text()


def test_an_unknown_or_changed_host_key_is_refused(tmp_path, sshd, client_key):
    bare = make_remote(tmp_path)
    url = f"ssh://{sshd.user}@127.0.0.1:{sshd.port}{bare}"
    work = ssh_clone(bare, tmp_path / "work", url)
    before = tip_of(bare)
    impostor = keygen(tmp_path / "impostor")
    changed = tmp_path / "changed_hosts"
    changed.write_text(f"[127.0.0.1]:{sshd.port} {' '.join(impostor.with_suffix('.pub').read_text().split()[:2])}\n")
    unknown = tmp_path / "unknown_hosts"
    unknown.write_text(f"[127.0.0.1]:{sshd.port + 1} {' '.join(impostor.with_suffix('.pub').read_text().split()[:2])}\n")

    for known, words in [(changed, f"the SSH host key of [127.0.0.1]:{sshd.port} does not match the one in {changed}"),
                         (unknown, f"the SSH host key of [127.0.0.1]:{sshd.port} is unknown: it is not in {unknown}"),
                         (tmp_path / "none", "no known_hosts file")]:
        with pytest.raises(PublishError) as err:
            publish(work, Options(push="origin", credentials=creds(client_key, known)), sleep=NO_SLEEP)
        assert words in str(err.value) and "\n" not in str(err.value)
    assert tip_of(bare) == before
    assert "Accepted publickey" not in sshd.log.read_text()  # refused before logging in


def test_hashed_known_hosts_entries_work_both_ways(tmp_path, sshd, client_key):
    """`ssh-keygen -H` hashes the host names: a hashed match is trusted, a hashed mismatch named as such."""
    bare = make_remote(tmp_path)
    work = ssh_clone(bare, tmp_path / "work", f"ssh://{sshd.user}@127.0.0.1:{sshd.port}{bare}")
    impostor = keygen(tmp_path / "impostor")
    good, bad = tmp_path / "good_hosts", tmp_path / "bad_hosts"
    good.write_text(sshd.known_hosts_line)
    bad.write_text(f"[127.0.0.1]:{sshd.port} {' '.join(impostor.with_suffix('.pub').read_text().split()[:2])}\n")
    for path in (good, bad):
        subprocess.run(["ssh-keygen", "-H", "-f", str(path)], check=True, capture_output=True)
        assert path.read_text().startswith("|1|")

    with pytest.raises(PublishError, match="does not match the one in"):
        publish(work, Options(push="origin", credentials=creds(client_key, bad)), sleep=NO_SLEEP)
    assert publish(work, Options(push="origin", credentials=creds(client_key, good)), sleep=NO_SLEEP).pushed


def test_publish_command_over_ssh_from_the_environment(tmp_path, sshd, client_key, known_hosts,
                                                       monkeypatch, capsys):
    bare = make_remote(tmp_path)
    work = ssh_clone(bare, tmp_path / "work", f"ssh://127.0.0.1:{sshd.port}{bare}")
    monkeypatch.setenv("MESHC_SSH_KEY", str(client_key))
    monkeypatch.setenv("MESHC_SSH_USER", sshd.user)
    wrong = tmp_path / "wrong_hosts"
    wrong.write_text(f"[127.0.0.1]:{sshd.port} {' '.join(client_key.with_suffix('.pub').read_text().split()[:2])}\n")

    monkeypatch.setenv("MESHC_SSH_KNOWN_HOSTS", str(wrong))
    assert main(["publish", "--repo", work.workdir, "--push", "origin"]) == 1
    assert capsys.readouterr().err.startswith("meshc: error: the SSH host key of ")

    monkeypatch.setenv("MESHC_SSH_KNOWN_HOSTS", str(tmp_path / "missing"))
    assert main(["publish", "--repo", work.workdir, "--push", "origin"]) == 2
    assert "MESHC_SSH_KNOWN_HOSTS" in capsys.readouterr().err

    monkeypatch.setenv("MESHC_SSH_KNOWN_HOSTS", str(known_hosts))
    assert main(["publish", "--repo", work.workdir, "--push", "origin"]) == 0
    assert "pushed to origin" in capsys.readouterr().out
    assert tip_of(bare) == work.head.target


def _publish(barrier, path: str, key: str, known: str, user: str, queue) -> None:
    barrier.wait()
    try:
        result = publish(pygit2.Repository(path), Options(
            push="origin", backoff_s=0.01,
            credentials=Credentials(ssh_key=Path(key),
                                    known_hosts=Path(known), ssh_user=user)))
        queue.put((result.pushed, result.attempts))
    except Exception as err:  # reported to the parent, which fails the test
        queue.put(("error", repr(err)))


def test_two_publishers_over_ssh_lose_nothing(tmp_path, sshd, client_key, known_hosts):
    bare = make_remote(tmp_path)
    url = f"ssh://127.0.0.1:{sshd.port}{bare}"
    a, b = ssh_clone(bare, tmp_path / "a", url), ssh_clone(bare, tmp_path / "b", url)
    commit_files(a, {"policies/bookinfo/reviews.yaml": edit(REVIEWS, "weight: 10", "weight: 35")}, "A: canary 35")
    commit_files(b, {"environments/staging.yaml": SAMPLE["environments/staging.yaml"].replace("10s", "4s")},
                 "B: staging 4s")
    results = race(_publish, [(r.workdir, str(client_key), str(known_hosts), sshd.user) for r in (a, b)])

    assert all(r[0] is True for r in results), results
    repo = pygit2.Repository(str(bare))
    assert_sources_rendered_once(repo, repo.references["refs/heads/main"].peel(pygit2.Commit),
                                 {"A: canary 35", "B: staging 4s"})
    git(bare, "fsck", "--strict")


# --- URL classification (no server needed) -------------------------------------------------


@pytest.mark.parametrize("url, kind", [
    ("git@github.com:acme/mesh.git", "ssh"),
    ("github.com:acme/mesh.git", "ssh"),  # scp form without user@: git's rule, a ':' before any '/'
    ("127.0.0.1:srv/mesh.git", "ssh"),
    ("[127.0.0.1:2222]:/srv/mesh.git", "ssh"),
    ("ssh://github.com/acme/mesh.git", "ssh"),
    ("git+ssh://git@github.com/acme/mesh.git", "ssh"),
    ("https://github.com/acme/mesh.git", "url"),
    ("file:///srv/mesh.git", "local"),
    ("/srv/odd:name.git", "local"),  # a '/' before the ':'
    ("./odd:name.git", "local"),
    ("../origin.git", "local"),
    ("C:\\repos\\mesh.git", "local"),  # a Windows drive, not host C
    ("C:/repos/mesh.git", "local"),
])
def test_urls_are_classified_as_git_does(url, kind, tmp_path):
    assert transport_of(url) == kind
    repo = pygit2.init_repository(str(tmp_path / "r"))
    assert (_local_path(repo, url) is not None) == (kind == "local")


def test_ssh_targets_name_user_host_port_and_path():
    assert ssh_target("github.com:acme/mesh.git") == SshTarget(None, "github.com", None, "acme/mesh.git")
    assert ssh_target("git@github.com:acme/mesh.git") == SshTarget("git", "github.com", None, "acme/mesh.git")
    assert ssh_target("[127.0.0.1:2222]:/srv/m.git") == SshTarget(None, "127.0.0.1", 2222, "/srv/m.git")
    assert ssh_target("ssh://ci@host:2200/m.git") == SshTarget("ci", "host", 2200, "/m.git")
    assert ssh_target("ssh://host:2200/m.git").known_hosts_name == "[host]:2200"
    assert ssh_target("host:m.git").known_hosts_name == "host"
    assert ssh_target("https://host/m.git") is None
