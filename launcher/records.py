"""Typed records to and from JSON: one mechanism for every file the tools exchange.

A record is a dataclass of plain values, lists, dicts and other records. ``to_json`` gives the dict that is
written; ``from_json`` reads it back, building nested records from the field types. Keys the record does
not know are ignored (a newer writer), and fields missing from the file take their defaults (an older one).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def to_json(record: Any) -> dict[str, Any]:
    return dataclasses.asdict(record)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _value(annotation: Any, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _value(options[0], value) if len(options) == 1 else value
    if dataclasses.is_dataclass(annotation):
        return from_json(annotation, value)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        return [from_json(args[0], item) for item in value]
    if origin is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]):
        return {key: from_json(args[1], item) for key, item in value.items()}
    return value


def from_json(cls: type[T], data: dict[str, Any]) -> T:
    hints = _hints(cls)
    kwargs = {f.name: _value(hints[f.name], data[f.name]) for f in dataclasses.fields(cls) if f.name in data}
    return cls(**kwargs)
