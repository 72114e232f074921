"""The spec language: loading, extends, --set, and errors that point at file, line and key."""

import pytest

from llmc.compiler.spec import SpecError, load_spec
from llmc.compiler.spec.base import Unvalidated, failures
from llmc.compiler.spec.model import AttentionSpec, ModelSpec

from conftest import SPECS

BASE = """\
[model]
vocab_size = 1000
d_model = 64
n_layers = 2
n_heads = 4
ffn_hidden = 128
max_seq_len = 128

[train]
seq_len = 64
global_batch_size = 8
max_steps = 10
"""


def problems(path, overrides=()):
    with pytest.raises(SpecError) as info:
        load_spec(path, overrides)
    return info.value.problems


def test_shipped_specs_load():
    for path in SPECS.glob("*.toml"):
        spec = load_spec(path)
        assert spec.model.n_layers >= 1


def test_ds_v32_is_deepseek_v32():
    spec = load_spec(SPECS / "ds_v32.toml")
    m = spec.model
    assert (m.n_layers, m.d_model, m.n_heads, m.vocab_size) == (61, 7168, 128, 129280)
    assert m.attention.kind == "mla" and m.attention.kv_lora_rank == 512
    assert (m.moe.n_experts, m.moe.top_k, m.moe.n_shared_experts, m.moe.first_dense_layers) == (256, 8, 1, 3)
    assert m.mtp.depth == 1 and m.attention.index_topk == 2048
    assert m.rope.scaling == "yarn" and m.rope.original_max_seq_len * m.rope.factor >= 128 * 1024
    assert m.n_moe_layers == 58


def test_unknown_key_names_line_and_suggests(write_spec):
    path = write_spec(BASE.replace("n_layers = 2", "n_layer = 2"))
    found = problems(path)
    missing = [p for p in found if p.key == "model.n_layers"]
    unknown = [p for p in found if p.key == "model.n_layer"]
    assert unknown and unknown[0].line == 4 and "did you mean 'n_layers'" in unknown[0].message
    assert missing and "required" in missing[0].message
    assert str(unknown[0]).startswith(f"{path.name}:4: model.n_layer: unknown key") or \
        str(unknown[0]).split(":")[1] == "4"


def test_wrong_type_and_range_all_reported_at_once(write_spec):
    text = BASE.replace("d_model = 64", 'd_model = "wide"').replace("max_steps = 10", "max_steps = -3")
    found = {p.key: p for p in problems(write_spec(text))}
    assert found["model.d_model"].line == 3
    assert "expected an integer" in found["model.d_model"].message and "'wide'" in found["model.d_model"].message
    assert found["train.max_steps"].line == 12 and ">= 1" in found["train.max_steps"].message


@pytest.mark.parametrize("edit, key, words", [
    (("n_heads = 4", "n_heads = 5"), "model.n_heads", "divide d_model"),
    (("ffn_hidden = 128", "ffn_hidden = 128\nn_kv_heads = 3"), "model.n_kv_heads", "divide n_heads"),
    (("seq_len = 64", "seq_len = 4096"), "train.seq_len", "max_seq_len"),
    (("[train]", "[model.moe]\nn_experts = 4\ntop_k = 6\nexpert_hidden = 32\n[train]"),
     "model.moe.top_k", "n_experts"),
    (("max_steps = 10", "max_steps = 10\nmicro_batch_size = 0\n[parallel]\ndp = 2"),
     "train.micro_batch_size", "expected a positive integer"),
])
def test_inconsistent_fields(write_spec, edit, key, words):
    found = {p.key: p for p in problems(write_spec(BASE.replace(*edit)))}
    assert key in found, found
    assert words in found[key].message


def test_parallel_product_must_match_world_size(write_spec):
    text = BASE + "[parallel]\ndp = 2\ntp = 2\npp = 1\n[hardware]\ngpus_per_node = 8\n"
    found = {p.key: p for p in problems(write_spec(text))}
    assert "world size" in found["parallel.dp"].message and "expected 8" in found["parallel.dp"].message


