"""meshc's xDS server: serves `rendered/<env>/envoy/*.json` to Envoy proxies.

Public surface, here and in two modules (the rest is implementation):

- `consistency_errors(resources)`: the one snapshot consistency check, also
  run by the compiler's Envoy target before it writes;
- `resources.TYPE_URLS`, `resources.content_version`: what the emitted files are,
  shared with the Envoy target;
- `snapshot.load_snapshot`, `snapshot.Snapshot`, `snapshot.SnapshotError`:
  strict loading of emitted files;
- `server.Server`, `server.ServerThread`, `server.Options`: the server (gRPC
  ADS SotW + Delta, per-type xDS services, REST-JSON, health, metrics, debug);
  imported from there so that the check above does not pull in gRPC;
- `cli.add_parser`: the `meshc serve` subcommand.

Modules, in the order data flows:
    resources    type URLs by kind, the version rule, the files' bytes
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

Exceptions (drawn with the rest in `compiler.errors`):
    SnapshotError      files that do not make a servable snapshot (kept out of service)
    protos.ParseError  one document failing the strict parse
    stream.StreamError ends one gRPC stream with a status (unknown environment, ...)

It never imports `compiler.model` or `compiler.targets`: serving reads only
emitted files (go-control-plane's rule).
"""

from compiler.xds.consistency import consistency_errors

# Only the pure check is imported here: the compiler's Envoy target imports this package's
# wire modules and must not pay for protobuf, gRPC and every xDS type (~0.1 s).
__all__ = ["consistency_errors"]
