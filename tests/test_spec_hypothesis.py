"""Generated specs: valid ones load and round-trip through TOML; invalid ones always give a located SpecError."""

import tomllib

import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmc.compiler.spec import Spec, SpecError, load_spec, spec_to_toml

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def valid_specs(draw) -> dict:
    """A consistent spec: every divisibility and range rule is satisfied by construction."""
    n_kv = draw(st.sampled_from([1, 2, 4]))
    n_heads = n_kv * draw(st.integers(1, 4))
    head_dim = draw(st.sampled_from([8, 16, 32]))
    max_seq = draw(st.sampled_from([64, 128, 256, 4096]))
    model = {
        "vocab_size": draw(st.integers(256, 70000)),
        "d_model": n_heads * head_dim,
        "n_layers": draw(st.integers(1, 8)),
        "n_heads": n_heads,
        "n_kv_heads": n_kv,
        "ffn_hidden": draw(st.integers(8, 512)),
        "max_seq_len": max_seq,
        "tie_embeddings": draw(st.booleans()),
        "norm": draw(st.sampled_from(["rmsnorm", "layernorm"])),
        "activation": draw(st.sampled_from(["swiglu", "gelu", "relu"])),
        "attention": {"kind": "gqa"},
        "rope": {"theta": draw(st.floats(100.0, 1e6))},
    }
    if draw(st.booleans()):
        n_experts = draw(st.sampled_from([2, 4, 8]))
        model["moe"] = {"n_experts": n_experts, "top_k": draw(st.integers(1, n_experts)),
                        "expert_hidden": draw(st.integers(8, 256)),
                        "n_shared_experts": draw(st.integers(0, 2)),
                        "score": draw(st.sampled_from(["softmax", "sigmoid"])),
                        "first_dense_layers": draw(st.integers(0, model["n_layers"]))}
    micro = draw(st.sampled_from([1, 2, 4]))
    train = {"seq_len": draw(st.integers(1, max_seq)), "micro_batch_size": micro,
             "global_batch_size": micro * draw(st.integers(1, 8)), "max_steps": draw(st.integers(1, 10**6)),
             "precision": draw(st.sampled_from(["fp32", "bf16"])),
             "optimizer": {"lr": draw(st.floats(1e-6, 1e-2)), "betas": [0.9, draw(st.floats(0.9, 0.999))]}}
    return {"model": model, "train": train,
            "hardware": {"accelerator": draw(st.sampled_from(["CPU", "H100-80GB", "A100-40GB"])),
                         "gpus_per_node": draw(st.sampled_from([1, 2, 8]))},
            "job": {"name": draw(st.from_regex(r"[a-z][a-z0-9-]{0,10}[a-z0-9]", fullmatch=True))}}


@FAST
@given(valid_specs())
def test_valid_specs_load_and_round_trip(tmp_path, data):
    path = tmp_path / "gen.toml"
    path.write_text(tomli_w.dumps(data))
    spec = load_spec(path)
    assert spec.model.d_model == data["model"]["d_model"]
    again_path = tmp_path / "again.toml"
    again_path.write_text(spec_to_toml(spec))
    assert load_spec(again_path) == spec
    assert Spec.model_validate(tomllib.loads(spec_to_toml(spec))) == spec


_BAD_VALUES = st.one_of(st.text(max_size=5), st.floats(allow_nan=False), st.integers(-10**6, 0),
                        st.booleans(), st.lists(st.integers(), max_size=2))


@st.composite
def broken_specs(draw) -> tuple[dict, str]:
    """A valid spec with one key made wrong: misspelt, mistyped, or out of range."""
    data = draw(valid_specs())
    table = draw(st.sampled_from(["model", "train", "hardware"]))
    key = draw(st.sampled_from(sorted(k for k, v in data[table].items() if not isinstance(v, dict))))
    how = draw(st.sampled_from(["misspell", "value", "drop_required"]))
    if how == "misspell":
        data[table][key + draw(st.sampled_from(["s", "_x", "z"]))] = data[table].pop(key)
    elif how == "value":
        data[table][key] = draw(_BAD_VALUES)
    else:
        required = {"model": "d_model", "train": "seq_len", "hardware": None}[table]
        if required:
            data[table].pop(required, None)
        else:
            data[table]["accelerator"] = "TPU-v9"
    return data, table


@FAST
@given(broken_specs())
def test_broken_specs_give_located_errors(tmp_path, case):
    data, table = case
    path = tmp_path / "broken.toml"
    path.write_text(tomli_w.dumps(data))
    try:
        load_spec(path)
    except SpecError as e:
        assert e.problems
        for problem in e.problems:
            assert problem.file.endswith("broken.toml")
            assert problem.line is not None and problem.line >= 1
            assert problem.key and problem.message
    # A mutation may by chance give another valid value (e.g. a bool turned into another bool):
    # then loading succeeds, which is correct. What must never happen is another exception type.


@st.composite
def overlong_specs_with_a_broken_table(draw) -> dict:
    """A valid spec whose train.seq_len exceeds model.max_seq_len, and one key of a table broken:
    of [hardware] or [job], or of [model] or [train] other than the two the check reads."""
    data = draw(valid_specs())
    data["train"]["seq_len"] = data["model"]["max_seq_len"] + draw(st.integers(1, 4096))
    table = draw(st.sampled_from(["model", "train", "hardware", "job"]))
    key = draw(st.sampled_from(sorted(set(data[table]) - {"max_seq_len", "seq_len"})))
    if draw(st.booleans()):
        data[table][key + "z"] = data[table].pop(key)
    else:
        data[table][key] = draw(st.sampled_from([-1, "?", [1], 0.5]))
    return data


@FAST
@given(overlong_specs_with_a_broken_table())
def test_cross_table_mistake_reported_beside_a_broken_table(tmp_path, data):
    path = tmp_path / "broken.toml"
    path.write_text(tomli_w.dumps(data))
    try:
        load_spec(path)
    except SpecError as e:
        assert any(p.key == "train.seq_len" and "max_seq_len" in p.message for p in e.problems), e.problems
    else:
        raise AssertionError("an overlong seq_len loaded")
