"""Numeric settings dataclasses read from small YAML files (click propagation, edge snapping).

Why one place: both post-processing steps take a handful of numbers from a file a user may
edit, and both must turn every mistake in it (unknown key, non-number, not a mapping, bad YAML,
missing file) into one clear line naming the file's kind, never a traceback.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from histosam.backend.errors import InvalidInputError, NotFoundError

T = TypeVar("T")


def settings_from_mapping(cls: type[T], data: Mapping[str, Any], what: str, int_fields: tuple[str, ...] = ()) -> T:
    """``cls(**data)`` with every value a number (ints for ``int_fields``); ``what`` names them in errors."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidInputError(f"unknown {what} setting(s) {unknown}; known: {sorted(known)}")
    values: dict[str, Any] = {}
    for key, value in data.items():
        try:
            values[key] = int(value) if key in int_fields else float(value)
        except (TypeError, ValueError):
            raise InvalidInputError(f"{what} setting {key} must be a number, got {value!r}") from None
    return cls(**values)


def load_settings(cls: type[T], path: str | Path, what: str, int_fields: tuple[str, ...] = ()) -> T:
    """Settings from the YAML mapping in ``path``."""
    return settings_from_mapping(cls, read_yaml_mapping(path, what), what, int_fields)


def read_yaml_mapping(path: str | Path, what: str) -> Mapping[str, Any]:
    """The YAML mapping in ``path``; every failure one line naming ``what`` the file is."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise NotFoundError(f"cannot read {what} config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:  # PyYAML's message spans several lines: keep the problem and where
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InvalidInputError(f"{what} config {path} is not valid YAML{where}: {problem}") from None
    if not isinstance(data, Mapping):
        raise InvalidInputError(f"{what} config {path} must be a mapping of settings")
    return data


class SettingsFile:
    """What a settings dataclass shares: loading from its YAML file or a mapping, and the check
    that every value is a positive finite number. Subclasses set ``WHAT`` (the name errors use),
    ``DEFAULT_CONFIG`` (the shipped YAML), ``INT_FIELDS`` and ``ZERO_ALLOWED``."""

    WHAT: ClassVar[str]
    DEFAULT_CONFIG: ClassVar[Path]
    INT_FIELDS: ClassVar[tuple[str, ...]] = ()
    ZERO_ALLOWED: ClassVar[tuple[str, ...]] = ()  # fields for which 0 means "none"

    def check_positive(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            ok = isinstance(value, (int, float)) and math.isfinite(value)
            if not (ok and (value > 0 or (value == 0 and f.name in self.ZERO_ALLOWED))):
                raise InvalidInputError(f"{self.WHAT} setting {f.name} must be a positive number, got {value!r}")

    @classmethod
    def from_mapping(cls: type[T], data: Mapping[str, Any]) -> T:
        return settings_from_mapping(cls, data, cls.WHAT, int_fields=cls.INT_FIELDS)  # type: ignore[attr-defined]

    @classmethod
    def load(cls: type[T], path: str | Path | None = None) -> T:
        """Settings from a YAML mapping (``None``: the shipped defaults)."""
        source = path if path is not None else cls.DEFAULT_CONFIG  # type: ignore[attr-defined]
        return load_settings(cls, source, cls.WHAT, int_fields=cls.INT_FIELDS)  # type: ignore[attr-defined]
