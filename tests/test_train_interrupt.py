"""`llmc train` interrupted (Ctrl-C): besides 'interrupted' (exit 130) it says what the run keeps,
its newest complete checkpoint, and that --resume continues from that step (it said nothing, so
a user could not tell whether the work was lost or how to go on)."""

import json

from llmc.compiler.cli import main as llmc
from train_helpers import REPO


def test_interrupted_training_names_the_checkpoint_it_resumes_from(tmp_path, monkeypatch, capsys):
    from llmc.runtime.data import prepare
    from llmc.runtime.train import loop

    def train_until_interrupted(plan, run_dir, env, resume=False):
        root = run_dir / "checkpoints"
        (root / "step-00000004").mkdir(parents=True)
        (root / "step-00000004" / "meta.json").write_text(json.dumps({"step": 4, "world_size": 1, "spec": {}}))
        (root / ".tmp-step-00000006").mkdir()  # being written when Ctrl-C came: not complete
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "prepare", lambda spec: tmp_path)  # (no data needed here)
    monkeypatch.setattr(prepare, "summary", lambda folder: "prepared")
    monkeypatch.setattr(loop, "train", train_until_interrupted)
    run_dir = tmp_path / "run"
    assert llmc(["train", str(REPO / "specs" / "tiny.toml"), "--out", str(run_dir)]) == 130
    err = capsys.readouterr().err
    assert f"{run_dir} keeps step-00000004" in err and "--resume continues from step 4" in err, err
    assert err.rstrip().endswith("interrupted") and "Traceback" not in err
