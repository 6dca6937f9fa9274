"""Targets lower one environment's `Mesh` into output files.

Each target is a module with `NAME` and three functions:

- `lower_service(service, environment) -> fragment`: everything that depends
  on one service alone; a pure function, so the pipeline computes fragments
  in worker processes and caches them (a fragment must be JSON-able but for
  the `emit.Piece`s in it, its serialised resources or documents);
- `assemble(environment, fragments) -> Lowered`: the environment's files from
  every service's fragment, in mesh order (cross-service work lives here);
- `lower(mesh) -> Lowered`: `assemble` over `lower_service` of every service.

Adding a target is a new module plus one line in `registry`. Targets never
import one another. Paths in `Lowered.files` are relative to `rendered/<env>/`;
`Lowered` and `OutputFile` belong to `compiler.emit`, which serialises them.
"""

from __future__ import annotations

from compiler.emit import Lowered, OutputFile

__all__ = ["Lowered", "OutputFile", "registry"]


def registry():
    """The targets, in the order they run. Imported lazily to keep start-up cheap."""
    from compiler.targets import envoy, istio

    return (istio, envoy)
