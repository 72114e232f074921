"""The base of every spec table: strict (unknown keys are errors), frozen-by-convention, documented.

A table's cross-field rules are its `_checks`: generator functions whose parameters name the
fields they read and which yield a (key, message) pair for each mistake. Every check runs and
every mistake is raised at once. When a field fails, pydantic skips the table's after-validator;
the loader then runs the checks over the fields that validated, a failed sub-table standing in as
a `Table.partial` of its own good fields. A check that reads a field which failed, directly or
through a property, meets `Unvalidated` and is skipped: it cannot judge, and guessing would
report mistakes that are not there.
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


class Unvalidated(Exception):
    """A check read a field that failed validation (absent from a `Table.partial`).

    Not an AttributeError on purpose: a misspelt attribute in a check stays an AttributeError and
    surfaces as the bug it is, partial table or not; only a failed field means "cannot judge".
    """


def failures(checks: tuple[Check, ...], fields: dict) -> list[tuple[str, str]]:
    """The mistakes found by the checks whose parameters are all in `fields`.

    A check that meets `Unvalidated` stops there; what it yielded before stands, since each of
    those was decided by fields it had already read, and all of them had validated.
    """
    found = []
    for check in checks:
        names = inspect.signature(check).parameters
        if not all(name in fields for name in names):
            continue
        try:
            for mistake in check(**{name: fields[name] for name in names}):
                found.append(mistake)
        except Unvalidated:
            pass  # it cannot judge the rest
    return found


class Table(BaseModel):
    """A TOML table of the spec. Unknown keys are rejected so that typos never pass silently."""

    model_config = ConfigDict(extra="forbid", strict=True)

    _checks: ClassVar[tuple[Check, ...]] = ()

    @classmethod
    def partial(cls, fields: dict) -> "Table":
        """This table holding only `fields`, unvalidated and unchecked: the loader's stand-in for a
        table of which some fields failed, so checks can still read the ones that did not."""
        table = cls.model_construct(**fields)
        for name in cls.model_fields.keys() - fields.keys():
            table.__dict__.pop(name, None)  # model_construct filled in the default of a failed field
        return table

    def __getattr__(self, name: str):
        # Python calls this only when normal lookup fails; a validated table has every field, so
        # a missing field means a partial table. Other names go on to pydantic's AttributeError.
        if name in type(self).model_fields:
            raise Unvalidated(f"{type(self).__name__}.{name} did not validate")
        return super().__getattr__(name)

    @model_validator(mode="after")
    def _consistent(self):
        found = failures(self._checks, {name: getattr(self, name) for name in type(self).model_fields})
        if found:
            raise Invalid(found)
        return self
