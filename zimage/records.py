"""Typed readers for the files the studio reads back from disk: a valid object, or a named problem.

Files on a shared server are input like any other: half-written, hand-edited, damaged. Each file kind has
one pydantic schema, and `read_record(path, Schema)` returns either a validated instance or a `Damaged`
naming the file, the field and what was wrong ("status.json: pid must be a whole number, got 'abc'").
It never raises for bad content, so one damaged file harms only its own run or dataset.

    info = read_record(folder / "dataset.json", DatasetRecord, missing=DatasetRecord(name=folder.name))
    if isinstance(info, Damaged):
        show(info.problem)
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

MAX_RECORD_BYTES = 16 * 1024 * 1024  # no file the studio writes for itself is near this

_MISSING = object()
T = TypeVar("T", bound=BaseModel)


@dataclass(frozen=True)
class Damaged:
    """A file that could not be read as its schema says; `problem` is one line for people. `data` is what the
    file held when it parsed as JSON but did not fit its schema (for salvaging the fields that do fit)."""

    path: Path
    problem: str
    data: Any = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        return self.problem


class Record(BaseModel):
    """Base of the file schemas: unknown keys are kept (a newer version may add some), types are strict
    enough that a string where a number belongs is a problem, not a crash later."""

    model_config = ConfigDict(extra="allow", str_strip_whitespace=False)


_WORDS = {
    "int_parsing": "must be a whole number",
    "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "string_type": "must be text",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "missing": "is missing",
    "literal_error": None,  # pydantic's own message names the allowed values
    "list_type": "must be a list",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
}


def describe_errors(name: str, exc: ValidationError) -> str:
    """ "status.json: pid must be a whole number, got 'abc'; step ..." from a pydantic error."""
    parts = []
    for err in exc.errors()[:3]:
        field = ".".join(str(p) for p in err["loc"]) or "the file"
        words = _WORDS.get(err["type"]) or err["msg"][0].lower() + err["msg"][1:]
        text = f"{field} {words}"
        if err["type"] != "missing":
            shown = _shown(err.get("input"))
            text += f", got {shown[:60]}{'...' if len(shown) > 60 else ''}"
        parts.append(text)
    more = len(exc.errors()) - 3
    return f"{name}: " + "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _shown(value: Any) -> str:
    try:
        return repr(value)
    except (RecursionError, ValueError):  # nested too deeply; an integer too long to print
        return f"a {type(value).__name__}"


def _reject_constant(value: str) -> float:
    raise ValueError(f"{value} is not a number JSON allows")


_MAY_OVERFLOW = re.compile(r"[eE]\+?\d{3}|\d{309}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: valid JSON syntax, but no double holds it (Python reads infinity)
        raise ValueError(f"{text[:20]} is too large a number")
    return value


def parse_json(text: str, finite: bool = True) -> Any:
    """json.loads that refuses NaN / Infinity and numbers too large for a double (Python writes the first,
    reads the second as infinity, and other readers choke on both).

    Anything that is not JSON raises ValueError, a nesting too deep for the parser included (json raises
    RecursionError there, which is no reason for a reader to crash). `finite=False` reads such a number as
    infinity, for a reader that judges each entry of a file on its own (control.json's requests)."""
    # Only a literal with a 3-digit exponent or 309 digits can overflow; the hook costs a third of the parse.
    hook = _finite_float if finite and _MAY_OVERFLOW.search(text) else None
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=hook)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def validate_record(name: str, data: Any, schema: type[T]) -> T | str:
    """`data` as `schema`, or the problem as one line."""
    if not isinstance(data, dict):
        return f"{name}: must hold a JSON object, found {_json_type(data)}"
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        return describe_errors(name, exc)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # a validator's own failure
        return f"{name}: {type(exc).__name__}: {str(exc)[:120]}"


def _json_type(data: Any) -> str:
    return "null" if data is None else type(data).__name__  # list, str, int, float, bool


def parse_record(raw: bytes | str, schema: type[T], name: str, finite: bool = True) -> T | Damaged:
    """One JSON document (a file's content, or one line of a JSONL file) as `schema`, or a Damaged named
    `name` ("metrics.jsonl line 12") whose `data` holds the parsed value when it parsed."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        return Damaged(Path(name), f"{name}: not UTF-8 text")
    try:
        data = parse_json(text, finite=finite)
    except ValueError as exc:  # JSONDecodeError is a ValueError
        return Damaged(Path(name), f"{name}: not valid JSON ({str(exc)[:120]})")
    result = validate_record(name, data, schema)
    return Damaged(Path(name), result, data) if isinstance(result, str) else result


def read_record(path: Path | str, schema: type[T], missing: Any = _MISSING, finite: bool = True) -> T | Damaged:
    """The file at `path` as `schema`; a missing file gives `missing` when given, else a Damaged."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_RECORD_BYTES:
            return Damaged(path, f"{path.name}: {path.stat().st_size:,} bytes is too large for this kind of file")
        raw = path.read_bytes()
    except FileNotFoundError:
        return missing if missing is not _MISSING else Damaged(path, f"{path.name}: missing")
    except IsADirectoryError:
        return Damaged(path, f"{path.name}: is a folder, not a file")
    except OSError as exc:
        return Damaged(path, f"{path.name}: cannot be read ({exc.strerror or exc})")
    rec = parse_record(raw, schema, path.name, finite=finite)
    return Damaged(path, rec.problem, rec.data) if isinstance(rec, Damaged) else rec


def finite(value: float | None) -> float | None:
    """`value` when it is a finite number, else None (for figures that must survive JSON)."""
    return value if isinstance(value, int | float) and math.isfinite(value) else None
