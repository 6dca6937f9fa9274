"""The serialisers: meshc's YAML node builder writes exactly what PyYAML's own dump_all would."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import yaml

from compiler import emit
from compiler.emit import Piece, canonical_json, file_bytes, json_bytes, plain, yaml_bytes
from compiler.load import source_from_dir
from compiler.pipeline import compile_source
from compiler.targets import OutputFile
from conftest import REPO


class _Reference(yaml.CSafeDumper):
    def ignore_aliases(self, data):
        return True


def _reference(docs) -> bytes:
    text = yaml.dump_all(docs, Dumper=_Reference, sort_keys=True, default_flow_style=False, allow_unicode=True, width=1 << 16)
    return text.encode()


TRICKY = [
    {
        "yaml11": ["on", "off", "yes", "no", "y", "n", "true", "null", "~", "Null"],
        "numbers": ["123", "0x1F", "1e3", "0.250s", ".inf", "010", "1_000"],
        "syntax": ["", " lead", "trail ", "- dash", "key: value", "#x", "*", "&a", "!t", "'q'", '"q"', "a\nb", "\t"],
        "unicode": "é ✓ 名前",
        "scalars": [None, True, False, 0, -3, 10**20, 1.5, 1e20, float("inf")],
        "empty": [[], {}],
        "nested": {"b": {"c": [{"d": "e"}]}, "a": 1},
    },
    {"second": "document"},
]


def test_yaml_bytes_match_pyyaml_on_tricky_values():
    assert yaml_bytes(TRICKY) == _reference(TRICKY)


def test_yaml_bytes_match_pyyaml_on_every_compiled_document():
    result = compile_source(source_from_dir(REPO), models=False)
    files = [(f"{env}/{rel}", data) for env, out in result.outputs.items() for rel, data in out.items() if rel.endswith(".yaml")]
    assert len(files) > 10, "the examples compile"
    for name, data in files:
        docs = list(yaml.load_all(data, Loader=yaml.CSafeLoader))
        assert yaml_bytes(docs) == _reference(docs) == data, name


def test_a_file_of_pieces_equals_one_dump_all():
    docs = TRICKY + [TRICKY[1]]
    assert file_bytes(OutputFile("x.yaml", [Piece.yaml(docs)], "yaml")) == _reference(docs)
    assert file_bytes(OutputFile("x.yaml", [Piece.yaml(docs[:1]), Piece.yaml(docs[1:])], "yaml")) == _reference(docs)
    assert file_bytes(OutputFile("x.yaml", docs, "yaml")) == _reference(docs)  # plain documents too
    assert Piece.yaml(docs).value == docs
    assert Piece.yaml(docs).canonical == canonical_json(docs)


MARKERS = {"apiVersion": "v1", "dashes": "---", "inside": "a\n---\nb", "ends": "x\n---", "dots": "...\n...",
           "list": ["---", "--- x", {"---": "---\n"}], "long": "---\n" * 3 + "-" * 80}


def test_a_piece_parsed_back_renders_only_the_documents_added_to_it(monkeypatch):
    """An ingress, a Sidecar or a patch makes a file of a service's cached documents and more:
    the cached documents' YAML is reused, split at the separators, and only the rest rendered."""
    docs = [MARKERS, TRICKY[0], {"kind": "Service", "text": "---"}]
    added = [{"kind": "Gateway", "spec": {"hosts": ["---", "a.example.com"]}}, TRICKY[1]]
    cached = Piece(Piece.yaml(docs).text, 0, Piece.yaml(docs).canonical, many=True)  # as the cache gives it back
    emit._YAML_MEMO.clear()
    rendered = []
    real = emit.yaml_bytes

    def counting(documents):
        rendered.extend(documents)
        return real(documents)

    monkeypatch.setattr(emit, "yaml_bytes", counting)
    combined = Piece.yaml(cached.value + added)
    assert rendered == added
    assert combined.text == _reference(docs + added) and combined.canonical == canonical_json(docs + added)


def test_a_run_of_list_items_splices_as_those_items():
    items = [{"name": "b", "x": [1, {}]}, {"name": "a"}, []]
    value = {"resources": [{"first": True}, Piece.json_items(items, 2), "last"]}
    assert json_bytes(value) == json_bytes({"resources": [{"first": True}, *items, "last"]})
    assert plain(value) == {"resources": [{"first": True}, *items, "last"]}
    assert Piece.json_items([], 2) is None


