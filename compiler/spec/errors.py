"""Spec errors: every mistake located by file, line and key path, all reported at once."""

import sys
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Problem:
    """One mistake in a spec."""

    file: str
    line: int | None
    key: str            # dotted key path, "" for the whole file
    message: str        # what is wrong, with "expected ..., found ..." where it applies
    origin: str = ""    # "" for the file itself, "extends: base.toml" or "--set" otherwise

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        key = f" {self.key}:" if self.key else ""
        origin = f" [from {self.origin}]" if self.origin else ""
        return f"{where}:{key} {self.message}{origin}"

    def to_dict(self) -> dict:
        return asdict(self)


class SpecError(Exception):
    """A spec could not be loaded; `problems` lists every mistake found."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(map(str, problems)))


def print_warnings(spec) -> None:
    """A loaded spec's warnings (Spec.warnings) on stderr."""
    for problem in spec.warnings:
        print(f"warning: {problem}", file=sys.stderr)
