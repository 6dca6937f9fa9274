"""Strict proto3-JSON parsing into the xds-protos message types.

Owns the type-URL → message-class resolution (importing an extension's
generated module on first use, so nested `typed_config` Anys resolve) and
the two checks Envoy itself only warns about: unknown fields and unknown
enum values. `json_format.Parse` refuses the first and an unknown enum
*name*, but proto3 enums are open, so an unknown enum *number* (`"lb_policy":
99`) parses; `unknown_enum_paths` finds those. `parse_strict` converts what
meshc emits by tables of its own first (see "the strict parse, fast path").
"""

from __future__ import annotations

import importlib
import math
import pkgutil
import re
from collections.abc import Iterator

from google.protobuf import any_pb2, descriptor_pool, json_format, message, symbol_database
from google.protobuf.descriptor import FieldDescriptor

__all__ = ["ParseError", "ensure_types", "message_class", "parse_strict", "unknown_enum_paths"]

_TYPE_PREFIX = "type.googleapis.com/"
_imported_packages: set[str] = set()


class ParseError(ValueError):
    """A JSON document that does not parse strictly into its message type."""


def _import_package_of(full_name: str) -> None:
    """Import every generated `_pb2` module of the proto package holding `full_name`.

    The Python module of a message is not derivable from its name alone
    (`http_connection_manager_pb2` lives in package `...http_connection_manager.v3`),
    but the proto package is a Python package, so import all its modules.
    """
    parts = full_name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        package = ".".join(parts[:cut])
        if package in _imported_packages:
            continue
        try:
            module = importlib.import_module(package)
        except ImportError:
            continue
        _imported_packages.add(package)
        for info in pkgutil.iter_modules(getattr(module, "__path__", [])):
            if info.name.endswith("_pb2"):
                importlib.import_module(f"{package}.{info.name}")
        return


def message_class(type_url: str) -> type[message.Message]:
    """The generated class for `type.googleapis.com/<full name>`; KeyError if none."""
    if not type_url.startswith(_TYPE_PREFIX):
        raise KeyError(type_url)
    full_name = type_url[len(_TYPE_PREFIX):]
    pool = descriptor_pool.Default()
    try:
        pool.FindMessageTypeByName(full_name)
    except KeyError:
        _import_package_of(full_name)
    return symbol_database.Default().GetSymbol(full_name)


