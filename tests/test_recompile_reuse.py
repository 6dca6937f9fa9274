"""A re-compile that reuses what the last one wrote gives the bytes a cold `--no-cache` compile gives.

`meshc compile` records, in its cache, each file it wrote (its content key and stat);
the next one takes a file whose content key and stat are unchanged as written without
serialising or reading it. These tests change the inputs in the ways a re-compile meets
(a route, an endpoint, a service added or removed, a new compiler) and compare every
byte of `rendered/` with a cold compile of the same inputs into another directory.
"""

from __future__ import annotations

import os
import shutil

import pytest

import compiler.cache as cache_module
import compiler.cli as cli
import compiler.emit as emit

from golden import read_tree, run_cli


@pytest.fixture
def repo(example_repo, tmp_path, monkeypatch):
    monkeypatch.setenv("MESHC_CACHE_DIR", str(tmp_path / "cache"))
    shutil.rmtree(example_repo / "rendered", ignore_errors=True)
    _compile(example_repo)  # the cold compile that fills the cache and records what it wrote
    return example_repo


def _compile(repo, *extra: str) -> None:
    code, err = run_cli(["compile", "--repo", str(repo), *extra])
    assert code == 0, err


def _cold(repo, tmp_path) -> dict[str, bytes]:
    out = tmp_path / "cold"
    shutil.rmtree(out, ignore_errors=True)
    _compile(repo, "--no-cache", "--out", str(out))
    return read_tree(out)


def _counting(monkeypatch) -> dict[str, list]:
    """Which files were serialised, and which old files were read to compare them."""
    seen: dict[str, list] = {"serialised": [], "read": []}
    file_bytes, holds = emit.file_bytes, emit._Delta._holds

    def counting_bytes(file):
        seen["serialised"].append(file.path)
        return file_bytes(file)

    def counting_holds(self, fd, content):
        seen["read"].append(len(content))
        return holds(self, fd, content)

    monkeypatch.setattr(emit, "file_bytes", counting_bytes)
    monkeypatch.setattr(emit._Delta, "_holds", counting_holds)
    return seen


def _edit(path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path}: {old!r}"
    path.write_text(text.replace(old, new))


def test_a_traffic_weight_changes_routes_only_and_matches_a_cold_compile(repo, tmp_path, monkeypatch):
    before = read_tree(repo / "rendered")
    _edit(repo / "policies" / "bookinfo" / "ratings.yaml", "split: {v1: 80, v2: 20}", "split: {v1: 70, v2: 30}")
    seen = _counting(monkeypatch)
    _compile(repo)
    serialised, read = list(seen["serialised"]), list(seen["read"])
    after = read_tree(repo / "rendered")
    assert after == _cold(repo, tmp_path)
    changed = sorted(p for p in after if after[p] != before.get(p))
    assert "prod/envoy/routes.json" in changed and "prod/envoy/clusters.json" not in changed
    # Only what changed is serialised, and no unchanged file is read back to compare it.
    assert not any(p.endswith(("clusters.json", "endpoints.json", "listeners.json", "kustomization.yaml"))
                   for p in serialised), serialised
    assert len(read) <= len(serialised)


def test_an_endpoint_address_changes_endpoints_and_matches_a_cold_compile(repo, tmp_path):
    before = read_tree(repo / "rendered")
    _edit(repo / "environments" / "prod.yaml", '"10.0.0.7:9080"', '"10.0.0.70:9080"')
    _compile(repo)
    after = read_tree(repo / "rendered")
    assert after == _cold(repo, tmp_path)
    assert after["prod/envoy/endpoints.json"] != before["prod/envoy/endpoints.json"]
    assert after["dev/envoy/endpoints.json"] == before["dev/envoy/endpoints.json"]


def test_a_service_added_then_removed_matches_a_cold_compile(repo, tmp_path):
    added = repo / "policies" / "bookinfo" / "stars.yaml"
    added.write_text((repo / "policies" / "bookinfo" / "ratings.yaml").read_text()
                     .replace("name: ratings", "name: stars").replace("app: ratings", "app: stars")
                     .replace("/api/v1/ratings", "/api/v1/stars"))
    _compile(repo)
    with_it = read_tree(repo / "rendered")
    assert with_it == _cold(repo, tmp_path)
    assert "prod/istio/bookinfo/stars.yaml" in with_it
    added.unlink()
    _compile(repo)
    without = read_tree(repo / "rendered")
    assert without == _cold(repo, tmp_path)
    assert "prod/istio/bookinfo/stars.yaml" not in without


def test_nothing_changed_serialises_and_reads_nothing(repo, monkeypatch):
    before = read_tree(repo / "rendered")
    seen = _counting(monkeypatch)
    _compile(repo)
    assert seen == {"serialised": [], "read": []}
    assert read_tree(repo / "rendered") == before


def test_a_file_edited_by_hand_is_written_again(repo, tmp_path):
    clusters = repo / "rendered" / "prod" / "envoy" / "clusters.json"
    clusters.write_bytes(clusters.read_bytes().replace(b'"name"', b'"nom"', 1))
    service = repo / "rendered" / "dev" / "istio" / "bookinfo" / "reviews.yaml"
    service.unlink()
    service.write_bytes(b"edited\n")
    _compile(repo)
    assert read_tree(repo / "rendered") == _cold(repo, tmp_path)


