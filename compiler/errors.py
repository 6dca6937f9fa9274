"""meshc's exceptions, one tree. A user's mistake in a policy is never one of
these: it is a `Diagnostic`. Exceptions are for the command line, for I/O and
git, and for bugs.

    MeshcError                      a failure the user can act on: `meshc: error: <message>`
    ├── UsageError                  the command line asks for what cannot be (exit 2)
    │   └── UnknownEnvironment      `--env` names an environment that has no file
    ├── CacheDamaged                the re-compile cache lost a piece it listed: `meshc compile`
    │                               compiles again without it; elsewhere, the message says what to delete
    └── gitops.errors.GitOpsError   the GitOps loop (exit 1); its own subtree is drawn there:
                                    RepoError, CompileFailed, PublishError, GitHubError
    SnapshotError (xds.snapshot)    emitted files that do not make a servable snapshot:
                                    `meshc serve` keeps serving the last good one
    ├── ParseError (xds.protos)     one resource failing the strict proto3-JSON parse
    StreamError (xds.stream)        ends one xDS stream with a gRPC status
    AssertionError
    └── InconsistentSnapshot        a compiler bug: lowered resources name what is not there

The CLI catches `MeshcError` only; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["CacheDamaged", "InconsistentSnapshot", "MeshcError", "UnknownEnvironment", "UsageError"]


class MeshcError(Exception):
    """A failure the user can act on; `str()` is the one-line message."""


class UsageError(MeshcError):
    """The command line asks for what cannot be: exit code 2."""


class UnknownEnvironment(UsageError):
    """`--env` named an environment that has no file."""


class CacheDamaged(MeshcError):
    """A piece the re-compile cache listed could not be read back (its file damaged, or
    changed by another process): nothing it gave can be trusted for this run."""


class InconsistentSnapshot(AssertionError):
    """A compiler bug: the lowered Envoy resources refer to something that is not there."""

    def __init__(self, environment: str, problems: list[str]) -> None:
        super().__init__(f"envoy snapshot for {environment!r} is inconsistent:\n  " + "\n  ".join(problems))
        self.environment = environment
        self.problems = tuple(problems)

    def __reduce__(self):  # raised in a worker process, it must reach the parent whole
        return InconsistentSnapshot, (self.environment, list(self.problems))