def test_experts_divisible_by_ep(write_spec):
    text = BASE.replace("[train]", "[model.moe]\nn_experts = 6\ntop_k = 2\nexpert_hidden = 32\n[train]")
    text += "[parallel]\nep = 4\n[hardware]\ngpus_per_node = 8\n"
    found = {p.key: p for p in problems(write_spec(text))}
    assert "divide model.moe.n_experts" in found["parallel.ep"].message


def test_toml_syntax_error_has_line(write_spec):
    found = problems(write_spec(BASE.replace("d_model = 64", "d_model = = 64")))
    assert len(found) == 1 and found[0].line == 3 and "invalid TOML" in found[0].message


def test_missing_file_and_missing_extends(write_spec, tmp_path):
    assert "not found" in problems(tmp_path / "nope.toml")[0].message
    found = problems(write_spec('extends = "base.toml"\n' + BASE))
    assert found[0].key == "extends" and found[0].line == 1 and "base.toml" in found[0].message


def test_extends_chain_merges_and_reports_origin(write_spec):
    write_spec(BASE.replace("ffn_hidden = 128", "ffn_hidden = -1"), "base.toml")
    write_spec('extends = "base.toml"\n[model]\nn_layers = 3\n', "mid.toml")
    child = write_spec('extends = "mid.toml"\n[train]\nseq_len = 32\n', "child.toml")
    found = problems(child)
    assert len(found) == 1
    assert found[0].file.endswith("base.toml") and found[0].line == 6
    assert found[0].origin == f"extends: {found[0].file}"
    write_spec(BASE, "base.toml")
    spec = load_spec(child)
    assert (spec.model.n_layers, spec.train.seq_len, spec.model.d_model) == (3, 32, 64)


def test_circular_extends(write_spec):
    write_spec('extends = "b.toml"\n' + BASE, "a.toml")
    write_spec('extends = "a.toml"\n', "b.toml")
    assert "circular" in problems(write_spec('extends = "a.toml"\n', "c.toml"))[0].message


def test_bundled_presets_found_from_anywhere(write_spec):
    text = 'extends = "presets/llama3.toml"\n' + BASE.replace("vocab_size = 1000\n", "")
    assert load_spec(write_spec(text)).model.vocab_size == 128256


def test_set_overrides_and_their_errors(write_spec):
    path = write_spec(BASE)
    spec = load_spec(path, ["train.seq_len=32", "parallel.tp=auto", "model.rope.theta=500000.0"])
    assert spec.train.seq_len == 32 and spec.parallel.tp == "auto" and spec.model.rope.theta == 500000.0
    found = problems(path, ["train.seq_lenn=32", "model.d_model=big"])
    by_key = {p.key: p for p in found}
    assert by_key["train.seq_lenn"].file == "--set" and "did you mean 'seq_len'" in by_key["train.seq_lenn"].message
    assert by_key["model.d_model"].file == "--set"
    assert problems(path, ["no-equals-sign"])[0].file == "--set"


def test_relative_source_paths_resolve_against_the_spec(write_spec, tmp_path):
    text = BASE + '[data]\nsources = [{ path = "corpus.txt" }]\n'
    spec = load_spec(write_spec(text))
    assert spec.data.sources[0].path == str((tmp_path / "corpus.txt").resolve())


def located(found):
    """(line, key, message) of each problem, in the order reported."""
    return [(p.line, p.key, p.message) for p in found]


def expect(found, expected):
    """Every expected (line, key, message fragment) is reported, and nothing else."""
    got = located(found)
    assert [(line, key) for line, key, _ in got] == [(line, key) for line, key, _ in expected], got
    for (_, _, message), (_, _, fragment) in zip(got, expected):
        assert fragment in message, (message, fragment)


