"""Output is a pure function of the input: same bytes on every run, in any order, on any path.

Compiling twice gives the same bytes; so does a `Source` whose files arrive in
a shuffled order; so do serial and parallel compiles of a repo big enough to
take the parallel path; so do two copies of a repo in different directories.
Nothing in the output names a path, the host, or the time.
"""

from __future__ import annotations

import concurrent.futures
import random
import re
import shutil
import socket
import time
from pathlib import Path

import pytest

from compiler import validate, workers
from compiler.load import Source, source_from_dir
from compiler.pipeline import compile_source
from conftest import GOLDEN, REPO
from golden import read_tree, run_cli

GOOD_CASES = ["canary-header-retries", "overlays", "split-consistent-hash", "tcp-and-multiport", "ingress-gateway"]


def outputs(source: Source, **kwargs) -> dict[str, dict[str, bytes]]:
    result = compile_source(source, **kwargs)
    assert result.ok, [d.render() for d in result.diagnostics]
    return result.outputs


def shuffled(source: Source, seed: int) -> Source:
    items = list(source.files.items())
    random.Random(seed).shuffle(items)
    return Source(dict(items))


@pytest.mark.parametrize("root", ["examples", *GOOD_CASES])
def test_twice_and_shuffled_give_the_same_bytes(root):
    source = source_from_dir(REPO if root == "examples" else GOLDEN / root)
    first = outputs(source)
    assert outputs(source) == first
    for seed in range(5):
        again = shuffled(source, seed)
        assert list(again.files) != list(source.files) or len(source.files) < 3
        assert outputs(again) == first, f"seed {seed}"


def test_diagnostics_do_not_depend_on_order_either():
    source = source_from_dir(GOLDEN / "bad-many-errors")
    first = [d.render() for d in compile_source(source).diagnostics]
    for seed in range(5):
        assert [d.render() for d in compile_source(shuffled(source, seed)).diagnostics] == first


# -- serial and parallel ---------------------------------------------------------------------

SERVICES, ENVIRONMENTS = 150, ("dev", "prod", "staging")


def big_source() -> Source:
    """150 services × 3 environments: more units than PARALLEL_THRESHOLD, with every overlay kind."""
    files = {}
    for i in range(SERVICES):
        ns = f"team{i % 7}"
        shape = ("traffic: {stable: v1, canary: {version: v2, weight: %d}}" % (i % 101) if i % 3 == 0
                 else "traffic: {split: {v1: %d, v2: %d}}" % (100 - i % 50, i % 50) if i % 3 == 1
                 else "loadBalancer: {consistentHash: {header: x-user}}")
        files[f"policies/{ns}/svc{i}.yaml"] = (
            f"apiVersion: meshc.dev/v1\nkind: TrafficPolicy\nmetadata: {{name: svc{i}, namespace: {ns}}}\nspec:\n"
            f"  selector: {{app: svc{i}}}\n  ports: [{{name: http, port: {8000 + i % 5}}}]\n"
            f"  versions: {{v1: {{labels: {{version: v1}}}}, v2: {{labels: {{version: v2}}}}}}\n"
            f"  {shape}\n  timeout: {1 + i % 9}s\n"
        ).encode()
    for n, env in enumerate(ENVIRONMENTS):
        overrides = "".join(f"    team{i % 7}/svc{i}: {{timeout: {n + 2}s}}\n" for i in range(n, SERVICES, 10))
        endpoints = "".join(f"    team{i % 7}/svc{i}: {{v1: [\"10.{n}.{i // 250}.{i % 250}:80\"]}}\n" for i in range(0, SERVICES, 4))
        files[f"environments/{env}.yaml"] = (
            f"apiVersion: meshc.dev/v1\nkind: Environment\nmetadata: {{name: {env}}}\nspec:\n"
            f"  defaults: {{retries: {{attempts: {n + 1}}}}}\n  overrides:\n{overrides}  endpoints:\n{endpoints}"
        ).encode()
    return Source(files)


@pytest.fixture
def pools(monkeypatch) -> list:
    """The worker count of every process pool the pipeline starts."""
    started = []

    class CountingPool(concurrent.futures.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            started.append(kwargs.get("max_workers"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(workers, "ProcessPoolExecutor", CountingPool)
    return started


def test_serial_and_parallel_compiles_are_identical(pools):
    source = big_source()
    assert SERVICES * len(ENVIRONMENTS) >= workers.PARALLEL_THRESHOLD
    serial = outputs(source, jobs=1)
    assert pools == []
    parallel = outputs(shuffled(source, 7), jobs=2)
    assert pools == [2]  # the parallel path was taken
    assert sorted(serial) == list(ENVIRONMENTS)
    assert all(len([p for p in files if p.startswith("istio/")]) == SERVICES for files in serial.values())
    assert parallel == serial


def test_policies_parsed_in_workers_compile_and_fail_as_parsed_at_home(pools, monkeypatch):
    monkeypatch.setattr(workers, "PARSE_THRESHOLD", 50)
    source = big_source()
    at_home = outputs(source, jobs=1)
    assert pools == []
    assert outputs(source, jobs=2) == at_home
    assert pools == [2, 2], "policies parsed by one pool's workers, units computed by another's"
    files = dict(source.files)
    files["policies/team0/copy.yaml"] = files["policies/team0/svc0.yaml"]  # a second policy for team0/svc0
    files["policies/team1/bad.yaml"] = files["policies/team1/svc1.yaml"].replace(b"timeout: 2s", b"timeout: soon")
    files["policies/team2/worse.yaml"] = b"spec: [unclosed\n"
    broken = Source(files)
    home, away = (compile_source(broken, jobs=jobs, models=False) for jobs in (1, 2))
    assert not home.ok and [d.render() for d in away.diagnostics] == [d.render() for d in home.diagnostics]
    assert {d.code for d in home.diagnostics} >= {"policy.duplicate", "yaml.syntax"}


# -- nothing from the machine in the output --------------------------------------------------


def test_no_paths_hosts_or_times_in_the_output(tmp_path):
    copies = []
    for where in ("a/one", "elsewhere/two"):
        repo = tmp_path / where
        shutil.copytree(REPO / "policies", repo / "policies")
        shutil.copytree(REPO / "environments", repo / "environments")
        assert run_cli(["compile", "--repo", str(repo)])[0] == 0
        copies.append(read_tree(repo / "rendered"))
        if len(copies) == 1:
            time.sleep(1.1)  # a timestamp in seconds would differ between the two
    assert copies[0] == copies[1]

    text = b"".join(copies[0].values()).decode()
    for leak in {str(tmp_path), str(REPO), str(Path.home()), "/tmp/", "/work/", socket.gethostname()}:
        assert leak not in text
    assert not re.search(r"\b20\d\d-[01]\d-[0-3]\d", text)  # no dates
    assert not re.search(rf"\b{int(time.time()) // 100_000}\d{{5}}\b", text)  # no epoch seconds of today


def test_every_file_is_lf_with_one_final_newline():
    for env, files in outputs(source_from_dir(REPO)).items():
        for path, data in files.items():
            assert b"\r" not in data and data.endswith(b"\n") and not data.endswith(b"\n\n"), f"{env}/{path}"


def test_no_worker_outlives_an_interrupted_compile(monkeypatch):
    import multiprocessing

    monkeypatch.setattr(workers, "PARSE_THRESHOLD", 50)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(validate, "load_environments", interrupted)  # while the workers parse policies
    with pytest.raises(KeyboardInterrupt):
        compile_source(big_source(), jobs=2)
    assert multiprocessing.active_children() == []
