"""A checkpoint damaged after it was completed (meta.json truncated, not an object or without a key
it records; a rank's rank{r}.pt truncated or missing): `llmc train --resume`, eval and generate
refuse it in one error line naming the damaged file, and the run keeps its checkpoints, metrics,
model and report (they raised KeyError / JSONDecodeError / FileNotFoundError with a traceback).
Moving the damaged checkpoint aside, as the message says, resumes from the one before it."""

import hashlib
import json
import shutil

import pytest

from llmc.compiler.cli import main as llmc
from train_helpers import llmc_train, metrics, train_args

RUN = ["train.max_steps=2", "train.checkpoint_every=1", "train.keep_checkpoints=2", "train.eval_every=0",
       "train.global_batch_size=4", "train.micro_batch_size=2"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-step run with checkpoints at steps 1 and 2."""
    tmp = tmp_path_factory.mktemp("resume_errors")
    done = llmc_train(tmp, "run", *RUN)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp


def _copy(finished, name):
    """A copy of the finished run beside it (the spec records the data cache, so it stays shared)."""
    shutil.copytree(finished / "run", finished / f"run-{name.replace(' ', '-')}")
    return finished / f"run-{name.replace(' ', '-')}"


def _truncate(file):
    file.write_bytes(file.read_bytes()[: len(file.read_bytes()) // 2])


def _without(key):
    def damage(file):
        meta = json.loads(file.read_text())
        del meta[key]
        file.write_text(json.dumps(meta))
    return damage


DAMAGES = {  # (file in the newest checkpoint, how it is damaged)
    "meta truncated": ("meta.json", _truncate),
    "meta not an object": ("meta.json", lambda f: f.write_text("[1, 2]")),
    "meta without spec": ("meta.json", _without("spec")),
    "meta without step": ("meta.json", _without("step")),
    "rank state truncated": ("rank0.pt", _truncate),
    "rank state missing": ("rank0.pt", lambda f: f.unlink()),
}


def _digests(run):
    """Everything a resume must not lose (plan.json and spec.toml are the new command's, as on any resume)."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name not in ("plan.json", "spec.toml") or p.parent.name == "model"}


def _one_error_line(err: str, names: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and [line for line in lines if line.startswith("error:")] == [lines[-1]], err
    assert names in lines[-1], err


@pytest.mark.parametrize("damage", DAMAGES)
def test_resume_from_a_damaged_checkpoint_is_one_error_line_and_loses_nothing(finished, tmp_path, damage, capsys):
    name, spoil = DAMAGES[damage]
    run = _copy(finished, damage)
    damaged = run / "checkpoints" / "step-00000002" / name
    spoil(damaged)
    before = _digests(run)

    code = llmc(train_args(finished, run.name, *RUN[1:], "train.max_steps=3", resume=True))
    err = capsys.readouterr().err
    assert code == 1
    _one_error_line(err, f"{damaged}: damaged checkpoint")
    assert _digests(run) == before
    assert [m["step"] for m in metrics(run)] == [1, 2]


@pytest.mark.parametrize("damage", ["meta truncated", "meta without spec"])
def test_eval_and_generate_of_a_damaged_checkpoint_name_its_meta_json(finished, tmp_path, damage, capsys):
    name, spoil = DAMAGES[damage]
    shutil.copytree(finished / "run", tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002"
    spoil(ckpt / name)
    (tmp_path / "text.txt").write_text("def f(x):\n    return x\n")
    shutil.rmtree(tmp_path / "run" / "model")  # the run directory then resolves to its newest checkpoint
    for argv in (["eval", str(ckpt), "--text-file", str(tmp_path / "text.txt")],
                 ["generate", str(tmp_path / "run"), "--prompt", "def ", "--max-new-tokens", "2"]):
        assert llmc(argv) == 1
        _one_error_line(capsys.readouterr().err, f"{ckpt / 'meta.json'}: damaged checkpoint")


def test_moving_the_damaged_checkpoint_aside_resumes_from_the_one_before(finished, tmp_path, capsys):
    run = _copy(finished, "aside")
    _truncate(run / "checkpoints" / "step-00000002" / "meta.json")
    assert llmc(train_args(finished, run.name, *RUN[1:], "train.max_steps=3", resume=True)) == 1
    assert "move step-00000002 out of" in capsys.readouterr().err
    shutil.move(run / "checkpoints" / "step-00000002", tmp_path / "aside")

    assert llmc(train_args(finished, run.name, *RUN[1:], "train.max_steps=3", resume=True)) == 0
    capsys.readouterr()
    straight = {m["step"]: m["loss"] for m in metrics(finished / "run")}
    resumed = {m["step"]: m["loss"] for m in metrics(run)}
    assert sorted(resumed) == [1, 2, 3]
    assert resumed[2] == pytest.approx(straight[2], rel=1e-6)  # step 2 redone from step 1's state
    assert json.loads((run / "report.json").read_text())["steps"] == 3
