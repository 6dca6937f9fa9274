"""The example repository, damaged at random, through the real command line.

Every case copies policies/ and environments/ of this checkout, damages one or
two of its files (a truncation, a lost or doubled line, stray bytes, a tab, a
value of another type, deep nesting, a huge number, a NUL, invalid UTF-8, an
unknown key, a wrong indentation, a file become a directory or emptied, ...)
and runs `meshc compile` in-process over a `rendered/` from a good compile. It
must end 0 or 1, never in an exception; on 1 every line is a diagnostic at a
file of the repo (or meshc's summary) and `rendered/` is byte-for-byte what it
was; on 0 every environment is rendered.

Each case draws from its own `random.Random(f"{SEED}-{index}")`, so one case
replays alone: `pytest tests/test_damage.py -k "case-17"`.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import re
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

from compiler.cache import Cache
from compiler.cli import main
from compiler.load import MAX_DEPTH
from conftest import REPO
from golden import read_tree

SEED = 20240607
CASES = 150

LINE = re.compile(r"^(policies|environments)/[^:\0]+\.ya?ml(:\d+:\d+)?: (error|warning|note): \S.*$")
SUMMARY = re.compile(r"^meshc: \d+ errors?; nothing written$")


# -- damages: each takes (file path, rng) and says what it did ----------------------------------


def _lines(b: bytes) -> list[bytes]:
    return b.splitlines(keepends=True) or [b""]


def truncate(p: Path, rng) -> str:
    b = p.read_bytes()
    n = rng.randrange(len(b) + 1)
    p.write_bytes(b[:n])
    return f"truncated at byte {n}"


def delete_line(p: Path, rng) -> str:
    lines = _lines(p.read_bytes())
    i = rng.randrange(len(lines))
    del lines[i]
    p.write_bytes(b"".join(lines))
    return f"deleted line {i + 1}"


def duplicate_line(p: Path, rng) -> str:
    lines = _lines(p.read_bytes())
    i = rng.randrange(len(lines))
    lines.insert(i, lines[i])
    p.write_bytes(b"".join(lines))
    return f"duplicated line {i + 1}"


def swap_lines(p: Path, rng) -> str:
    lines = _lines(p.read_bytes())
    i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
    lines[i], lines[j] = lines[j], lines[i]
    p.write_bytes(b"".join(lines))
    return f"swapped lines {i + 1} and {j + 1}"


def _insert(p: Path, rng, what: bytes) -> int:
    b = p.read_bytes()
    at = rng.randrange(len(b) + 1)
    p.write_bytes(b[:at] + what + b[at:])
    return at


def random_bytes(p: Path, rng) -> str:
    what = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    return f"inserted {what!r} at byte {_insert(p, rng, what)}"


STRAYS = [b"\t", b"\0", b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\xef\xbb\xbf", b"\r", b"\r\n", b"\x85", "\u2028".encode(),
          b"\x1b", b"\x7f", "\U0001f600".encode(), b":", b"- ", b"[", b"{", b"]", b"}", b"&a ", b"*a", b"!", b"|",
          b">", b"%", b"@", b"`", b'"', b"'", b"#", b"---\n", b"...\n", b"? ", b",", b"\n  "]


def stray(p: Path, rng) -> str:
    what = rng.choice(STRAYS)
    return f"inserted {what!r} at byte {_insert(p, rng, what)}"


def tab_indent(p: Path, rng) -> str:
    lines = _lines(p.read_bytes())
    i = rng.randrange(len(lines))
    lines[i] = b"\t" + lines[i].lstrip(b" ")
    p.write_bytes(b"".join(lines))
    return f"indented line {i + 1} with a tab"


def reindent(p: Path, rng) -> str:
    lines = _lines(p.read_bytes())
    i = rng.randrange(len(lines))
    delta = rng.choice([-3, -2, -1, 1, 2, 3])
    body = lines[i].lstrip(b" ")
    lines[i] = b" " * max(0, len(lines[i]) - len(body) + delta) + body
    p.write_bytes(b"".join(lines))
    return f"re-indented line {i + 1} by {delta}"


def _deep(rng) -> tuple[str, str]:
    n = rng.choice([MAX_DEPTH - 2, MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, 2_000, 10_000, 100_000])
    style = rng.choice(["flow-list", "flow-map", "flow-list-unclosed"])
    if style == "flow-list":
        return "[" * n + "1" + "]" * n, f"{style} {n} deep"
    if style == "flow-map":
        return "{a: " * n + "1" + "}" * n, f"{style} {n} deep"
    return "[" * n, f"{style} {n} deep"


# What a value may become: other types, odd scalars, tags, aliases, huge and odd numbers.
VALUES = ["[1, 2]", "{a: 1}", "[]", "{}", "~", "null", "true", "false", '""', "''", "'text'", "12", "-1", "0", "1.5",
          "-0.0", "1e400", ".nan", ".inf", "-.inf", "0x1F", "0o17", "0b101", "1_000", "9" * 19, "9" * 20, "9" * 400,
          "9" * 5_000, "0x" + "f" * 5_000, "-0x" + "f" * 100, "0o" + "7" * 6_000, "!!binary aGk=", "!!str 5", "!!int x",
          "!!float '1'", "!!set {a}", "!custom 1", "*nowhere", "&a [*a]", "&a {b: *a}", "|\n  text", ">-\n  text",
          '"\\u0000"', '"\\x00a"', "a: b", "- x", "? x", "'unterminated", '"unterminated', "x" * 100_000,
          "2s", "0s", "1h", "250ms", "99999999999h", "-5s", "v9", "HTTP", "10.0.0.1:0", "[::1]:80", "@"]


def change_value(p: Path, rng) -> str:
    text = p.read_bytes().decode("utf-8", "replace")
    spots = list(re.finditer(r"(?<=: )[^\s,{}\[\]#][^,{}\[\]\n#]*", text))
    if not spots:
        return truncate(p, rng)
    m = rng.choice(spots)
    if rng.random() < 0.15:
        new, what = _deep(rng)
    else:
        new = rng.choice(VALUES)
        what = repr(new) if len(new) < 40 else f"{new[:12]!r}… ({len(new)} chars)"
    p.write_bytes((text[: m.start()] + new + text[m.end() :]).encode("utf-8", "surrogatepass"))
    return f"value {m.group()!r} at offset {m.start()} became {what}"


def deep_value(p: Path, rng) -> str:
    new, what = _deep(rng)
    with p.open("a", encoding="utf-8") as f:
        f.write(f"deep: {new}\n")
    return f"appended deep: {what}"


def deep_block(p: Path, rng) -> str:
    n = rng.choice([MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, 300])
    seq = rng.random() < 0.5
    lines = "".join(" " * (i + 1) + ("-\n" if seq else "a:\n") for i in range(n))
    with p.open("a", encoding="utf-8") as f:
        f.write("deep:\n" + lines + " " * (n + 1) + "x: 1\n")
    return f"appended a block {'list' if seq else 'mapping'} {n} deep"


def unknown_key(p: Path, rng) -> str:
    lines = _lines(p.read_bytes())
    i = rng.randrange(len(lines) + 1)
    indent = rng.choice([0, 2, 4, 6])
    lines.insert(i, b" " * indent + rng.choice([b"bogus: 1\n", b"timeoutt: 1s\n", b"spec: {}\n", b"metadata: ~\n"]))
    p.write_bytes(b"".join(lines))
    return f"inserted an unknown key at line {i + 1}, indent {indent}"


def duplicate_key(p: Path, rng) -> str:
    lines = _lines(p.read_bytes())
    keyed = [i for i, line in enumerate(lines) if re.match(rb"^\s*[\w./-]+:", line)]
    i = rng.choice(keyed) if keyed else 0
    lines.insert(i + 1, lines[i].split(b":")[0] + b": 1\n")
    p.write_bytes(b"".join(lines))
    return f"repeated the key of line {i + 1}"


def aliases(p: Path, rng) -> str:
    kind = rng.choice(["bomb", "cycle", "undefined", "shared", "anchor-only"])
    if kind == "bomb":  # the loader builds 100,000 values before it refuses: the slowest case here
        levels = ["b0: &b0 [x, x, x, x, x, x, x, x, x, x]"]
        levels += [f"b{i}: &b{i} [" + ", ".join([f"*b{i - 1}"] * 10) + "]" for i in range(1, 7)]
        tail = "\n".join(levels)
    else:
        tail = {"cycle": "b: &b {c: [*b]}", "undefined": "b: *nowhere", "shared": "b: &b {c: 1}\nd: *b",
                "anchor-only": "b: &b 1"}[kind]
    with p.open("a", encoding="utf-8") as f:
        f.write(tail + "\n")
    return f"appended an alias {kind}"


def emptied(p: Path, rng) -> str:
    what = rng.choice([b"", b"\n", b"   \n\n", b"# only a comment\n", b"---\n", b"~\n", b"[]\n", b"'text'\n", b"42\n"])
    p.write_bytes(what)
    return f"content replaced by {what!r}"


def directory(p: Path, rng) -> str:
    p.unlink()
    p.mkdir()
    if rng.random() < 0.5:
        (p / "inner.yaml").write_bytes(b"a: 1\n")
    return "replaced by a directory"


def line_endings(p: Path, rng) -> str:
    sep = rng.choice([b"\r\n", b"\r", b"\x85", "\u2028".encode()])
    p.write_bytes(p.read_bytes().replace(b"\n", sep))
    return f"line endings became {sep!r}"


def another_encoding(p: Path, rng) -> str:
    enc = rng.choice(["utf-16", "utf-32", "latin-1", "utf-16-le"])
    p.write_bytes(p.read_bytes().decode("utf-8").replace("#", "# é").encode(enc))
    return f"re-encoded as {enc}"


def copied(p: Path, rng) -> str:
    """A second file: the same policy twice, or a file beside the inputs."""
    twin = p.with_name(rng.choice(["copy.yaml", "Copy Of.yml", "zz.yaml", ".hidden.yaml", "x.yaml.bak"]))
    shutil.copyfile(p, twin)
    return f"copied to {twin.name}"


DAMAGES = [truncate, delete_line, duplicate_line, swap_lines, random_bytes, stray, stray, tab_indent, reindent,
           change_value, change_value, change_value, deep_value, deep_block, unknown_key, duplicate_key, aliases,
           emptied, directory, line_endings, another_encoding, copied]


def damage(repo: Path, rng: random.Random) -> list[str]:
    done = []
    for _ in range(rng.choice([1, 1, 1, 2])):
        files = sorted(p for p in repo.rglob("*.y*ml") if p.is_file())
        target = rng.choice(files)
        kind = rng.choice(DAMAGES)
        done.append(f"{target.relative_to(repo).as_posix()}: {kind.__name__}: {kind(target, rng)}")
    return done


# -- the test ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    """The example repo compiled once, with a re-compile cache of its own, and copies of the
    state every case starts from: the repo (always at one path: the cache is keyed by it), the
    cache warm from the good compile, and the good compile's `rendered/`."""
    root = tmp_path_factory.mktemp("damage")
    state = {"repo": root / "work/repo", "cache": root / "work/cache", "rendered": root / "work/rendered"}
    for part in ("policies", "environments"):
        shutil.copytree(REPO / part, state["repo"] / part)
    old_cache = os.environ["MESHC_CACHE_DIR"]
    os.environ["MESHC_CACHE_DIR"] = str(state["cache"])
    try:
        code, _, stderr = _run(["compile", "--repo", str(state["repo"]), "--out", str(state["rendered"])])
        assert code == 0, stderr
        for name, path in list(state.items()):
            state["good-" + name] = root / "good" / name
            shutil.copytree(path, state["good-" + name])
        state["good-tree"] = read_tree(state["rendered"])
        yield state
    finally:
        os.environ["MESHC_CACHE_DIR"] = old_cache


