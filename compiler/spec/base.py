"""The base of every spec table: strict (unknown keys are errors), frozen-by-convention, documented.

A table's cross-field rules are its `_checks`: generator functions whose parameters name the
fields they read and which yield a (key, message) pair for each mistake. Every check runs and
every mistake is raised at once. When a field fails, pydantic skips the table's after-validator;
the loader then runs the checks whose fields all validated (`failures` over those fields).
"""

import inspect
from typing import Callable, ClassVar, Iterator, Literal, Union

from pydantic import BaseModel, ConfigDict, model_validator

Auto = Literal["auto"]
Degree = Union[int, Auto]

Check = Callable[..., Iterator[tuple[str, str]]]


def positive_or_auto(value: Degree) -> Degree:
    """A count that is "auto" or a positive integer (parallel degrees, micro-batch size): the
    planner and the checks divide by it."""
    if value != "auto" and value < 1:
        raise ValueError(f"expected a positive integer or \"auto\", found {value}")
    return value


class Invalid(ValueError):
    """The cross-field mistakes of a table: (key relative to the table, message) pairs.

    The loader appends each key to the table's location, so each report points at its own line.
    """

    def __init__(self, problems: list[tuple[str, str]]):
        super().__init__("; ".join(f"{key}: {message}" for key, message in problems))
        self.problems = problems


def failures(checks: tuple[Check, ...], fields: dict) -> list[tuple[str, str]]:
    """The mistakes found by the checks whose fields are all in `fields`."""
    found = []
    for check in checks:
        names = inspect.signature(check).parameters
        if all(name in fields for name in names):
            found += check(**{name: fields[name] for name in names})
    return found


class Table(BaseModel):
    """A TOML table of the spec. Unknown keys are rejected so that typos never pass silently."""

    model_config = ConfigDict(extra="forbid", strict=True)

    _checks: ClassVar[tuple[Check, ...]] = ()

    @model_validator(mode="after")
    def _consistent(self):
        found = failures(self._checks, {name: getattr(self, name) for name in type(self).model_fields})
        if found:
            raise Invalid(found)
        return self
