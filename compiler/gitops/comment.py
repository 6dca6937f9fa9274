"""One sticky pull-request comment through the GitHub REST API (requests).

`GitHub.upsert_comment(pr, body)` finds meshc's earlier comment on the pull
request by a hidden marker, across every page of the comment list (the
`Link: rel="next"` header), and updates it with PATCH, or creates it with
POST; an unchanged body is left alone. Only a comment the token's own
account wrote is ever updated (`GET /user`; an installation token such as
Actions' GITHUB_TOKEN cannot read /user, so then the comment of the bot it
posts as, `github-actions[bot]` unless told another app's login): a person
who pasted the marker, or another app posting its own marked comment, keeps it. Requests are
retried with exponential backoff on connection errors, 5xx, 429 and rate
limits (a 403 carrying `Retry-After` or `X-RateLimit-Remaining: 0`), waiting
as long as GitHub asks. 401, 403 and 404 become one-line `GitHubError`s.

Endpoints: https://docs.github.com/en/rest/issues/comments
           https://docs.github.com/en/rest/users/users#get-the-authenticated-user
Rate limits: https://docs.github.com/en/rest/using-the-rest-api/best-practices-for-using-the-rest-api
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import requests

from compiler import __version__
from compiler.gitops.errors import GitHubError
from compiler.gitops.render import MARKDOWN_LIMIT, MARKER

API_URL = "https://api.github.com"
ACTIONS_BOT = "github-actions[bot]"  # whom GitHub Actions' GITHUB_TOKEN posts as
COMMENT_LIMIT = 65_536  # GitHub refuses longer comment bodies


@dataclass(frozen=True)
class Retry:
    attempts: int = 5  # tries per request, the first included
    base_s: float = 1.0  # backoff before try n+1: base * 2**(n-1), with jitter
    max_wait_s: float = 300.0  # a longer wait asked by GitHub is not waited for: give up instead


class GitHub:
    """A small client for one repository (`owner/name`)."""

    def __init__(self, token: str, repository: str, api_url: str = API_URL, retry: Retry = Retry(),
                 session: requests.Session | None = None, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.time, timeout_s: float = 30.0, bot_login: str = ACTIONS_BOT):
        self.repository = repository
        self.bot_login = bot_login  # who an installation token posts as (it cannot ask /user)
        self.api_url = api_url.rstrip("/")
        self.retry = retry
        self._sleep, self._clock, self._timeout = sleep, clock, timeout_s
        self._session = session or requests.Session()
        self._author: Author | None = None
        self._session.headers.update({
            "Authorization": f"Bearer {token}",
            "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": "2022-11-28",
            "User-Agent": f"meshc/{__version__}",
        })

    def upsert_comment(self, pr: int, body: str, marker: str = MARKER) -> tuple[str, dict]:
        """("created" | "updated" | "unchanged", the comment) for meshc's one comment on `pr`."""
        body = _with_marker(body, marker)
        marked = [c for c in self.comments(pr) if marker in (c.get("body") or "")]
        existing = next((c for c in marked if self.author(pr).wrote(c)), None) if marked else None
        if existing is None:
            made = self._call("POST", f"/repos/{self.repository}/issues/{pr}/comments", pr, json={"body": body})
            return "created", made.json()
        if existing.get("body") == body:
            return "unchanged", existing
        updated = self._call("PATCH", f"/repos/{self.repository}/issues/comments/{existing['id']}", pr,
                             json={"body": body})
        return "updated", updated.json()

    def author(self, pr: int) -> "Author":
        """Who this token comments as: its login from `GET /user`, or, for an installation
        token (403 "Resource not accessible by integration"), the bot `bot_login`."""
        if self._author is None:
            response = self._call("GET", "/user", pr, accept=(403, 404))
            try:
                user = response.json() if response.status_code < 300 else None
            except ValueError:
                user = None
            login = user.get("login") if isinstance(user, dict) else None
            if isinstance(login, str) and login:
                self._author = Author(login)
            else:
                self._author = Author(self.bot_login, bot=True)
        return self._author

    def comments(self, pr: int) -> Iterator[dict]:
        """Every comment on the pull request, oldest first, following pagination."""
        url = f"/repos/{self.repository}/issues/{pr}/comments"
        params = {"per_page": 100}
        while url:
            response = self._call("GET", url, pr, params=params)
            yield from response.json()
            url, params = response.links.get("next", {}).get("url"), None  # `next` carries its own query

    def _call(self, method: str, url: str, pr: int, accept: tuple[int, ...] = (), **kwargs) -> requests.Response:
        """The response to a request, retried as GitHub asks; a final failure raises GitHubError
        unless its status is in `accept`."""
        full = url if url.startswith(("http://", "https://")) else self.api_url + url
        for attempt in range(1, self.retry.attempts + 1):
            try:
                response = self._session.request(method, full, timeout=self._timeout, **kwargs)
            except (requests.ConnectionError, requests.Timeout) as err:
                if attempt == self.retry.attempts:
                    raise GitHubError(f"cannot reach the GitHub API at {self.api_url}: {type(err).__name__}") from None
                self._sleep(self._backoff(attempt))
                continue
            if response.status_code < 300:
                return response
            wait = self._retry_wait(response, attempt)
            if wait is None and response.status_code in accept:
                return response
            if wait is None or attempt == self.retry.attempts:
                raise _error(response, method, pr, self.repository, retried=attempt > 1)
            if wait > self.retry.max_wait_s:
                raise GitHubError(f"GitHub rate limit: it asks to wait {wait:.0f}s; try again later", response.status_code)
            self._sleep(wait)
        raise AssertionError("unreachable")  # the loop returns or raises on its last attempt

    def _retry_wait(self, response: requests.Response, attempt: int) -> float | None:
        """Seconds to wait before retrying, or None when the failure is final."""
        status, headers = response.status_code, response.headers
        rate_limited = status == 429 or (status == 403 and ("Retry-After" in headers
                                                            or headers.get("X-RateLimit-Remaining") == "0"))
        if not (rate_limited or status >= 500):
            return None
        if "Retry-After" in headers:
            try:
                return max(0.0, float(headers["Retry-After"]))
            except ValueError:
                pass
        if headers.get("X-RateLimit-Remaining") == "0" and "X-RateLimit-Reset" in headers:
            try:
                return max(0.0, float(headers["X-RateLimit-Reset"]) - self._clock())
            except ValueError:
                pass
        return self._backoff(attempt)

    def _backoff(self, attempt: int) -> float:
        return self.retry.base_s * 2 ** (attempt - 1) * (0.5 + random.random() / 2)