def _reset(state: dict, name: str) -> None:
    shutil.rmtree(state[name])
    shutil.copytree(state["good-" + name], state[name])


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("index", range(CASES), ids=lambda i: f"case-{i}")
def test_a_damaged_repo_is_refused_with_located_errors_or_compiles(index, pristine):
    # Every case starts from the same state: the good repo, its warm cache and rendered/ (which
    # only a case that exits 0 changes; it is put back after one).
    repo, out = pristine["repo"], pristine["rendered"]
    _reset(pristine, "repo")
    _reset(pristine, "cache")
    rng = random.Random(f"{SEED}-{index}")
    what = damage(repo, rng)
    before = pristine["good-tree"]
    replay = f"seed {SEED}, case {index}: {'; '.join(what)}"

    code = None
    try:
        code, stdout, stderr = _run(["compile", "--repo", str(repo), "--out", str(out)])
    except BaseException:  # noqa: BLE001 — a crash is exactly what this test looks for
        pytest.fail(f"{replay}\nmeshc raised:\n{traceback.format_exc()}")
    finally:
        after = read_tree(out)
        rendered = sorted(p.name for p in out.iterdir() if (p / "kustomization.yaml").is_file())
        if after != before:  # for the next case (a compile that wrote, or a failure here)
            _reset(pristine, "rendered")

    assert code in (0, 1), f"{replay}\nexit {code}\n{stderr}"
    assert stdout == "", replay
    lines = [line for line in stderr.splitlines() if not line.startswith("meshc: ")]
    assert all(LINE.match(line) for line in lines), f"{replay}\n{stderr}"
    if code == 1:
        assert any(": error: " in line for line in lines), f"{replay}\n{stderr}"
        assert SUMMARY.match(stderr.splitlines()[-1]), f"{replay}\n{stderr}"
        assert after == before, f"{replay}: rendered/ changed on exit 1"
    else:
        envs = sorted(p.stem for p in (repo / "environments").iterdir()
                      if p.is_file() and p.suffix in (".yaml", ".yml") and not p.name.startswith("."))
        assert rendered == envs, f"{replay}: rendered {rendered}"