def test_every_cross_field_mistake_of_a_table_at_once(write_spec):
    text = BASE.replace("n_heads = 4", "n_heads = 5\nn_kv_heads = 3") + """\
[model.rope]
scaling = "linear"
original_max_seq_len = 256
[model.moe]
n_experts = 4
top_k = 2
expert_hidden = 32
first_dense_layers = 3
"""
    text = text.replace("max_steps = 10", "max_steps = 10\ntokens = 5000\nmicro_batch_size = 16")
    expect(problems(write_spec(text)), [
        (5, "model.n_heads", "must divide d_model when head_dim is not given (expected a divisor of 64, found 5)"),
        (6, "model.n_kv_heads", "must divide n_heads (expected a divisor of 5, found 3)"),
        (14, "train.tokens", "not both"),
        (15, "train.micro_batch_size", "exceeds global_batch_size (expected <= 8, found 16)"),
        (18, "model.rope.original_max_seq_len", "exceeds max_seq_len (expected <= 128, found 256)"),
        (23, "model.moe.first_dense_layers", "exceeds n_layers (expected <= 2, found 3)"),
    ])


def test_every_cross_table_mistake_at_once(write_spec):
    text = BASE.replace("max_seq_len = 128", "max_seq_len = 128\ntie_embeddings = true")
    text = text.replace("seq_len = 64", "seq_len = 4096")
    text += "[parallel]\ndp = 3\ntp = 3\npp = 4\nep = 4\n[hardware]\ngpus_per_node = 2\n"
    # Follow-ons stay quiet: the fixed degrees not dividing the world size (their product is
    # already wrong), ep not dividing it (ep must be 1 without [model.moe]).
    expect(problems(write_spec(text)), [
        (11, "train.seq_len", "exceeds model.max_seq_len (expected <= 128, found 4096)"),
        (12, "train.global_batch_size", "divide over dp = 3 (expected a multiple of 3, found 8)"),
        (15, "parallel.dp", "dp x tp x pp must equal the world size (expected 2, found 3 x 3 x 4 = 36)"),
        (16, "parallel.tp", "stays within a node (expected <= gpus_per_node = 2, found 3)"),
        (16, "parallel.tp", "tp must divide n_heads (found tp = 3 with n_heads = 4)"),
        (16, "parallel.tp", "tp must divide the key/value heads (found tp = 3 with n_kv_heads = 4)"),
        (16, "parallel.tp", "tp must divide ffn_hidden: the dense FFNs split by columns (found tp = 3 with ffn_hidden = 128)"),
        (16, "parallel.tp", "sequence parallelism needs tp to divide seq_len (found tp = 3 with seq_len = 4096)"),
        (16, "parallel.tp", "tp must be 1 with tied embeddings"),
        (17, "parallel.pp", "more pipeline stages than layers (expected <= 2, found 4)"),
        (18, "parallel.ep", "needs [model.moe] (expected 1, found 4)"),
    ])


def test_checks_run_beside_field_errors_of_their_table(write_spec):
    text = """\
extends = "presets/llama3.toml"
[model]
d_model = 4096
n_layers = "many"
n_heads = 32
n_kv_heads = 7
ffn_hidden = 14336
max_seq_len = 8192
[model.moe]
n_experts = 8
top_k = 10
expert_hidden = "big"
n_groups = 3
[train]
seq_len = 4096
global_batch_size = 8
max_steps = 10
tokens = 100000
log_every = 0
[parallel]
tp = 3
[hardware]
accelerator = "H100-80G"
"""
    # [model] and [hardware] failed, but not in the fields [parallel]'s checks read (model.n_heads;
    # hardware.gpus_per_node and nodes, by default 1): those checks run.
    expect(problems(write_spec(text)), [
        (4, "model.n_layers", "expected an integer, found 'many'"),
        (6, "model.n_kv_heads", "must divide n_heads (expected a divisor of 32, found 7)"),
        (11, "model.moe.top_k", "must not exceed moe.n_experts (expected <= 8, found 10)"),
        (12, "model.moe.expert_hidden", "expected an integer, found 'big'"),
        (13, "model.moe.n_groups", "must divide moe.n_experts (expected a divisor of 8, found 3)"),
        (18, "train.tokens", "not both"),
        (19, "train.log_every", "expected a value >= 1, found 0"),
        (20, "parallel", "the fixed degrees (tp=3) do not divide the world size 1"),
        (21, "parallel.tp", "stays within a node (expected <= gpus_per_node = 1, found 3)"),
        (21, "parallel.tp", "tp must divide n_heads (found tp = 3 with n_heads = 32)"),
        (21, "parallel.tp", "tp must divide the key/value heads (found tp = 3 with n_kv_heads = 7)"),
        (23, "hardware.accelerator", "unknown accelerator"),
    ])


