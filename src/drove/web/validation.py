"""Validation of JSON request bodies and query parameters, with pydantic's error shapes.

A route declares its body as a :class:`Body` of :class:`Field` s and its query
parameters as Fields; a request that does not fit raises :class:`ValidationError`,
which the app answers 422 with ``{"detail": [{"type", "loc", "msg", "input"}, ...]}``,
the entries pydantic (and so FastAPI) would give.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any


class ValidationError(Exception):
    """A request's body or query failed validation: 422 with the list of errors."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(errors)
        self.errors = errors


_TRUE = frozenset(("1", "on", "t", "true", "y", "yes"))
_FALSE = frozenset(("0", "off", "f", "false", "n", "no"))


def invalid(kind: str, loc: tuple[Any, ...], msg: str, value: Any, **ctx: Any
            ) -> dict[str, Any]:
    """One entry of a 422 answer's ``detail`` list: what is wrong, where, with what input."""
    err = {"type": kind, "loc": list(loc), "msg": msg, "input": value}
    if ctx:
        err["ctx"] = ctx
    return err


class Field:
    """One field of a JSON body, or one query parameter.

    ``kind`` is one of ``str``, ``int``, ``bool``, ``dict[str,str]``,
    ``dict`` (any JSON object), ``list[dict]`` (objects), ``list[list[int]]``.
    """

    _SCHEMAS: dict[str, dict[str, Any]] = {
        "str": {"type": "string"},
        "int": {"type": "integer"},
        "bool": {"type": "boolean"},
        "dict[str,str]": {"type": "object", "additionalProperties": {"type": "string"}},
        "dict": {"type": "object", "additionalProperties": True},
        "list[dict]": {"type": "array",
                       "items": {"type": "object", "additionalProperties": True}},
        "list[list[int]]": {"type": "array",
                            "items": {"type": "array", "items": {"type": "integer"}}},
    }

    def __init__(self, kind: str, *, default: Any = ..., default_factory: Callable[[], Any]
                 | None = None, nullable: bool = False, gt: int | None = None,
                 pattern: str | None = None, description: str = "") -> None:
        if kind not in self._SCHEMAS:
            raise ValueError(f"unknown field kind {kind!r}")
        self.kind = kind
        self.default = default
        self.default_factory = default_factory
        self.nullable = nullable
        self.gt = gt
        self.pattern = re.compile(pattern) if pattern else None
        self.description = description

    @property
    def required(self) -> bool:
        """Whether the field must be given."""
        return self.default is ... and self.default_factory is None

    def missing(self) -> Any:
        """The value of an absent optional field."""
        return self.default_factory() if self.default_factory is not None else self.default

    def schema(self) -> dict[str, Any]:
        """The field's JSON Schema."""
        s: dict[str, Any] = dict(self._SCHEMAS[self.kind])
        if self.gt is not None:
            s["exclusiveMinimum"] = self.gt
        if self.pattern is not None:
            s["pattern"] = self.pattern.pattern
        if self.nullable:
            s = {"anyOf": [s, {"type": "null"}]}
        if self.description:
            s["description"] = self.description
        if not self.required and self.default_factory is None:
            s["default"] = self.default
        return s

    # JSON values (bodies)
    def validate(self, value: Any, loc: tuple[Any, ...], errors: list[dict[str, Any]]) -> Any:
        """The value as the handler gets it; appends to ``errors`` when invalid."""
        if value is None and self.nullable:
            return None
        kind = self.kind
        if kind == "str":
            if not isinstance(value, str):
                errors.append(invalid("string_type", loc, "Input should be a valid string", value))
            elif self.pattern is not None and not self.pattern.fullmatch(value):
                errors.append(invalid("string_pattern_mismatch", loc,
                                      f"String should match pattern '{self.pattern.pattern}'",
                                      value, pattern=self.pattern.pattern))
            return value
        if kind == "int":
            return self._check_int(_json_int(value, loc, errors), loc, errors)
        if kind == "bool":
            return _json_bool(value, loc, errors)
        if kind in ("dict", "dict[str,str]"):
            if not isinstance(value, dict):
                errors.append(invalid("dict_type", loc, "Input should be a valid dictionary",
                                      value))
            elif kind == "dict[str,str]":
                for key, item in value.items():
                    if not isinstance(item, str):
                        errors.append(invalid("string_type", (*loc, key),
                                              "Input should be a valid string", item))
            return value
        if not isinstance(value, list):
            errors.append(invalid("list_type", loc, "Input should be a valid list", value))
            return value
        if kind == "list[dict]":
            for i, item in enumerate(value):
                if not isinstance(item, dict):
                    errors.append(invalid("dict_type", (*loc, i),
                                          "Input should be a valid dictionary", item))
            return value
        out = []  # list[list[int]]
        for i, item in enumerate(value):
            if not isinstance(item, list):
                errors.append(invalid("list_type", (*loc, i), "Input should be a valid list", item))
                continue
            out.append([_json_int(x, (*loc, i, j), errors) for j, x in enumerate(item)])
        return out

    # strings (query parameters)
    def parse(self, text: str, loc: tuple[Any, ...], errors: list[dict[str, Any]]) -> Any:
        """A query parameter's value; appends to ``errors`` when invalid."""
        if self.kind == "bool":
            low = text.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            errors.append(invalid("bool_parsing", loc, "Input should be a valid boolean, unable "
                                  "to interpret input", text))
            return None
        if self.kind == "int":
            try:
                value = int(text.strip())
            except ValueError:
                errors.append(invalid("int_parsing", loc, "Input should be a valid integer, unable "
                                      "to parse string as an integer", text))
                return None
            return self._check_int(value, loc, errors)
        if self.kind == "str":
            return self.validate(text, loc, errors)
        raise TypeError(f"a query parameter cannot be {self.kind}")

    def _check_int(self, value: Any, loc: tuple[Any, ...], errors: list[dict[str, Any]]) -> Any:
        if isinstance(value, int) and self.gt is not None and not value > self.gt:
            errors.append(invalid("greater_than", loc, f"Input should be greater than {self.gt}",
                                  value, gt=self.gt))
        return value


