"""A frozen dataclass's JSON, derived from its fields: the codec every record of ghsae/records.py uses.

A record subclasses `JsonRecord`; `to_json()` writes one key per field, in field order, and
`from_json(obj)` reads them back, checking each value against the field's type (a nested record,
tuple, Mapping, `X | None`, int, float, str, bool or Any). A field's metadata (`stored(...)`) says
where its JSON differs from the plain rule: another key, the value an absent key reads as (a key
older records lack), the value left out when the field holds it. Keys the record does not know are
ignored, so a file with a key added later still reads.

Values are checked, never converted, so a record read and written again is the same bytes: a
float field keeps an integer as read; an int field takes a float only when it is a whole number
(older readers took int(x)); a Mapping with int keys (layer numbers) writes them as strings, as
JSON must. A value of the wrong type is a RecordError (a DamagedFileError) naming the field's path,
what it holds and what it should hold.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Self, Union

from ghsae.errors import DamagedFileError

RECORD_VERSION = 1
_NEVER = object()  # stored(omit_if=...) unset: the key is always written
_ABSENT = object()  # what a _Mismatch found for a missing key
_JSON = "json"  # the metadata key stored() fills


class RecordError(DamagedFileError):
    """A JSON object is not the record asked for: a key missing or holding the wrong type."""


def stored(key: str | None = None, *, absent: Any = dataclasses.MISSING, omit_if: Any = _NEVER) -> dict:
    """A field's metadata: `field(default=None, metadata=stored(omit_if=None))`.

    key: its JSON key, where it is not the field's name. absent: what a missing key reads as, where
    that is not the field's default (or the field has none). omit_if: a value not written (the key
    is left out while the field holds it, as in files written before the field existed)."""
    return {_JSON: (key, absent, omit_if)}


class JsonRecord:
    """Base of a frozen dataclass stored as JSON. Set `stored_in` on a record that is a file of its
    own: its "version" key is checked and errors name the file. A record that must refuse some
    JSON before its fields are read (another tool's file) overrides `check_json`."""

    stored_in: ClassVar[str | None] = None

    @classmethod
    def from_json(cls, obj: Any) -> Self:
        if cls.stored_in is not None:
            check_version(obj, cls.stored_in)
        try:
            return _read_record(cls, obj, "")
        except _Mismatch as e:
            raise RecordError(f"not a {cls.__name__.removesuffix('Record')} record ({e})") from None

    def to_json(self) -> dict:
        return _write_record(self)

    @classmethod
    def check_json(cls, obj: dict) -> None:
        """Refuse what is not this record before its fields are read (none here)."""


def check_version(obj: Any, what: str) -> dict:
    """A record file's JSON: an object whose "version" (1 when absent: records that predate it) this ghsae reads."""
    if not isinstance(obj, dict):
        raise DamagedFileError(f"{what} is not a JSON object (found {type(obj).__name__})")
    version = obj.get("version", 1)
    if isinstance(version, int) and version > RECORD_VERSION:
        raise DamagedFileError(
            f"{what} has record version {version}; this ghsae reads version {RECORD_VERSION}: upgrade ghsae"
        )
    return obj


# --- the fields of a record -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Field:
    name: str
    key: str
    tp: Any
    absent: Callable[[], Any] | None  # what a missing key reads as (None: the key is required)
    omit_if: Any


_FIELDS: dict[type, tuple[_Field, ...]] = {}  # per record class, worked out on its first use


def _fields(cls: type) -> tuple[_Field, ...]:
    if cls not in _FIELDS:
        _FIELDS[cls] = _work_out_fields(cls)
    return _FIELDS[cls]


def _work_out_fields(cls: type) -> tuple[_Field, ...]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        key, absent, omit_if = f.metadata.get(_JSON, (None, dataclasses.MISSING, _NEVER))
        absent_value: Callable[[], Any] | None
        if absent is dataclasses.MISSING and callable(f.default_factory):
            absent_value = f.default_factory
        else:
            value = f.default if absent is dataclasses.MISSING else absent
            # a copy each time: two records never share one mutable value ({} of a missing key)
            absent_value = None if value is dataclasses.MISSING else functools.partial(copy.copy, value)
        out.append(_Field(f.name, key or f.name, hints[f.name], absent_value, omit_if))
    return tuple(out)


def _write_record(record: JsonRecord) -> dict:
    out = {}
    for f in _fields(type(record)):
        value = getattr(record, f.name)
        if f.omit_if is _NEVER or value != f.omit_if:
            out[f.key] = _write(value, f.tp)
    return out


def _read_record(cls: Any, obj: Any, path: str) -> Any:
    if not isinstance(obj, dict):
        raise _Mismatch(path or "it", obj, f"an object ({cls.__name__})")
    cls.check_json(obj)
    values = {}
    for f in _fields(cls):
        where = f"{path}.{f.key}" if path else f.key
        if f.key in obj:
            values[f.name] = _read(obj[f.key], f.tp, where)
        elif f.absent is None:
            raise _Mismatch(where, _ABSENT, _expected(f.tp))
        else:
            values[f.name] = f.absent()
    return cls(**values)


# --- values, by their declared type -------------------------------------------------------------


def _write(value: Any, tp: Any) -> Any:
    if value is None or tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return _write(value, next(a for a in args if a is not type(None)))
    if isinstance(tp, type) and issubclass(tp, JsonRecord):
        return _write_record(value)
    if origin is tuple:
        items = args[:1] * len(value) if args[-1:] == (Ellipsis,) else args
        return [_write(v, t) for v, t in zip(value, items)]
    if origin in (Mapping, dict):
        return {str(k) if args[0] is int else k: _write(v, args[1]) for k, v in value.items()}
    return value


def _read(value: Any, tp: Any, path: str) -> Any:
    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return None if value is None else _read(value, next(a for a in args if a is not type(None)), path)
    if isinstance(tp, type) and issubclass(tp, JsonRecord):
        return _read_record(tp, value, path)
    if origin is tuple:
        fixed = args[-1:] != (Ellipsis,)
        if not isinstance(value, list) or (fixed and len(value) != len(args)):
            raise _Mismatch(path, value, _expected(tp))
        items = args if fixed else args[:1] * len(value)
        return tuple(_read(v, t, f"{path}[{i}]") for i, (v, t) in enumerate(zip(value, items)))
    if origin in (Mapping, dict):
        if not isinstance(value, dict):
            raise _Mismatch(path, value, _expected(tp))
        return {_read_key(k, args[0], path): _read(v, args[1], f"{path}[{json.dumps(k)}]") for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return value  # an int stays one: written back, it is the same bytes
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise _Mismatch(path, value, _expected(tp))


def _read_key(key: str, tp: Any, path: str) -> Any:
    if tp is not int:
        return key
    try:
        return int(key)
    except ValueError:
        raise _Mismatch(f"a key of {path}", key, "an integer written as a string") from None


# --- what a mismatch says -----------------------------------------------------------------------


class _Mismatch(Exception):
    """Where a record's JSON differs from its fields; RecordError names the record around it."""

    def __init__(self, path: str, found: Any, expected: str) -> None:
        if found is _ABSENT:
            super().__init__(f"{path} is missing; expected {expected}")
        else:
            text = json.dumps(found, default=repr)  # as the file has it: "3" is a string, 3 a number
            super().__init__(f"{path} is {text if len(text) <= 60 else text[:57] + '...'}; expected {expected}")


def _expected(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _expected(a) for a in args)
    if origin is tuple:
        if args[-1:] == (Ellipsis,):
            return f"a list, each {_expected(args[0])}"
        return f"a list of {len(args)}: {', '.join(_expected(a) for a in args)}"
    if origin in (Mapping, dict):
        keys = "integer keys" if args[0] is int else "string keys"
        return "an object" if args[1] is Any else f"an object with {keys}, each value {_expected(args[1])}"
    if isinstance(tp, type) and issubclass(tp, JsonRecord):
        return f"an object ({tp.__name__})"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(tp, str(tp))
