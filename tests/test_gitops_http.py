"""Publishing over HTTP with a token: a real `git http-backend` (git's smart-HTTP
server) behind basic auth on 127.0.0.1, as GitHub serves HTTPS pushes."""

from __future__ import annotations

import base64
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pygit2
import pytest

from compiler.gitops.errors import PublishError
from compiler.gitops.publish import Options, publish
from compiler.gitops.remote import Credentials, credentials_from_env
from test_gitops_publish import assert_sources_rendered_once, race
from test_gitops_support import REVIEWS, SAMPLE, commit_files, edit, git, make_remote

TOKEN = "ghs_test_token"


class GitHttpServer:
    """`git http-backend` as CGI, requiring basic auth whose password is TOKEN."""

    def __init__(self, root: Path):
        self.root = root
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(root))
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)

    def url(self, name: str) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/{name}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _handler(root: Path):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self):
            auth = self.headers.get("Authorization", "")
            user, _, password = base64.b64decode(auth.removeprefix("Basic ")).decode().partition(":") \
                if auth.startswith("Basic ") else ("", "", "")
            if password != TOKEN:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="git"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = self._body()
            path, _, query = self.path.partition("?")
            env = {"PATH": os.environ["PATH"], "GIT_PROJECT_ROOT": str(root), "GIT_HTTP_EXPORT_ALL": "1",
                   "PATH_INFO": path, "QUERY_STRING": query, "REQUEST_METHOD": self.command,
                   "CONTENT_TYPE": self.headers.get("Content-Type", ""), "CONTENT_LENGTH": str(len(body)),
                   "REMOTE_USER": user, "REMOTE_ADDR": "127.0.0.1", "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(root)}
            out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True, check=True).stdout
            head, _, payload = out.partition(b"\r\n\r\n")
            headers = [line.split(": ", 1) for line in head.decode().split("\r\n") if line]
            status = next((int(v.split()[0]) for k, v in headers if k.lower() == "status"), 200)
            self.send_response(status)
            for k, v in headers:
                if k.lower() != "status":
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().strip().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        do_GET = do_POST = _serve

        def log_message(self, *args):
            pass

    return Handler


@pytest.fixture
def served(tmp_path):
    bare = make_remote(tmp_path)
    with GitHttpServer(tmp_path) as server:
        yield bare, server.url(bare.name)


def http_clone(url: str, path: Path) -> pygit2.Repository:
    return pygit2.clone_repository(url, str(path), callbacks=_token_callbacks())


def _token_callbacks():
    return pygit2.RemoteCallbacks(credentials=pygit2.UserPass("x-access-token", TOKEN))


def test_push_over_http_with_a_token(served, tmp_path):
    bare, url = served
    work = http_clone(url, tmp_path / "work")
    result = publish(work, Options(push="origin", credentials=Credentials(token=TOKEN)), sleep=lambda s: None)
    assert result.pushed
    assert str(pygit2.Repository(str(bare)).references["refs/heads/main"].target) == result.commit


def test_a_wrong_token_is_a_one_line_error(served, tmp_path):
    bare, url = served
    work = http_clone(url, tmp_path / "work")
    before = pygit2.Repository(str(bare)).references["refs/heads/main"].target
    with pytest.raises(PublishError) as err:
        publish(work, Options(push="origin", credentials=Credentials(token="wrong")))
    assert "authentication failed" in str(err.value) and "\n" not in str(err.value)
    assert TOKEN not in str(err.value)
    assert pygit2.Repository(str(bare)).references["refs/heads/main"].target == before


def _publish(barrier, path: str, queue) -> None:
    barrier.wait()
    try:
        result = publish(pygit2.Repository(path), Options(push="origin", credentials=Credentials(token=TOKEN),
                                                           backoff_s=0.01))
        queue.put((result.pushed, result.attempts))
    except Exception as err:
        queue.put(("error", repr(err)))


