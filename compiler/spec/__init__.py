"""The spec language: pydantic models of every table, and loading with file:line errors."""

from .dump import spec_to_toml
from .errors import Problem, SpecError, print_warnings
from .load import load_spec, parse_override
from .model import ModelSpec
from .spec import SCHEMA_VERSION, Spec

__all__ = ["ModelSpec", "Problem", "SCHEMA_VERSION", "Spec", "SpecError", "load_spec", "parse_override", "print_warnings",
           "spec_to_toml"]
