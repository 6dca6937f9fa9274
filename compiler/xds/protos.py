"""Strict proto3-JSON parsing into the xds-protos message types.

Owns the type-URL → message-class resolution (importing an extension's
generated module on first use, so nested `typed_config` Anys resolve) and
the two checks Envoy itself only warns about: unknown fields and unknown
enum values. `json_format.Parse` refuses the first and an unknown enum
*name*, but proto3 enums are open, so an unknown enum *number* (`"lb_policy":
99`) parses; `unknown_enum_paths` finds those.
"""

from __future__ import annotations

import importlib
import pkgutil
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
    """Parse a JSON object into `cls`, refusing unknown fields and enum values."""
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
