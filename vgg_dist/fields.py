"""Dataclasses read back from JSON or YAML with every field's type checked.

One helper for everything vgg_dist reads from a file someone could have edited: a `--config` file, the
model spec, a run's config.json, a checkpoint's state.json and its manifest. A wrong type is a
FieldError naming the field's path; values are never formatted whole into a message, so a huge or
deeply nested value cannot make the message itself unbounded.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import reprlib
import types
import typing

_SHORT = reprlib.Repr()  # Python 3.11's Repr takes no keyword arguments; set the limits one by one
_SHORT.maxstring = _SHORT.maxother = 40
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 4
_SHORT.maxlevel = 2


class FieldError(ValueError):
    """A value of the wrong type, or a missing or unknown field; the message names the field's path."""


def short(value) -> str:
    """A repr of at most a few dozen characters, whatever the value."""
    return _SHORT.repr(value)


@functools.cache
def _hints(cls) -> dict[str, object]:
    return typing.get_type_hints(cls)


def type_name(annotation) -> str:
    if annotation is float:
        return "number"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def check_value(annotation, value, path: str):
    """`value` as `annotation` (int, float, str, bool, None, X | None, list[X], dict[str, X], a dataclass,
    or `object` for anything); FieldError naming `path` otherwise."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        kinds = [arg for arg in args if arg is not type(None)]
        if value is None:
            raise FieldError(f"{path} needs a value ({' or '.join(map(type_name, kinds))}), not null")
        for kind in kinds:
            try:
                return check_value(kind, value, path)
            except FieldError:
                if len(kinds) == 1:
                    raise
        raise FieldError(f"{path} must be {' or '.join(map(type_name, kinds))}, got {short(value)}")
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise FieldError(f"{path} must be a list, got {short(value)}")
        return [check_value(args[0], item, f"{path}[{index}]") for index, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
            raise FieldError(f"{path} must be a mapping with text keys, got {short(value)}")
        return {key: check_value(args[1], item, f"{path}.{key}") for key, item in value.items()}
    if value is None:
        raise FieldError(f"{path} needs a value ({type_name(annotation)}), not null")
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise FieldError(f"{path} must be a finite number, got {short(value)}")
        return float(value)
    if annotation is int and isinstance(value, bool):
        raise FieldError(f"{path} must be int, got {short(value)}")
    if not isinstance(value, annotation):
        raise FieldError(f"{path} must be {type_name(annotation)}, got {short(value)}")
    return value


def checked_fields(cls, values, path: str) -> dict:
    """The given fields of dataclass `cls`, each checked; unknown names are refused."""
    if not isinstance(values, dict):
        raise FieldError(f"{path or 'it'} must be a mapping of field names to values, got {short(values)}")
    hints = _hints(cls)
    known = {field.name for field in dataclasses.fields(cls)}
    checked = {}
    for name, value in values.items():
        if name not in known:
            raise FieldError(f"{path + ': ' if path else ''}unknown field {short(name)}")
        checked[name] = check_value(hints[name], value, f"{path}.{name}" if path else name)
    return checked


def from_dict(cls, values, path: str = ""):
    """An instance of dataclass `cls` from a mapping, every field checked; a field with a default may
    be missing."""
    checked = checked_fields(cls, values, path)
    for field in dataclasses.fields(cls):
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if required and field.name not in checked:
            raise FieldError(f"{path + ': ' if path else ''}missing field {field.name!r}")
    return cls(**checked)
