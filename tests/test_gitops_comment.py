"""`meshc comment`: one sticky pull-request comment, against FakeGitHub on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest

from compiler.cli import main
from compiler.gitops.comment import GitHub, Retry
from compiler.gitops.errors import GitHubError
from compiler.gitops.render import MARKER
from fake_github import BOT, FakeGitHub
from test_gitops_support import REVIEWS, edit, make_repo


class Sleeps(list):
    """Records the waits instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def fake():
    with FakeGitHub(prs=(7, 8)) as server:
        yield server


def client(fake: FakeGitHub, token: str = "good-token", attempts: int = 4, sleeps: Sleeps | None = None) -> GitHub:
    return GitHub(token, fake.repository, fake.url, Retry(attempts=attempts, base_s=0.001),
                  sleep=sleeps if sleeps is not None else Sleeps(), clock=lambda: 1_000.0)


def test_creates_then_updates_one_comment(fake):
    gh = client(fake)
    assert gh.upsert_comment(7, "first diff")[0] == "created"
    assert gh.upsert_comment(7, "second diff")[0] == "updated"
    assert gh.upsert_comment(7, "second diff")[0] == "unchanged"
    [comment] = fake.comments[7]
    assert comment["body"] == f"{MARKER}\nsecond diff"
    comments = "/repos/acme/mesh/issues/7/comments?per_page=100"
    assert fake.requests == [("GET", comments), ("POST", "/repos/acme/mesh/issues/7/comments"),
                             ("GET", comments), ("GET", "/user"),  # asked once, and only once there is a marked comment
                             ("PATCH", f"/repos/acme/mesh/issues/comments/{comment['id']}"), ("GET", comments)]
    assert fake.comments[8] == []


def test_prefers_the_bot_comment_over_a_pasted_marker(fake):
    pasted = fake.add_comment(7, f"quoting: {MARKER} see above")
    bot = fake.add_comment(7, f"{MARKER}\nold diff", user=BOT)
    action, comment = client(fake).upsert_comment(7, "new diff")
    assert action == "updated" and comment["id"] == bot["id"]
    assert pasted["body"] == f"quoting: {MARKER} see above"


def test_never_overwrites_a_persons_comment_that_carries_the_marker(fake):
    """GITHUB_TOKEN cannot read /user: only a bot's comment is taken for meshc's own."""
    pasted = fake.add_comment(7, f"{MARKER}\nthe diff I ran locally, pasted whole")
    action, made = client(fake).upsert_comment(7, "new diff")
    assert action == "created" and made["user"] == BOT
    assert client(fake).upsert_comment(7, "newer diff")[1]["id"] == made["id"]
    assert pasted["body"] == f"{MARKER}\nthe diff I ran locally, pasted whole"
    assert [c["id"] for c in fake.comments[7]] == [pasted["id"], made["id"]]


OTHER_APP = {"login": "other-app[bot]", "type": "Bot"}


def test_an_installation_token_never_takes_another_apps_marked_comment(fake):
    """GITHUB_TOKEN posts as github-actions[bot]: another app's marked comment is not meshc's."""
    other = fake.add_comment(7, f"{MARKER}\nanother app's report", user=OTHER_APP)
    mine = fake.add_comment(7, f"{MARKER}\nold diff", user=BOT)
    fake.add_comment(8, f"{MARKER}\nanother app's report", user=OTHER_APP)

    action, comment = client(fake).upsert_comment(7, "new diff")
    assert action == "updated" and comment["id"] == mine["id"]
    action, made = client(fake).upsert_comment(8, "new diff")
    assert action == "created" and made["user"] == BOT

    assert other["body"] == f"{MARKER}\nanother app's report"
    assert fake.comments[8][0]["body"] == f"{MARKER}\nanother app's report"


def test_the_bot_an_installation_token_posts_as_can_be_configured(fake):
    """Another app's installation token posts as that app's bot: told its login, meshc takes its comment."""
    fake.add_comment(7, f"{MARKER}\nfrom actions", user=BOT)
    theirs = fake.add_comment(7, f"{MARKER}\nold diff", user=OTHER_APP)
    fake.add_comment(7, f"{MARKER}\npasted by a person called other-app[bot]?",
                     user={"login": "Other-App[bot]", "type": "User"})
    gh = GitHub("good-token", fake.repository, fake.url, Retry(attempts=2, base_s=0.001), sleep=Sleeps(),
                bot_login="Other-App[bot]")  # GitHub logins ignore case
    action, comment = gh.upsert_comment(7, "new diff")
    assert action == "updated" and comment["id"] == theirs["id"]
    assert fake.comments[7][0]["body"] == f"{MARKER}\nfrom actions"