def _random_value(rng: random.Random, depth: int = 0):
    """Plain JSON data of every shape: nested, empty, non-ASCII, DEL, escapes."""
    roll = rng.random()
    if depth < 4 and roll < 0.3:
        return {rng.choice(["a", "b", "@type", "é", "k\x7f", "z\"q", "名"]) + str(i): _random_value(rng, depth + 1)
                for i in range(rng.randint(0, 4))}
    if depth < 4 and roll < 0.5:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return rng.choice([None, True, False, 0, -7, 2**40, 1.5, "", "plain", "é ✓", "tab\tnew\nline", "\x7f", "</script>"])


def _with_pieces(rng: random.Random, value, depth: int = 0):
    """`value` with some of its inner values (and maybe itself) made pieces, some for a shallower depth."""
    if rng.random() < 0.3:
        return Piece.json(value, rng.randint(0, depth))
    if isinstance(value, dict):
        return {k: _with_pieces(rng, v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_pieces(rng, v, depth + 1) for v in value]
    return value


@pytest.mark.parametrize("seed", range(300))
def test_pieces_splice_to_the_bytes_of_the_plain_value(seed):
    rng = random.Random(seed)
    value = {"resources": [_random_value(rng) for _ in range(rng.randint(0, 5))], "type_url": "t", "nested": _random_value(rng)}
    spliced = _with_pieces(rng, value)
    assert plain(spliced) == value
    assert json_bytes(spliced) == json_bytes(value) == (json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def test_integers_beyond_64_bits_fall_back_to_json_dumps_pieces_and_all():
    big = {"n": 10**20, "inner": {"m": -(10**30)}}
    value = {"resources": [Piece.json(big, 2), Piece.json({"a": 1}, 2)], "z": 10**25}
    expected = {"resources": [big, {"a": 1}], "z": 10**25}
    assert json_bytes(value) == (json.dumps(expected, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
    assert Piece.json(big, 2).value == big


def test_a_piece_never_goes_shallower_than_it_was_made_for():
    with pytest.raises(ValueError, match="depth 2"):
        json_bytes([Piece.json({"a": [1]}, 2)])


def test_canonical_json_is_compact_and_sorted():
    assert canonical_json({"b": [1, {"d": None, "c": "é"}], "a": True}) == '{"a":true,"b":[1,{"c":"é","d":null}]}'.encode()


def test_a_piece_parses_back_only_when_asked_and_survives_pickling():
    import pickle

    piece = Piece.json({"name": "c", "é": [1, {}]}, 1)
    copy = pickle.loads(pickle.dumps(piece))
    assert copy == piece and copy._value is emit._UNPARSED, "the parsed value stayed behind"
    assert copy.value == {"name": "c", "é": [1, {}]}


def test_json_bytes_match_json_dumps():
    value = {"b": [1, 2.5, None, True], "a": {"é": "✓"}, "@type": "x"}
    assert json_bytes(value) == (json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def test_directories_swap_in_one_step(tmp_path):

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a"), (b / "x").write_text("b")
    assert emit._exchange(str(a), b), "renameat2(RENAME_EXCHANGE) works on this kernel"
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_write_rendered_replaces_and_keeps_nothing_beside(tmp_path):
    from compiler.emit import write_rendered

    write_rendered(tmp_path, {"prod": {"kustomization.yaml": b"one\n", "istio/a.yaml": b"a\n"}})
    write_rendered(tmp_path, {"prod": {"kustomization.yaml": b"two\n"}})
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["prod", "prod/kustomization.yaml"]
    assert (tmp_path / "prod/kustomization.yaml").read_bytes() == b"two\n"


def test_unchanged_files_are_linked_changed_ones_written_and_symlinks_never_followed(tmp_path):
    import os

    from compiler.emit import write_rendered

    outside = tmp_path / "outside.yaml"
    outside.write_bytes(b"same\n")
    out = tmp_path / "rendered"
    files = {"kustomization.yaml": b"k\n", "istio/a/x.yaml": b"x\n", "istio/a/y.yaml": b"y\n", "istio/b/z.yaml": b"same\n"}
    old_umask = os.umask(0o077)
    try:
        write_rendered(out, {"prod": files})
        before = {rel: (out / "prod" / rel).stat().st_ino for rel in files}
        (out / "prod" / "istio/b/z.yaml").unlink()
        (out / "prod" / "istio/b/z.yaml").symlink_to(outside)  # a planted link to a file with the same bytes
        write_rendered(out, {"prod": {**files, "istio/a/y.yaml": b"changed\n"}})
    finally:
        os.umask(old_umask)
    after = {rel: (out / "prod" / rel).stat(follow_symlinks=False).st_ino for rel in files}
    assert after["kustomization.yaml"] == before["kustomization.yaml"] and after["istio/a/x.yaml"] == before["istio/a/x.yaml"]
    assert after["istio/a/y.yaml"] != before["istio/a/y.yaml"]
    z = out / "prod" / "istio/b/z.yaml"
    assert not z.is_symlink() and z.read_bytes() == b"same\n" and z.stat().st_ino != outside.stat().st_ino
    assert outside.stat().st_nlink == 1
    dirs = [out / "prod", out / "prod" / "istio", out / "prod" / "istio" / "a"]
    assert [oct(d.stat().st_mode & 0o777) for d in dirs] == ["0o755"] * 3, "directories do not depend on the umask"


def test_a_failure_while_building_any_environment_changes_none(tmp_path):
    from compiler.emit import write_rendered

    write_rendered(tmp_path, {"dev": {"kustomization.yaml": b"dev 1\n"}, "prod": {"kustomization.yaml": b"prod 1\n"}})
    broken = {"kustomization.yaml": b"prod 2\n", "istio": b"a file", "istio/x.yaml": b"under that file\n"}
    with pytest.raises(OSError):
        write_rendered(tmp_path, {"dev": {"kustomization.yaml": b"dev 2\n"}, "prod": broken})
    assert (tmp_path / "dev" / "kustomization.yaml").read_bytes() == b"dev 1\n", "dev was built, but not swapped in"
    assert (tmp_path / "prod" / "kustomization.yaml").read_bytes() == b"prod 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dev", "prod"], "no staging directory left behind"


def test_a_symlink_at_any_level_of_the_old_tree_is_never_followed(tmp_path):
    from compiler.emit import write_rendered

    outside = tmp_path / "outside"
    (outside / "a").mkdir(parents=True)
    (outside / "a" / "x.yaml").write_bytes(b"same\n")
    out = tmp_path / "rendered"
    files = {"kustomization.yaml": b"k\n", "istio/a/x.yaml": b"same\n"}
    write_rendered(out, {"prod": files, "dev": files})
    shutil.rmtree(out / "prod" / "istio")
    (out / "prod" / "istio").symlink_to(outside)  # a directory on the way to the file
    shutil.rmtree(out / "dev")
    (out / "dev").symlink_to(out / "prod")  # the environment's directory itself
    (out / "staging").symlink_to(tmp_path / "nowhere")  # dangling
    write_rendered(out, {"prod": files, "dev": files, "staging": files})
    assert (outside / "a" / "x.yaml").stat().st_nlink == 1, "nothing outside was linked in"
    for env in ("prod", "dev", "staging"):
        assert not (out / env).is_symlink() and not (out / env / "istio").is_symlink()
        assert (out / env / "istio/a/x.yaml").read_bytes() == b"same\n"
    assert sorted(p.name for p in out.iterdir()) == ["dev", "prod", "staging"], "the replaced links went too"


def test_check_neither_follows_nor_waits_on_what_is_planted_in_rendered(tmp_path):
    import os

    from compiler.emit import stale_files, write_rendered

    files = {"kustomization.yaml": b"k\n", "istio/a.yaml": b"a\n"}
    out = tmp_path / "rendered"
    write_rendered(out, {"prod": files})
    (out / "prod" / "istio/a.yaml").unlink()
    (out / "prod" / "istio/a.yaml").symlink_to(out / "prod" / "kustomization.yaml")
    os.mkfifo(out / "prod" / "istio/pipe.yaml")
    assert stale_files(out, {"prod": {**files, "istio/a.yaml": b"k\n"}}, all_envs=True) == [
        "rendered/prod/istio/a.yaml: differs from the compiled output",  # though the link leads to those bytes
        "rendered/prod/istio/pipe.yaml: not produced by the compiler (stale)",
    ]