def _json_bool(value: Any, loc: tuple[Any, ...], errors: list[dict[str, Any]]) -> Any:
    """A boolean from JSON: true, false, 0, 1 and the strings pydantic takes ("yes", "off")."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    if isinstance(value, str | int | float):
        errors.append(invalid("bool_parsing", loc, "Input should be a valid boolean, unable to "
                              "interpret input", value))
    else:
        errors.append(invalid("bool_type", loc, "Input should be a valid boolean", value))
    return value


def _json_int(value: Any, loc: tuple[Any, ...], errors: list[dict[str, Any]]) -> Any:
    """An integer from JSON: ints, floats without a fractional part and integer strings.

    Booleans are refused (pydantic would take them as 0 and 1).
    """
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            errors.append(invalid("int_parsing", loc, "Input should be a valid integer, unable "
                                  "to parse string as an integer", value))
            return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        errors.append(invalid("int_type", loc, "Input should be a valid integer", value))
        return value
    if isinstance(value, float):
        if not value.is_integer():
            errors.append(invalid("int_from_float", loc, "Input should be a valid integer, got a "
                                  "number with a fractional part", value))
            return value
        return int(value)
    return value


class Body:
    """A JSON object body with named fields (extra fields are ignored), or any object.

    The handler gets the fields as attributes of a namespace (``model``), or the
    object itself when ``fields`` is None.
    """

    def __init__(self, name: str, fields: dict[str, Field] | None = None,
                 description: str = "") -> None:
        self.name = name
        self.fields = fields
        self.description = description

    def schema(self) -> dict[str, Any]:
        """The body's JSON Schema."""
        if self.fields is None:
            s: dict[str, Any] = {"type": "object", "additionalProperties": True}
        else:
            s = {"type": "object",
                 "properties": {k: f.schema() for k, f in self.fields.items()},
                 "required": [k for k, f in self.fields.items() if f.required]}
        s["title"] = self.name
        if self.description:
            s["description"] = self.description
        return s

    def validate(self, value: Any) -> Any:
        """The handler's argument; ValidationError when the body does not fit."""
        loc = ("body",)
        if value is MISSING:
            raise ValidationError([invalid("missing", loc, "Field required", None)])
        if not isinstance(value, dict):
            if self.fields is None:
                raise ValidationError([invalid("dict_type", loc,
                                               "Input should be a valid dictionary", value)])
            raise ValidationError([invalid("model_attributes_type", loc, "Input should be a valid "
                                           "dictionary or object to extract fields from", value)])
        if self.fields is None:
            return value
        errors: list[dict[str, Any]] = []
        out = {}
        for key, field in self.fields.items():
            if key in value:
                out[key] = field.validate(value[key], (*loc, key), errors)
            elif field.required:
                errors.append(invalid("missing", (*loc, key), "Field required", value))
            else:
                out[key] = field.missing()
        if errors:
            raise ValidationError(errors)
        return SimpleNamespace(**out)


MISSING = object()
"""The value of an empty request body (none was sent)."""
