"""The base of every spec table: strict (unknown keys are errors), frozen-by-convention, documented."""

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict

Auto = Literal["auto"]
Degree = Union[int, Auto]


class Table(BaseModel):
    """A TOML table of the spec. Unknown keys are rejected so that typos never pass silently."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Invalid(ValueError):
    """A cross-field error raised by a table's validator, naming the key (relative to the table).

    The loader appends `key` to the table's location, so the report points at the right line.
    """

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key