# A few of the worst, through the installed console script in a process of its own: a C-level crash
# (a stack overflow in the YAML composer) would kill it with a signal, not raise.
WORST = [
    ("policies/bookinfo/reviews.yaml", "  x: " + "[" * 100_000 + "]" * 100_000 + "\n"),
    ("environments/prod.yaml", "  x: " + "{a: " * 1_000_000 + "\n"),
    ("policies/bookinfo/ratings.yaml", "  x: &a [*a]\n"),
    ("policies/bookinfo/details.yaml", "  x: \0\xff\n"),
]


@pytest.mark.parametrize("path,tail", WORST, ids=["flow-list-100k", "flow-map-1m-unclosed", "alias-cycle", "nul"])
def test_the_console_script_survives_the_worst(path, tail, pristine, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(pristine["good-repo"], repo)
    with (repo / path).open("ab") as f:
        f.write(tail.encode("utf-8", "surrogateescape") if "\xff" not in tail else tail.encode("latin-1"))
    meshc = Path(sys.executable).parent / "meshc"
    proc = subprocess.run([str(meshc), "validate", "--repo", str(repo)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Fatal Python error" not in proc.stderr
    assert proc.stderr.startswith(path + ":"), proc.stderr[-2000:]


@pytest.mark.parametrize("number,message", [
    ("0x" + "f" * 5_000, "integer '0xffffffffffffffffff'… (5,002 characters) has more than 640 digits"),
    ("9" * 5_000, "integer '99999999999999999999'… (5,000 characters) has more than 640 digits"),
    ("18446744073709551616", "spec.ports[0].port: 18446744073709551616 is out of range"),
])
def test_a_huge_port_is_a_located_error(number, message, pristine, tmp_path):
    # Found here (seed 20240607, case 126): a 6,000-digit octal loaded, and the schema's message
    # quoting it raised ValueError (Python prints no int past 4,300 digits).
    repo = tmp_path / "repo"
    shutil.copytree(pristine["good-repo"], repo)
    policy = repo / "policies/bookinfo/reviews.yaml"
    text = policy.read_text()
    line = text[:text.index("port: 9080,")].count("\n") + 1
    policy.write_text(text.replace("port: 9080,", f"port: {number},", 1))
    code, _, stderr = _run(["validate", "--repo", str(repo)])
    assert code == 1
    assert stderr.startswith(f"policies/bookinfo/reviews.yaml:{line}:26: error: {message}"), stderr