def test_a_changed_compiler_reuses_nothing_it_recorded(repo, tmp_path, monkeypatch):
    recorded = cache_module.Cache.for_repo(repo)
    assert recorded.written(repo / "rendered"), "the cold compile recorded what it wrote"
    recorded.close()
    monkeypatch.setattr(cache_module, "fingerprint", lambda: b"another compiler")
    fresh = cache_module.Cache.for_repo(repo)
    assert fresh.written(repo / "rendered") == {}, "another compiler's record is not this one's"
    fresh.close()
    seen = _counting(monkeypatch)
    _edit(repo / "policies" / "bookinfo" / "reviews.yaml", "weight: 10", "weight: 30")
    _compile(repo)
    assert read_tree(repo / "rendered") == _cold(repo, tmp_path)
    assert len(seen["read"]) == len(read_tree(repo / "rendered")), "every old file compared byte by byte"


def test_a_file_whose_stat_changed_is_compared_not_trusted(repo, tmp_path, monkeypatch):
    listeners = repo / "rendered" / "staging" / "envoy" / "listeners.json"
    st = os.stat(listeners)
    os.utime(listeners, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    seen = _counting(monkeypatch)
    _compile(repo)
    assert seen["read"] == [len(listeners.read_bytes())]
    assert read_tree(repo / "rendered") == _cold(repo, tmp_path)


def test_a_piece_gone_from_the_cache_mid_run_means_a_compile_without_it(repo, tmp_path, monkeypatch):
    """Pieces' bytes are read from the cache only when a file needs them; one that is gone by
    then (the file damaged, or another process pruned it) is no traceback: the CLI compiles
    again without the cache."""
    _edit(repo / "policies" / "bookinfo" / "ratings.yaml", "split: {v1: 80, v2: 20}", "split: {v1: 60, v2: 40}")

    def gone(self, keys):
        raise cache_module.CacheDamaged("pieces gone")

    monkeypatch.setattr(cache_module._Store, "many", gone)
    code, err = run_cli(["compile", "--repo", str(repo)])
    assert code == 0 and "the re-compile cache is damaged" in err, err
    assert read_tree(repo / "rendered") == _cold(repo, tmp_path)


def test_one_environment_compiled_alone_keeps_the_record_of_the_others(repo, tmp_path, monkeypatch):
    _edit(repo / "environments" / "prod.yaml", '"10.0.0.7:9080"', '"10.0.0.71:9080"')
    _compile(repo, "--env", "prod")
    recorded = cache_module.Cache.for_repo(repo)
    assert sorted(recorded.written(repo / "rendered")["files"]) == ["dev", "prod", "staging"]
    recorded.close()
    seen = _counting(monkeypatch)
    _compile(repo)
    assert seen == {"serialised": [], "read": []}, "every environment as the record has it"
    assert read_tree(repo / "rendered") == _cold(repo, tmp_path)


def test_an_environment_removed_is_pruned_and_forgotten(repo, tmp_path):
    (repo / "environments" / "staging.yaml").unlink()
    _compile(repo)
    assert read_tree(repo / "rendered") == _cold(repo, tmp_path)
    recorded = cache_module.Cache.for_repo(repo)
    assert sorted(recorded.written(repo / "rendered")["files"]) == ["dev", "prod"]
    recorded.close()


def _compiles(monkeypatch) -> list:
    """Each time the CLI runs the pipeline."""
    calls = []
    real = cli.compile_source

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cli, "compile_source", counting)
    return calls


def test_the_same_inputs_again_compile_nothing_and_say_what_the_compile_said(repo, tmp_path, monkeypatch):
    _edit(repo / "policies" / "bookinfo" / "ratings.yaml", "split: {v1: 80, v2: 20}", "split: {v1: 75, v2: 25}")
    first = run_cli(["compile", "--repo", str(repo)])
    calls = _compiles(monkeypatch)
    again = run_cli(["compile", "--repo", str(repo)])
    assert calls == [] and again == first
    assert read_tree(repo / "rendered") == _cold(repo, tmp_path)


def test_the_same_inputs_with_a_file_changed_on_disk_compile_again(repo, tmp_path, monkeypatch):
    listeners = repo / "rendered" / "dev" / "envoy" / "listeners.json"
    listeners.write_bytes(listeners.read_bytes() + b" ")
    calls = _compiles(monkeypatch)
    _compile(repo)
    assert calls == [1]
    assert read_tree(repo / "rendered") == _cold(repo, tmp_path)


def test_the_same_inputs_with_a_stray_file_remove_it_without_compiling(repo, tmp_path, monkeypatch):
    (repo / "rendered" / "prod" / "envoy" / "stray.json").write_bytes(b"{}\n")
    (repo / "rendered" / "prod" / "notes.txt").write_bytes(b"hello\n")
    calls = _compiles(monkeypatch)
    _compile(repo)
    assert calls == []
    assert read_tree(repo / "rendered") == _cold(repo, tmp_path)


def test_other_environments_or_inputs_compile(repo, tmp_path, monkeypatch):
    calls = _compiles(monkeypatch)
    _compile(repo, "--env", "dev")
    assert calls == [1], "another selection of environments is another compile"
    (repo / "environments" / "dev.yaml").write_text((repo / "environments" / "dev.yaml").read_text() + "\n# a comment\n")
    _compile(repo)
    assert calls == [1, 1]
    assert read_tree(repo / "rendered") == _cold(repo, tmp_path)


def test_a_damaged_record_means_a_compile(repo, tmp_path, monkeypatch):
    cache = cache_module.Cache.for_repo(repo)
    record = cache.written(repo / "rendered")
    del record["summary"]
    cache.put_written(repo / "rendered", record)
    cache.close()
    calls = _compiles(monkeypatch)
    _compile(repo)
    assert calls == [1]
    assert read_tree(repo / "rendered") == _cold(repo, tmp_path)
