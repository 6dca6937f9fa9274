"""The one place the GitOps loop runs the compiler: files read from git → results.

`compile_files` wraps `compiler.pipeline.compile_source`. Both sides of a
diff go through the same content-addressed cache (`compiler.cache`): they
share every unchanged policy × environment unit, so the second side costs
only what the change touched. The head goes first because it is usually
warm already (`meshc compile --check` ran on it). Saving the cache is the
pipeline's job (after each clean compile); nothing here saves it again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

from compiler.gitops.errors import CompileFailed

Files = Mapping[str, bytes]  # a Source's content: repo-relative path → bytes
Outputs = Mapping[str, Mapping[str, bytes]]  # env → path under rendered/<env>/ → bytes
Render = Callable[[Files, str], Outputs]  # (files, what they are, for messages) → outputs


def open_cache(repo_dir: Path | str | None):
    """The repo's re-compile cache (in the user's cache directory), or None (no directory given).
    The caller closes it."""
    if repo_dir is None:
        return None
    from compiler.cache import Cache

    return Cache.for_repo(Path(repo_dir))


def compile_files(files: Files, cache=None, models: bool = True):
    """The pipeline's CompileResult for `files` (diagnostics, outputs, and meshes if `models`)."""
    from compiler.load import Source
    from compiler.pipeline import compile_source

    return compile_source(Source(dict(files)), cache=cache, models=models)


def renderer(cache=None) -> Render:
    """A Render that raises CompileFailed (with the diagnostics) on any error."""
    def render(files: Files, what: str = "the source") -> Outputs:
        result = compile_files(files, cache, models=False)  # publishing needs the files only
        if not result.ok:
            raise CompileFailed(what, result.diagnostics)
        return result.outputs
    return render


render_files = renderer()


def compile_pair(base: Files, head: Files, cache=None):
    """(base result, head result), sharing `cache` when given."""
    head_result = compile_files(head, cache)
    base_result = head_result if base == head else compile_files(base, cache)
    return base_result, head_result