def test_cross_table_checks_run_beside_field_errors_of_other_tables(write_spec):
    text = BASE.replace("max_seq_len = 128", "max_seq_len = 128\ntie_embeddings = true")
    text = text.replace("seq_len = 64", "seq_len = 4096")
    text += """\
[parallel]
dp = 3
tp = 3
pp = 4
[hardware]
nodes = 0
[data]
val_fraction = 2.0
[job]
name = "Bad Name"
"""
    # dp x tp x pp against the world size needs hardware.nodes, which failed: skipped. tp against
    # gpus_per_node (its default, 1) does not: reported.
    expect(problems(write_spec(text)), [
        (11, "train.seq_len", "exceeds model.max_seq_len (expected <= 128, found 4096)"),
        (12, "train.global_batch_size", "divide over dp = 3"),
        (16, "parallel.tp", "stays within a node (expected <= gpus_per_node = 1, found 3)"),
        (16, "parallel.tp", "tp must divide n_heads (found tp = 3 with n_heads = 4)"),
        (16, "parallel.tp", "tp must divide the key/value heads (found tp = 3 with n_kv_heads = 4)"),
        (16, "parallel.tp", "tp must divide ffn_hidden: the dense FFNs split by columns (found tp = 3 with ffn_hidden = 128)"),
        (16, "parallel.tp", "sequence parallelism needs tp to divide seq_len (found tp = 3 with seq_len = 4096)"),
        (16, "parallel.tp", "tp must be 1 with tied embeddings"),
        (17, "parallel.pp", "more pipeline stages than layers (expected <= 2, found 4)"),
        (19, "hardware.nodes", "expected a value >= 1, found 0"),
        (21, "data.val_fraction", "expected a value < 1.0, found 2.0"),
        (23, "job.name", "expected lowercase letters"),
    ])


def test_cross_table_checks_run_beside_a_cross_field_mistake_of_their_table(write_spec):
    text = BASE.replace("ffn_hidden = 128", "ffn_hidden = 128\nn_kv_heads = 3")
    text = text.replace("seq_len = 64", "seq_len = 4096")
    expect(problems(write_spec(text)), [
        (7, "model.n_kv_heads", "must divide n_heads (expected a divisor of 4, found 3)"),
        (11, "train.seq_len", "exceeds model.max_seq_len (expected <= 128, found 4096)"),
    ])
    # An unknown key also skips pydantic's run of the table's checks: the loader runs them, once.
    expect(problems(write_spec(text.replace("d_model = 64", "d_model = 64\nd_modle = 64"))), [
        (4, "model.d_modle", "did you mean 'd_model'?"),
        (8, "model.n_kv_heads", "must divide n_heads (expected a divisor of 4, found 3)"),
        (12, "train.seq_len", "exceeds model.max_seq_len (expected <= 128, found 4096)"),
    ])


def test_cross_table_checks_read_the_fields_that_validated(write_spec):
    text = BASE.replace("n_layers = 2", 'n_layers = "many"').replace("seq_len = 64", "seq_len = 4096")
    text += "[parallel]\npp = 4\n[hardware]\ngpus_per_node = 4\n"
    # pp against n_layers cannot be judged: no report about it.
    expect(problems(write_spec(text)), [
        (4, "model.n_layers", "expected an integer, found 'many'"),
        (10, "train.seq_len", "exceeds model.max_seq_len (expected <= 128, found 4096)"),
    ])