def test_a_user_token_adopts_only_the_comments_of_its_own_account():
    machine = {"login": "meshc-bot", "type": "User"}
    with FakeGitHub(prs=(7, 8), users={"bot-pat": machine}) as fake:
        fake.add_comment(7, f"{MARKER}\npasted", user={"login": "someone", "type": "User"})
        fake.add_comment(7, f"{MARKER}\nanother app", user={"login": "other-app[bot]", "type": "Bot"})
        mine = fake.add_comment(7, f"{MARKER}\nold diff", user=machine)
        fake.add_comment(8, f"{MARKER}\nwritten by the Actions token", user=BOT)

        assert client(fake, "bot-pat").upsert_comment(7, "new diff") == ("updated", {**mine, "body": f"{MARKER}\nnew diff"})
        action, made = client(fake, "bot-pat").upsert_comment(8, "new diff")

        assert action == "created" and made["user"] == machine
        assert [c["body"] for c in fake.comments[7]][:2] == [f"{MARKER}\npasted", f"{MARKER}\nanother app"]
        assert fake.comments[8][0]["body"] == f"{MARKER}\nwritten by the Actions token"


def test_finds_its_comment_on_a_later_page(fake):
    for i in range(230):
        fake.add_comment(7, f"review comment {i}")
    mine = fake.add_comment(7, f"{MARKER}\nold diff", user=BOT)
    fake.add_comment(7, "a reply after the diff")

    action, comment = client(fake).upsert_comment(7, "new diff")

    assert action == "updated" and comment["id"] == mine["id"]
    gets = [t for m, t in fake.requests if m == "GET" and t != "/user"]
    assert len(gets) == 3 and gets[-1].endswith("page=3")  # followed Link rel="next" to the last page
    assert sum(MARKER in c["body"] for c in fake.comments[7]) == 1


def test_retries_server_errors_and_rate_limits_as_told(fake):
    sleeps = Sleeps()
    fake.fail_next(502)
    fake.fail_next(429, headers={"Retry-After": "0.02"})
    fake.fail_next(403, headers={"Retry-After": "0.03"}, message="You have exceeded a secondary rate limit")
    fake.fail_next(403, headers={"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1000.04"})

    assert client(fake, attempts=5, sleeps=sleeps).upsert_comment(7, "diff")[0] == "created"

    assert sleeps[1:] == [0.02, 0.03, pytest.approx(0.04)]  # Retry-After and the reset time honoured
    assert 0 < sleeps[0] <= 0.001  # the injected backoff base, not a real second
    assert len(fake.comments[7]) == 1


def test_gives_up_after_the_last_attempt(fake):
    fake.fail_next(503, times=3)
    with pytest.raises(GitHubError, match="GitHub answered 503 to GET: scripted failure after retries") as err:
        client(fake, attempts=3).upsert_comment(7, "diff")
    assert err.value.status == 503 and fake.comments[7] == []


def test_a_wait_longer_than_allowed_is_not_waited_for(fake):
    fake.fail_next(429, headers={"Retry-After": "3600"})
    with pytest.raises(GitHubError, match="asks to wait 3600s"):
        client(fake).upsert_comment(7, "diff")


@pytest.mark.parametrize("token, pr, status, words", [
    ("wrong", 7, 401, "rejected the token (401: Bad credentials): check GITHUB_TOKEN"),
    ("read-only", 7, 403, "needs `pull-requests: write`"),
    ("good-token", 99, 404, "no pull request #99 in acme/mesh (404: Not Found)"),
])
def test_auth_and_not_found_are_one_line_errors(fake, token, pr, status, words):
    fake.readonly_tokens.add("read-only")
    with pytest.raises(GitHubError) as err:
        client(fake, token).upsert_comment(pr, "diff")
    assert err.value.status == status and words in str(err.value) and "\n" not in str(err.value)
    assert len(fake.requests) == len(set(fake.requests)) <= 2  # nothing retried
    assert fake.comments.get(pr, []) == []


def test_github_enterprise_api_prefix():
    with FakeGitHub(prefix="/api/v3") as ghe:
        assert client(ghe).upsert_comment(7, "diff")[0] == "created"
        assert all(t.startswith("/api/v3/") for _, t in ghe.requests)


