"""Bytes -> public request message for the Generation and VllmEngine servicers, never raising.

grpc decodes a request before the servicer runs, and answers a decoding error itself with UNKNOWN
and the exception's class. ``lenient_deserializer`` returns an ``Undecodable`` instead, saying what
could not be decoded (``sampling.stop[0] is not valid UTF-8``), and the servicer's error wrapper
answers it INVALID_ARGUMENT. To name the field, the bytes are parsed again with every ``string``
field read as ``bytes`` (a copy of the messages' file and its imports in a pool of their own,
built on first use; a map's keys stay strings, so one that is not UTF-8 goes unnamed).

Not here: checking what the request asks for (request_checks.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FileDescriptor
from google.protobuf.message import DecodeError, Message

M = TypeVar("M", bound=Message)
STRING = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
BYTES = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES


@dataclass(frozen=True)
class Undecodable:
    """Stands in for a request whose bytes are not a valid message: ``reason`` says why."""

    reason: str


def lenient_deserializer(message_type: type[M]) -> Callable[[bytes], M | Undecodable]:
    """A grpc ``request_deserializer`` for ``message_type`` that returns Undecodable on error."""

    def deserialize(data: bytes) -> M | Undecodable:
        try:
            return message_type.FromString(data)
        except DecodeError:
            return Undecodable(why_undecodable(message_type.DESCRIPTOR, data))

    return deserialize


def why_undecodable(descriptor: Descriptor, data: bytes) -> str:
    """The reason ``data`` does not decode as ``descriptor``'s message, naming the field if any."""
    prefix = "the request could not be decoded"
    shadow_type, string_fields = _strings_as_bytes(descriptor.file)
    try:
        shadow = shadow_type(descriptor.full_name).FromString(data)
    except DecodeError:
        return f"{prefix}: it is not a {descriptor.full_name} in protobuf wire format"
    path = _first_invalid_utf8(shadow, string_fields)
    if path is None:  # not expected: the shadow differs only in how strings are read
        return f"{prefix} as a {descriptor.full_name}"
    return f"{prefix}: {path} is not valid UTF-8 (a string field must be)"


@functools.cache
def _strings_as_bytes(
    file: FileDescriptor,
) -> tuple[Callable[[str], type[Message]], frozenset[str]]:
    """The file's messages with ``string`` fields as ``bytes`` (by full name), and those fields:
    the file and everything it imports, each copied so, into a pool of their own."""
    string_fields: set[str] = set()
    pool = descriptor_pool.DescriptorPool()
    for imported in _with_imports(file):  # a file's imports before it, as the pool needs
        proto = descriptor_pb2.FileDescriptorProto()
        imported.CopyToProto(proto)
        string_fields |= _bytes_for_strings(proto)
        pool.Add(proto)

    def message_type(full_name: str) -> type[Message]:
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(full_name))

    return message_type, frozenset(string_fields)


def _with_imports(file: FileDescriptor) -> list[FileDescriptor]:
    """``file`` and the files it imports, transitively, each after its own imports."""
    ordered: dict[str, FileDescriptor] = {}

    def visit(f: FileDescriptor) -> None:
        if f.name not in ordered:
            for dependency in f.dependencies:
                visit(dependency)
            ordered[f.name] = f

    visit(file)
    return list(ordered.values())


def _bytes_for_strings(proto: descriptor_pb2.FileDescriptorProto) -> set[str]:
    """Turn every ``string`` field of ``proto``'s messages into ``bytes``; return their names."""
    string_fields: set[str] = set()
    package = f"{proto.package}." if proto.package else ""
    pending = [(f"{package}{m.name}", m) for m in proto.message_type]
    while pending:
        name, message = pending.pop()
        pending += [(f"{name}.{m.name}", m) for m in message.nested_type]
        if message.options.map_entry:  # a map's key must stay a string (its values are kept)
            continue
        for field in message.field:
            if field.type == STRING:
                field.type = BYTES
                string_fields.add(f"{name}.{field.name}")
    return string_fields


def _first_invalid_utf8(
    message: Message, string_fields: frozenset[str], at: str = ""
) -> str | None:
    """The path (``sampling.stop[0]``) of the first string field that is not UTF-8, if any."""
    for field, value in message.ListFields():
        name = f"{at}{field.name}"
        if field.is_repeated:
            items = [(f"{name}[{i}]", item) for i, item in enumerate(value)]
        else:
            items = [(name, value)]
        for path, item in items:
            if isinstance(item, Message):
                found = _first_invalid_utf8(item, string_fields, f"{path}.")
                if found is not None:
                    return found
            elif field.full_name in string_fields and not _is_utf8(item):
                return path
    return None


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