def test_a_failed_field_gives_no_cross_table_report(write_spec):
    text = BASE.replace("max_seq_len = 128", 'max_seq_len = "long"').replace("seq_len = 64", "seq_len = 4096")
    # hardware.world_size, a property, reads the failed nodes: the world-size checks stay quiet.
    text += "[parallel]\nworld_size = 4\nep = 2\n[hardware]\nnodes = 0\n"
    expect(problems(write_spec(text)), [
        (7, "model.max_seq_len", "expected an integer, found 'long'"),
        (17, "hardware.nodes", "expected a value >= 1, found 0"),
    ])
    # A failed optional sub-table is unknown, not absent: no "expert parallelism needs [model.moe]".
    text = BASE.replace("max_seq_len = 128", "max_seq_len = 128\nmoe = 5") + "[parallel]\nep = 2\n"
    expect(problems(write_spec(text)), [(8, "model.moe", "expected a table, found 5")])


def test_checks_read_failed_sub_tables_as_far_as_they_validated(write_spec):
    text = BASE.replace("max_seq_len = 128", "max_seq_len = 128\ntie_embeddings = true\nn_kv_heads = 3")
    text += '[model.attention]\nindex_n_heads = "x"\n[parallel]\ntp = 2\n[hardware]\ngpus_per_node = 2\n'
    # attention.kind validated: [model]'s kv-head check runs. attention.sparse reads the failed
    # index_n_heads: the indexer checks are skipped; the tp check's tied-embeddings report, made
    # before it reads attention.sparse, stands.
    expect(problems(write_spec(text)), [
        (9, "model.n_kv_heads", "must divide n_heads (expected a divisor of 4, found 3)"),
        (16, "model.attention.index_n_heads", "expected an integer, found 'x'"),
        (18, "parallel.tp", "tp must divide the key/value heads (found tp = 2 with n_kv_heads = 3)"),
        (18, "parallel.tp", "tp must be 1 with tied embeddings"),
    ])


def test_a_check_cannot_judge_a_failed_field_but_its_typos_still_raise():
    good = {"vocab_size": 1000, "d_model": 64, "n_heads": 4, "ffn_hidden": 128, "max_seq_len": 128,
            "attention": AttentionSpec(kind="gqa")}
    partial = ModelSpec.partial(good)  # n_layers failed; n_kv_heads is absent as well, not None
    with pytest.raises(Unvalidated):
        partial.kv_heads
    assert partial.n_heads == 4 and partial.attention.kind == "gqa"

    def reads_kv_heads(model):
        yield "model", f"{model.kv_heads} kv heads"

    def misspelt(model):
        yield "model", f"{model.n_head} heads"

    assert failures((reads_kv_heads,), {"model": partial}) == []
    complete = ModelSpec(**good, n_layers=2)
    assert failures((reads_kv_heads,), {"model": complete}) == [("model", "4 kv heads")]
    for model in (partial, complete):
        with pytest.raises(AttributeError, match="n_head"):
            failures((misspelt,), {"model": model})


def test_a_missing_table_is_named_as_a_table(write_spec):
    path = write_spec(BASE[:BASE.index("[train]")])
    (train,) = [p for p in problems(path) if p.key == "train"]
    assert "required table [train] is missing" in train.message and "The training run." in train.message


def test_a_node_holds_no_more_devices_than_the_catalog_says(write_spec):
    """An H100 node (HGX/DGX) holds 8 GPUs: 16 per node is no machine a scheduler can give."""
    text = BASE + '[hardware]\naccelerator = "H100"\ngpus_per_node = 16\n'
    line = text.splitlines().index("gpus_per_node = 16") + 1
    expect(problems(write_spec(text)), [
        (line, "hardware.gpus_per_node", "a node holds at most 8 H100-80GB devices (expected <= 8, found 16)"),
    ])
