"""The loader: YAML 1.2 scalars, positions, and inputs built to hurt."""

from __future__ import annotations

import os

import pytest

from compiler.diagnostics import Diagnostics, Span
from compiler.load import MAX_DEPTH, MAX_INT_DIGITS, MAX_VALUES, parse


def _load(text: str):
    diags = Diagnostics()
    doc = parse("p.yaml", text.encode(), diags)
    return doc, [d.render() for d in diags]


def test_scalars_resolve_by_yaml_1_2():
    doc, problems = _load("a: on\nb: yes\nc: 0b101\nd: 0o17\ne: 0x1F\nf: 1_000\ng: ~\nh: true\ni: 1.5\nj: '10'\n")
    assert problems == []
    assert doc.data == {"a": "on", "b": "yes", "c": 5, "d": 15, "e": 31, "f": 1000, "g": None, "h": True, "i": 1.5, "j": "10"}


def test_every_value_and_key_has_its_position():
    doc, _ = _load("spec:\n  timeout: 4s\n  ports:\n    - {name: http}\n")
    assert doc.spans.at(("spec", "timeout")) == Span("p.yaml", 2, 12)
    assert doc.spans.key_at(("spec", "timeout")) == Span("p.yaml", 2, 3)
    assert doc.spans.at(("spec", "ports", 0, "name")) == Span("p.yaml", 4, 14)


def test_an_alias_bomb_is_refused_not_expanded():
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 7)]
    doc, problems = _load("\n".join(levels) + "\n")
    assert doc is None
    assert problems == [f"p.yaml:1:1: error: the document expands to more than {MAX_VALUES:,} values (through aliases?)"]


def test_a_cached_documents_spans_answer_as_the_parsed_ones():
    from compiler.load import Document

    doc, _ = _load("spec:\n  overrides:\n    a/b: {timeout: 1s, ports: [{port: 80}]}\n    a/c: {timeout: 2s}\n  defaults: {x: 1}\n")
    cached = Document.from_json(doc.to_json())
    for prefix in [(), ("spec",), ("spec", "overrides"), ("spec", "overrides", "a/b"), ("spec", "nothing")]:
        parsed, rows = doc.spans.under(prefix), cached.spans.under(prefix)
        assert dict(rows.items()) == dict(parsed.items()), prefix
        # a map under a map under the rows, asked before and after the rows were built
        assert dict(rows.under(("overrides",)).items()) == dict(parsed.under(("overrides",)).items())
    early = cached.spans.under(("spec",))
    assert cached.spans.at(("spec", "defaults", "x")) == Span("p.yaml", 5, 17)  # builds the whole map
    assert early.under(("overrides", "a/b")).at(("ports", 0, "port")) == doc.spans.at(("spec", "overrides", "a/b", "ports", 0, "port"))
    assert cached.spans.children(("spec", "overrides"))["a/c"].at(("timeout",)) == Span("p.yaml", 4, 20)


def test_a_symlink_out_of_the_repo_is_not_read(tmp_path):
    from compiler.load import source_from_dir

    repo, outside = tmp_path / "repo", tmp_path / "secret.yaml"
    (repo / "policies" / "shop").mkdir(parents=True)
    (repo / "environments").mkdir()
    outside.write_text("token: hunter2\n")
    (repo / "policies" / "shop" / "web.yaml").write_text("kind: TrafficPolicy\n")
    (repo / "policies" / "shop" / "leak.yaml").symlink_to(outside)
    (repo / "policies" / "shop" / "alias.yaml").symlink_to(repo / "policies" / "shop" / "web.yaml")
    (repo / "environments" / "prod.yaml").write_text("kind: Environment\n")
    source = source_from_dir(repo)
    assert sorted(source.files) == ["environments/prod.yaml", "policies/shop/alias.yaml", "policies/shop/web.yaml"]
    assert source.files["policies/shop/alias.yaml"] == b"kind: TrafficPolicy\n"


def test_an_input_directory_that_is_a_symlink_is_read_only_inside_the_repo(tmp_path):
    from compiler.load import source_from_dir

    repo, outside = tmp_path / "repo", tmp_path / "elsewhere"
    (outside / "shop").mkdir(parents=True)
    (outside / "shop" / "web.yaml").write_text("kind: TrafficPolicy\n")
    (repo / "config" / "envs").mkdir(parents=True)
    (repo / "config" / "envs" / "prod.yaml").write_text("kind: Environment\n")
    (repo / "policies").symlink_to(outside)
    (repo / "environments").symlink_to(repo / "config" / "envs")
    assert sorted(source_from_dir(repo).files) == ["environments/prod.yaml"]


