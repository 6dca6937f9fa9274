"""The serialisers: meshc's YAML node builder writes exactly what PyYAML's own dump_all would."""

from __future__ import annotations

import json

import yaml

from compiler.emit import Serializer, json_bytes, yaml_bytes
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


def test_yaml_bytes_match_pyyaml_on_every_rendered_document():
    files = sorted((REPO / "rendered").rglob("*.yaml"))
    assert files, "the examples are rendered"
    for path in files:
        docs = list(yaml.load_all(path.read_bytes(), Loader=yaml.CSafeLoader))
        assert yaml_bytes(docs) == _reference(docs) == path.read_bytes(), path


def test_memoised_multi_document_file_equals_one_dump_all():
    docs = TRICKY + [TRICKY[1]]
    serializer = Serializer()
    assert serializer.serialize(OutputFile("x.yaml", docs, "yaml")) == _reference(docs)
    assert len(serializer.new) == 2  # the repeated document was emitted once


def test_json_bytes_match_json_dumps():
    value = {"b": [1, 2.5, None, True], "a": {"é": "✓"}, "@type": "x"}
    assert json_bytes(value) == (json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