def _error(response: requests.Response, method: str, pr: int, repository: str, retried: bool) -> GitHubError:
    status = response.status_code
    said = _message(response)
    if status == 401:
        text = f"GitHub rejected the token (401{said}): check GITHUB_TOKEN"
    elif status == 403:
        text = (f"GitHub refused {method} on {repository} (403{said}): the token needs "
                "`pull-requests: write` permission (fork pull requests get a read-only token)")
    elif status == 404:
        text = (f"GitHub found no pull request #{pr} in {repository} (404{said}): "
                "check GITHUB_REPOSITORY, the number and the token's access")
    else:
        text = f"GitHub answered {status} to {method}{said}" + (" after retries" if retried else "")
    return GitHubError(text, status)


def _message(response: requests.Response) -> str:
    try:
        message = response.json().get("message")
    except (ValueError, AttributeError):
        message = None
    return f": {' '.join(str(message).split())[:200]}" if message else ""


@dataclass(frozen=True)
class Author:
    """The identity meshc's comments carry: the token's own login, or (`bot`) the login of
    the bot an installation token posts as (GITHUB_TOKEN: github-actions[bot]), which such a
    token cannot ask for; then the comment must also be a bot's."""

    login: str
    bot: bool = False

    def wrote(self, comment: dict) -> bool:
        user = comment.get("user") or {}
        login = user.get("login")
        if not isinstance(login, str) or login.lower() != self.login.lower():  # GitHub logins ignore case
            return False
        return user.get("type") == "Bot" if self.bot else True


def _with_marker(body: str, marker: str) -> str:
    if marker not in body:
        body = f"{marker}\n{body}"
    if len(body) > COMMENT_LIMIT:
        note = "\n\n**Cut to fit a GitHub comment.** Run `meshc diff` locally for the full diff.\n"
        body = body[: MARKDOWN_LIMIT - len(note)] + note
    return body
