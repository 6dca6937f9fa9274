"""The serialisers: meshc's YAML node builder writes exactly what PyYAML's own dump_all would."""

from __future__ import annotations

import json

import yaml

from compiler.emit import Serializer, json_bytes, yaml_bytes
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


def test_memoised_multi_document_file_equals_one_dump_all():
    docs = TRICKY + [TRICKY[1]]
    serializer = Serializer()
    assert serializer.serialize(OutputFile("x.yaml", docs, "yaml")) == _reference(docs)
    assert len(serializer.new) == 2  # the repeated document was emitted once


def test_json_bytes_match_json_dumps():
    value = {"b": [1, 2.5, None, True], "a": {"é": "✓"}, "@type": "x"}
    assert json_bytes(value) == (json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def test_directories_swap_in_one_step(tmp_path):
    from compiler import emit

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
