"""One typed loader for every settings file and the server config (pydantic v2, strict).

Why one place: click propagation, edge snapping, the server and the training config all take
values from a file or a mapping a user wrote, and each used to check them its own way (one took
``gamma: true`` as 1.0 and ``working_side: 160.9`` as 160, another ``port: true`` as 1). Here every
settings dataclass declares its fields with the types below and is validated by pydantic with
unknown keys forbidden, so the same value means the same thing everywhere and every mistake
(unknown key, wrong type, not a mapping, bad YAML, missing file) is one line naming the file's
kind, the key and the value, never a traceback.

The value rules, the same for every file: a boolean is never a number; a whole-number field takes
whole numbers only (``3`` or ``3.0``, never ``2.7``); a number field takes finite numbers, and text
that reads as one (YAML 1.1 reads ``1e-4`` as text); paths are text; flags are ``true``/``false``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import BeforeValidator, ConfigDict, Strict, TypeAdapter, ValidationError

from histosam.backend.core.errors import InvalidInputError, NotFoundError

T = TypeVar("T")

# What every settings dataclass gets (``__pydantic_config__``): unknown keys are errors.
STRICT_CONFIG = ConfigDict(extra="forbid")


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("must be a number")
    try:
        number = float(value)
    except ValueError:
        raise ValueError("must be a number") from None
    if not math.isfinite(number):
        raise ValueError("must be a finite number")
    return number


def _whole(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    number = _number(value)
    if not number.is_integer():
        raise ValueError("must be a whole number")
    return int(number)


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be text")
    return value


def _path(value: Any) -> Path:
    if not isinstance(value, str | os.PathLike):
        raise ValueError("must be a path")
    return Path(value)


def _paths(value: Any) -> tuple[Path, ...]:
    items = [value] if isinstance(value, str | os.PathLike) else value
    if not isinstance(items, list | tuple):
        raise ValueError("must be a path or a list of paths")
    return tuple(_path(v) for v in items)


def _mapping(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError("must be a mapping")
    return dict(value)


def _folders(value: Any) -> list[str]:
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise ValueError("must be a list of folders")
    return list(value)


def _numbers(value: Any) -> list[float]:
    if not isinstance(value, list | tuple):
        raise ValueError("must be a list of numbers")
    try:
        return [_number(v) for v in value]
    except ValueError:
        raise ValueError("must be a list of numbers") from None


def _pair(value: Any) -> tuple[float, float]:
    numbers = _numbers(value)
    if len(numbers) != 2:
        raise ValueError("must be two numbers [lo, hi]")
    return numbers[0], numbers[1]


def _epochs(value: Any) -> tuple[int, ...]:
    numbers = _numbers(value)
    if not all(n.is_integer() for n in numbers):
        raise ValueError("must be whole epochs")
    return tuple(int(n) for n in numbers)


def required(check: Callable[[Any], Any]) -> BeforeValidator:
    """``check`` as a validator that refuses a missing value (``key:`` with nothing after it)."""

    def run(value: Any) -> Any:
        if value is None:
            raise ValueError("needs a value")
        return check(value)

    return BeforeValidator(run)


def optional(check: Callable[[Any], Any]) -> BeforeValidator:
    """``check`` as a validator that lets ``None`` (no value: the default behaviour) through."""
    return BeforeValidator(lambda value: None if value is None else check(value))


# Field types for settings dataclasses: ``gamma: Number = 0.003``.
Number = Annotated[float, Strict(), required(_number)]
Whole = Annotated[int, Strict(), required(_whole)]
Flag = Annotated[bool, Strict(), required(_flag)]
Text = Annotated[str, Strict(), required(_text)]
PathValue = Annotated[Path, Strict(), required(_path)]
Paths = Annotated[tuple[Path, ...], Strict(), required(_paths)]
Table = Annotated[dict[str, Any], Strict(), required(_mapping)]
Folders = Annotated[list[str], Strict(), required(_folders)]
Epochs = Annotated[tuple[int, ...], Strict(), required(_epochs)]
OptNumber = Annotated[float | None, Strict(), optional(_number)]
OptWhole = Annotated[int | None, Strict(), optional(_whole)]
OptText = Annotated[str | None, Strict(), optional(_text)]
OptPath = Annotated[Path | None, Strict(), optional(_path)]
OptPair = Annotated[tuple[float, float] | None, Strict(), optional(_pair)]
Pair = Annotated[tuple[float, float], Strict(), required(_pair)]


_ADAPTERS: dict[type, TypeAdapter[Any]] = {}


def _adapter(cls: type) -> TypeAdapter[Any]:
    """The validator of a settings class, built once (building one costs milliseconds)."""
    if cls not in _ADAPTERS:
        _ADAPTERS[cls] = TypeAdapter(cls)
    return _ADAPTERS[cls]


def parse_settings(cls: type[T], data: Mapping[str, Any], kind: str) -> T:
    """``cls`` built from ``data`` by its field types; ``kind`` names a key in errors
    ("propagation setting", "config key")."""
    if not isinstance(data, Mapping):
        raise InvalidInputError(f"{kind}s must be a mapping, got {data!r}")
    data = {str(k): v for k, v in data.items()}
    known = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise InvalidInputError(f"unknown {kind}(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    try:
        return _adapter(cls).validate_python(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(part) for part in error["loc"][:1]) or "?"
        problem = error["msg"].removeprefix("Value error, ")
        raise InvalidInputError(f"{kind} {key} {problem}, got {data.get(key, error.get('input'))!r}") from None


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """The YAML mapping in ``path`` ({} for an empty file); ``what`` names the file in errors."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise NotFoundError(f"cannot read {what} {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:  # PyYAML's message spans several lines: keep the problem and where
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InvalidInputError(f"{what} {path} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise InvalidInputError(f"{what} {path} must be a mapping of settings")
    return dict(data)


class SettingsFile:
    """What a settings dataclass read from its own YAML file shares: loading from the file or a
    mapping, and the check that every numeric value is a positive finite number. Subclasses set ``WHAT``
    (the name errors use) and ``DEFAULT_CONFIG`` (the shipped YAML); ``ZERO_ALLOWED`` names the
    fields for which 0 means "none"."""

    __pydantic_config__: ClassVar[ConfigDict] = STRICT_CONFIG
    WHAT: ClassVar[str]
    DEFAULT_CONFIG: ClassVar[Path]
    ZERO_ALLOWED: ClassVar[tuple[str, ...]] = ()

    def check_positive(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, str):
                continue  # a choice among names, checked by its own class
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            if not (ok and (value > 0 or (value == 0 and f.name in self.ZERO_ALLOWED))):
                raise InvalidInputError(f"{self.WHAT} setting {f.name} must be a positive number, got {value!r}")

    @classmethod
    def from_mapping(cls: type[T], data: Mapping[str, Any]) -> T:
        return parse_settings(cls, data, f"{cls.WHAT} setting")  # type: ignore[attr-defined]

    @classmethod
    def load(cls: type[T], path: str | Path | None = None) -> T:
        """Settings from a YAML mapping (``None``: the shipped defaults)."""
        source = path if path is not None else cls.DEFAULT_CONFIG  # type: ignore[attr-defined]
        data = read_yaml_mapping(source, f"{cls.WHAT} config")  # type: ignore[attr-defined]
        return cls.from_mapping(data)  # type: ignore[attr-defined]
