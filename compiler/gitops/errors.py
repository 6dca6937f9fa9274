"""The exceptions of the GitOps loop, one tree (a branch of the one in `compiler.errors`):

    GitOpsError                 a user-facing failure: the CLI prints `meshc: error: <message>`
    ├── RepoError               not a git repository, unborn or detached HEAD, unknown revision
    ├── CompileFailed           a revision does not compile; carries its diagnostics
    ├── PublishError            publish could not finish (conflict, remote kept moving, push refused)
    └── GitHubError             the GitHub API refused or kept failing; `status` is the HTTP status

Bugs are ordinary exceptions and are not caught by the CLI.
"""

from __future__ import annotations

from typing import Sequence

from compiler.diagnostics import Diagnostic
from compiler.errors import MeshcError


class GitOpsError(MeshcError):
    """A failure the user can act on; `str()` is the one-line message."""


class RepoError(GitOpsError):
    pass


class CompileFailed(GitOpsError):
    def __init__(self, what: str, diagnostics: Sequence[Diagnostic]):
        self.what = what
        self.diagnostics = tuple(diagnostics)
        errors = sum(1 for d in self.diagnostics if d.is_error)
        super().__init__(f"{what} does not compile ({errors} error{'s' * (errors != 1)})")


class PublishError(GitOpsError):
    pass


class GitHubError(GitOpsError):
    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status
