"""Training / validation membership of the shared patch sets, by source image.

Why here, in numpy-land: the trainer must leave out exactly the patches the evaluator reports
on, so both read one file (``splits.yaml``) through one function. A split by patch would leak:
neighbouring patches cut from one image share tissue, stain and annotator, so a model trained
on one scores too well on its neighbour. Each set names a regex whose first group is the
source image of a patch, and the source images held out for validation.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from histosam.backend.core.errors import InvalidInputError
from histosam.backend.core.settings import read_yaml_mapping

DEFAULT_SPLITS = Path(__file__).with_name("splits.yaml")
PARTS = ("all", "train", "validation")


@dataclass(frozen=True)
class DatasetSplit:
    """One patch set's rule: which source each patch comes from, which sources validate."""

    name: str
    source: re.Pattern[str]
    validation: frozenset[str]

    def source_of(self, stem: str) -> str:
        """The source image ``stem`` was cut from (the stem itself when the regex misses)."""
        m = self.source.match(stem)
        if m is None:
            return stem
        return m.group(1) if m.groups() else m.group(0)

    def part_of(self, stem: str) -> str:
        return "validation" if self.source_of(stem) in self.validation else "train"


def _parse(name: str, entry: Any, path: Path) -> DatasetSplit:
    if not isinstance(entry, Mapping) or set(entry) - {"source", "validation"}:
        raise InvalidInputError(f"splits file {path}: {name} needs exactly 'source' (a regex) and 'validation' (a list)")
    try:
        pattern = re.compile(str(entry.get("source", "^(.+)$")))
    except re.error as exc:
        raise InvalidInputError(f"splits file {path}: {name}.source is not a regex: {exc}") from None
    held = entry.get("validation") or []
    if not isinstance(held, list) or not all(isinstance(s, (str, int)) for s in held):
        raise InvalidInputError(f"splits file {path}: {name}.validation must be a list of source names")
    return DatasetSplit(name, pattern, frozenset(str(s) for s in held))


def load_splits(path: str | Path | None = None) -> dict[str, DatasetSplit]:
    """Every set's split from ``path`` (default: the shipped ``splits.yaml``), by folder name."""
    source = Path(path) if path is not None else DEFAULT_SPLITS
    data = read_yaml_mapping(source, "splits file")
    return {str(name): _parse(str(name), entry, source) for name, entry in data.items()}


def check_part(part: str) -> str:
    if part not in PARTS:
        raise InvalidInputError(f"split must be one of {', '.join(PARTS)}, got {part!r}")
    return part


def in_part(dataset: str, stem: str, part: str, splits: Mapping[str, DatasetSplit]) -> bool:
    """Is patch ``stem`` of the folder named ``dataset`` in ``part``?

    A folder the splits do not name belongs wholly to both parts (all of glas is validation
    because it is never given to training, not because of this file).
    """
    if check_part(part) == "all" or dataset not in splits:
        return True
    return splits[dataset].part_of(stem) == part


def select_part(dataset: str, stems: Iterable[str], part: str,
                splits: Mapping[str, DatasetSplit]) -> list[str]:
    """The stems of ``part``, in the order given."""
    return [s for s in stems if in_part(dataset, s, part, splits)]
