"""`llmc plan` formats and `llmc hardware`, run as the user runs them."""

import json
import subprocess
import sys

import pytest


def llmc(*args):
    return subprocess.run([sys.executable, "-m", "llmc.compiler.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_json_document_has_the_contract_fields():
    out = llmc("plan", "specs/mixtral_8x7b.toml", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["version"] == 1 and len(doc["spec_hash"]) == 64
    assert doc["params"]["total"] == 46_702_792_704 and doc["params"]["mtp"] == 0
    assert doc["flops"]["train_per_token"] > 0
    assert doc["memory"]["inference"]["kv_cache_bytes_per_token"] == 2 * 32 * 2 * 8 * 128  # GQA, bf16
    lay = doc["layout"]
    for key in ("world_size", "dp", "tp", "pp", "ep", "zero", "micro_batch_size", "grad_accum", "nodes",
                "procs_per_node", "sequence_parallel", "pp_schedule", "stages"):
        assert key in lay
    assert lay["world_size"] == 128 and lay["nodes"] == 16 and lay["procs_per_node"] == 8
    assert sorted(sum(lay["stages"], [])) == list(range(32))
    assert doc["spec"]["model"]["moe"]["n_experts"] == 8


def test_markdown_renders_every_section():
    out = llmc("plan", "specs/ds_v32.toml", "--format", "markdown", "--set", 'train.recompute="full"')
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for heading in ("## Parameters", "## FLOPs and time", "## Memory per device", "## Parallel layout"):
        assert heading in text
    assert "685,355,314,688" in text       # as stored, with the MTP module's embedding and head copies
    assert "683,501,956,608" in text       # unique parameters
    assert "| stage 0 |" in text and "embedding" in text


def test_each_pipeline_stage_row_shows_its_own_peak():
    sets = ["--set", "parallel.pp=2", "--set", "hardware.gpus_per_node=2", "--set", "model.mtp.depth=0",
            "--set", "train.micro_batch_size=4"]
    doc = json.loads(llmc("plan", "specs/tiny.toml", "--json", *sets).stdout)
    peaks = [m["peak"] for m in doc["memory"]["train_stages"]]
    assert doc["memory"]["train"]["peak"] == max(peaks)
    text = llmc("plan", "specs/tiny.toml", "--format", "markdown", *sets).stdout
    for i, peak in enumerate(peaks):
        row = next(line for line in text.splitlines() if line.startswith(f"| stage {i} |"))
        assert f"peak {peak / 2**30:,.1f} GiB" in row, row


def test_a_run_that_starts_from_a_model_folder_says_so():
    sets = ["--set", "train.init_from=/models/base"]  # (plan reads no folder: a run checks it when it starts)
    assert "starts from /models/base" in llmc("plan", "specs/tiny.toml", *sets).stdout
    assert "Starts from the weights of `/models/base`." in llmc("plan", "specs/tiny.toml", "--format", "markdown",
                                                                *sets).stdout
    assert "starts from" not in llmc("plan", "specs/tiny.toml").stdout.lower()


def test_table_report_and_no_fit_explanation():
    out = llmc("plan", "specs/ds_v32.toml")
    text = out.stdout
    assert "Parameters" in text and "FLOPs and time" in text and "Inference on one node" in text
    if out.returncode == 1:  # as shipped the spec may not fit: the report says why and what would
        assert "does not fit" in out.stderr and "would make it fit" in out.stderr
    else:
        assert "Parallel layout" in text


def test_formula_prints_closed_forms():
    out = llmc("plan", "specs/llama3_8b.toml", "--formula")
    assert out.returncode == 0, out.stderr
    assert "D*V" in out.stdout and "8,030,261,248" in out.stdout


def test_hardware_lists_the_catalog():
    out = llmc("hardware")
    assert out.returncode == 0
    assert "H800-80GB" in out.stdout and "B200-180GB" in out.stdout


@pytest.mark.parametrize("args, needle", [(["plan", "specs/nope.toml"], "file not found"),
                                          (["plan", "specs"], "specs: a folder, not a spec (a .toml file)"),
                                          (["plan", "specs/tiny.toml", "--set", "parallel.tp=3"], "tp=3")])
def test_bad_input_is_an_error_not_a_traceback(args, needle):
    out = llmc(*args)
    assert out.returncode == 1 and needle in out.stderr and "Traceback" not in out.stderr


def test_a_peak_over_the_device_never_reads_as_equal_to_it():
    from llmc.compiler.plan.formatting import GiB, exceeds, gib_pair
    # 0.03 GiB over: one decimal would print "80.0 GiB > 80.0 GiB"
    assert exceeds(80.03 * GiB, 80 * GiB) == "80.03 GiB > 80.00 GiB"
    assert gib_pair(81.2 * GiB, 80 * GiB) == ("81.2", "80.0")
    assert gib_pair(80.0004 * GiB, 80 * GiB) == ("80.0004", "80.0000")
