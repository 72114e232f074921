"""`llmc lint` and `llmc schema` as a user and a CI job see them."""

import json
import subprocess
import sys

import pytest

from llmc.compiler.cli import main

from conftest import REPO, SPECS


def test_lint_shipped_specs_clean(capsys):
    assert main(["lint", str(SPECS)]) == 0
    assert "0 problems" in capsys.readouterr().err


def test_lint_reports_every_error_with_location(write_spec, capsys):
    path = write_spec("[model]\nvocab_size = 10\nd_modle = 8\n[train]\nseq_len = 'long'\n")
    assert main(["lint", str(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith(f"{path}:3: model.d_modle: unknown key; did you mean 'd_model'?") for line in out), out
    assert any(":5: train.seq_len: expected an integer, found 'long'" in line for line in out), out
    assert len(out) >= 4  # plus the missing required keys


def test_lint_refuses_objectives_the_runtime_does_not_train(capsys):
    """dpo and grpo passed lint and plan, then failed at train: they are not in the language yet."""
    spec = str(SPECS / "tiny.toml")
    assert main(["lint", spec, "--set", 'train.objective="dpo"']) == 1
    assert "train.objective: expected one of 'pretrain' or 'sft', found 'dpo'" in capsys.readouterr().out
    assert main(["lint", spec, "--set", 'train.objective="sft"']) == 0


def test_lint_json_and_github_formats(write_spec, capsys):
    path = write_spec("[model]\nvocab_size = -1\n")
    assert main(["lint", str(path), "--format", "json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert any(p["key"] == "model.vocab_size" and p["line"] == 2 for p in report["problems"])
    assert main(["lint", str(path), "--format", "github"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert f"::error file={path},line=2,title=llmc lint::model.vocab_size: expected a value >= 2, found -1 (integer)" in lines


def test_lint_missing_path_is_a_clean_error(tmp_path, capsys):
    assert main(["lint", str(tmp_path / "nowhere")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_bad_spec_never_shows_a_traceback(write_spec):
    path = write_spec("[model\nvocab_size = 1\n")
    done = subprocess.run([sys.executable, "-m", "llmc.compiler.cli", "lint", str(path)],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr + done.stdout
    assert ":1:" in done.stdout and "invalid TOML" in done.stdout


def test_schema_verb_prints_the_schema(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "llmc spec" and "model" in schema["required"]


NO_TORCH = """
import sys
sys.modules["torch"] = None          # any `import torch` now raises ImportError
sys.modules["transformers"] = None
from llmc.compiler.cli import main
codes = [main(["lint", "specs"]), main(["plan", "specs/tiny.toml", "--json"]), main(["plan", "specs/ds_v32.toml"])]
assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None], "torch was imported"
sys.exit(max(codes))
"""


def test_lint_and_plan_run_without_torch():
    done = subprocess.run([sys.executable, "-c", NO_TORCH], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]


MISTYPED_MODELS = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
from llmc.compiler.cli import main
model = sys.argv[1]          # a folder with the files of a model
for argv in (["eval", "nowhere", "--text-file", "README.md"], ["generate", "nowhere", "--prompt", "hi"],
             ["chat", "nowhere"], ["quantize", "nowhere", "--bits", "8", "-o", "out"],
             ["export", "hf", "nowhere", "-o", "out"], ["generate", model, "--prompt", "hi", "--draft", "nowhere"]):
    assert main(argv) == 1, argv
"""


def test_a_mistyped_model_path_fails_before_torch_is_imported(tmp_path):
    """Every verb that reads a model refuses a path with no model at once: without torch, whose
    import would take seconds before the same error."""
    (tmp_path / "plan.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    done = subprocess.run([sys.executable, "-c", MISTYPED_MODELS, str(tmp_path)], capture_output=True, text=True,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    assert lines == ["error: nowhere is not an llmc model folder (expected plan.json and model.safetensors in it "
                     "or in nowhere/model, or a training checkpoint's meta.json)"] * 6


CROSS_FIELD = """\
extends = "presets/llama3.toml"
[model]
d_model = 4096
n_layers = "many"
n_heads = 32
n_kv_heads = 7
ffn_hidden = 14336
max_seq_len = 8192
[train]
seq_len = 4096
global_batch_size = 8
max_steps = 10
[parallel]
dp = 3
[hardware]
gpus_per_node = 0
"""


def test_lint_reports_cross_field_mistakes_beside_field_errors_in_one_run(write_spec):
    path = write_spec(CROSS_FIELD)
    expected = [(4, "model.n_layers", "expected an integer, found 'many'"),
                (6, "model.n_kv_heads", "must divide n_heads (expected a divisor of 32, found 7)"),
                (11, "train.global_batch_size", "must divide over dp = 3"),
                (16, "hardware.gpus_per_node", "expected a value >= 1, found 0")]

    def lint(*args):
        done = subprocess.run([sys.executable, "-m", "llmc.compiler.cli", "lint", str(path), *args],
                              capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 1 and "Traceback" not in done.stderr + done.stdout, done.stderr
        return done.stdout

    out = lint().splitlines()
    assert len(out) == len(expected), out
    for line, (number, key, fragment) in zip(out, expected):
        assert line.startswith(f"{path}:{number}: {key}: ") and fragment in line, (line, fragment)
    report = json.loads(lint("--format", "json"))["problems"]
    assert [(p["line"], p["key"]) for p in report] == [(n, k) for n, k, _ in expected]
    github = lint("--format", "github").splitlines()
    assert github[1].startswith(f"::error file={path},line=6,title=llmc lint::model.n_kv_heads: n_kv_heads must divide")


def test_train_refuses_a_process_count_below_one(capsys):
    """--nproc 0 once meant "the plan's world size" and trained the whole run."""
    for bad in ("0", "-2", "two"):
        with pytest.raises(SystemExit) as e:
            main(["train", str(SPECS / "tiny.toml"), "--nproc", bad])
        assert e.value.code == 2 and "expected a positive integer" in capsys.readouterr().err


WARMUP_PAST_THE_RUN = ("[model]\nvocab_size = 64\nd_model = 32\nn_layers = 1\nn_heads = 2\nffn_hidden = 64\n"
                       "max_seq_len = 16\n[train]\nseq_len = 16\nglobal_batch_size = 2\nmax_steps = 4\n"
                       "[train.schedule]\nwarmup_steps = 10\n")


def test_a_warmup_past_the_run_is_a_warning_at_its_line(write_spec, capsys):
    """Valid, but the learning rate would rise for the whole run to 4/10 of its peak and never
    decay: lint says so at the key's line and passes; json and GitHub formats carry it too."""
    path = write_spec(WARMUP_PAST_THE_RUN)
    assert main(["lint", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        f"warning: {path}:13: train.schedule.warmup_steps: the run warms up for all of its 4 steps and never "
        "decays: the learning rate ends at 40% of train.optimizer.lr (expected warmup_steps below the run's "
        "steps, found 10)"]
    assert "1 spec checked, 0 problems, 1 warning" in captured.err
    assert main(["lint", str(path), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["problems"] == [] and [(w["line"], w["key"]) for w in report["warnings"]] == [
        (13, "train.schedule.warmup_steps")]
    assert main(["lint", str(path), "--format", "github"]) == 0
    assert capsys.readouterr().out.startswith(f"::warning file={path},line=13,title=llmc lint::train.schedule.")
    # a run long enough, or set so on the command line, is fine; the warning names --set when it came from there
    assert main(["lint", str(path), "--set", "train.max_steps=11"]) == 0
    assert "warning" not in capsys.readouterr().out
    assert main(["lint", str(path), "--set", "train.schedule.warmup_steps=4"]) == 0
    assert capsys.readouterr().out.startswith("warning: --set: train.schedule.warmup_steps: ")


def test_a_floor_under_a_constant_schedule_is_a_warning(write_spec, capsys):
    """min_lr_ratio written for a schedule that does not decay: it would never apply. The default
    ratio under a constant schedule, or a written one under a decay, says nothing."""
    constant = WARMUP_PAST_THE_RUN.replace("warmup_steps = 10\n", 'kind = "constant"\n')
    path = write_spec(constant + "min_lr_ratio = 0.05\n")
    assert main(["lint", str(path)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"warning: {path}:14: train.schedule.min_lr_ratio: a constant schedule does not decay, so the learning "
        'rate never reaches min_lr_ratio (expected kind = "cosine" or "linear" to decay to it, found kind = '
        '"constant")']
    for text in (constant, constant.replace('"constant"', '"linear"') + "min_lr_ratio = 0.05\n"):
        assert main(["lint", str(write_spec(text))]) == 0
        assert "warning" not in capsys.readouterr().out


def test_plan_says_the_warnings_of_its_spec_and_plans(write_spec, capsys):
    path = write_spec(WARMUP_PAST_THE_RUN)
    assert main(["plan", str(path), "--format", "json"]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith(f"warning: {path}:13: train.schedule.warmup_steps: the run warms up")
    assert json.loads(captured.out)["layout"] is not None


def test_shipped_specs_have_no_warnings():
    from llmc.compiler.spec import load_spec
    for path in sorted(SPECS.glob("*.toml")):
        assert load_spec(path).warnings == [], path


def test_an_output_that_cannot_be_written_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    """llmc schema -o, export hf / quantize -o (a staged folder) and train --out into a path under a
    file: each printed an OSError's traceback."""
    from llmc.compiler.errors import UserError
    from llmc.runtime.data import prepare
    from llmc.runtime.folders import staged_folder

    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert main(["schema", "-o", str(a_file / "schema.json")]) == 1
    assert capsys.readouterr().err == f"error: {a_file / 'schema.json'}: Not a directory\n"

    with pytest.raises(UserError, match=f"cannot write into {a_file / 'model'} \\(Not a directory\\)"):
        with staged_folder(a_file / "model"):
            pass

    monkeypatch.setattr(prepare, "prepare", lambda spec: tmp_path)  # (no data needed here)
    monkeypatch.setattr(prepare, "summary", lambda folder: "prepared")
    assert main(["train", str(SPECS / "tiny.toml"), "--out", str(a_file / "run")]) == 1
    err = capsys.readouterr().err
    assert err.rstrip().splitlines()[-1] == f"error: {a_file / 'run'}: Not a directory" and "Traceback" not in err


def test_a_reader_that_left_ends_the_output_quietly():
    """`llmc schema | head -1`: the pipe closes before llmc writes; no 'Broken pipe' error."""
    p = subprocess.Popen([sys.executable, "-m", "llmc.compiler.cli", "schema"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait() == 0 and err == ""
