"""FakeGitHub: a small fake of the GitHub REST API on 127.0.0.1, for `meshc comment` tests.

No forge can run here, so this implements just what meshc calls, the way
https://docs.github.com/en/rest/issues/comments documents it:

    GET   /user                                                       (the token's account)
    GET   /repos/{owner}/{repo}/issues/{n}/comments?per_page=&page=   (Link: rel="next")
    POST  /repos/{owner}/{repo}/issues/{n}/comments
    PATCH /repos/{owner}/{repo}/issues/comments/{id}                  (any comment: write access edits all)

A token listed in `users` belongs to that account (a personal or machine
user's token): /user answers with it and its comments carry it. Any other
token is an installation token, like Actions' GITHUB_TOKEN: /user answers
403 "Resource not accessible by integration" and it posts as
github-actions[bot]. Also: bearer-token auth (401 "Bad credentials"),
read-only tokens (403 "Resource not accessible by integration"), 404 for an
unknown repository or pull request, an optional path prefix (GitHub
Enterprise's /api/v3), and scripted failures (`fail_next`) for the retry
paths. Every request is recorded in `requests`.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

BOT = {"login": "github-actions[bot]", "type": "Bot"}


@dataclass
class Fault:
    status: int
    headers: dict = field(default_factory=dict)
    body: dict = field(default_factory=lambda: {"message": "scripted failure"})


class FakeGitHub:
    def __init__(self, repository: str = "acme/mesh", prs: tuple[int, ...] = (7,), token: str = "good-token",
                 readonly_tokens: tuple[str, ...] = (), prefix: str = "", users: dict[str, dict] | None = None):
        self.repository = repository
        self.token = token
        self.users = dict(users or {})  # token → {"login", "type"}; other tokens are installation tokens
        self.readonly_tokens = set(readonly_tokens)
        self.prefix = prefix
        self.comments: dict[int, list[dict]] = {pr: [] for pr in prs}
        self.requests: list[tuple[str, str]] = []
        self.faults: list[Fault] = []
        self._next_id = 1000
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}{self.prefix}"

    def __enter__(self) -> "FakeGitHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def fail_next(self, status: int, times: int = 1, headers: dict | None = None, message: str = "scripted failure"):
        self.faults += [Fault(status, dict(headers or {}), {"message": message}) for _ in range(times)]

    def add_comment(self, pr: int, body: str, user: dict | None = None) -> dict:
        with self._lock:
            self._next_id += 1
            comment = {"id": self._next_id, "body": body, "user": user or {"login": "someone", "type": "User"},
                       "html_url": f"https://github.example/{self.repository}/pull/{pr}#issuecomment-{self._next_id}"}
            self.comments[pr].append(comment)
            return comment

    # --- request handling (called from the server's threads) ---------------------------

    def handle(self, method: str, target: str, headers, body: bytes):
        self.requests.append((method, target))
        with self._lock:
            if self.faults:
                fault = self.faults.pop(0)
                return fault.status, fault.headers, fault.body
        token = (headers.get("Authorization") or "").removeprefix("Bearer ").removeprefix("token ")
        if token not in {self.token, *self.readonly_tokens, *self.users}:
            return 401, {}, {"message": "Bad credentials", "documentation_url": "https://docs.github.com/rest"}
        url = urlsplit(target)
        path = url.path.removeprefix(self.prefix)
        if path == "/user" and method == "GET":
            if token not in self.users:
                return 403, {}, {"message": "Resource not accessible by integration"}
            return 200, {}, self.users[token]
        repo = re.escape(self.repository)
        if m := re.fullmatch(rf"/repos/{repo}/issues/(\d+)/comments", path):
            pr = int(m.group(1))
            if pr not in self.comments:
                return 404, {}, {"message": "Not Found"}
            if method == "GET":
                return self._page(pr, parse_qs(url.query), target)
            if method == "POST":
                if token in self.readonly_tokens:
                    return 403, {}, {"message": "Resource not accessible by integration"}
                return 201, {}, self.add_comment(pr, json.loads(body)["body"], self.users.get(token, BOT))
        if (m := re.fullmatch(rf"/repos/{repo}/issues/comments/(\d+)", path)) and method == "PATCH":
            if token in self.readonly_tokens:
                return 403, {}, {"message": "Resource not accessible by integration"}
            for comment in (c for cs in self.comments.values() for c in cs):
                if comment["id"] == int(m.group(1)):
                    comment["body"] = json.loads(body)["body"]
                    return 200, {}, comment
        return 404, {}, {"message": "Not Found"}

    def _page(self, pr: int, query: dict, target: str):
        per_page = min(int(query.get("per_page", ["30"])[0]), 100)
        page = int(query.get("page", ["1"])[0])
        items = self.comments[pr]
        last = max(1, -(-len(items) // per_page))
        links = []
        base = f"{self.url}/repos/{self.repository}/issues/{pr}/comments"
        if page < last:
            links.append(f'<{base}?per_page={per_page}&page={page + 1}>; rel="next"')
            links.append(f'<{base}?per_page={per_page}&page={last}>; rel="last"')
        headers = {"Link": ", ".join(links)} if links else {}
        return 200, headers, items[(page - 1) * per_page: page * per_page]


def _handler(fake: FakeGitHub):
    class Handler(BaseHTTPRequestHandler):
        def _serve(self):
            length = int(self.headers.get("Content-Length") or 0)
            status, headers, payload = fake.handle(self.command, self.path, self.headers, self.rfile.read(length))
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, str(value))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = _serve

        def log_message(self, *args):  # keep pytest output clean
            pass

    return Handler
