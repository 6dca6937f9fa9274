"""The re-compile cache never changes a result: same bytes, same diagnostics, with or without it."""

from __future__ import annotations

import json
import sqlite3

import compiler.cache as cache_module
import compiler.check as check
import compiler.units as units
from compiler.cache import Cache, cache_root
from compiler.load import source_from_dir
from compiler.pipeline import compile_source

from golden import run_cli


def _compile(repo, cache_dir=None):
    cache = Cache(cache_dir) if cache_dir else None
    try:
        return compile_source(source_from_dir(repo), cache=cache, models=False)
    finally:
        if cache:
            cache.close()


def _rendered(result):
    return {env: dict(files) for env, files in result.outputs.items()}


def _counting_units(monkeypatch) -> list:
    computed = []
    real = units._unit

    def counting(ctx, policy, *args, **kwargs):
        computed.append((ctx.env.name, policy.key))
        return real(ctx, policy, *args, **kwargs)

    monkeypatch.setattr(units, "_unit", counting)
    return computed


def test_cached_compile_equals_uncached_and_follows_edits(example_repo, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    computed = _counting_units(monkeypatch)
    cold = _compile(example_repo, cache_dir)
    assert len(computed) == 15  # 5 services × 3 environments
    computed.clear()
    warm = _compile(example_repo, cache_dir)
    assert computed == [], "a warm compile computes no unit"
    assert _rendered(warm) == _rendered(cold) == _rendered(_compile(example_repo))
    computed.clear()

    env = example_repo / "environments" / "prod.yaml"
    env.write_text(env.read_text().replace("weight: 5}", "weight: 7}"))
    policy = example_repo / "policies" / "bookinfo" / "details.yaml"
    policy.write_text(policy.read_text().replace("timeout: 2s", "timeout: 3s"))
    edited = _compile(example_repo, cache_dir)
    # prod's file changed (5 units) and details' policy changed (in dev and staging: 2 more)
    assert sorted(computed) == sorted([("prod", k) for k in ("bookinfo/details", "bookinfo/mongodb", "bookinfo/productpage", "bookinfo/ratings", "bookinfo/reviews")] + [("dev", "bookinfo/details"), ("staging", "bookinfo/details")])
    assert _rendered(edited) == _rendered(_compile(example_repo))
    assert b"weight: 7" in edited.outputs["prod"]["istio/bookinfo/reviews.yaml"]
    assert b"timeout: 3s" in edited.outputs["dev"]["istio/bookinfo/details.yaml"]


def test_errors_are_reported_the_same_with_a_warm_cache(example_repo, tmp_path):
    cache_dir = tmp_path / "cache"
    _compile(example_repo, cache_dir)
    prod = example_repo / "environments" / "prod.yaml"
    # Two services claiming one ingress host: a cross-service error over cached units.
    prod.write_text(prod.read_text().replace("  overrides:\n", "  overrides:\n    bookinfo/details: {ingress: {hosts: [bookinfo.example.com]}}\n", 1))
    cached = _compile(example_repo, cache_dir)
    uncached = _compile(example_repo)
    assert not cached.ok
    assert [d.render() for d in cached.diagnostics] == [d.render() for d in uncached.diagnostics]
    assert any(d.code == "ingress.host-conflict" and d.span is not None for d in cached.diagnostics)


def test_an_error_between_services_needs_no_compile_without_the_cache(example_repo, tmp_path, monkeypatch):
    """Cached units carry their claims with spans: a clash among them is reported from the
    cache as it is, and only the units whose files changed are computed (no second run)."""
    cache_dir = tmp_path / "cache"
    _compile(example_repo, cache_dir)
    computed = _counting_units(monkeypatch)
    policy = example_repo / "policies" / "bookinfo" / "details.yaml"
    text = policy.read_text()
    assert "ingress" not in text
    policy.write_text(text.rstrip("\n") + "\n  ingress: {hosts: [bookinfo.example.com]}\n")
    result = _compile(example_repo, cache_dir)
    assert sorted(computed) == [(env, "bookinfo/details") for env in ("dev", "prod", "staging")]
    clashes = {d.span.path: d for d in result.diagnostics if d.code == "ingress.host-conflict"}
    # productpage's own hosts clash in dev and staging: one error for both; prod sets them itself.
    assert sorted(clashes) == ["environments/prod.yaml", "policies/bookinfo/productpage.yaml"]
    assert clashes["policies/bookinfo/productpage.yaml"].message.endswith("in environments 'dev', 'staging'")
    assert clashes["environments/prod.yaml"].message.endswith("in environment 'prod'")
    assert all(d.notes[0].span.path == "policies/bookinfo/details.yaml" for d in clashes.values())


def test_a_damaged_cache_is_recomputed_not_trusted(example_repo, tmp_path):
    cache_dir = tmp_path / "cache"
    expected = _rendered(_compile(example_repo))
    _compile(example_repo, cache_dir)
    with sqlite3.connect(cache_dir / "cache.sqlite") as db:
        db.execute("UPDATE units SET value = x'00ff'")  # undecodable entries
    assert _rendered(_compile(example_repo, cache_dir)) == expected
    (cache_dir / "cache.sqlite").write_bytes(b"not a database")
    assert _rendered(_compile(example_repo, cache_dir)) == expected


def test_a_changed_compiler_never_reuses_stored_bytes(example_repo, tmp_path, monkeypatch):
    """Units are keyed by the compiler's fingerprint; the pieces they refer to by their own bytes.
    So a changed compiler computes every unit again and never reaches an older emitter's bytes."""
    cache_dir = tmp_path / "cache"
    _compile(example_repo, cache_dir)
    with sqlite3.connect(cache_dir / "cache.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM pieces").fetchone()[0] > 15
        db.execute("UPDATE pieces SET text = CAST('stale: bytes' || char(10) AS BLOB), canonical = NULL")
    db.close()
    computed = _counting_units(monkeypatch)
    monkeypatch.setattr(cache_module, "fingerprint", lambda: b"another compiler")
    assert _rendered(_compile(example_repo, cache_dir)) == _rendered(_compile(example_repo))
    assert len(computed) == 2 * 15, "every unit computed again (with the cache, then without)"


def test_a_unit_whose_piece_is_gone_is_computed_again(example_repo, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    expected = _rendered(_compile(example_repo, cache_dir))
    with sqlite3.connect(cache_dir / "cache.sqlite") as db:
        db.execute("DELETE FROM pieces WHERE rowid = (SELECT MIN(rowid) FROM pieces)")
    db.close()
    computed = _counting_units(monkeypatch)
    assert _rendered(_compile(example_repo, cache_dir)) == expected
    assert 0 < len(computed) < 15
    computed.clear()
    assert _rendered(_compile(example_repo, cache_dir)) == expected
    assert computed == [], "the recomputed units were stored again"


def test_a_read_of_pieces_waits_for_a_save_in_progress_instead_of_calling_the_cache_damaged(
        example_repo, tmp_path):
    """Pieces are read through a connection of their own while the save thread may hold the
    write lock: a save that takes a while is waited out, not reported as damage."""
    import threading
    import time
    cache_dir = tmp_path / "cache"
    _compile(example_repo, cache_dir)
    with sqlite3.connect(cache_dir / "cache.sqlite") as db:
        key = db.execute("SELECT key FROM pieces LIMIT 1").fetchone()[0]
    store = cache_module._Store(cache_dir / "cache.sqlite")
    writer = sqlite3.connect(cache_dir / "cache.sqlite", isolation_level=None, check_same_thread=False)
    writer.execute("BEGIN EXCLUSIVE")       # what a large save holds until it commits
    releasing = threading.Timer(1.0, lambda: writer.execute("COMMIT"))
    releasing.start()
    started = time.monotonic()
    try:
        canonical, text = store.one(key)
    finally:
        releasing.join()
        writer.close()
        store.close()
    assert text and time.monotonic() - started >= 0.9


def test_cli_keeps_its_cache_outside_the_repo(example_repo):
    before = {p for p in example_repo.rglob("*") if "rendered" not in p.parts}
    code, _ = run_cli(["compile", "--repo", str(example_repo)])
    assert code == 0
    assert {p for p in example_repo.rglob("*") if "rendered" not in p.parts} == before
    assert Cache.for_repo(example_repo).records, "the cache filled, in the user's cache directory"
    assert Cache.for_repo(example_repo).directory.parent == cache_root()


def test_a_cache_that_outgrew_its_repo_keeps_only_what_this_run_used(example_repo, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    monkeypatch.setattr(cache_module, "PRUNE_SLACK", 0)
    policy = example_repo / "policies" / "bookinfo" / "details.yaml"
    original = policy.read_text()
    for n, compiler_version in enumerate((b"one", b"two", b"three")):  # each leaves a full set of entries behind
        monkeypatch.setattr(cache_module, "fingerprint", lambda v=compiler_version: v)
        policy.write_text(original.replace("timeout: 2s", f"timeout: {n + 2}s"))  # and pieces of its own
        expected = _rendered(_compile(example_repo, cache_dir))
    with sqlite3.connect(cache_dir / "cache.sqlite") as db:
        units = db.execute("SELECT COUNT(*) FROM units").fetchone()[0]
        records = [json.loads(value) for (value,) in db.execute("SELECT value FROM units")]
        referred = {ref for r in records if isinstance(r, dict) for _, ref in r.get("pieces", [])}
        pieces = {key for (key,) in db.execute("SELECT key FROM pieces")}
    db.close()
    assert units == 15 + 5 + 3, "this run's units, policies and environments: no older ones"
    assert pieces == referred, "no piece without a unit that refers to it, none missing"
    computed = _counting_units(monkeypatch)
    assert _rendered(_compile(example_repo, cache_dir)) == expected and computed == []


def test_an_integer_beyond_64_bits_in_a_patch_compiles_with_the_cache(example_repo, tmp_path):
    prod = example_repo / "environments" / "prod.yaml"
    prod.write_text(prod.read_text().replace("value: {oncall: reviews-team}", "value: {oncall: 123456789012345678901234567890}"))
    cached = _compile(example_repo, tmp_path / "cache")
    assert cached.ok, [d.render() for d in cached.diagnostics]
    assert b"oncall: 123456789012345678901234567890" in cached.outputs["prod"]["istio/bookinfo/reviews.yaml"]
    assert _rendered(cached) == _rendered(_compile(example_repo, tmp_path / "cache")) == _rendered(_compile(example_repo))


def test_a_mirror_into_a_changed_service_is_checked_from_the_cache(example_repo, tmp_path, monkeypatch):
    """A unit's claims carry the mirrors it sends to other services: when the target moves
    off the mirrored port, the mirroring unit, unchanged and cached, is reported at its span."""
    cache_dir = tmp_path / "cache"
    details = example_repo / "policies" / "bookinfo" / "details.yaml"
    details.write_text(details.read_text() + "  mirror: {service: bookinfo/ratings, version: v2, percent: 10}\n")
    assert _compile(example_repo, cache_dir).ok
    computed = _counting_units(monkeypatch)
    ratings = example_repo / "policies" / "bookinfo" / "ratings.yaml"
    ratings.write_text(ratings.read_text().replace("port: 9080,", "port: 9090,"))
    result = _compile(example_repo, cache_dir)
    assert {key for _, key in computed} == {"bookinfo/ratings"}
    errors = [d for d in result.diagnostics if d.is_error]
    assert [(d.code, d.span.path, d.span.line) for d in errors] == [
        ("mirror.port", "policies/bookinfo/details.yaml", details.read_text().count("\n"))]
    assert errors[0].message.startswith("bookinfo/ratings has no HTTP port 9080 in environments 'dev', 'prod', 'staging'")
    assert [d.render() for d in result.diagnostics] == [d.render() for d in _compile(example_repo).diagnostics]


def test_a_shared_ingress_host_follows_a_change_to_one_of_its_services(tmp_path, monkeypatch):
    """The host's VirtualService is in its owner's file but holds every claimant's routes:
    a change to one claimant rewrites it, while the owner's own unit stays cached."""
    import shutil

    from conftest import GOLDEN

    repo = tmp_path / "repo"
    shutil.copytree(GOLDEN / "ingress-shared-host", repo, ignore=shutil.ignore_patterns("expected*"))
    cache_dir = tmp_path / "cache"
    before = _compile(repo, cache_dir)
    computed = _counting_units(monkeypatch)
    search = repo / "policies" / "catalog" / "search.yaml"
    search.write_text(search.read_text().replace("paths: [/api/search]", "paths: [/api/find]"))
    after = _compile(repo, cache_dir)
    assert computed == [("prod", "catalog/search")]
    assert _rendered(after) == _rendered(_compile(repo))
    storefront = "istio/shop/storefront.yaml"
    assert b"prefix: /api/search" in before.outputs["prod"][storefront]
    assert b"prefix: /api/find" in after.outputs["prod"][storefront] and b"/api/search" not in after.outputs["prod"][storefront]


def _counting_claims(monkeypatch) -> dict[str, int]:
    counts = {"checked": 0, "read back": 0}
    real_check, real_read = check.claims, check.Claims.from_json

    def checking(*args, **kwargs):
        counts["checked"] += 1
        return real_check(*args, **kwargs)

    def reading(value):
        counts["read back"] += 1
        return real_read(value)

    monkeypatch.setattr(check, "claims", checking)
    monkeypatch.setattr(check.Claims, "from_json", staticmethod(reading))
    return counts


def test_a_change_that_keeps_every_claim_reads_no_claim_back(example_repo, tmp_path, monkeypatch):
    """The checks between services are a function of the units' claims: when a change leaves
    them all as they were, the result stored for them stands, and no cached unit's claims
    are read back into `check.Claims`."""
    cache_dir = tmp_path / "cache"
    _compile(example_repo, cache_dir)
    policy = example_repo / "policies" / "bookinfo" / "details.yaml"
    policy.write_text(policy.read_text().replace("timeout: 2s", "timeout: 3s"))  # same lines: same spans
    counts = _counting_claims(monkeypatch)
    warm = _compile(example_repo, cache_dir)
    assert counts == {"checked": 0, "read back": 0}
    assert warm.ok and _rendered(warm) == _rendered(_compile(example_repo))
    assert counts["checked"] == 1, "without the cache, checked"


def test_what_the_checks_between_services_found_is_reported_again_from_the_cache(tmp_path, monkeypatch):
    import shutil

    from conftest import GOLDEN

    repo = tmp_path / "repo"
    shutil.copytree(GOLDEN / "bad-ingress-host-conflict", repo, ignore=shutil.ignore_patterns("expected*"))
    cache_dir = tmp_path / "cache"
    first = _compile(repo, cache_dir)
    assert any(d.code == "ingress.host-conflict" for d in first.diagnostics)
    counts = _counting_claims(monkeypatch)
    again = _compile(repo, cache_dir)
    assert counts["checked"] == 0
    assert [d.render() for d in again.diagnostics] == [d.render() for d in first.diagnostics]
    assert again.diagnostics == first.diagnostics, "the same values: codes, severities, spans, notes"


def test_a_re_compile_reads_the_environment_spans_of_the_services_it_computes(example_repo, tmp_path, monkeypatch):
    """A cached environment keeps each service's override and endpoints spans apart: a unit
    computed again reads its own, and a problem found in an override is located the same as
    without the cache (here the policy drops the canary its prod override still tunes)."""
    from compiler import validate

    cache_dir = tmp_path / "cache"
    _compile(example_repo, cache_dir)
    asked = []
    real = validate.EnvironmentFile.entry_spans

    def counting(self, section, key):
        asked.append((self.name, section, key))
        return real(self, section, key)

    monkeypatch.setattr(validate.EnvironmentFile, "entry_spans", counting)
    policy = example_repo / "policies" / "bookinfo" / "reviews.yaml"
    text = policy.read_text()
    start = text.index("    canary:")
    end = text.index("\n  ", text.index("\n", start) + 1)
    while text[end + 3] == " ":  # the rest of the canary's block
        end = text.index("\n  ", end + 1)
    policy.write_text(text[:start] + text[end + 1:])
    cached = _compile(example_repo, cache_dir)
    assert {key for _, _, key in asked} == {"bookinfo/reviews"}
    uncached = _compile(example_repo)
    assert not cached.ok and any(d.span.path == "environments/prod.yaml" for d in cached.diagnostics if d.span)
    assert [d.render() for d in cached.diagnostics] == [d.render() for d in uncached.diagnostics]
