"""The GitOps loop: review a policy change, publish its rendered output.

    review.diff_revisions   two revisions (git objects or the working tree) → a diff Report
    diff.compare            two compiled sides → Report (pure); summary / resources do the parts
    render.render           Report → text | markdown | json
    publish.publish         HEAD → a render commit (commit-back or a rendered branch), pushed
                            with compare-and-swap retries
    comment.GitHub          the sticky pull-request comment (GitHub REST API)
    cli.add_parsers         the `diff`, `publish` and `comment` subcommands

Only this package touches git (pygit2) and the forge (requests) for meshc;
errors a user can act on are the `GitOpsError` tree in `errors`.
"""

from compiler.gitops.comment import GitHub, Retry
from compiler.gitops.diff import Report, Side, compare
from compiler.gitops.errors import CompileFailed, GitHubError, GitOpsError, PublishError, RepoError
from compiler.gitops.publish import BOT, Identity, Options, Published, publish
from compiler.gitops.remote import Credentials
from compiler.gitops.review import diff_revisions

__all__ = [
    "BOT", "CompileFailed", "Credentials", "GitHub", "GitHubError", "GitOpsError", "Identity", "Options",
    "PublishError", "Published", "RepoError", "Report", "Retry", "Side", "compare", "diff_revisions",
    "publish",
]