def test_the_api_being_down_is_an_error_not_a_traceback():
    with FakeGitHub() as gone:
        url = gone.url
    gh = GitHub("t", "acme/mesh", url, Retry(attempts=2, base_s=0.001), sleep=Sleeps())
    with pytest.raises(GitHubError, match="cannot reach the GitHub API"):
        gh.upsert_comment(7, "diff")


# --- the command ---------------------------------------------------------------------------


def meshc(*argv: str) -> int:
    """`meshc ARGS...` in this process: the real entry point."""
    return main(list(argv))


@pytest.fixture
def github_env(fake, monkeypatch):
    monkeypatch.setenv("GITHUB_TOKEN", "good-token")
    monkeypatch.setenv("GITHUB_REPOSITORY", fake.repository)
    monkeypatch.setenv("GITHUB_API_URL", fake.url)
    return fake


def test_comment_posts_the_diff_it_computes(github_env, tmp_path, capsys):
    repo = make_repo(tmp_path / "r")
    (Path(repo.workdir) / "policies/bookinfo/reviews.yaml").write_text(edit(REVIEWS, "weight: 10", "weight: 20"))

    assert meshc("comment", "--repo", repo.workdir, "--pr", "7", "--base", "main") == 0
    assert meshc("comment", "--repo", repo.workdir, "--pr", "7", "--base", "main") == 0

    [comment] = github_env.comments[7]
    assert comment["body"].startswith(MARKER)
    assert "`bookinfo/reviews`: canary v2 10% → 20%" in comment["body"]
    assert capsys.readouterr().out.splitlines()[-1].startswith("unchanged comment https://")


def test_comment_from_a_body_file(github_env, tmp_path, capsys):
    body = tmp_path / "diff.md"
    body.write_text(f"{MARKER}\nprecomputed\n")
    assert meshc("comment", "--pr", "8", "--body-file", str(body)) == 0
    assert github_env.comments[8][0]["body"] == f"{MARKER}\nprecomputed\n"
    assert meshc("comment", "--pr", "8", "--body-file", str(tmp_path / "missing.md")) == 2
    assert capsys.readouterr().err.startswith("meshc: error: cannot read ")


def test_comment_usage_errors(github_env, monkeypatch, tmp_path, capsys):
    body = tmp_path / "b.md"
    body.write_text("x")
    assert meshc("comment", "--pr", "99", "--body-file", str(body)) == 1
    assert "no pull request #99" in capsys.readouterr().err
    monkeypatch.setenv("GITHUB_REPOSITORY", "not a repo")
    assert meshc("comment", "--pr", "7", "--body-file", str(body)) == 2
    monkeypatch.delenv("GITHUB_TOKEN")
    assert meshc("comment", "--pr", "7", "--body-file", str(body)) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "meshc: error: GITHUB_TOKEN is not set"


def test_comment_bot_login_from_the_flag_or_the_environment(github_env, monkeypatch, tmp_path, capsys):
    body = tmp_path / "b.md"
    body.write_text("diff")
    theirs = github_env.add_comment(7, f"{MARKER}\nold", user=OTHER_APP)
    assert meshc("comment", "--pr", "7", "--body-file", str(body)) == 0  # default: github-actions[bot]
    assert capsys.readouterr().out.startswith("created ")
    assert theirs["body"] == f"{MARKER}\nold"

    monkeypatch.setenv("MESHC_BOT_LOGIN", "other-app[bot]")
    assert meshc("comment", "--pr", "7", "--body-file", str(body)) == 0
    assert capsys.readouterr().out.startswith(f"updated comment {theirs['html_url']}")
    body.write_text("newer diff")
    assert meshc("comment", "--pr", "7", "--body-file", str(body), "--bot-login", "github-actions[bot]") == 0
    assert theirs["body"] == f"{MARKER}\ndiff"  # the flag wins over the variable
    assert capsys.readouterr().out.startswith("updated ")

    assert meshc("comment", "--pr", "7", "--body-file", str(body), "--bot-login", "not a login") == 2
    assert capsys.readouterr().err.startswith("meshc: error: --bot-login / MESHC_BOT_LOGIN must be a GitHub login")


def test_an_oversized_body_is_cut_to_fit(fake):
    action, comment = client(fake).upsert_comment(7, "x" * 100_000)
    assert action == "created" and len(comment["body"]) <= 65_536
    assert comment["body"].startswith(MARKER) and "Cut to fit a GitHub comment" in comment["body"]