# -- nesting depth --------------------------------------------------------------------------------
# Each shape nests `n` collections below the document's top-level mapping (so n + 1 in all) and
# says where its k-th collection starts (1-based line and column), k counted from the top mapping.


def _nested(shape: str, n: int) -> tuple[str, callable]:
    if shape == "flow-list":
        return "x: " + "[" * n + "1" + "]" * n + "\n", lambda k: (1, 4 + k - 2)
    if shape == "flow-map":
        return "x: " + "{a: " * n + "1" + "}" * n + "\n", lambda k: (1, 4 + 4 * (k - 2))
    if shape == "flow-list-of-pairs":  # `[a: ...]`: a list holding a one-pair mapping, two levels a `[`
        p = n % 2  # an odd level: one plain list first
        return "x: " + "[" * p + "[a: " * (n // 2) + "1" + "]" * (n // 2 + p) + "\n", lambda k: (1, 4 + p + 4 * ((k - 2 - p) // 2) + (k - p) % 2)
    if shape == "block-map":
        return "x:\n" + "".join(" " * (i + 1) + "a:\n" for i in range(n - 1)) + " " * n + "b: 1\n", lambda k: (k, k)
    if shape == "block-list":
        return "x:\n" + "".join(" " * (i + 1) + "-\n" for i in range(n)) + " " * (n + 1) + "1\n", lambda k: (k, k)
    if shape == "compact-list":  # `- - - 1`: every level on one line
        return "x:\n  " + "- " * n + "1\n", lambda k: (2, 3 + 2 * (k - 2))
    raise AssertionError(shape)


SHAPES = ["flow-list", "flow-map", "flow-list-of-pairs", "block-map", "block-list", "compact-list"]


@pytest.mark.parametrize("shape", SHAPES)
def test_nesting_up_to_the_limit_loads(shape):
    text, _ = _nested(shape, MAX_DEPTH - 1)
    doc, problems = _load(text)
    assert problems == [] and doc is not None
    value, depth = doc.data, 0
    while isinstance(value, (dict, list)):
        value, depth = (value[0] if isinstance(value, list) else next(iter(value.values()))), depth + 1
    assert depth == MAX_DEPTH


# (a block-style file n levels deep is n²/2 bytes: those stop at 2,000)
@pytest.mark.parametrize("shape,n", [(s, n) for s in SHAPES for n in (MAX_DEPTH, MAX_DEPTH + 1, 2_000, 100_000)
                                     if n <= 2_000 or not s.startswith("block")])
def test_nesting_beyond_the_limit_is_refused_at_the_first_collection_too_deep(shape, n):
    text, where = _nested(shape, n)
    doc, problems = _load(text)
    line, col = where(MAX_DEPTH + 1)
    assert doc is None
    assert problems == [f"p.yaml:{line}:{col}: error: value nested deeper than {MAX_DEPTH} levels"]


def test_a_million_levels_are_refused_without_composing_them():
    # ruamel's C composer would recurse a C frame a level and overflow the stack (SIGSEGV) here.
    doc, problems = _load("a: 1\nb: " + "[" * 1_000_000 + "\n")
    assert doc is None and problems == [f"p.yaml:2:{4 + MAX_DEPTH - 1}: error: value nested deeper than {MAX_DEPTH} levels"]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 10, 500, 3_000])
def test_the_nesting_bound_is_never_below_the_true_depth(shape, n):
    # What keeps the C composer's recursion short: a text the bound calls shallow is composed as is.
    from compiler.load import _nesting_bound

    assert _nesting_bound(_nested(shape, n)[0]) >= n + 1


def test_a_deep_value_reached_through_an_alias_counts_its_full_depth():
    inner = "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)
    doc, problems = _load(f"a: &deep {inner}\nb: {{c: *deep}}\n")  # a: 64 levels, fine; b.c: 65
    assert doc is None
    assert problems == [f"p.yaml:1:{10 + MAX_DEPTH - 2}: error: value nested deeper than {MAX_DEPTH} levels"]


