"""Spec -> TOML text: what `llmc compile` writes beside plan.json, and what round-trips in tests."""

import tomli_w

from .spec import Spec


def spec_to_toml(spec: Spec) -> str:
    """The fully resolved spec as TOML (no `extends`: every value is written out)."""
    data = spec.model_dump(mode="json", exclude_none=True, exclude={"extends"})
    return tomli_w.dumps(data)
