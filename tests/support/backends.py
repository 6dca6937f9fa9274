"""Loopback addressing and small HTTP/1.1 backends for end-to-end tests.

Owns `unique_loopback` and `free_port` (so tests on parallel pytest-xdist
workers never share an IP:port) and `Backend`, a threaded HTTP server that
answers every request with its own name.
"""

from __future__ import annotations

import itertools
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["Backend", "Backends", "free_port", "unique_loopback"]

_HOSTS_PER_WORKER = range(2, 255)
_host_counter = itertools.count()
_host_lock = threading.Lock()


def _worker_octet() -> int:
    """Second-to-last octet for this process: 0 for master, n+1 for gw<n>."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw") and worker[2:].isdigit():
        return int(worker[2:]) % 255 + 1
    return 0


def unique_loopback() -> str:
    """A loopback address no other call, in this or another xdist worker, returns.

    Envoy sets SO_REUSEPORT on listeners, so two Envoys bound to the same
    IP:port would silently share traffic; distinct IPs rule that out.
    """
    with _host_lock:
        n = next(_host_counter)
    last = _HOSTS_PER_WORKER[n % len(_HOSTS_PER_WORKER)]
    return f"127.0.{_worker_octet()}.{last}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as two writes
    server: "_Server"

    def _answer(self) -> None:
        self._drain_body()
        headers: dict[str, str] = {}
        for name, value in self.headers.items():  # a header sent twice reads as one, comma-joined (RFC 9110)
            name = name.lower()
            headers[name] = f"{headers[name]},{value}" if name in headers else value
        status = self.server.backend._record(self.path, headers)
        if self.server.backend.delay:
            time.sleep(self.server.backend.delay)
        name = self.server.backend.name
        body = name.encode()
        self.send_response(status)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.send_header("x-backend", name)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _drain_body(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _answer

    def log_message(self, format: str, *args: object) -> None:
        """Stay quiet: no stderr line per request."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    backend: "Backend"

    def handle_error(self, request, client_address) -> None:
        """A client gone mid-answer (Envoy cancelling a mirror, a test's timeout) is not an error here.
        socketserver would print its traceback to sys.stderr from this thread, into whatever a
        test running meanwhile captures there (the golden tests capture the CLI's stderr)."""
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class Backend:
    """An HTTP/1.1 server answering every request with 200 and body `name`.

    `delay` sleeps before each answer; `fail_every` answers 500 to every Nth request;
    `fail_first` answers 503 to the first
    N requests. Every response carries `x-backend: <name>`. `paths` and `headers`
    record each request's target and its (lower-cased) headers, in arrival order.
    """

    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 0, *,
                 delay: float = 0, fail_first: int = 0, fail_every: int = 0) -> None:
        self.name = name
        self.delay = delay
        self.fail_first = fail_first
        self.fail_every = fail_every
        self.requests = 0
        self.paths: list[str] = []
        self.headers: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._server = _Server((host, port), _Handler, bind_and_activate=False)
        self._server.backend = self
        self._thread: threading.Thread | None = None
        self.host = host
        self.port = port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def _record(self, path: str, headers: dict[str, str]) -> int:
        with self._lock:
            self.requests += 1
            self.paths.append(path)
            self.headers.append(headers)
            if self.fail_every and self.requests % self.fail_every == 0:
                return 500
            return 503 if self.requests <= self.fail_first else 200

    def reset(self) -> None:
        """Forget counted requests (fail_first starts over)."""
        with self._lock:
            self.requests = 0
            self.paths.clear()
            self.headers.clear()

    def start(self) -> "Backend":
        self._server.server_bind()
        self._server.server_activate()
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name=f"backend-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> "Backend":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Backend({self.name!r} at {self.address}, requests={self.requests})"


class Backends:
    """Several named backends started and stopped together; index by name."""

    def __init__(self, *names: str, host: str = "127.0.0.1", **options: float) -> None:
        self._by_name = {name: Backend(name, host, **options) for name in names}

    def __getitem__(self, name: str) -> Backend:
        return self._by_name[name]

    def __iter__(self):
        return iter(self._by_name.values())

    def __enter__(self) -> "Backends":
        started = []
        try:
            for backend in self:
                started.append(backend.start())
        except BaseException:
            for backend in started:
                backend.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for backend in self:
            backend.stop()