@pytest.mark.parametrize("text,col", [("x: &a [*a]\n", 4), ("x: &a {b: [1, {c: *a}]}\n", 4), ("&a [*a]\n", 1)])
def test_an_alias_inside_its_own_anchor_is_refused_not_followed_forever(text, col):
    # The composer registers an anchor before its children: `&a [*a]` composes into a cycle.
    doc, problems = _load(text)
    assert doc is None
    assert problems == [f"p.yaml:1:{col}: error: this value contains an alias of itself; YAML data here must be a tree"]


@pytest.mark.parametrize("text,line,col,char", [
    ("a: 1\nb: x\x7fy\n", 2, 5, "007F"),
    ("a: é\nbb: \u00e9\x01\n", 2, 6, "0001"),  # columns count characters, not bytes
    ("a: 1\r\nb: \x1c\n", 2, 4, "001C"),
    ("a: 1\rb: \U0001f600\x02\n", 2, 5, "0002"),  # a lone CR breaks a line, as libyaml counts
])
def test_a_forbidden_character_is_reported_on_one_line_where_it_is(text, line, col, char):
    # Found by tests/test_damage.py: the reader's error came at 1:1, with a second line of its own.
    doc, problems = _load(text)
    assert doc is None
    assert problems == [f"p.yaml:{line}:{col}: error: YAML error: character U+{char} is not allowed (control characters are not allowed)"]


@pytest.mark.parametrize("text,value", [("18446744073709551616", 2**64), ("9" * MAX_INT_DIGITS, 10**MAX_INT_DIGITS - 1),
                                        ("-0x" + "0" * 5_000 + "1F", -31), ("0x" + "f" * 500, 16**500 - 1)])
def test_a_big_integer_loads(text, value):
    # A patch value may carry one (tests/test_cache.py compiles a 30-digit annotation).
    doc, problems = _load(f"a: {text}\n")
    assert problems == [] and doc.data == {"a": value}


@pytest.mark.parametrize("text", ["1" + "0" * MAX_INT_DIGITS, "-" + "9" * 5_000, "0x" + "f" * 5_000,
                                  "0o" + "7" * 6_000, "0b" + "1" * 2_200, "1" + "_0" * MAX_INT_DIGITS])
def test_an_integer_no_one_could_print_is_refused_where_it_is(text):
    # Found by tests/test_damage.py: `value: 0o777…` (6,000 digits) loaded as an int no message could
    # print (Python refuses str() past 4,300 digits): a ValueError traceback from the schema.
    doc, problems = _load(f"a: 1\nb: {text}\n")
    shown = repr(text) if len(text) <= 40 else f"{text[:20]!r}… ({len(text):,} characters)"
    assert doc is None
    assert problems == [f"p.yaml:2:4: error: integer {shown} has more than {MAX_INT_DIGITS} digits; no field takes a number this large"]


@pytest.mark.parametrize("make", ["fifo", "dangling", "loop"])
def test_an_input_that_cannot_be_read_is_named_and_never_waited_on(make, tmp_path):
    # A FIFO named like a policy blocked meshc forever in read(); a dangling or looping symlink
    # was reported as "cannot read REPO: ..." without saying which file.
    from compiler.load import source_from_dir

    shop = tmp_path / "policies" / "shop"
    shop.mkdir(parents=True)
    (tmp_path / "environments").mkdir()
    bad = shop / "web.yaml"
    if make == "fifo":
        os.mkfifo(bad)
    else:
        bad.symlink_to("nowhere.yaml" if make == "dangling" else "web.yaml")
    with pytest.raises(OSError) as exc:
        source_from_dir(tmp_path)
    assert exc.value.strerror.startswith("policies/shop/web.yaml: ")


def test_a_plain_timestamp_is_a_string_and_an_explicit_one_is_refused():
    """YAML 1.2's core schema has no timestamps (freeze windows are RFC 3339 strings); a
    `!!timestamp` tag written out is still a tag the loader does not construct."""
    diags = Diagnostics()
    doc = parse("environments/prod.yaml", b"from: 2026-12-24T00:00:00Z\nday: 2026-12-24\n", diags)
    assert doc.data == {"from": "2026-12-24T00:00:00Z", "day": "2026-12-24"} and not list(diags)
    diags = Diagnostics()
    assert parse("environments/prod.yaml", b"from: !!timestamp 2026-12-24\n", diags) is None
    assert [d.code for d in diags] == ["yaml.tag"]