def _type_urls(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        url = node.get("@type")
        if isinstance(url, str):
            yield url
        for value in node.values():
            yield from _type_urls(value)
    elif isinstance(node, list):
        for value in node:
            yield from _type_urls(value)


def ensure_types(document: object) -> list[str]:
    """Import the message types every `@type` in `document` names.

    Returns the type URLs that name no known message (so the caller can say
    which one, rather than json_format's nested error).
    """
    unknown = []
    for url in sorted(set(_type_urls(document))):
        try:
            message_class(url)
        except KeyError:
            unknown.append(url)
    return unknown


def parse_strict(document: dict, cls: type[message.Message]) -> message.Message:
    """Parse a JSON object into `cls`, refusing unknown fields and enum values: the message
    json_format makes of it, or ParseError. What meshc emits takes the fast path below."""
    msg = cls()
    try:
        _fast(document, msg, 0)
    except Exception:   # noqa: BLE001 - _Slow, or a value upb refuses: json_format decides
        return _parse_json(document, cls)
    return msg


def _parse_json(document: dict, cls: type[message.Message]) -> message.Message:
    """`parse_strict` by json_format alone."""
    unknown = ensure_types(document)
    if unknown:
        raise ParseError(f"unknown type {unknown[0]!r}")
    msg = cls()
    try:
        json_format.ParseDict(document, msg, ignore_unknown_fields=False)
    except json_format.ParseError as exc:
        # json_format appends a long "Available Fields" list; the first line says it.
        raise ParseError(str(exc).splitlines()[0]) from None
    bad = list(unknown_enum_paths(msg))
    if bad:
        raise ParseError(f"unknown enum value at {bad[0]}")
    return msg


def _check_value(field: FieldDescriptor, value: object, path: str) -> Iterator[str]:
    if field.type == FieldDescriptor.TYPE_ENUM:
        if value not in field.enum_type.values_by_number:
            yield f"{path} = {value}"
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        yield from unknown_enum_paths(value, path)


def unknown_enum_paths(msg: message.Message, path: str = "") -> Iterator[str]:
    """Paths (like `filter_chains[0].filters[0]...`) of enum fields holding an unknown number.

    Descends into `google.protobuf.Any` by unpacking it with the default pool.
    """
    if msg.DESCRIPTOR.full_name == "google.protobuf.Any":
        try:
            inner = message_class(msg.type_url)()
        except KeyError:  # `{}` parses as an Any with no type: Envoy refuses it, and so do we
            raise ParseError(f"{path or 'an Any'} has no known @type ({msg.type_url!r})") from None
        msg.Unpack(inner)
        yield from unknown_enum_paths(inner, path)
        return
    for field, value in msg.ListFields():
        here = f"{path}.{field.name}" if path else field.name
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            for key, item in value.items():
                yield from _check_value(value_field, item, f"{here}[{key!r}]")
        elif field.is_repeated:
            for index, item in enumerate(value):
                yield from _check_value(field, item, f"{here}[{index}]")
        else:
            yield from _check_value(field, value, here)


def pack(msg: message.Message) -> any_pb2.Any:
    """An Any holding `msg`, deterministically serialised (stable bytes → stable hashes)."""
    return any_pb2.Any(type_url=_TYPE_PREFIX + msg.DESCRIPTOR.full_name,
                       value=msg.SerializeToString(deterministic=True))


# --- the strict parse, fast path ---------------------------------------------------
# json_format.ParseDict is pure Python and rebuilds its per-message lookup tables for every
# message it converts: it was three quarters of a server's cold load (1.7 s per environment
# at 1,000 services). `_fast` converts what meshc emits (proto field names; plain scalars,
# enum names, Duration, wrappers, Any, string-keyed maps of messages) with tables built once
# per message type, and gives up on anything else. Then `_parse_json` decides, so a document
# the fast path takes becomes the message json_format would make of it (the same setters in
# the same order), and one it refuses gets json_format's own error.

class _Slow(Exception):
    """Not a case the fast path takes: json_format decides."""


_STRING, _INT, _BOOL, _DOUBLE, _ENUM, _MESSAGE, _MAP, _OTHER = range(8)
_REGULAR, _WRAPPER, _DURATION, _ANY = range(4)
_INTS = frozenset({FieldDescriptor.CPPTYPE_INT32, FieldDescriptor.CPPTYPE_INT64,
                   FieldDescriptor.CPPTYPE_UINT32, FieldDescriptor.CPPTYPE_UINT64})
_OTHER_WELL_KNOWN = frozenset({"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue",
                               "google.protobuf.Timestamp", "google.protobuf.FieldMask"})
# As json_format checks strings (`_UNPAIRED_SURROGATE_PATTERN`).
_UNPAIRED_SURROGATE = re.compile("[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]")
_TABLES: dict[type, dict[str, tuple]] = {}      # message class → field name → spec


def _table(cls) -> dict[str, tuple]:
    table = _TABLES.get(cls)
    if table is None:
        table = _TABLES[cls] = {f.name: _spec(f) for f in cls.DESCRIPTOR.fields}
    return table


def _spec(field) -> tuple:
    """(name, how, what, repeated, oneof) of one field, for `_fast`."""
    oneof = field.containing_oneof.name if field.containing_oneof is not None else None
    how, what = _OTHER, None
    message = field.message_type
    if message is not None and message.GetOptions().map_entry:
        key, value = message.fields_by_name["key"], message.fields_by_name["value"]
        if key.type == FieldDescriptor.TYPE_STRING and value.message_type is not None:
            what = _message_kind(value.message_type)
            how = _MAP if what is not None else _OTHER
    elif message is not None:
        what = _message_kind(message)
        how = _MESSAGE if what is not None else _OTHER
    elif field.type == FieldDescriptor.TYPE_ENUM:
        how = _ENUM
        what = ({v.name: v.number for v in field.enum_type.values}, frozenset(field.enum_type.values_by_number))
    elif field.cpp_type in _INTS:
        how = _INT
    elif field.cpp_type == FieldDescriptor.CPPTYPE_DOUBLE:
        how = _DOUBLE
    elif field.cpp_type == FieldDescriptor.CPPTYPE_BOOL:
        how = _BOOL
    elif field.type == FieldDescriptor.TYPE_STRING:
        how = _STRING
    return field.name, how, what, field.is_repeated, oneof


def _message_kind(descriptor) -> tuple | None:
    """How `_fast_message` sets a message of this type; None: it does not."""
    name = descriptor.full_name
    if descriptor.file.name == "google/protobuf/wrappers.proto":   # json_format's _IsWrapperMessage
        value = _spec(descriptor.fields_by_name["value"])
        return (_WRAPPER, value[1], value[2])
    if name == "google.protobuf.Duration":
        return (_DURATION,)
    if name == "google.protobuf.Any":
        return (_ANY,)
    if name in _OTHER_WELL_KNOWN:
        return None
    return (_REGULAR,)


def _fast(document, msg, depth: int, skip: str = "") -> None:
    """Set `msg` from a JSON object as json_format does, or raise (see `parse_strict`)."""
    if type(document) is not dict or depth > 64:
        raise _Slow
    table = _TABLES.get(type(msg)) or _table(type(msg))
    oneofs = None
    for key, value in document.items():
        if key == skip:
            continue
        spec = table.get(key)
        if spec is None or value is None:
            raise _Slow
        name, how, what, repeated, oneof = spec
        if oneof is not None:
            if oneofs is None:
                oneofs = {oneof}
            elif oneof in oneofs:
                raise _Slow
            else:
                oneofs.add(oneof)
        if how == _MAP:
            if type(value) is not dict:
                raise _Slow
            entries = getattr(msg, name)
            for entry, item in value.items():
                if _UNPAIRED_SURROGATE.search(entry):
                    raise _Slow
                _fast_message(item, entries[entry], what, depth + 1)
        elif repeated:
            if type(value) is not list:
                raise _Slow
            field = getattr(msg, name)
            if how == _MESSAGE:
                for item in value:
                    if item is None:
                        raise _Slow
                    _fast_message(item, field.add(), what, depth + 1)
            else:
                for item in value:
                    field.append(_scalar(item, how, what))
        elif how == _MESSAGE:
            sub = getattr(msg, name)
            sub.SetInParent()
            _fast_message(value, sub, what, depth + 1)
        else:
            setattr(msg, name, _scalar(value, how, what))


def _fast_message(value, msg, kind: tuple, depth: int) -> None:
    tag = kind[0]
    if tag == _REGULAR:
        _fast(value, msg, depth)
    elif tag == _WRAPPER:
        msg.value = _scalar(value, kind[1], kind[2])
    elif tag == _DURATION:
        if type(value) is not str:
            raise _Slow
        msg.FromJsonString(value)
    else:       # Any: its message converted, then serialised as json_format does it
        url = value.get("@type") if type(value) is dict else None
        if type(url) is not str:
            raise _Slow
        cls = message_class(url)
        if _message_kind(cls.DESCRIPTOR) != (_REGULAR,):
            raise _Slow
        inner = cls()
        _fast(value, inner, depth, skip="@type")
        msg.value = inner.SerializeToString()
        msg.type_url = url


def _scalar(value, how: int, what):
    kind = type(value)
    if how == _STRING:
        if kind is str and not _UNPAIRED_SURROGATE.search(value):
            return value
    elif how == _INT:
        if kind is int:
            return value
        if kind is str and " " not in value:    # 64-bit integers are strings in proto3 JSON
            return int(value)                   # as json_format reads them; ValueError: it decides
    elif how == _ENUM:
        names, numbers = what
        if kind is str and value in names:
            return names[value]
        if kind is int and value in numbers:
            return value
    elif how == _BOOL:
        if kind is bool:
            return value
    elif how == _DOUBLE:
        if kind is int or (kind is float and math.isfinite(value)):
            return float(value)
    raise _Slow