def test_two_publishers_over_http_lose_nothing(served, tmp_path):
    bare, url = served
    a, b = http_clone(url, tmp_path / "a"), http_clone(url, tmp_path / "b")
    commit_files(a, {"policies/bookinfo/reviews.yaml": edit(REVIEWS, "weight: 10", "weight: 20")}, "A: canary 20")
    commit_files(b, {"environments/prod.yaml": SAMPLE["environments/prod.yaml"].replace("weight: 5", "weight: 1")},
                 "B: prod canary 1")
    results = race(_publish, [(r.workdir,) for r in (a, b)])
    assert all(r[0] is True for r in results), results
    repo = pygit2.Repository(str(bare))
    assert_sources_rendered_once(repo, repo.references["refs/heads/main"].peel(pygit2.Commit),
                                 {"A: canary 20", "B: prod canary 1"})
    git(bare, "fsck", "--strict")


def test_credentials_come_from_the_environment():
    creds = credentials_from_env({"GITHUB_TOKEN": "gh", "MESHC_SSH_KEY": "/k/id_ed25519"})
    assert creds.token == "gh" and creds.username == "x-access-token" and str(creds.ssh_key) == "/k/id_ed25519"
    assert credentials_from_env({"GITHUB_TOKEN": "gh", "MESHC_GIT_TOKEN": "pat"}).token == "pat"
    assert credentials_from_env({}) == Credentials()
    ssh = credentials_from_env({"MESHC_SSH_USER": "deploy", "MESHC_SSH_KNOWN_HOSTS": "/ci/known_hosts"})
    assert ssh.ssh_user == "deploy" and str(ssh.known_hosts) == "/ci/known_hosts"


def test_ssh_and_https_credentials_are_offered_once_each(tmp_path):
    """The callback, called the way libgit2 calls it (tests/test_gitops_ssh.py pushes through
    a real sshd): a URL without a user gets a user-name-only request first."""
    from pygit2.enums import CredentialType

    from compiler.gitops.remote import _Callbacks

    key = tmp_path / "id_ed25519"
    ssh = _Callbacks(Credentials(ssh_key=key, ssh_passphrase="pw"))
    offered = ssh.credentials("git@github.com:acme/mesh.git", "git", CredentialType.SSH_KEY)
    assert isinstance(offered, pygit2.Keypair)
    assert offered.credential_tuple == ("git", f"{key}.pub", str(key), "pw")
    with pytest.raises(PublishError, match="MESHC_SSH_KEY or an ssh-agent"):
        ssh.credentials("git@github.com:acme/mesh.git", "git", CredentialType.SSH_KEY)  # rejected: stop asking
    for configured, user in [(None, "git"), ("deploy", "deploy")]:
        asking = _Callbacks(Credentials(ssh_user=configured), "ssh://github.com/acme/mesh.git")
        name = asking.credentials("ssh://github.com/acme/mesh.git", None, CredentialType.USERNAME)
        assert isinstance(name, pygit2.Username) and name.credential_tuple == (user,)
        agent = asking.credentials("ssh://github.com/acme/mesh.git", user,
                                   CredentialType.SSH_KEY | CredentialType.SSH_CUSTOM)
        assert isinstance(agent, pygit2.KeypairFromAgent) and agent.credential_tuple[0] == user
    named = _Callbacks(Credentials(ssh_user="deploy")).credentials("ssh://ci@h/r.git", "ci", CredentialType.USERNAME)
    assert named.credential_tuple == ("ci",)  # the URL's user wins
    https = _Callbacks(Credentials(token="t")).credentials("https://github.com/acme/mesh.git", None,
                                                            CredentialType.USERPASS_PLAINTEXT)
    assert isinstance(https, pygit2.UserPass) and https.credential_tuple == ("x-access-token", "t")
    with pytest.raises(PublishError) as err:
        _Callbacks(Credentials()).credentials("https://user:secret@example.com/r.git", None,
                                              CredentialType.USERPASS_PLAINTEXT)
    assert "secret" not in str(err.value)
