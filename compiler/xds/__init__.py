"""meshc's xDS server: serves `rendered/<env>/envoy/*.json` to Envoy proxies.

Public surface, here and in two modules (the rest is implementation):

- `consistency_errors(resources)`: the one snapshot consistency check, also
  run by the compiler's Envoy target before it writes;
- `load_snapshot`, `Snapshot`, `SnapshotError`: strict loading of emitted files;
- `server.Server`, `server.ServerThread`, `server.Options`: the server (gRPC
  ADS SotW + Delta, per-type xDS services, REST-JSON, health, metrics, debug);
  imported from there so that the check above does not pull in gRPC;
- `cli.add_parser`: the `meshc serve` subcommand.

Modules, in the order data flows:
    protos       strict proto3-JSON parsing, enum checks
    consistency  consistency_errors: every reference resolves (pure dict walking)
    snapshot     files -> Snapshot, pre-serialised responses
    cache        the last good Snapshot per environment; publication
    stream       xDS protocol state per gRPC stream (SotW, Delta)
    ads          grpc.aio services over `stream`
    rest         HTTP: REST xDS, /healthz /readyz /metrics /debug
    watch        inotify / polling, debounced
    server       wiring, reload cycle, Options
    cli          `meshc serve` flags
    sample       a hand-made snapshot and bootstraps (tests, demo, bench)
    demo         `make demo`

Exceptions:
    SnapshotError      files that do not make a servable snapshot (kept out of service)
    protos.ParseError  one document failing the strict parse
    stream.StreamError ends one gRPC stream with a status (unknown environment, ...)

It never imports `compiler.model` or `compiler.targets`: serving reads only
emitted files (go-control-plane's rule).
"""

from compiler.xds.consistency import consistency_errors

__all__ = ["Snapshot", "SnapshotError", "consistency_errors", "load_snapshot"]


def __getattr__(name: str):
    # The snapshot module pulls in protobuf and every xDS type (~0.1 s); the compiler
    # imports this package only for `consistency_errors` and must not pay for it.
    if name in ("Snapshot", "SnapshotError", "load_snapshot"):
        from compiler.xds import snapshot

        return getattr(snapshot, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
