"""The `diff`, `publish` and `comment` subcommands: arguments in, exit code out.

Exit codes: diff: 0, or with --exit-code 0 no change / 1 changes; 2 for an
error (a bad revision, a side that does not compile). publish and comment:
0 done; 1 the policies do not compile or the push / GitHub call failed;
2 a usage error (not a repository, detached HEAD, missing GITHUB_* setting).
Messages are one line, `meshc: error: ...`; compile errors are the diagnostics.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import pygit2

from compiler.gitops.build import open_cache, renderer
from compiler.gitops.comment import ACTIONS_BOT, API_URL, GitHub
from compiler.gitops.errors import CompileFailed, GitHubError, GitOpsError, PublishError, RepoError
from compiler.gitops.publish import BOT, Identity, Options, publish
from compiler.gitops.render import markdown, render
from compiler.gitops.remote import credentials_from_env
from compiler.gitops.review import diff_revisions
from compiler.gitops.source import open_repo
from compiler.load import is_input_path

EXIT_OK, EXIT_CHANGES, EXIT_FAILED, EXIT_USAGE = 0, 1, 1, 2


def add_parsers(subparsers) -> None:
    diff = subparsers.add_parser(
        "diff", help="what a policy change does to every environment",
        description="Compile two revisions straight from git and report what changes, per environment.")
    _repo(diff)
    diff.add_argument("--base", required=True, metavar="REF", help="the revision to compare against (e.g. origin/main)")
    diff.add_argument("--head", metavar="REF", help="the changed revision (default: the working tree)")
    diff.add_argument("--format", choices=("text", "markdown", "json"), default="text")
    diff.add_argument("--exit-code", action="store_true",
                      help="exit 1 when anything changes, 0 when nothing does (like git diff)")
    _no_cache(diff)
    diff.set_defaults(func=run_diff)

    pub = subparsers.add_parser(
        "publish", help="commit the rendered output (and push it)",
        description="Compile HEAD and commit rendered/ on the current branch, or onto --branch.")
    _repo(pub)
    pub.add_argument("--branch", metavar="NAME", help="commit onto this branch holding only rendered/ instead")
    pub.add_argument("--push", metavar="REMOTE", help="push to this remote, retrying on top when it moved")
    pub.add_argument("--author", type=_identity, default=BOT, metavar="'NAME <EMAIL>'", help=f"default: {BOT}")
    pub.add_argument("--committer", type=_identity, metavar="'NAME <EMAIL>'", help="default: the author")
    pub.add_argument("--attempts", type=_positive, default=Options.attempts, metavar="N",
                     help="push rounds before giving up on a remote that keeps moving")
    _no_cache(pub)
    pub.set_defaults(func=run_publish)

    com = subparsers.add_parser(
        "comment", help="post the diff as one sticky pull-request comment",
        description="Post or update meshc's comment on a pull request. "
                    "Reads GITHUB_TOKEN, GITHUB_REPOSITORY (owner/name), GITHUB_API_URL and MESHC_BOT_LOGIN.")
    _repo(com)
    com.add_argument("--pr", type=_positive, required=True, metavar="N", help="the pull request number")
    source = com.add_mutually_exclusive_group(required=True)
    source.add_argument("--body-file", metavar="FILE", help="the Markdown to post ('-' for stdin)")
    source.add_argument("--base", metavar="REF", help="compute the diff against this revision")
    com.add_argument("--head", metavar="REF", help="with --base: the changed revision (default: the working tree)")
    com.add_argument("--bot-login", metavar="LOGIN",
                     help="the bot an app installation token posts as, whose marked comment is meshc's "
                          f"(default: $MESHC_BOT_LOGIN, else {ACTIONS_BOT}); a user token's own login is asked")
    _no_cache(com)
    com.set_defaults(func=run_comment)

    can = subparsers.add_parser(
        "canary", help="step, promote, roll back or hold each scheduled canary, from Prometheus",
        description="For each canary with steps in ENV: read its figures from Prometheus, decide, and write the "
                    "decision into environments/ENV.yaml (exit 1 when one rolled back).")
    _repo(can)
    can.add_argument("--env", required=True, metavar="NAME")
    can.add_argument("--prometheus", metavar="URL", help="default: the environment's spec.metrics.prometheus")
    can.add_argument("--dry-run", action="store_true", help="decide and say so; write nothing")
    _decision_args(can)
    can.set_defaults(func=run_canary)

    pro = subparsers.add_parser(
        "promote", help="carry each release from one environment to the next, as a canary at its first step",
        description="The version --from runs as stable becomes --to's canary at the first step of its schedule "
                    "(its stable where it has none; never prod's at 100%%), written into environments/TO.yaml.")
    _repo(pro)
    pro.add_argument("--from", dest="from_env", required=True, metavar="ENV")
    pro.add_argument("--to", dest="to_env", required=True, metavar="ENV")
    _decision_args(pro)
    pro.set_defaults(func=run_promote)


def _decision_args(parser: argparse.ArgumentParser) -> None:
    """What canary and promote share: which services, committing, the time decided at."""
    parser.add_argument("services", nargs="*", metavar="SERVICE", help="only these (namespace/name); default: every one")
    parser.add_argument("--commit", action="store_true", help="commit each decision, its verdict the message")
    parser.add_argument("--now", metavar="TIME", help="decide as at this RFC 3339 time (default: now), e.g. for freeze windows")
    parser.add_argument("--author", type=_identity, default=BOT, metavar="'NAME <EMAIL>'", help=f"default: {BOT}")


def run_diff(args) -> int:
    try:
        report = diff_revisions(Path(args.repo), args.base, args.head, cache=not args.no_cache)
    except GitOpsError as err:
        return _fail(err, EXIT_USAGE)
    except pygit2.GitError as err:
        return _fail(f"git: {err}", EXIT_USAGE)
    sys.stdout.write(render(report, args.format))
    if report.failed:
        return EXIT_USAGE
    return EXIT_CHANGES if args.exit_code and report.changed else EXIT_OK


def run_publish(args) -> int:
    credentials = credentials_from_env(os.environ)
    if credentials.known_hosts is not None and not credentials.known_hosts.expanduser().is_file():
        return _fail(f"MESHC_SSH_KNOWN_HOSTS: no such file {credentials.known_hosts}", EXIT_USAGE)
    options = Options(branch=args.branch, push=args.push, author=args.author,
                      committer=args.committer or args.author, attempts=args.attempts,
                      credentials=credentials)
    cache = None
    try:
        repo = open_repo(args.repo)
        if repo.workdir and Path(repo.workdir).resolve() != Path(args.repo).resolve():
            raise RepoError(f"publish needs --repo to be the top of the git repository ({repo.workdir.rstrip('/')})")
        cache = None if args.no_cache else open_cache(args.repo)
        result = publish(repo, options, renderer(cache))
    except CompileFailed as err:
        for d in err.diagnostics:
            print(d.render(), file=sys.stderr)
        return _fail(err, EXIT_FAILED)
    except PublishError as err:
        return _fail(err, EXIT_FAILED)
    except GitOpsError as err:
        return _fail(err, EXIT_USAGE)
    except (pygit2.GitError, OSError) as err:  # an I/O or repository failure: one line, not a traceback
        return _fail(f"git: {err}", EXIT_FAILED)
    finally:
        if cache is not None:
            cache.close()
    branch = result.ref.removeprefix("refs/heads/")
    where = f" and pushed to {args.push}" if result.pushed else ""
    if result.commit:
        print(f"committed {result.commit[:12]} on {branch}{where}: rendered {result.source[:12]}")
    else:
        print(f"nothing to publish: {branch} already renders {result.source[:12]}")
    for note in result.notes + _uncommitted_inputs(repo):
        print(f"meshc: note: {note}", file=sys.stderr)
    return EXIT_OK


def _now(text: str | None):
    """The time a run decides at: --now, else now. Raises ValueError for what is not an RFC 3339 time."""
    from datetime import datetime, timezone

    from compiler.validate import instant

    if not text:
        return datetime.now(timezone.utc)
    now = instant(text)
    if now is None:
        raise ValueError(text)
    return now


def run_canary(args) -> int:
    from compiler.gitops.canary import run

    return _delivery(args, lambda source, now: run(source, args.env, tuple(args.services), args.prometheus, now),
                     EXIT_USAGE, args.dry_run, "meshc canary", f"{args.env}: no canary with steps")


def run_promote(args) -> int:
    from compiler.gitops.canary import promote

    return _delivery(args, lambda source, now: promote(source, args.from_env, args.to_env, tuple(args.services), now),
                     EXIT_FAILED, False, "meshc promote", f"{args.to_env}: nothing to promote")


def _delivery(args, decide, refused: int, dry_run: bool, title: str, nothing: str) -> int:
    """A canary or promotion run: decide at --now over the repository, print, write, commit."""
    from compiler.errors import MeshcError
    from compiler.load import source_from_dir

    try:
        now = _now(args.now)
    except ValueError:
        return _fail(f"--now {args.now!r} is not an RFC 3339 time with its offset", EXIT_USAGE)
    try:
        outcome = decide(source_from_dir(Path(args.repo)), now)
    except MeshcError as err:
        return _fail(err, refused)
    for line in outcome.verdicts or (nothing,):
        print(line)
    return _write(args, outcome, dry_run=dry_run, title=title)


def _write(args, outcome, dry_run: bool, title: str) -> int:
    """Write the environment file a run changed, and with --commit commit each decision on its own
    (its verdict the message); its exit code."""
    if outcome.after != outcome.before and not dry_run:
        path = Path(args.repo) / outcome.path
        for verdict, text in outcome.changes if args.commit else ():
            path.write_text(text)
            try:
                oid = _commit(Path(args.repo), outcome.path, verdict, args.author, title)
            except (pygit2.GitError, GitOpsError) as err:
                return _fail(f"git: {err}", EXIT_USAGE)
            print(f"committed {str(oid)[:12]}")
        path.write_text(outcome.after)
    return EXIT_FAILED if outcome.rolled_back else EXIT_OK


def _commit(root: Path, path: str, verdict: str, author: Identity, title: str) -> pygit2.Oid:
    """One commit of `path` on HEAD, whose message is the decision."""
    repo = open_repo(root)
    repo.index.read()
    repo.index.add(path)
    repo.index.write()
    tree = repo.index.write_tree()
    message = f"{title}: {verdict}\n\n{verdict}\n"
    parents = [] if repo.head_is_unborn else [repo.head.target]
    return repo.create_commit("HEAD", author.signature(), author.signature(), message, tree, parents)


def _uncommitted_inputs(repo: pygit2.Repository) -> tuple[str, ...]:
    """publish renders HEAD: say so when the working tree holds policy edits it left out."""
    if repo.is_bare:
        return ()
    edited = sorted(p for p, flags in repo.status().items()
                    if is_input_path(p) and flags not in (pygit2.enums.FileStatus.CURRENT, pygit2.enums.FileStatus.IGNORED))
    if not edited:
        return ()
    more = f" and {len(edited) - 3} more" if len(edited) > 3 else ""
    return (f"published HEAD; uncommitted changes to {', '.join(edited[:3])}{more} are not in it",)


def run_comment(args) -> int:
    token = os.environ.get("GITHUB_TOKEN")
    repository = os.environ.get("GITHUB_REPOSITORY", "")
    if not token:
        return _fail("GITHUB_TOKEN is not set", EXIT_USAGE)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repository):
        return _fail(f"GITHUB_REPOSITORY must be owner/name, not {repository!r}", EXIT_USAGE)
    try:
        body = _body(args)
    except OSError as err:
        return _fail(f"cannot read {args.body_file}: {err.strerror}", EXIT_USAGE)
    except GitOpsError as err:
        return _fail(err, EXIT_USAGE)
    except pygit2.GitError as err:
        return _fail(f"git: {err}", EXIT_USAGE)
    bot = args.bot_login or os.environ.get("MESHC_BOT_LOGIN") or ACTIONS_BOT
    if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\[bot\])?", bot):
        return _fail(f"--bot-login / MESHC_BOT_LOGIN must be a GitHub login such as {ACTIONS_BOT}, not {bot!r}",
                     EXIT_USAGE)
    github = GitHub(token, repository, os.environ.get("GITHUB_API_URL") or API_URL, bot_login=bot)
    try:
        action, comment = github.upsert_comment(args.pr, body)
    except GitHubError as err:
        return _fail(err, EXIT_FAILED)
    print(f"{action} comment {comment.get('html_url') or comment.get('id')} on #{args.pr}")
    return EXIT_OK


def _body(args) -> str:
    if args.body_file == "-":
        return sys.stdin.read()
    if args.body_file:
        return Path(args.body_file).read_text(encoding="utf-8")
    return markdown(diff_revisions(Path(args.repo), args.base, args.head, cache=not args.no_cache))


def _repo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", default=".", metavar="DIR", help="the policy repository (default: .)")


def _no_cache(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-cache", action="store_true", help="ignore and do not update the re-compile cache")


def _identity(text: str) -> Identity:
    found = re.fullmatch(r"\s*([^<>]+?)\s*<([^<>\s]+@[^<>\s]+)>\s*", text)
    if not found:
        raise argparse.ArgumentTypeError(f"expected 'Name <email>', not {text!r}")
    return Identity(found.group(1), found.group(2))


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}")
    return value


def _fail(err, code: int) -> int:
    print(f"meshc: error: {err}", file=sys.stderr)
    return code
