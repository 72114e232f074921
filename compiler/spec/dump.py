"""Spec -> TOML text: what `llmc compile` writes beside plan.json, and what round-trips in tests;
and a spec document as dotted keys, for naming what differs between two."""

import tomli_w

from .spec import Spec


def spec_to_toml(spec: Spec) -> str:
    """The fully resolved spec as TOML (no `extends`: every value is written out)."""
    data = spec.model_dump(mode="json", exclude_none=True, exclude={"extends"})
    return tomli_w.dumps(data)


def flatten(document: dict, prefix: str = "") -> dict:
    """A (spec) document's values by dotted key: {"model": {"d_model": 64}} -> {"model.d_model": 64};
    an empty table is a value of its own."""
    out = {}
    for k, v in document.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
