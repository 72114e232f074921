"""The JSON Schema editors use: generated from the models, shipped with the specs, agreeing with pydantic."""

import json
import tomllib

import jsonschema
import pytest

from llmc.compiler.lint import spec_schema
from llmc.compiler.spec import SpecError, load_spec
from llmc.compiler.spec.load import _load_chain

from conftest import SPECS


def resolved(path):
    data, _ = _load_chain(path.resolve(), path.resolve(), ())
    return data


def test_shipped_schema_is_current():
    assert json.loads((SPECS / "llmc.schema.json").read_text()) == spec_schema(), \
        "specs/llmc.schema.json is stale: run `llmc schema -o specs/llmc.schema.json`"


def test_every_field_is_described():
    def walk(node, where):
        for name, prop in node.get("properties", {}).items():
            assert prop.get("description"), f"{where}.{name} has no description"
    schema = spec_schema()
    for name, definition in schema["$defs"].items():
        walk(definition, name)
    walk(schema, "Spec")


def test_specs_carry_the_schema_comment():
    for path in SPECS.rglob("*.toml"):
        first = path.read_text().splitlines()[0]
        assert first.startswith("#:schema ") and (path.parent / first.split()[1]).resolve() == SPECS / "llmc.schema.json"


@pytest.mark.parametrize("path", sorted(SPECS.glob("*.toml")), ids=lambda p: p.name)
def test_schema_accepts_shipped_specs(path):
    jsonschema.validate(resolved(path), spec_schema())


INVALID = [
    {"model": {"vocab_size": 10}},                                        # missing required keys
    {"model": {"vocab_size": "many"}, "train": {}},                        # wrong type
    {"unknown_table": {}, "model": {}, "train": {}},                        # unknown key
    {"model": {"vocab_size": 100, "d_model": 8, "n_layers": 1, "n_heads": 2, "ffn_hidden": 8,
               "max_seq_len": 8, "norm": "batchnorm"}, "train": {"seq_len": 8, "global_batch_size": 1, "max_steps": 1}},
    {"model": {"vocab_size": 100, "d_model": 8, "n_layers": 0, "n_heads": 2, "ffn_hidden": 8,
               "max_seq_len": 8}, "train": {"seq_len": 8, "global_batch_size": 1, "max_steps": 1}},
]


@pytest.mark.parametrize("data", INVALID)
def test_schema_and_pydantic_agree_on_invalid(data, tmp_path):
    import tomli_w
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, spec_schema())
    path = tmp_path / "bad.toml"
    path.write_text(tomli_w.dumps(data))
    with pytest.raises(SpecError):
        load_spec(path)
    assert tomllib.loads(path.read_text()) == data
